"""Per-forward statistics of one MoE layer: pure functions of a trace, on the device, no host sync.

- `compute_expert_stats`: the sufficient statistics every reading is built from (SPEC 1), in one pass.
- `coherence_reference`: the vector each expert's mean output is compared with (loo or full).
- `starvation_fraction`: the fraction of tokens that fit no expert well (misfit the experts cannot see).
- `coactivation_increment`: the router's interchangeability of expert pairs (the slow objective's
  redundancy and removal predictions read it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ESTIMATORS
from ..grouped import group_sums, native_group_sums
from ..trace import Dispatch, MoETrace


@dataclass
class ExpertStats:
    """Per-expert sufficient statistics of one forward (all fp32, on the trace's device).

    counts `n [E]` tokens routed to each expert (after capacity drops, padding excluded);
    sum_out `S [E,H]` = sum of unweighted outputs; sum_weighted `G [E,H]` = sum of gate-weighted outputs;
    sum_mixture `M [H]` = sum of the layer's MoE output over tokens (= sum_e G_e);
    num_tokens `N []` real tokens; nonfinite `[E]` bool, experts skipped for non-finite values.
    """

    counts: Tensor
    sum_out: Tensor
    sum_weighted: Tensor
    sum_mixture: Tensor
    num_tokens: Tensor
    nonfinite: Tensor

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])

    @property
    def measured(self) -> Tensor:
        """[E] bool: experts that saw at least one token with finite output this step."""
        return (self.counts > 0) & ~self.nonfinite


REDUCTIONS = ("auto", "index_add", "matmul", "grouped")


def _grouped_fits(d: Dispatch) -> bool:
    """The layout suits the sync-free grouped product: bf16 CUDA rows, N and H multiples of 8, and a torch
    whose grouped product gives fp32 outputs on this device (`grouped.native_group_sums`)."""
    n, h = d.rows.shape
    return (d.rows.is_cuda and d.rows.dtype == torch.bfloat16 and n % 8 == 0 and h % 8 == 0
            and native_group_sums(d.rows.device))


@torch.no_grad()
def compute_expert_stats(trace: MoETrace, reduction: str = "auto") -> ExpertStats:
    """All per-expert statistics of a trace in one vectorised pass, accumulated in fp32.

    The reduction (`reduction="auto"`): on CUDA, when the trace carries the layer's expert-sorted layout
    (`trace.dispatch`, bf16), one grouped product over each expert's own rows (`grouped`: `2 x N x H`
    multiply-adds instead of the one-hot product's `2E x N x H`); otherwise a one-hot matmul on accelerators
    (PERF.md: the fastest there without the layout) and `index_add_` on the CPU (where it is faster than a
    one-hot product). Any of them can be forced (`grouped` needs `trace.dispatch`; off bf16 CUDA it is an
    fp32 `index_add_` over the sorted rows).
    Non-finite outputs or gate weights mark their expert as skipped (`nonfinite`). With `index_add_` they
    never reach the sums of other experts; with the one-hot product a non-finite row spreads
    (0 * inf = nan) to every expert of that layer and step, which are then all skipped (with the grouped
    product, to the experts of its own group only). Either way no NaN/Inf leaves this function.
    """
    t, k, h = trace.expert_out.shape
    e = trace.num_experts
    idx = trace.topk_index.reshape(t * k).to(torch.long)
    w = trace.topk_weight.reshape(t * k)
    y = trace.expert_out.reshape(t * k, h)
    keep = trace.kept_slots().reshape(t * k)
    device = y.device
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid: expected one of {list(REDUCTIONS)}")
    d = trace.dispatch
    if reduction == "grouped" and d is None:
        raise ValueError("reduction='grouped' needs the trace's expert-sorted layout (trace.dispatch); it has none")
    # Dropped / padded slots go to a scratch row E, so no multiply-by-mask pass is needed.
    target = torch.where(keep, idx, torch.full_like(idx, e))
    if d is not None and (reduction == "grouped" or (reduction == "auto" and _grouped_fits(d))):
        counts = torch.zeros(e + 1, device=device).index_add_(0, target, keep.float())[:e]
        # columns: 1 and the gate weight of each kept, real slot in the layout's order; dropped and padding
        # slots weigh 0
        kept = keep[d.order]
        cols = torch.stack([kept.to(w.dtype), torch.where(kept, w[d.order], torch.zeros((), dtype=w.dtype,
                                                                                          device=device))], 1)
        sums = group_sums(cols.to(d.rows.dtype), d.rows, d.offsets)  # [E, 2, H] fp32
        sum_out, sum_weighted = sums[:, 0], sums[:, 1]
    elif reduction == "index_add" or (reduction == "auto" and device.type == "cpu"):
        yf = y.float()
        counts = torch.zeros(e + 1, device=device).index_add_(0, target, keep.float())[:e]
        sums = torch.zeros(2, e + 1, h, device=device)
        sums[0].index_add_(0, target, yf)
        sums[1].index_add_(0, target, yf * w.float().unsqueeze(1))
        sum_out, sum_weighted = sums[0, :e], sums[1, :e]
    else:
        # Rows [0, E): one-hot of the kept slots; rows [E, 2E): the same scaled by the gate weights.
        both = torch.empty(2 * e, t * k, dtype=y.dtype, device=device)
        both[:e].copy_(target.unsqueeze(0) == torch.arange(e, device=device).unsqueeze(1))
        torch.mul(both[:e], w.to(y.dtype).unsqueeze(0), out=both[e:])
        prod = _onehot_reduce(both, y)
        sum_out, sum_weighted = prod[:e], prod[e:]
        counts = both[:e].sum(1, dtype=torch.float32)
    finite = torch.isfinite(sum_out).all(1) & torch.isfinite(sum_weighted).all(1)
    zero = torch.zeros((), device=device)
    sum_out = torch.where(finite.unsqueeze(1), sum_out, zero)
    sum_weighted = torch.where(finite.unsqueeze(1), sum_weighted, zero)
    counts = torch.where(finite, counts, zero)
    real = trace.token_mask.float().sum() if trace.token_mask is not None else torch.full((), float(t), device=device)
    return ExpertStats(
        counts=counts,
        sum_out=sum_out,
        sum_weighted=sum_weighted,
        sum_mixture=sum_weighted.sum(0),
        num_tokens=real,
        nonfinite=~finite,
    )


def _onehot_reduce(a: Tensor, y: Tensor) -> Tensor:
    """`a [R, N] @ y [N, H]` with fp32 output, split along N into independent chunks.

    The product has few output tiles and a very long reduction (R ~ 2E, N = T*K), which a single GEMM
    spreads over few SMs; batching the reduction in chunks (split-K) and summing the partials in fp32 keeps
    the GPU busy.
    """
    r, n = a.shape
    chunks = next((c for c in (64, 32, 16, 8, 4, 2) if n % c == 0 and n // c >= 512), 1)
    a3 = a.view(r, chunks, n // chunks).transpose(0, 1)
    y3 = y.view(chunks, n // chunks, y.shape[1])
    if a.dtype != torch.float32:
        try:  # fp32 output straight from the low-precision product where the backend supports it
            return torch.bmm(a3, y3, out_dtype=torch.float32).sum(0)
        except (TypeError, RuntimeError):
            pass
    return torch.bmm(a3, y3).float().sum(0)


def coherence_reference(stats: ExpertStats, estimator: str = "loo") -> Tensor:
    """[E, H] the vector each expert's mean output is compared with: `(M - G_e) / N` (loo) or `M / N` (full).

    The bimodality detector reads it too (its centroids' coherence, `BimodalityState.update(reference=...)`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid: expected one of {list(ESTIMATORS)}")
    big_n = stats.num_tokens.clamp_min(1.0)
    m = stats.sum_mixture.unsqueeze(0)
    if estimator == "loo":
        return (m - stats.sum_weighted) / big_n
    return m.expand_as(stats.sum_weighted) / big_n


# ---------------------------------------------------------------------- per-step signal
# Both router signals below read the masked clean logits only through differences `z_f - z_e` and a top-k:
# no softmax is computed (a softmax over a narrow last dim, E = 8, takes ~200 us on an AVX-512 CPU, ten
# times an exp + sum), and one top-k serves both when they run together (`router_signals`).


def _masked_logits(router_logits_clean: Tensor, active_mask: Tensor) -> Tensor:
    return router_logits_clean.float().masked_fill(~active_mask.to(router_logits_clean.device), float("-inf"))


def _starved_from_top(z: Tensor, top: Tensor, n: Tensor, k: int, real: Tensor, confidence: float) -> Tensor:
    """`top [T, >=k]` the sorted top values of the masked logits `z [T, E]`; see `starvation_fraction`."""
    m = top[:, :1]
    mass = (top[:, :k] - m).exp().sum(-1) / (z - m).exp().sum(-1)  # top-k softmax mass, without the softmax
    base = (k / n.clamp_min(1.0)).clamp_max(1.0)
    fit = (mass - base) / (1.0 - base).clamp_min(1e-12)
    starved = (fit < confidence) & (n > k)
    return (starved & real).sum().to(z.dtype) / real.sum().clamp_min(1).to(z.dtype)


def _real_tokens(token_mask: Tensor | None, t: int, device: torch.device) -> Tensor:
    if token_mask is None:
        return torch.ones(t, dtype=torch.bool, device=device)
    return token_mask.to(device).bool()


def starvation_fraction(
    router_logits_clean: Tensor,
    active_mask: Tensor,
    top_k: int,
    token_mask: Tensor | None = None,
    confidence: float = 0.2,
) -> Tensor:
    """Fraction of real tokens that fit no expert well (a device scalar; no host sync).

    `p = softmax(z_clean)` over active slots, `mass` = the token's top-k probability mass,
    `fit = (mass - k/n) / (1 - k/n)` with n active slots (uniform router -> 0, one-hot -> 1); a token is
    starved when `fit < confidence`. A layer with n <= k (every token reaches every expert) reads 0.
    """
    z = _masked_logits(router_logits_clean, active_mask)
    n = active_mask.sum().to(z.dtype)
    k = min(int(top_k), int(z.shape[-1]))
    top = z.topk(k, dim=-1).values
    return _starved_from_top(z, top, n, k, _real_tokens(token_mask, z.shape[0], z.device), confidence)


def _coactivation_from_top(accumulator: Tensor, z: Tensor, index: Tensor, keep: Tensor) -> None:
    """Add `min(1, p_f / p_e) = exp(min(0, z_f - z_e))` for each token's clean top-2 `index [T, 2]`."""
    e = z.shape[-1]
    own = z.gather(1, index)  # [T, 2]
    ratio = torch.exp((z.unsqueeze(1) - own.unsqueeze(-1)).clamp_max(0.0)).nan_to_num(0.0)  # [T, 2, E]
    ratio = ratio * keep.unsqueeze(-1)
    accumulator.index_add_(0, index.reshape(-1), ratio.reshape(-1, e))


@torch.no_grad()
def add_coactivation(accumulator: Tensor, trace: MoETrace, active_mask: Tensor) -> Tensor:
    """Add one forward's co-routing to `accumulator [E, E]` (in place); returns its number of real tokens `[]`.

    From the clean router (any top-k): for each real token and each expert e among its clean top-2, row e
    adds the router's interchangeability of every active f, `min(1, p_f / p_e)` (`C_ee += 1`). `C_ef / C_ee`
    is then how nearly the router would give e's tokens to f: ~1 for a duplicate, ~0 for a distinct expert
    behind a confident router, however often it is the runner-up (a co-selection count cannot tell these
    apart). Without clean logits: co-selection counts of the top-k. Device tensors only, no host sync.
    """
    e = trace.num_experts
    t = trace.topk_index.shape[0]
    if trace.router_logits_clean is None:
        index, keep = trace.topk_index.to(torch.long), trace.kept_slots()
        target = torch.where(keep, index, torch.full_like(index, e))
        onehot = torch.zeros(t, e + 1, device=index.device).scatter_(1, target, 1.0)[:, :e]
        accumulator.add_(onehot.T @ onehot)
    else:
        z = _masked_logits(trace.router_logits_clean, active_mask)
        index = z.topk(min(2, e), dim=-1).indices  # [T, 2]
        keep = active_mask[index]
        if trace.token_mask is not None:
            keep = keep & trace.token_mask.unsqueeze(1)
        _coactivation_from_top(accumulator, z, index, keep)
    if trace.token_mask is not None:
        return trace.token_mask.float().sum()
    return torch.full((), float(t), device=trace.topk_index.device)


@torch.no_grad()
def router_signals(
    accumulator: Tensor, trace: MoETrace, active_mask: Tensor, top_k: int, confidence: float = 0.2
) -> tuple[Tensor, Tensor | None]:
    """`add_coactivation` and `starvation_fraction` of one forward from one masking and one top-k of the
    clean logits: returns `(real tokens [], starved fraction [] or None without clean logits)`."""
    if trace.router_logits_clean is None:
        return add_coactivation(accumulator, trace, active_mask), None
    z = _masked_logits(trace.router_logits_clean, active_mask)
    t, e = z.shape
    k = min(int(top_k), e)
    top = z.topk(max(k, min(2, e)), dim=-1)
    real = _real_tokens(trace.token_mask, t, z.device)
    index = top.indices[:, : min(2, e)]
    _coactivation_from_top(accumulator, z, index, active_mask[index] & real.unsqueeze(1))
    starved = _starved_from_top(z, top.values, active_mask.sum().to(z.dtype), k, real, confidence)
    return real.sum().to(torch.float32), starved
