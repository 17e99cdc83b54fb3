"""Grouped matrix product for experts stored as stacked `[E, K, N]` weights.

Rows of `x [M, K]` are sorted by expert; group e is `x[offsets[e-1]:offsets[e]]` and is multiplied by
`w[e]`. Rows past the last offset (dropped slots) give zeros. One custom op with its own autograd, so
`torch.compile` sees an opaque, shape-known call (no graph break), and eager runs the fastest kernel the
device has: `torch._grouped_mm` for bf16 on CUDA with 16-byte aligned dimensions; on CUDA otherwise, a dense
product of every row with every expert for small layers (sync-free, launch-light) and a per-group product
for large ones (that path reads the offsets on the host: the fallback, not the fast path); a per-group
product on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _native_ok(a: Tensor, b: Tensor) -> bool:
    """bf16 CUDA operands whose rows are 16-byte aligned: `torch._grouped_mm`'s sync-free kernel.

    (torch 2.11 also accepts fp32 on an H100, but reads the offsets on the host for it: measured with
    `torch.cuda.set_sync_debug_mode("error")`; fp32 takes the per-group path, which does the same.)"""
    if not (a.is_cuda and a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16):
        return False
    per_16_bytes = 16 // a.element_size()
    return all(s % per_16_bytes == 0 for s in (a.shape[-1], b.shape[-1]))


# A CUDA layer that `torch._grouped_mm` cannot take (fp32, or unaligned) and that is small enough is computed
# densely: every expert over every row, then each row's own expert picked. E times the arithmetic, but no
# host sync (the per-group loop reads the offsets on the host) and a few kernels instead of 2E: on small
# layers, which are launch-bound, much faster. The bound is on the `[E, N, max(H, I)]` intermediate.
DENSE_LIMIT = 1 << 24


def _dense_ok(x: Tensor, e: int, width: int) -> bool:
    return x.is_cuda and e * x.shape[0] * max(x.shape[1], width) <= DENSE_LIMIT


def _groups(offsets: Tensor, n: int) -> Tensor:
    """[N] the group of each row (E for rows past the last offset)."""
    return torch.searchsorted(offsets, torch.arange(n, dtype=offsets.dtype, device=offsets.device), right=True)


def _dense_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    e, n = w.shape[0], x.shape[0]
    group = _groups(offsets, n).long()
    every = torch.matmul(x.unsqueeze(0), w)  # [E, N, I]
    pick = group.clamp_max(e - 1).view(1, n, 1).expand(1, n, every.shape[-1])
    out = every.gather(0, pick).squeeze(0)
    return torch.where((group < e).unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _dense_weight_grad(x: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    e, n = offsets.shape[0], x.shape[0]
    group = _groups(offsets, n)
    member = (group.unsqueeze(0) == torch.arange(e, dtype=group.dtype, device=group.device).unsqueeze(1))
    return torch.matmul(x.t().unsqueeze(0) * member.to(x.dtype).unsqueeze(1), grad)  # [E, H, N] @ [N, I]


def _loop_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e]
        start = end
    return out


def _loop_weight_grad(x: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    out = x.new_zeros(offsets.shape[0], x.shape[1], grad.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[e] = x[start:end].t() @ grad[start:end]
        start = end
    return out


@torch.library.custom_op("chronomoe_v3::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """`out[r] = x[r] @ w[e(r)]` with e(r) the group of row r; zeros past `offsets[-1]`."""
    if _native_ok(x, w):
        out = torch._grouped_mm(x, w, offs=offsets)
        rows = torch.arange(x.shape[0], device=x.device)
        return torch.where((rows < offsets[-1]).unsqueeze(1), out, torch.zeros((), dtype=out.dtype,
                                                                                device=out.device))
    if _dense_ok(x, w.shape[0], w.shape[-1]):
        return _dense_mm(x, w, offsets)
    return _loop_mm(x, w, offsets)


@grouped_mm.register_fake
def _grouped_mm_fake(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("chronomoe_v3::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(x: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """`out[e] = x_e^T @ grad_e` over each group's rows: the weight gradient of `grouped_mm`."""
    if _native_ok(x, grad) and x.shape[0] % (16 // x.element_size()) == 0:
        return torch._grouped_mm(x.t(), grad, offs=offsets)
    if _dense_ok(x, offsets.shape[0], grad.shape[1]):
        return _dense_weight_grad(x, grad, offsets)
    return _loop_weight_grad(x, grad, offsets)


@grouped_weight_grad.register_fake
def _grouped_weight_grad_fake(x: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


_NATIVE_FP32_OUT: dict[int, bool] = {}  # per CUDA device: does torch._grouped_mm give an fp32 output?


def native_group_sums(device: torch.device) -> bool:
    """Whether `group_sums` runs as one grouped product on `device` (bf16 CUDA with an fp32 output; torch 2.11
    gives bf16 outputs only). Probed once per device with a tiny product, eagerly: call it outside compiled
    code (`ChronoSystem` does at construction); inside, an unprobed device reads False."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    known = _NATIVE_FP32_OUT.get(index)
    if known is not None or torch.compiler.is_compiling():
        return bool(known)
    try:
        a = torch.ones(16, 8, device=device, dtype=torch.bfloat16)
        out = torch._grouped_mm(a.t(), a, offs=torch.tensor([8, 16], dtype=torch.int32, device=device),
                                out_dtype=torch.float32)
        ok = out.dtype == torch.float32 and tuple(out.shape) == (2, 8, 8)
    except (RuntimeError, TypeError, AttributeError):
        ok = False
    _NATIVE_FP32_OUT[index] = ok
    return ok


@torch.library.custom_op("chronomoe_v3::group_sums", mutates_args=())
def group_sums(x: Tensor, rows: Tensor, offsets: Tensor) -> Tensor:
    """`out[e] = x_e^T @ rows_e` in fp32, `[E, C, H]` for `x [N, C]` and `rows [N, H]` grouped by `offsets`
    (rows past `offsets[-1]` are left out): per-group weighted sums of rows, the observer's per-expert
    statistics. One grouped product on bf16 CUDA operands (N and H multiples of 8; x padded to 8 columns)
    where the build gives an fp32 output (`native_group_sums`); otherwise an fp32 `index_add_` per column
    (correct, but slow on CUDA: `compute_expert_stats` picks this op there only when it is native)."""
    n, c = x.shape
    if _native_ok(rows, rows) and n % 8 == 0 and _NATIVE_FP32_OUT.get(rows.device.index or 0, False):
        padded = x.new_zeros(n, 8 * ((c + 7) // 8))
        padded[:, :c] = x.to(padded.dtype)
        out = torch._grouped_mm(padded.t(), rows.to(padded.dtype), offs=offsets, out_dtype=torch.float32)
        return out[:, :c]
    e = offsets.shape[0]
    group = _groups(offsets, n)
    rows_f = rows.float()
    out = torch.zeros(e + 1, c, rows.shape[1], dtype=torch.float32, device=rows.device)
    for j in range(c):  # C is a handful of columns, never the experts
        out[:, j].index_add_(0, group.long(), rows_f * x[:, j : j + 1].float())
    return out[:e]


@group_sums.register_fake
def _group_sums_fake(x: Tensor, rows: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], rows.shape[1], dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    # the transposed view as it is: `torch._grouped_mm` takes a column-major operand (no copy of every expert)
    grad_x = grouped_mm(grad, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = grouped_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
