"""X-LoRA's own behaviour: config checks, the classifier, gating, logging and control APIs, training."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import XLoraConfig
from peftkit.methods.xlora.classifier import expert_weights

from .conftest import CONFIG, make_base


def build(adapters, **kw):
    return peftkit.get_peft_model(make_base(), XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, **kw)).eval()


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, match", [
    (dict(enable_softmax_topk=True, top_k_lora=1), "mutually exclusive"),
    (dict(enable_softmax=False, enable_softmax_topk=True), "needs top_k_lora"),
    (dict(top_k_lora=0), "at least 1"),
    (dict(xlora_depth=0), "positive integer"),
    (dict(xlora_dropout_p=1.5), "probability"),
    (dict(softmax_temperature=0.0), "positive"),
])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        XLoraConfig(adapters={"a": "x"}, **kw)


def test_defaults_are_the_seed_documents():
    c = XLoraConfig()
    assert (c.hidden_size, c.adapters, c.enable_softmax, c.enable_softmax_topk, c.layerwise_scalings) == (None, {}, True, False, False)
    assert (c.xlora_depth, c.xlora_size, c.xlora_dropout_p, c.use_trainable_adapters) == (1, 2048, 0.2, False)
    assert (c.softmax_temperature, c.top_k_lora, c.scaling_pass_value, c.global_scaling_weight) == (1.0, None, 0.0, 1.0)
    assert c.peft_type == "XLORA"


def test_model_level_errors(experts):
    with pytest.raises(ValueError, match="adapters is empty"):
        build({})
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        build(experts("0", "1"), top_k_lora=3)
    with pytest.raises(ValueError, match="hidden size is 32"):
        build(experts("0", "1"), hidden_size=48)


def test_hidden_size_and_pass_value_are_filled_in(experts):
    model = build(experts("0", "1", "2"), scaling_pass_value=None)
    config = model.peft_config["default"]
    assert config.hidden_size == CONFIG["hidden_size"]
    assert config.scaling_pass_value == pytest.approx(1 / 3)


@pytest.mark.parametrize("expert_kw, match", [
    (dict(use_dora=True, target_modules=["q_proj"]), "DoRA"),
    (dict(init_lora_weights="olora", target_modules=["q_proj"]), "olora"),
])
def test_unsupported_experts_are_refused_and_the_model_is_left_as_it_was(tmp_path, expert_kw, match, experts, ids):
    bad = peftkit.get_peft_model(make_base(), peftkit.LoraConfig(r=2, **expert_kw))
    bad.save_pretrained(str(tmp_path / "bad"))
    base = make_base()
    before = base(input_ids=ids).logits
    with pytest.raises((ValueError, TypeError), match=match):
        peftkit.get_peft_model(base, XLoraConfig(adapters={**experts("0"), "bad": str(tmp_path / "bad")}))
    assert not any("lora" in n for n, _ in base.named_modules())
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(base(input_ids=ids).logits, before)


def test_non_lora_expert_is_refused(tmp_path, experts):
    ia3 = peftkit.get_peft_model(make_base(), peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ValueError, match="LoRA adapters"):
        build({**experts("0"), "ia3": str(tmp_path / "ia3")})


def test_conv_expert_is_refused(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)
            self.config = None

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    lora = peftkit.get_peft_model(Net(), peftkit.LoraConfig(r=2, target_modules=["conv"]))
    lora.save_pretrained(str(tmp_path / "conv"))
    with pytest.raises(TypeError, match="Conv1d"):
        peftkit.get_peft_model(Net(), XLoraConfig(hidden_size=4, adapters={"c": str(tmp_path / "conv")}))


# ---------------------------------------------------------------------------- classifier and gate
@pytest.mark.parametrize("depth, layerwise, dropout", [(1, False, 0.2), (1, True, 0.2), (3, True, 0.2), (2, False, 0.0)])
def test_classifier_layout(experts, depth, layerwise, dropout):
    model = build(experts("0", "1"), xlora_depth=depth, xlora_size=8, layerwise_scalings=layerwise, xlora_dropout_p=dropout)
    layers = list(model.base_model.internal_xlora_classifier.layers)
    n_layers = sum(1 for _ in model.base_model.adapter_layers())
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert len(linears) == depth
    assert linears[0].in_features == 32
    assert linears[-1].out_features == 2 * (n_layers if layerwise else 1)
    assert all(m.out_features == 8 for m in linears[:-1])
    assert sum(isinstance(m, nn.ReLU) for m in layers) == depth - 1
    assert sum(isinstance(m, nn.Dropout) for m in layers) == (depth - 1 if dropout else 0)


def test_non_layerwise_scalings_are_shared_by_every_layer(experts, ids):
    model = build(experts("0", "1"))
    with torch.no_grad():
        model(input_ids=ids)
    s = model.get_latest_scalings()
    assert torch.equal(s, s[:, :, :1].expand_as(s))
    torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:-1]))


def test_expert_weights_top_k_and_softmax_top_k():
    s = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.4, 0.0, 0.3, 0.3]])
    top2 = expert_weights(s, 2, False)
    assert torch.equal((top2 != 0).sum(-1), torch.tensor([2, 2]))
    assert top2[0, 1] == 0.5 and top2[1, 0] == 0.4
    soft = expert_weights(s, 2, True)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    kept = top2 != 0
    expected = torch.softmax(top2.masked_fill(~kept, float("-inf")), -1)
    torch.testing.assert_close(soft, expected)
    assert torch.equal(expert_weights(torch.zeros(3), 1, True), torch.zeros(3))  # nothing kept: zeros, not NaN


def test_temperature_sharpens(experts, ids):
    spread = []
    for t in (1.0, 0.1):
        model = build(experts("0", "1"), softmax_temperature=t)
        torch.manual_seed(0)
        model.base_model.internal_xlora_classifier.layers[0].weight.data.normal_(0, 0.5)
        with torch.no_grad():
            model(input_ids=ids)
        spread.append(model.get_latest_scalings().max(-1).values.mean())
    assert spread[1] > spread[0]


def test_mixture_is_the_weighted_sum_of_experts(experts, ids):
    """Per token: logits equal a model whose layers add Σ_e w_e·s_e·B_e A_e x with the predicted weights."""
    model = build(experts("0", "1", "2"), layerwise_scalings=True, global_scaling_weight=0.5)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    w = model.get_latest_scalings() * 0.5  # (b, s, L, n)
    hooks = []
    for _, layer in model.base_model.adapter_layers():
        def hook(mod, args, out, layer=layer):
            x = args[0]
            extra = 0
            for e in layer.adapters:
                a, b = layer._factors(e)
                h = F.embedding(x, a.t()) if layer.ops.kind == "embedding" else F.linear(x, a)
                extra = extra + F.linear(h, b) * layer.scaling[e] * w[:, :, layer.xlora_index, int(e), None]
                if e in layer.lora_B and layer.lora_B[e].bias is not None:
                    extra = extra + layer.lora_B[e].bias * layer.scaling[e] * 0.5
            return out + extra
        hooks.append(layer.base_layer.register_forward_hook(hook))
    try:
        with torch.no_grad(), model.base_model.lora_model.disable_adapter():
            expected = model.get_base_model()(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- controls
def test_logging_apis(experts, ids):
    model = build(experts("0", "1"))
    with torch.no_grad():
        model(input_ids=ids)
        assert model.get_scalings_log() == []
        model.enable_scalings_logging()
        model(input_ids=ids)
        model(input_ids=ids[:, :3])
        model(input_ids=ids)
        model.disable_scalings_logging()
        model(input_ids=ids)
    log = model.get_scalings_log()
    assert [s.shape[1] for s in log] == [6, 3, 6]
    log.clear()
    assert len(model.get_scalings_log()) == 3  # a copy of the list
    buckets = model.get_bucketed_scalings_log()
    assert sorted(buckets) == [3, 6]
    assert buckets[6][0] == [0, 2] and buckets[3][0] == [1]
    assert torch.equal(buckets[6][1][1], model.get_scalings_log()[2])
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_latest_scalings_before_and_after(experts, ids):
    model = build(experts("0", "1"))
    assert model.get_latest_scalings() is None
    with torch.no_grad():
        model(input_ids=ids)
    assert model.get_latest_scalings().shape == (2, 6, sum(1 for _ in model.base_model.adapter_layers()), 2)


def test_global_scaling_weight(experts, ids):
    model = build(experts("0", "1"))
    assert model.get_global_scaling_weight() == 1.0
    model.set_global_scaling_weight(0.0)
    assert model.peft_config["default"].global_scaling_weight == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, make_base()(input_ids=ids).logits)
        model.set_global_scaling_weight(2.0)
        assert (model(input_ids=ids).logits - make_base()(input_ids=ids).logits).abs().max() > 1e-3


def test_scaling_pass_value_changes_the_gate(experts, ids):
    model = build(experts("0", "1"), layerwise_scalings=True)
    with torch.no_grad():
        model(input_ids=ids)
        zero = model.get_latest_scalings().clone()
        model.set_scaling_pass_value(None)
        assert model.peft_config["default"].scaling_pass_value == 0.5
        model(input_ids=ids)
    assert not torch.allclose(model.get_latest_scalings(), zero)


def test_set_topk_lora(experts, ids):
    model = build(experts("0", "1", "2"))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        model.set_topk_lora(1)
        assert model.peft_config["default"].top_k_lora == 1
        sparse = model(input_ids=ids).logits
        model.set_topk_lora(None)
        torch.testing.assert_close(model(input_ids=ids).logits, dense)
    assert not torch.allclose(sparse, dense)
    with pytest.raises(ValueError, match="between 1"):
        model.set_topk_lora(4)


# ---------------------------------------------------------------------------- training and lifecycle
def test_training_the_classifier_lowers_the_loss(experts, ids):
    model = build(experts("0", "1"), xlora_depth=2, xlora_size=16, layerwise_scalings=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.base_model.internal_xlora_classifier.parameters()}
    opt = torch.optim.Adam(trainable, lr=5e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_trainable_adapters(experts, ids):
    model = build(experts("0", "1"), use_trainable_adapters=True)
    model.train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in names) and any("internal_xlora_classifier" in n for n in names)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = next(layer for _, layer in model.base_model.adapter_layers())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for e in layer.adapters for p in layer.adapter_parameters(e))


def test_expert_dropout_in_training_is_unbiased(tmp_path, ids):
    """Each expert draws its own dropout mask; the mean over draws is the eval output."""
    for name in ("a", "b"):
        lora = peftkit.get_peft_model(make_base(), peftkit.LoraConfig(r=2, lora_dropout=0.5, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
        lora.save_pretrained(str(tmp_path / name))
    model = build({n: str(tmp_path / n) for n in "ab"})
    layer = next(layer for _, layer in model.base_model.adapter_layers())
    x = torch.randn(2, 6, 32)
    from peftkit.methods.xlora.layer import Gate

    gate = Gate(torch.rand(2, 6, 1, 2), 1.0)
    with torch.no_grad():
        expected = layer.mix(x, layer.base_layer(x), gate)
        layer.train()
        torch.manual_seed(0)
        draws = torch.stack([layer.mix(x, layer.base_layer(x), gate) for _ in range(2000)])
    assert not torch.allclose(draws[0], expected)
    bound = 5 * draws.std(0) / len(draws) ** 0.5 + 1e-6  # 5 standard errors of the mean, per element
    assert ((draws.mean(0) - expected).abs() <= bound).all()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(experts, ids, reentrant):
    """The blocks recomputed in backward see the per-token weights of their call."""
    grads = []
    for checkpointing in (False, True):
        model = build(experts("0", "1"), xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)
        torch.manual_seed(3)
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.data.normal_(0, 0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.base_model.internal_xlora_classifier.parameters()])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)
    layer = next(m for m in model.get_base_model().modules() if "_gradient_checkpointing_func" in vars(m))
    assert "_gated_checkpoint" not in getattr(layer._gradient_checkpointing_func, "__qualname__", "")  # put back


def test_disable_adapter_runs_the_base_model_only(experts, ids):
    model = build(experts("0", "1"))
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, make_base()(input_ids=ids).logits)
    assert model.get_latest_scalings() is None  # no scaling pass ran


def test_lifecycle_verbs(experts, ids):
    model = build(experts("0", "1"))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="one mixture"):
        model.add_adapter("other", peftkit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids=ids, adapter_names=["0", "1"])
    with pytest.raises(ValueError, match="not selected"):
        model.set_adapter("0")
    base = model.unload()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in base.named_modules())
    torch.testing.assert_close(base(input_ids=ids).logits, make_base()(input_ids=ids).logits)


def test_gpt2_conv1d_experts(tmp_path):
    """Conv1D (fan_in_fan_out) experts mix like linear ones; generation with the cache equals without."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                          eos_token_id=0)).eval()

    paths = {}
    for i, targets in enumerate((["c_attn"], ["c_attn", "c_fc"])):
        torch.manual_seed(10 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peftkit.get_peft_model(gpt2(), peftkit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
        lora.save_pretrained(str(tmp_path / str(i)))
        paths[f"e{i}"] = str(tmp_path / str(i))
    model = peftkit.get_peft_model(gpt2(), XLoraConfig(task_type="CAUSAL_LM", adapters=paths, layerwise_scalings=True)).eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, **gen), model.generate(input_ids=ids, use_cache=False, **gen))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - gpt2()(input_ids=ids).logits).abs().max() > 1e-4


def test_inputs_embeds_and_masked_batches(experts, ids):
    model = build(experts("0", "1"), layerwise_scalings=True)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        by_ids = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.get_base_model().get_input_embeddings()(ids)
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(by_embeds, by_ids)
    assert model.get_latest_scalings().shape[:2] == ids.shape
