"""Training an (IA)³ adapter: only the vectors move, and the trained adapter saves and loads both ways."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from .helpers import build, inputs, load, make, run, save


def test_train_save_load_both_libraries(tmp_path):
    model = make("peftkit", "bert", init_ia3_weights=True)
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "ia3_" not in k
            and "modules_to_save" not in k and "classifier" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n or "classifier" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs("bert")
    labels = torch.tensor([0, 2])
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    for k, v in model.get_base_model().state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k  # the base model does not move
    model.eval()
    expected = run(model, "bert")
    save(model, tmp_path)
    for lib in ("peftkit", "peft"):
        assert_close(run(load(lib, "bert", tmp_path), "bert"), expected, atol=1e-6, rtol=1e-6)
    again = load("peftkit", "bert", tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in again.named_parameters() if "ia3_l" in n)
    assert not torch.allclose(expected, run(build("bert"), "bert"))
