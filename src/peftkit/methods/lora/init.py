"""LoRA initialisations that start from the base weight (PiSSA, OLoRA).

Both return factors ``A`` (r, fan_in) and ``B`` (out, r) and leave the residual
``W − s·BA`` in the base layer, so the model starts exactly where it was. They work on the
weight's canonical (out, fan_in) layout, which covers Linear, Conv1D and Conv layers alike.
"""

from __future__ import annotations

import torch


def pissa(w2d: torch.Tensor, r: int, scale: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal singular values and vectors: ``B A = U_r S_r V_rᵀ / scale``, split evenly by √S.

    Args:
        w2d: (out, in) base weight.
        r: rank.
        scale: the LoRA scaling (the factors are divided by it so that ``scale·BA`` is the top-r part).
        niter: use a randomized low-rank SVD with this many subspace iterations (``pissa_niter_K``).
    """
    w = w2d.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    root = (s / scale).sqrt()
    return root[:, None] * vh, u * root[None, :]


def olora(w2d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal init from a QR decomposition: ``B = Q_r``, ``A = R_r``."""
    q, rr = torch.linalg.qr(w2d.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def parse_pissa(init: str) -> int | None:
    """``"pissa"`` -> None (exact SVD); ``"pissa_niter_K"`` -> K."""
    if init == "pissa":
        return None
    head, _, k = init.partition("_niter_")
    if head != "pissa" or not k.isdigit():
        raise ValueError(f"init_lora_weights={init!r}: use 'pissa' or 'pissa_niter_<iterations>'.")
    return int(k)


def convert_to_plain_lora(config, state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]):
    """Express a trained PiSSA/OLoRA adapter as a plain LoRA against the *original* base weight.

    The trained model computes ``W_res + s·BA`` with ``W_res = W − s·B₀A₀``, so the same
    function is ``W + s·(BA − B₀A₀)``: a LoRA of rank 2r with ``A' = [A; A₀]`` and
    ``B' = [B, −B₀]``. Alpha is doubled (× √2 with rsLoRA) so the scaling stays ``s``.

    Args:
        config: the trained adapter's config (a copy is returned).
        state: the trained adapter's checkpoint tensors.
        initial: the tensors saved right after ``get_peft_model``, before training.
    """
    import copy

    if config.use_dora:
        raise ValueError("A DoRA adapter cannot be converted to plain LoRA (its magnitude is not a low-rank term).")
    missing = [k for k in state if ("lora_A" in k or "lora_B" in k or "lora_embedding" in k) and k not in initial]
    if missing:
        raise ValueError(f"The initial adapter lacks {missing[:3]}: was it saved from this model before training?")
    out = {}
    for key, value in state.items():
        if "lora_A" in key or "lora_embedding_A" in key:
            out[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif "lora_B" in key and key.endswith("weight") or "lora_embedding_B" in key:
            out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            out[key] = value
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    factor = 2**0.5 if config.use_rslora else 2
    config.r *= 2
    config.lora_alpha *= factor
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: factor * v for k, v in config.alpha_pattern.items()}
    return config, out
