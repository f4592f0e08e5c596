"""DoRA: the weight is split into a per-output magnitude ``m`` and a direction.

``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖`` with the norm taken per output row of the weight in
its (out, fan_in) layout (for an embedding that is per embedding dimension). The forward
never forms ``W + s·BA``: with the base output ``y = Wx + b`` and the LoRA output ``l = s·BAx``,

    out = b + (m / n) ⊙ (y − b + l)

and the squared row norm is expanded so that nothing out×in is created:

    n² = ‖W‖² + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)

``‖W‖²`` only changes when the base weight does, so it is cached on the weight's version;
``n`` itself is cached on the versions of W, A and B, so inference computes it once. As the
DoRA paper advises, ``n`` is treated as a constant in backward (no gradient flows through it).
"""

from __future__ import annotations

import torch
from torch import nn


class Magnitude(nn.Module):
    """Holds one adapter's magnitude vector as ``weight`` (in memory ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None
        self._wsq_cache: tuple[tuple, torch.Tensor] | None = None

    def direction_norm(
        self, w2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, stored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``‖W + s·BA‖`` per row, detached, cached while W, A and B are unchanged.

        ``w2d`` may be a function giving W: it is called only when the norm must be computed. W's
        identity for the cache is ``stored`` (the tensor W is read from, e.g. a quantized layer's
        packed weight), else W itself.
        """
        if torch.compiler.is_compiling():  # no cache: the keys (versions, data pointers) cannot be traced
            w2d = w2d if isinstance(w2d, torch.Tensor) else w2d()
            with torch.no_grad():
                w_sq = w2d.float().pow(2).sum(1)
            return row_norm_of_sum(w_sq, w2d, a, b, scale)
        ref = stored if stored is not None else w2d
        wkey = (ref._version, ref.data_ptr())
        key = (*wkey, a._version, b._version, a.data_ptr(), b.data_ptr(), scale)
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        if not isinstance(w2d, torch.Tensor):
            w2d = w2d()
        if self._wsq_cache is None or self._wsq_cache[0] != wkey:
            with torch.no_grad():
                self._wsq_cache = (wkey, w2d.float().pow(2).sum(1))
        norm = row_norm_of_sum(self._wsq_cache[1], w2d, a, b, scale)
        self._norm_cache = (key, norm)
        return norm


@torch.no_grad()
def row_norm_of_sum(w_sq: torch.Tensor, w2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of ``W + scale·B A`` from ``‖W‖²`` per row, without forming the (out, in) sum.

    Args:
        w_sq: (out,) squared row norms of W.
        w2d: (out, in) the base weight.
        a: (r, in) LoRA A.
        b: (out, r) LoRA B.
        scale: the LoRA scaling.
    """
    a32, b32 = a.float(), b.float()
    cross = (w2d.to(a32.dtype) @ a32.t()).mul_(b32).sum(1)  # (out,): <W_i, (BA)_i>
    gram = a32 @ a32.t()  # (r, r)
    lora_sq = (b32 @ gram).mul_(b32).sum(1)  # (out,): ‖(BA)_i‖²
    n_sq = w_sq + 2 * scale * cross + scale * scale * lora_sq
    return n_sq.clamp_min_(0).sqrt_().to(a.dtype)


def channel_view(v: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Shape a per-output-channel vector to broadcast against ``out``."""
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    return v.view(shape)
