"""Top-k routing over a fixed-width, masked expert set, with an optional additive logit bias, and the bridge
detector that keeps the slow bias honest (SPEC 4-5).

`z_clean = W h (+ b)`; `z_biased = z_clean + bias` (fp32 add, then back to the logits' dtype); inactive
slots get -inf; then softmax -> top-k -> (optional) renormalisation. Two bias modes (SPEC 4):
`logits` (the bias moves selection and gate weights) and `selection` (the bias moves only which experts
are chosen; gate weights come from the clean logits, as in aux-loss-free balancing).

The bridge detector compares, per token, the clean routing `p_clean = softmax(z_clean)` with the biased one
`p_biased = softmax(z_clean + beta)` so that beta can only amplify what the input already supports:
the *support* `s(e) = clamp(p_clean(e) / p_biased(e), 0, 1)` multiplies an expert's gate (the veto),
`overlap_only(e) = max(0, p_biased(e) - p_clean(e))` is the mass beta moved onto e, the *relevance*
`r = mean over real tokens of sum_e p_biased(e) * s(e)` (= 1 - mean total-variation distance between the
two routings) feeds the fast/mid clock retentions, and the Jaccard index of the clean and biased top-k
sets is a secondary trigger. `route_with_bias` does routing, detector and veto in one call, for any router.

Choices (docs/slow_bias.md):
- The support ratio is computed from the bias itself, `log(p_clean(e) / p_biased(e)) = log(Z_biased /
  Z_clean) - delta_e`, with `Z_biased / Z_clean = sum_f p_clean(f) e^delta_f`: the `eps -> 0` limit of SPEC's
  `p_clean / (p_biased + eps)`, exact (1 when beta is 0, so a zero beta changes nothing), free of underflow
  for experts with tiny probabilities, and cheaper than two log-softmaxes.
- Relevance is the mean over real tokens (padding excluded) of the support averaged over the active
  experts *with the biased routing probabilities as weights*. An unweighted mean over experts would give
  the same voice to experts a token never reaches; since `p_clean(e) / p_biased(e) =
  E_{p_clean}[exp(beta)] / exp(beta_e)`, it would be nearly a function of beta alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .config import BIAS_MODES


@dataclass
class Routing:
    """The result of routing T tokens over E slots."""

    topk_index: Tensor  # [T, K] int64
    topk_weight: Tensor  # [T, K] fp32 gate weights
    logits_clean: Tensor  # [T, E] masked clean logits (fp32)
    logits_biased: Tensor  # [T, E] masked biased logits (fp32); equals logits_clean without a bias
    probs_clean: Tensor  # [T, E] softmax of the masked clean logits
    probs_biased: Tensor  # [T, E] softmax of the masked biased logits
    bridge: BridgeReport | None = None  # overlap safety of the bias (set by `route_with_bias`)
    # a biased routing's `(bias [E] fp32, -inf at inactive slots; log(Z_biased / Z_clean) [T])`, from which its
    # bridge report reads the support without recomputing it (`bias_shift`)
    shift: tuple[Tensor, Tensor] | None = None


def mask_logits(logits: Tensor, active_mask: Tensor | None) -> Tensor:
    """Set inactive slots to -inf so they can never be selected."""
    if active_mask is None:
        return logits
    return logits.masked_fill(~active_mask, float("-inf"))


def route_topk(
    logits: Tensor,
    top_k: int,
    active_mask: Tensor | None = None,
    bias: Tensor | None = None,
    mode: str = "logits",
    normalize: bool = True,
    check_values: bool = False,
    selection_bias: Tensor | None = None,
) -> Routing:
    """Route with the softmax -> top-k (-> renormalise) rule (Mixtral; Qwen/OLMoE with norm_topk_prob).

    `logits [T,E]` are the clean router logits; `bias [E]` is added in fp32. `selection_bias [E]` (e.g. an
    aux-loss-free balancer's per-expert bias, `balance.py`) is added in fp32 to the scores that choose the
    top-k and to nothing else: it never moves gate weights, whatever `mode` says. Works for any router that
    produces logits, not only ChronoMoELayer's. No host synchronisation, unless `check_values` asks for
    the logits and the biases to be checked finite (a read of device values: for explicit API calls and
    tests, not for the per-step path).
    """
    if mode not in BIAS_MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {list(BIAS_MODES)}")
    if logits.dim() != 2:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [T, E]")
    e = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer in [1, {e}]")
    if active_mask is not None and (tuple(active_mask.shape) != (e,) or active_mask.dtype != torch.bool):
        raise ValueError(
            f"active_mask has shape {tuple(active_mask.shape)} and dtype {active_mask.dtype}; expected ({e},) bool"
        )
    for name, value in (("bias", bias), ("selection_bias", selection_bias)):
        if value is not None and tuple(value.shape) != (e,):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected ({e},) to match the logits' width")
    if check_values:
        for name, value in (("logits", logits), ("bias", bias), ("selection_bias", selection_bias)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds non-finite values; expected finite {name}")
    z = logits.float()
    z_clean = mask_logits(z, active_mask)
    p_clean = torch.softmax(z_clean, dim=-1)
    shift: tuple[Tensor, Tensor] | None = None
    if bias is not None:
        b = mask_logits(bias.float(), active_mask)
        z_biased = mask_logits(z + bias.float(), active_mask)
        # p_biased = softmax(z_biased) = p_clean e^bias Z_c / Z_b: two elementwise passes instead of a second
        # softmax (and its backward), exactly p_clean at a zero bias (`bias_shift`)
        log_ratio, weighted, scale = bias_shift(p_clean, b)
        p_biased = weighted * scale.unsqueeze(1)
        shift = (b, log_ratio)
    else:
        z_biased = z_clean
        p_biased = p_clean
    scores = z_biased if selection_bias is None else z_biased + selection_bias.float()
    _, index = torch.topk(scores, top_k, dim=-1)
    source = p_biased if mode == "logits" else p_clean
    weight = source.gather(1, index)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(
        topk_index=index,
        topk_weight=weight,
        logits_clean=z_clean,
        logits_biased=z_biased,
        probs_clean=p_clean,
        probs_biased=p_biased,
        shift=shift,
    )


# ---------------------------------------------------------------------- overlap safety
def bias_shift(p_clean: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(log(Z_biased / Z_clean) [T], p_clean e^(bias - m) [T,E], Z_clean / Z_biased e^m [T])` for the clean
    probabilities `p_clean [T,E]` and a per-slot bias `[E]` (fp32, -inf at inactive slots), differentiable.

    `Z_biased / Z_clean = sum_f p_clean(f) e^bias_f / sum_f p_clean(f)`, so that `log(p_clean(e) /
    p_biased(e)) = log(Z_biased / Z_clean) - bias_e` for every slot, however small its probabilities (the
    ratio never divides two tiny numbers), and `p_biased = p_clean e^(bias - m) * (Z_clean / Z_biased e^m)`.
    Both sums read the same `p_clean`, so a zero bias gives exactly 0, `p_clean` and 1. The bias is shifted
    by its largest finite entry `m` first (no overflow, whatever a `router_bias` holds). Per forward: one
    exponential of `[E]`, one product of `[T,E]`, two sums and two logarithms of `[T]`.
    """
    top = bias.detach().max()
    m = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weighted = p_clean * torch.exp(bias - m)
    z_b, z_c = weighted.sum(-1), p_clean.sum(-1)
    return torch.log(z_b) + m - torch.log(z_c), weighted, z_c / z_b


def _shift_from_logits(routing: Routing) -> tuple[Tensor, Tensor]:
    """`(delta [T,E], log(Z_biased / Z_clean) [T])` of a routing built without `route_topk`'s shift: the bias
    read back from its logits (`z_biased - z_clean`, 0 where a slot is unreachable)."""
    z_clean, z_biased = routing.logits_clean, routing.logits_biased
    reachable = torch.isfinite(z_clean) & torch.isfinite(z_biased)
    delta = torch.where(reachable, z_biased - z_clean, torch.zeros((), dtype=z_clean.dtype, device=z_clean.device))
    p = routing.probs_clean
    return delta, torch.log((p * torch.exp(delta)).sum(-1)) - torch.log(p.sum(-1))


def _support(reachable: Tensor, log_ratio: Tensor) -> Tensor:
    """`clamp(exp(log_ratio), 0, 1)` where reachable and finite, 1 elsewhere (an inactive slot's log ratio is
    +inf; a non-finite one is sanitised before exp, for its gradient)."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    ok = reachable & torch.isfinite(log_ratio)
    return torch.where(ok, torch.exp(torch.where(ok, torch.minimum(log_ratio, zero), zero)), torch.ones_like(zero))


_REPORT_FIELDS = ("support", "overlap_only", "relevance", "jaccard", "jaccard_mean", "topk_index_clean", "gate_support")


class BridgeReport:
    """How much of a biased routing the input itself supports, for T tokens over E slots (SPEC 5).

    support `[T,E]`: `clamp(p_clean / p_biased, 0, 1)`, the veto factor (1 for inactive slots);
    overlap_only `[T,E]`: `max(0, p_biased - p_clean)`, routing mass that only the bias put there;
    relevance `[]`: mean over real tokens of `sum_e p_biased(e) * support(e)` (= 1 - mean TV distance);
    jaccard `[T]`: |clean top-k ∩ biased top-k| / |clean top-k ∪ biased top-k|; jaccard_mean `[]` over real
    tokens; topk_index_clean `[T,K]`: the top-k the clean logits alone would choose; gate_support `[T,K]`:
    the support of each selected slot (the factor the veto applies, or would apply, to its gate).

    All device tensors, no host sync. Each field is computed when first read (then kept): a training forward
    pays for the veto factor `gate_support` alone, and the observer for the scalar `relevance`; the `[T,E]`
    fields and the clean top-k (the Jaccard index) cost nothing unless someone reads them. Build one with
    `bridge_report` (or `route_with_bias`); `replace(**fields)` gives a copy with some fields set (a family
    with its own selection rule supplies its own top-k and Jaccard index).
    """

    def __init__(
        self,
        routing: Routing,
        token_mask: Tensor | None = None,
        selection_bias: Tensor | None = None,
        *,
        shift: tuple[Tensor, Tensor] | None = None,
        **fields: Tensor,
    ) -> None:
        t, _ = routing.topk_index.shape
        if token_mask is not None:
            if tuple(token_mask.shape) != (t,) or token_mask.dtype != torch.bool:
                raise ValueError(
                    f"token_mask has shape {tuple(token_mask.shape)} and dtype {token_mask.dtype}; expected ({t},) bool"
                )
        unknown = set(fields) - set(_REPORT_FIELDS)
        if unknown:
            raise TypeError(f"BridgeReport got unknown fields {sorted(unknown)}; expected some of {_REPORT_FIELDS}")
        self._routing = routing
        self._token_mask = token_mask
        self._selection_bias = selection_bias
        self._shift = shift
        self._values: dict[str, Tensor] = dict(fields)

    # ------------------------------------------------------------------ fields (computed on first read)
    def _get(self, name: str) -> Tensor:
        value = self._values.get(name)
        if value is None:
            getattr(self, f"_compute_{name}")()
            value = self._values[name]
        return value

    @property
    def support(self) -> Tensor:
        return self._get("support")

    @property
    def overlap_only(self) -> Tensor:
        return self._get("overlap_only")

    @property
    def relevance(self) -> Tensor:
        return self._get("relevance")

    @property
    def jaccard(self) -> Tensor:
        return self._get("jaccard")

    @property
    def jaccard_mean(self) -> Tensor:
        return self._get("jaccard_mean")

    @property
    def topk_index_clean(self) -> Tensor:
        return self._get("topk_index_clean")

    @property
    def gate_support(self) -> Tensor:
        return self._get("gate_support")

    def _parts(self) -> tuple[Tensor, Tensor]:
        """`(bias [E] or [T,E], log(Z_biased / Z_clean) [T])`."""
        if self._shift is None:
            r = self._routing
            self._shift = r.shift if r.shift is not None else _shift_from_logits(r)
        return self._shift

    def _compute_support(self) -> None:
        bias, shift = self._parts()
        z_clean, z_biased = self._routing.logits_clean, self._routing.logits_biased
        reachable = torch.isfinite(z_clean) & torch.isfinite(z_biased)
        self._values["support"] = _support(reachable, shift.unsqueeze(1) - bias)

    def _compute_gate_support(self) -> None:
        if "support" in self._values:
            self._values["gate_support"] = self.support.gather(1, self._routing.topk_index)
            return
        bias, shift = self._parts()
        index = self._routing.topk_index
        at = bias[index] if bias.dim() == 1 else bias.gather(1, index)  # an inactive slot's bias is -inf
        log_ratio = shift.unsqueeze(1) - at
        self._values["gate_support"] = _support(torch.isfinite(at), log_ratio)

    def _compute_overlap_only(self) -> None:
        self._values["overlap_only"] = (self._routing.probs_biased - self._routing.probs_clean).clamp_min(0.0)

    def _usable_weights(self, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Skip rule: a token whose reading is non-finite (NaN/Inf input or logits) is no evidence either way:
        it is left out of the mean, as padding is. Returns `(weights, safe values, empty)`."""
        usable = torch.isfinite(values)
        if self._token_mask is not None:
            usable = usable & self._token_mask
        real = usable.to(values.dtype)
        weights = real / real.sum().clamp_min(1.0)
        return weights, torch.where(usable, values, torch.ones_like(values)), weights.sum() <= 0

    def _compute_relevance(self) -> None:
        # sum_e p_biased * support, written as 1 - sum_e p_biased * (1 - support): exactly 1 at beta 0
        per_token = 1.0 - (self._routing.probs_biased * (1.0 - self.support)).sum(-1)
        weights, safe, empty = self._usable_weights(per_token)
        one = torch.ones((), dtype=per_token.dtype, device=per_token.device)
        self._values["relevance"] = torch.where(empty, one, (weights * safe).sum().clamp(0.0, 1.0))

    def _compute_topk_index_clean(self) -> None:
        routing, selection = self._routing, self._selection_bias
        scores = routing.logits_clean if selection is None else routing.logits_clean + selection.float()
        self._values["topk_index_clean"] = torch.topk(scores, routing.topk_index.shape[1], dim=-1).indices

    def _compute_jaccard(self) -> None:
        k = self._routing.topk_index.shape[1]
        clean = self.topk_index_clean
        inter = (clean.unsqueeze(2) == self._routing.topk_index.unsqueeze(1)).any(-1).sum(-1).float()
        self._values["jaccard"] = inter / (2 * k - inter)

    def _compute_jaccard_mean(self) -> None:
        jaccard = self.jaccard
        weights, safe, empty = self._usable_weights(jaccard)
        one = torch.ones((), dtype=jaccard.dtype, device=jaccard.device)
        self._values["jaccard_mean"] = torch.where(empty, one, (weights * safe).sum())

    # ------------------------------------------------------------------ copies
    def replace(self, **fields: Tensor) -> BridgeReport:
        """A copy with `fields` set (the others are computed, or kept, as in this one)."""
        return BridgeReport(self._routing, self._token_mask, self._selection_bias, shift=self._shift,
                            **{**self._values, **fields})

    def detach(self) -> BridgeReport:
        """A copy cut from the autograd graph (what a trace carries): fields computed so far are kept, detached;
        the rest are computed without a graph when read."""
        r = self._routing
        routing = Routing(
            topk_index=r.topk_index, topk_weight=r.topk_weight.detach(), logits_clean=r.logits_clean.detach(),
            logits_biased=r.logits_biased.detach(), probs_clean=r.probs_clean.detach(),
            probs_biased=r.probs_biased.detach(),
        )
        parts = self._shift if self._shift is not None else r.shift
        shift = None if parts is None else tuple(x.detach() for x in parts)
        return BridgeReport(routing, self._token_mask, self._selection_bias, shift=shift,  # type: ignore[arg-type]
                            **{k: v.detach() for k, v in self._values.items()})

    def __repr__(self) -> str:
        t, k = self._routing.topk_index.shape
        return f"BridgeReport(T={t}, K={k}, computed={sorted(self._values)})"


def bridge_report(
    routing: Routing, token_mask: Tensor | None = None, selection_bias: Tensor | None = None
) -> BridgeReport:
    """The bridge detector for one routing (its masked clean and biased logits and probabilities).
    `token_mask [T]` bool (True = real token) excludes padding from the means; tokens whose routing is
    non-finite (a NaN/Inf input) are left out the same way (skipped, never averaged in), so relevance is
    always finite; with no real, finite token, relevance and jaccard_mean read 1 (no evidence of bridging).
    `selection_bias [E]`: the balancer bias the routing selected with (`route_topk(selection_bias=...)`); the
    clean top-k it is compared with then includes it too, so the Jaccard index measures beta's effect on the
    choice alone. Fields are computed when first read (`BridgeReport`)."""
    return BridgeReport(routing, token_mask, selection_bias)


def apply_veto(topk_weight: Tensor, gate_support: Tensor, renormalize: bool = False) -> Tensor:
    """The bridge veto: `g_eff = g_biased * clamp(p_clean / p_biased, 0, 1)` per selected slot. An expert
    chosen only because of the bias loses its gate; one the input supports keeps it. No renormalisation by
    default (vetoed mass is dropped, not handed to the other selected experts)."""
    gated = topk_weight * gate_support.to(topk_weight.dtype)
    if renormalize:
        gated = gated / gated.sum(-1, keepdim=True).clamp_min(1e-20)
    return gated


def route_with_bias(
    logits: Tensor,
    top_k: int,
    active_mask: Tensor | None,
    beta: Tensor,
    *,
    mode: str = "logits",
    normalize: bool = True,
    veto: bool = True,
    token_mask: Tensor | None = None,
    check_values: bool = False,
    selection_bias: Tensor | None = None,
) -> Routing:
    """Route any router's clean `logits [T,E]` with the slow bias `beta [E]` (fp32 add, inactive slots -inf,
    then the softmax -> top-k rule of `route_topk` in `mode`), run the bridge detector, and (with `veto`)
    apply the veto to the gate weights. The report rides on the result as `routing.bridge`.
    `selection_bias [E]` (a balancer's) only moves the top-k choice (`route_topk`); the detector judges beta
    alone (its probabilities never include the selection bias), so a balancer is never vetoed."""
    routing = route_topk(
        logits, top_k, active_mask, bias=beta, mode=mode, normalize=normalize, check_values=check_values,
        selection_bias=selection_bias,
    )
    report = bridge_report(routing, token_mask, selection_bias)
    weight = apply_veto(routing.topk_weight, report.gate_support) if veto else routing.topk_weight
    # (without the veto nothing is computed here: the trace's observer reads the relevance, without a graph)
    return replace(routing, topk_weight=weight, bridge=report)
