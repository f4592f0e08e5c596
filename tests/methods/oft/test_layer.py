"""OFT in peftkit alone: the math of the forward and of merging, several adapters, mixed batches,
dropout, COFT, validation, and training.

The forward of an OFT layer is ``base(x R)`` with ``R`` block-diagonal (Cayley blocks); merging
writes ``W Rᵀ``. Dense references here build ``R`` with ``torch.block_diag``.
"""

from __future__ import annotations

import copy
import warnings
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import peftkit
from peftkit import AdapterLayer
from peftkit.kernels.orthogonal import cayley, skew_from_packed

from .helpers import base_of, fresh_net, make, net_inputs, out, quiet_call


def _layer(model, name: str):
    return dict(model.get_base_model().named_modules())[name]


def _dense_r(layer, adapter: str = "default") -> torch.Tensor:
    """The adapter's (fan_in, fan_in) block-diagonal rotation, in float64."""
    w = layer.oft_R[adapter].weight.detach().double()
    bs = layer.oft_block_size[adapter]
    blocks = cayley(skew_from_packed(w, bs), layer.neumann_terms[adapter])
    n = layer.fan_in // bs
    return torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i] for i in range(n)])


def _w2d(base: nn.Module) -> torch.Tensor:
    return base.weight.detach().double().reshape(base.weight.shape[0], -1)


# ------------------------------------------------------------------ forward / merge math
@pytest.mark.parametrize("cfg", [{"oft_block_size": 4}, {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
                                 {"oft_block_size": 2, "block_share": True}, {"oft_block_size": 4,
                                                                              "num_cayley_neumann_terms": 3}])
def test_linear_forward_and_merge_match_dense_math(cfg):
    model = make("OFTConfig", "peftkit", "net", **cfg)
    layer = _layer(model, "lin")
    r = _dense_r(layer)
    assert r.shape == (8, 8)
    base = layer.base_layer
    x = net_inputs()["x"]
    expected = F.linear(x.double() @ r, _w2d(base), base.bias.double())
    assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(merged.lin.weight.double(), _w2d(base) @ r.T, atol=1e-6, rtol=1e-6)
    assert torch.equal(merged.lin.bias, base.bias)


def test_conv2d_forward_rotates_the_weight():
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4)
    layer = _layer(model, "conv")
    base = layer.base_layer
    r = _dense_r(layer)
    assert r.shape == (36, 36)
    w = (_w2d(base) @ r.T).reshape(base.weight.shape)
    img = net_inputs()["img"]
    expected = F.conv2d(img.double(), w, base.bias.double(), stride=2, padding=1)
    assert_close(layer(img).double(), expected, atol=1e-5, rtol=1e-5)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(merged.conv.weight.double(), w, atol=1e-6, rtol=1e-6)


def test_exact_blocks_orthogonal_neumann_nearly():
    exact = make("OFTConfig", "peftkit", "net", oft_block_size=4, use_cayley_neumann=False)
    r = _dense_r(_layer(exact, "conv"))
    assert_close(r.T @ r, torch.eye(36, dtype=torch.float64), atol=1e-10, rtol=0)
    neumann = make("OFTConfig", "peftkit", "net", oft_block_size=4)
    r = _dense_r(_layer(neumann, "conv"))
    err = (r.T @ r - torch.eye(36, dtype=torch.float64)).abs().max()
    assert 1e-8 < err < 0.1  # init N(0, 0.1²): small Q, small truncation error


def test_gpt2_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D stores (in, out): the merged weight is R W_stored; outputs match merged."""
    model = make("OFTConfig", "peftkit", "gpt2", oft_block_size=4)
    assert model.peft_config["default"].fan_in_fan_out
    layer = _layer(model, "transformer.h.0.attn.c_attn")
    r = _dense_r(layer)
    stored = layer.base_layer.weight.detach().double()  # (16, 48)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(merged.transformer.h[0].attn.c_attn.weight.double(), r @ stored, atol=1e-6, rtol=1e-6)
    assert_close(out(merged, "gpt2"), out(model, "gpt2"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out(model, "gpt2"), out(base_of("gpt2"), "gpt2"), atol=1e-5)


# ------------------------------------------------------------------ merge / unmerge / unload / delete
@pytest.mark.parametrize("neumann", [True, False])
def test_merge_unmerge_restores_weights(neumann):
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4, use_cayley_neumann=neumann)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    expected = out(model, "net")
    model.merge_adapter()
    assert _layer(model, "lin").merged and _layer(model, "conv").merged
    assert_close(out(model, "net"), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        assert_close(v, before[k], atol=1e-5, rtol=1e-5, msg=k)
    assert_close(out(model, "net"), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_and_non_finite():
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4)
    expected = out(model, "net")
    model.merge_adapter(safe_merge=True)
    assert_close(out(model, "net"), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with torch.no_grad():
        _layer(model, "conv").oft_R["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "oft_R" not in k}
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    for k, v in before.items():
        assert torch.equal(model.get_base_model().state_dict()[k], v), k
    assert not _layer(model, "lin").merged


def test_merge_and_unload_unload_disable_delete():
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4)
    base_out = out(fresh_net(), "net")
    expected = out(model, "net")
    assert not torch.allclose(expected, base_out, atol=1e-4)
    with model.disable_adapter():
        assert_close(out(model, "net"), base_out)
    assert_close(out(model, "net"), expected)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload, safe_merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert_close(out(merged, "net"), expected, atol=1e-5, rtol=1e-5)
    plain = copy.deepcopy(model).unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert_close(out(plain, "net"), base_out)
    model.add_adapter("other", peftkit.OFTConfig(oft_block_size=2, target_modules=["lin", "conv"], init_weights=False))
    model.delete_adapter("other")
    assert not any(".other" in k for k in model.state_dict())
    assert_close(out(model, "net"), expected)
    model.delete_adapter("default")
    assert_close(out(model, "net"), base_out)


def _two(neumann: bool = False):
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4, use_cayley_neumann=neumann)
    torch.manual_seed(7)
    model.add_adapter("b", peftkit.OFTConfig(oft_block_size=2, target_modules=["lin", "conv"], init_weights=False,
                                             use_cayley_neumann=neumann))
    return model.eval()


@pytest.mark.parametrize("neumann", [True, False])
def test_several_active_adapters_compose_as_merging(neumann):
    model = _two(neumann)
    model.base_model.set_adapter(["default", "b"])
    lin = _layer(model, "lin")
    ra, rb = _dense_r(lin, "default"), _dense_r(lin, "b")
    x = net_inputs()["x"]
    # the last active adapter rotates first: x M_b M_a  (what merging a then b writes)
    w = _w2d(lin.base_layer)
    expected = F.linear(x.double() @ rb @ ra, w, lin.base_layer.bias.double())
    assert_close(lin(x).double(), expected, atol=1e-5, rtol=1e-5)
    stacked = out(model, "net")
    model.merge_adapter()
    assert_close(out(model, "net"), stacked, atol=1e-5, rtol=1e-5)
    assert_close(lin.base_layer.weight.double(), w @ ra.T @ rb.T, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert_close(out(model, "net"), stacked, atol=1e-5, rtol=1e-5)
    # and it is neither adapter alone
    model.base_model.set_adapter("b")
    assert not torch.allclose(out(model, "net"), stacked, atol=1e-4)


def test_mixed_batch_equals_per_sample():
    model = _two()
    names = ["default", "b", "__base__", "b"]
    inp = net_inputs(batch=4)
    with torch.no_grad():
        mixed = model(**inp, adapter_names=names)
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in inp.items()}
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(**one)
            else:
                model.base_model.set_adapter(name)
                expected = model(**one)
        assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ dropout, COFT
def test_module_dropout_drops_blocks_in_training_only():
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4, module_dropout=0.5, use_cayley_neumann=False)
    lin = _layer(model, "lin")
    x = net_inputs()["x"].double()
    w, b = _w2d(lin.base_layer), lin.base_layer.bias.double()
    r = _dense_r(lin)
    eye = torch.eye(4, dtype=torch.float64)
    # int(0.5 * 2 blocks) = 1 block becomes the identity
    candidates = [F.linear(x @ torch.block_diag(eye, r[4:, 4:]), w, b),
                  F.linear(x @ torch.block_diag(r[:4, :4], eye), w, b)]
    model.eval()
    eval_out = lin(x.float()).double()
    assert_close(eval_out, F.linear(x @ r, w, b), atol=1e-5, rtol=1e-5)
    model.train()
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        y = lin(x.float()).double()
        hits = [i for i, c in enumerate(candidates) if torch.allclose(y, c, atol=1e-5)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == {0, 1}


def test_coft_projects_blocks_to_radius():
    eps = 1e-2
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4, coft=True, eps=eps)
    with torch.no_grad():
        for layer in (_layer(model, "lin"), _layer(model, "conv")):
            layer.oft_R["default"].weight.mul_(10.0)
    out(model, "net")
    for layer in (_layer(model, "lin"), _layer(model, "conv")):
        w = layer.oft_R["default"].weight.detach()
        q = skew_from_packed(w, 4)
        radius = eps / math.sqrt(w.shape[0])
        norms = q.flatten(1).norm(dim=1)
        assert_close(norms, torch.full_like(norms, radius), atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw,match", [({"r": 2, "oft_block_size": 4}, "exactly one of r"),
                                      ({"r": 0, "oft_block_size": 0}, "exactly one of r"),
                                      ({"oft_block_size": -1}, "non-negative"),
                                      ({"oft_block_size": 4, "bias": "lora_only"}, "oft_only"),
                                      ({"oft_block_size": 4, "num_cayley_neumann_terms": 0}, "positive integer")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        peftkit.OFTConfig(target_modules=["lin"], **kw)


def test_failed_injection_leaves_model_unchanged():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.lin(x))

    torch.manual_seed(0)
    model = WithNorm()
    reference = copy.deepcopy(model)
    with pytest.raises(TypeError, match="norm"):
        peftkit.get_peft_model(model, peftkit.OFTConfig(oft_block_size=4, target_modules=["lin", "norm"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()


# ------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None)
@given(
    blocks=st.integers(1, 4), bs=st.integers(1, 5), out_features=st.integers(1, 9), bias=st.booleans(),
    neumann=st.sampled_from([None, 2, 3, 5]), share=st.booleans(), seed=st.integers(0, 2**16),
)
def test_forward_equals_linear_with_merged_weight(blocks, bs, out_features, bias, neumann, share, seed):
    torch.manual_seed(seed)
    fan_in = blocks * bs
    model = nn.Sequential(nn.Linear(fan_in, out_features, bias=bias))
    cfg = peftkit.OFTConfig(oft_block_size=bs, target_modules=["0"], init_weights=False, block_share=share,
                            use_cayley_neumann=neumann is not None, num_cayley_neumann_terms=neumann or 5)
    peft_model = quiet_call(peftkit.get_peft_model, model, cfg).eval()
    x = torch.randn(3, 2, fan_in)
    with torch.no_grad():
        y = peft_model(x)
        merged = quiet_call(copy.deepcopy(peft_model).merge_and_unload)[0]
    assert_close(y, F.linear(x, merged.weight, merged.bias), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ training
def test_training_changes_only_oft_params_and_lowers_loss():
    model = make("OFTConfig", "peftkit", "net", oft_block_size=4, init_weights=True)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".oft_R." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inp = net_inputs(batch=8)
    torch.manual_seed(3)
    target = torch.randn_like(model(**inp))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.mse_loss(model(**inp), target)
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


# ------------------------------------------------------------------ embeddings (PEFT's oft_embedding_R)
@pytest.mark.parametrize("kw", [dict(oft_block_size=8, r=0), dict(oft_block_size=8, r=0, use_cayley_neumann=False),
                                dict(oft_block_size=16, r=0, block_share=True)], ids=["neumann", "exact", "shared"])
def test_embedding_rotates_its_output_like_peft_both_ways(kw, tmp_path):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100)
        return LlamaForCausalLM(cfg).eval()

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    models = {}
    for name, lib in (("peft", peft), ("peftkit", peftkit)):
        torch.manual_seed(1)
        cfg = lib.OFTConfig(target_modules=["embed_tokens", "q_proj"], init_weights=False, **kw)
        models[name] = lib.get_peft_model(llama(), cfg).eval()
    a, b = models["peft"], models["peftkit"]
    layer = b.base_model.model.model.embed_tokens
    assert list(layer.oft_embedding_R) == ["default"] and not len(layer.oft_R)
    with torch.no_grad():  # the same seed draws the same tensors; copy anyway so the check is about the math
        pa = dict(a.named_parameters())
        for n, p in b.named_parameters():
            if "oft_" in n:
                p.copy_(pa[n])
        ya, yb = a(input_ids=ids).logits, b(input_ids=ids).logits
        assert torch.allclose(ya, yb, atol=1e-6)
        assert not torch.allclose(yb, llama()(input_ids=ids).logits)
        b.merge_adapter()
        assert torch.allclose(b(input_ids=ids).logits, yb, atol=1e-5)
        b.unmerge_adapter()
        assert torch.allclose(layer.base_layer.weight, llama().model.embed_tokens.weight, atol=1e-5)
    b.save_pretrained(tmp_path / "kit")
    a.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a2 = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "kit")).eval()
        b2 = peftkit.PeftModel.from_pretrained(llama(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.allclose(a2(input_ids=ids).logits, yb, atol=1e-6)
        assert torch.allclose(b2(input_ids=ids).logits, ya, atol=1e-6)
