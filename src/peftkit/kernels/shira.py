"""Sparse weight updates (SHiRA) without a dense delta: ``y = x (W + S)ᵀ + b`` for a sparse ``S``.

``S`` holds ``nnz`` values at fixed positions of the (out, in) weight. Three formulations
were measured (2-core CPU, 512-token batch, r=16, so nnz = 16·(out+in)):

* dense delta (HF PEFT): clone ``W``, add ``S``, one GEMM; the backward forms the full
  ``gᵀx`` product (out×in) and gathers nnz entries: a second full-size GEMM and an out×in
  clone per forward.
* base GEMM + sparse product: ``x Wᵀ + spmm(S, x)``; the sparse products (CSR) cost 40% of
  the base GEMM each at this density, three of them per step.
* **patch in place** (used here): write ``W + S`` into the nnz positions of ``W`` itself,
  run the base GEMM, and write the saved originals back, so forward and the input gradient
  cost exactly the base layer's GEMMs plus O(nnz) gathers/scatters; the values' gradient is
  a sampled product ``(gᵀx)[i, j]`` for the nnz positions only (``sampled_addmm``), never the
  dense ``gᵀx``. Nothing of size out×in is allocated and only the input is saved for backward.

The restore writes back the exact original values (not ``w + v − v``), so the base weight is
bit-for-bit unchanged after every call. A lock makes the patch-compute-restore sequence
atomic for threads sharing one model.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch
import torch.nn.functional as F

from .autocast import autocast_dtype

_PATCH_LOCK = threading.RLock()
# torch flags every CSR tensor as "beta"; the few operations used here are tested against a dense reference
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


class SparsePattern:
    """Where an adapter's values sit in the weight, in the forms the kernels need.

    Attributes:
        flat: (nnz,) int64 positions in the base weight's own storage order (file order).
        shape: the canonical (out, fan_in) shape.
        crow, col: CSR of the canonical (out, fan_in) matrix.
        order: (nnz,) positions of the CSR entries in file order (None: the same order).

    The CSR of the transposed matrix, used only by ``sparse_delta``'s input gradient, is built
    on first use.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, flat: torch.Tensor, shape: tuple[int, int]) -> None:
        """From canonical (row, col) pairs (nnz,) of an integer dtype and storage positions (nnz,) int64, in file order.

        When the file order is already the CSR order (a row-major mask on nn.Linear), ``col`` is
        ``cols`` itself, so the CSR adds only ``crow`` to the positions the layer keeps anyway.
        """
        self.flat, self.shape = flat, shape
        self.crow, self.col, self.order = _csr(rows, cols, shape[0], shape[1])
        self._transposed: tuple | None = None

    def coo(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical (rows, cols) in CSR order."""
        rows = torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.col.device, dtype=self.col.dtype), self.crow.diff().long()
        )
        return rows, self.col

    def values(self, v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The file-ordered values in CSR order."""
        order = self._t()[2] if transposed else self.order
        return v if order is None else v.index_select(0, order)

    def csr(self, v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        crow, col = self._t()[:2] if transposed else (self.crow, self.col)
        shape = self.shape[::-1] if transposed else self.shape
        return torch.sparse_csr_tensor(crow, col, self.values(v, transposed), shape, check_invariants=False)

    def _t(self) -> tuple:
        if self._transposed is None:
            rows, cols = self.coo()  # CSR order; map the transposed order back to file order below
            crow_t, col_t, order_t = _csr(cols, rows, self.shape[1], self.shape[0])
            if self.order is not None:
                order_t = self.order if order_t is None else self.order[order_t]
            self._transposed = (crow_t, col_t, order_t)
        return self._transposed

    def sampled_grad(self, g: torch.Tensor, x: torch.Tensor | None = None, xt: torch.Tensor | None = None) -> torch.Tensor:
        """``(gᵀ x)[i, j]`` at the pattern's positions, in file order; g (N, out), x (N, in) or xt = xᵀ (in, N).

        The kernel dots token-contiguous rows of gᵀ and xᵀ: given ``xt`` (contiguous), it makes no copy of x.
        """
        dtype = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        # zeros, not empty: beta=0 still multiplies (0·NaN = NaN); made per call, not kept (nnz floats per layer)
        zeros = torch.sparse_csr_tensor(
            self.crow, self.col, torch.zeros(self.col.numel(), dtype=dtype, device=g.device), self.shape,
            check_invariants=False,
        )
        mat2 = x.to(dtype) if xt is None else xt.to(dtype).t()  # (N, in); with xt, column-major already
        # a row-major gᵀ: the kernel's own copy of the transposed view is ~10% slower (measured)
        vals = torch.sparse.sampled_addmm(zeros, g.t().to(dtype).contiguous(), mat2, beta=0.0).values()
        if self.order is None:
            return vals
        return torch.empty_like(vals).index_copy_(0, self.order, vals)


def _csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> tuple:
    """(crow, col, order) of the CSR of these positions; indices int32 when nnz and the columns fit in it."""
    index_dtype = torch.int32 if max(rows.numel(), n_cols) < 2**31 else torch.int64
    key = rows.long() * n_cols + cols
    order = torch.argsort(key)
    if bool((order[1:] > order[:-1]).all()):
        order_out, col, sorted_rows = None, cols, rows
    else:
        order_out, col, sorted_rows = order, cols[order], rows[order]
    crow = torch.zeros(n_rows + 1, dtype=index_dtype, device=rows.device)
    crow[1:] = torch.bincount(sorted_rows.long(), minlength=n_rows).cumsum(0)
    return crow, col.to(index_dtype).contiguous(), order_out


class _Patched:
    """``with _Patched(weight, pattern, values):`` the weight holds ``W + S`` inside, ``W`` after."""

    def __init__(self, weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> None:
        self.storage = weight.data.view(-1) if weight.is_contiguous() else None
        self.weight, self.flat, self.values = weight, flat, values

    def __enter__(self) -> None:
        _PATCH_LOCK.acquire()
        try:
            if self.storage is None:
                raise RuntimeError("SHiRA needs a contiguous base weight.")
            self.orig = self.storage.index_select(0, self.flat)
            self.storage.index_copy_(0, self.flat, (self.orig.to(self.values.dtype) + self.values).to(self.storage.dtype))
        except BaseException:
            _PATCH_LOCK.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.storage.index_copy_(0, self.flat, self.orig)
        finally:
            _PATCH_LOCK.release()


class _ShiraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, w2d, bias, values, pattern, scale, xt):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        with _Patched(weight, pattern.flat, values if scale == 1.0 else values * scale):
            out = F.linear(x2, w2d, bias)
        # backward needs x only for the values' gradient, and there token-major (xt): keep that instead
        ctx.save_for_backward(x2 if xt is None else xt, values)
        ctx.weight, ctx.w2d, ctx.pattern, ctx.scale, ctx.x_shape = weight, w2d, pattern, scale, x.shape
        ctx.token_major = xt is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_saved, values = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            with _Patched(ctx.weight, ctx.pattern.flat, values if ctx.scale == 1.0 else values * ctx.scale):
                grad_x = (g @ ctx.w2d).view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_v = (ctx.pattern.sampled_grad(g, xt=x_saved) if ctx.token_major
                      else ctx.pattern.sampled_grad(g, x_saved))
            grad_v = (grad_v if ctx.scale == 1.0 else grad_v.mul_(ctx.scale)).to(values.dtype)
        return grad_x, None, None, None, grad_v, None, None, None


_TOKEN_MAJOR = threading.local()


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (in, N) contiguous, shared by the layers that read the same input tensor (q, k, v; gate, up).

    One entry per thread, held weakly: it lives as long as the autograd graph that saved it, and is
    reused only for the very same tensor at the same version.
    """
    entry = getattr(_TOKEN_MAJOR, "entry", None)
    if entry is not None:
        source, version, kept = entry
        xt = kept()
        if xt is not None and source() is x and version == x._version:
            return xt
    xt = x.reshape(-1, x.shape[-1]).t().contiguous()
    _TOKEN_MAJOR.entry = (weakref.ref(x), x._version, weakref.ref(xt))
    return xt


def shira_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    w2d: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    pattern: SparsePattern,
    scale: float = 1.0,
) -> torch.Tensor:
    """``F.linear(x, w2d + scale·S, bias)`` for a frozen weight, with S given by ``values`` at ``pattern``.

    Args:
        x: input (..., in).
        weight: the base layer's weight tensor as stored (patched through ``pattern.flat``).
        w2d: the same weight as an (out, in) view.
        bias: the frozen base bias or None.
        values: (nnz,) the adapter's values, in file order.
        pattern: the positions.
        scale: multiplies the values.
    """
    training = values.requires_grad and torch.is_grad_enabled()
    return _ShiraLinear.apply(x, weight, w2d, bias, values, pattern, scale, _token_major(x) if training else None)


class _SparseDelta(torch.autograd.Function):
    """``x Sᵀ`` alone (for paths that add adapters to an existing output): spmm both ways."""

    @staticmethod
    def forward(ctx, x, values, pattern):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        s = pattern.csr(values.to(x2.dtype) if x2.dtype in (torch.float32, torch.float64) else values.float())
        y = (s @ x2.t().to(s.dtype)).t().to(x.dtype)  # (N, out)
        ctx.save_for_backward(x2, values)
        ctx.pattern, ctx.x_shape = pattern, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, values = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            st = ctx.pattern.csr(values.to(g.dtype) if g.dtype in (torch.float32, torch.float64) else values.float(), True)
            grad_x = (st @ g.t().to(st.dtype)).t().to(x2.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_v = ctx.pattern.sampled_grad(g, x2).to(values.dtype)
        return grad_x, grad_v, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """``x Sᵀ`` (..., out) for the sparse (out, in) matrix S given by ``values`` at ``pattern``.

    In ``x``'s dtype (float32 math for half types); autocast is off inside (sparse CPU matmuls have no bfloat16).
    """
    if autocast_dtype(x.device.type) is None:
        return _SparseDelta.apply(x, values, pattern)
    with torch.autocast(x.device.type, enabled=False):
        return _SparseDelta.apply(x, values, pattern)


def shira_linear_reference(x, w2d, bias, values, rows, cols, scale=1.0):
    """The definition both kernels must match: a dense delta."""
    delta = torch.zeros(w2d.shape, dtype=values.dtype, device=values.device).index_put((rows, cols), values * scale)
    return F.linear(x, w2d + delta.to(w2d.dtype), bias)
