"""The slow objective (SPEC 7): a layer's free energy and candidate edits with predicted effects.

Everything here is a pure function of a `LayerView` (what the slow clock reads for one layer) and the
config; it runs at `system.step()` time, where host transfers are allowed, and returns Python floats.
docs/objective.md has the formulas with the reasoning and the scenario evidence.

Free energy of a layer, with `in_play = active | cooling` and `measured = in_play & isfinite(phi_slow)`:

    F = (1 - (1 - s) Psi_slow) + lambda * N_active + rho * R + kappa * I

- `Psi_slow = sum_e w_e phi_slow_e`, `w` the slow token shares renormalised over measured experts; a layer
  with no measured expert has Psi 0. `s` = starvation (slow EMA of the fraction of tokens no expert fits,
  `starvation_fraction`): starved tokens enter the misfit with coherence 0, so a layer can have a high
  misfit while its experts are individually coherent (SPEC 7's condition for spawn).
- `N_active` = number of slots in play (cooling experts included).
- `R = sum_{e<f measured} r_ef`, `r_ef = (relu(cos(role_e, role_f)) * (1 - |phi_e - phi_f| / 2)) ** sharpness
  * overlap_ef`, with `overlap_ef` the routing overlap read from the less used expert's row
  (`routing_overlap`: how nearly the clean router would give e's tokens to f; ~1 for duplicates).
- `I = sum_{e in_play} relu(bimodality_e - bimodality_threshold)`.

Why the predictions below are shaped as they are. With the old rule (prune the worst expert, predicted
`w_e (phi_e - Psi) / (1 - w_e) - lambda`, and `lambda == min_improvement`) any below-average expert passed
the bar, so healthy layers pruned; LOO phi of a healthy specialist can even be negative (its output need
not point with the others' mean). Removing an expert is only a gain when its traffic has somewhere to go.
So every removal predicts where the traffic moves (`_moved_traffic_misfit`): the fraction `a` that the
router finds interchangeable with a neighbour f is served at f's coherence; the rest has no expert that fits
it and keeps `min(phi_e, 0)` (a coherent expert's unique service is lost; stranding tokens is never
credited).

Candidates, one `propose_<action>` per edit kind (never on cooling experts; "judged" = active, measured,
>= `min_observations_to_judge` observations and >= `min_evidence_tokens` tokens of evidence; "removable" =
judged and at least `min_age_to_remove` training steps old; every threshold lives in `ChronoConfig.objective`).
Nothing is removed from a concentrated layer (`concentration`: low slow Neff or a dominant top-2, a
PRE_COLLAPSE / COLLAPSE_CONFIRMED alert, or the mid clock still pressing on it): there low traffic and
look-alike experts are the router's doing, and starvation is not decoherence.
- PRUNE the removable, non-degrading expert with the lowest phi_slow, only if `phi_slow <
  prune_coherence_floor` (default 0: "even when used it is decoherent, persistently"), its share is below
  `prune_max_share` of its fair share, and its best absorber takes `a >= prune_min_absorbable` (0.5) of its
  traffic. Misfit delta `(1 - s) w_e (phi_e - a phi_f - (1 - a) min(phi_e, 0))`; N - 1; its pairs leave R;
  its excess bimodality leaves I.
- MERGE the removable pair with the largest r_ef, only if `r_ef >= merge_min_redundancy` (0.5); the more used
  one survives and takes the other's traffic with `a = overlap[absorbed, survivor]`; misfit delta
  `max(0, moved-traffic misfit)` (a merge is justified by redundancy, never credited with a coherence gain);
  N - 1; the absorbed expert's pairs leave R and its excess bimodality leaves I.
- SPLIT the most bimodal judged expert above `bimodality_threshold`: children take roles j with weights q_j
  and coherence `centroid_phi_j`: misfit delta `(1 - s) w_e (phi_e - sum_j q_j centroid_phi_j)` (0 when
  unknown; a penalty when the children are predicted less coherent than the parent); its excess bimodality
  leaves I; N + 1; R unchanged. `centroid_phi_j` is phi's own estimator applied to the child right after the
  split (role centroid against the parent's reference plus the sibling's contribution,
  `BimodalityState.centroid_phi`), so it compares like with like with `phi_e`.
- SPAWN when `s > starvation_floor` (0.15) persistently (at least one judged expert) while the judged
  experts are individually coherent (median phi_slow above the prune floor): the new expert is predicted
  to serve `min(s, 1 / (N + 1))` of the traffic (a starved share, at most its fair share) at the layer's
  coherence: misfit delta `-min(s, 1/(N+1)) * max(Psi, 0)`; N + 1. Allowed in a concentrated layer.
- REPLACE a degrading judged expert (fast phi fell away from its baseline, or its identity broke) by a
  perturbed copy of the expert the router finds most interchangeable with it, keeping its router row: its
  share is predicted to be served at the donor's phi_slow instead of its own phi_fast. Not in a
  concentrated layer. An expert whose weights *jumped* (ops/shadow.py: far from its shadow copy, several times
  further than its peers) is instead replaced by that copy, its own weights from before the jump: its share is
  predicted to be served at its own phi_slow (its pre-jump coherence) instead of its phi_fast; allowed in a
  concentrated layer.
Removing edits need `N - 1 >= min_experts_per_layer`; adding edits need `N + 1 <= max_experts_per_layer`
and a free slot. An edit is executed only when its predicted delta_F < -min_improvement; every executed edit
is audited and rolled back when it hurt (`audit.py`).

Selection under the cycle's rules is `select.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import ChronoConfig, ObjectiveConfig
from ..observe.coherence import layer_coherence
from ..view import LayerView

ACTIONS = ("prune", "merge", "split", "spawn", "replace")
# What an emergency review may run before the regular review: capacity that adds (spawn, split) and the repair
# of a degrading expert (replace); removals (prune, merge) wait for the slow clock.
EARLY_ACTIONS = ("spawn", "split", "replace")
REMOVING_ACTIONS = ("prune", "merge")  # edits that take an expert out of play
GROWING_ACTIONS = ("spawn", "split")  # edits that bring one more expert into play
CONCENTRATION_ALERTS = ("PRE_COLLAPSE", "COLLAPSE_CONFIRMED")
_EPS = 1e-12


@dataclass(frozen=True)
class FreeEnergy:
    """The four weighted terms of F (or of a predicted delta_F): they sum to `total`."""

    misfit: float
    complexity: float
    redundancy: float
    instability: float

    @property
    def total(self) -> float:
        return self.misfit + self.complexity + self.redundancy + self.instability


@dataclass(frozen=True)
class EditCandidate:
    """One proposed edit of one layer and its predicted effect.

    `expert_id`: the slot acted on (pruned expert, split parent, merge: the absorbed expert, replaced expert;
    None for spawn). `partner_id`: the merge survivor, or the replacement's donor. `delta`: predicted weighted
    component deltas.
    """

    action: str
    layer_id: int
    expert_id: int | None
    F_before: float
    delta: FreeEnergy
    reason: str
    partner_id: int | None = None

    @property
    def delta_F(self) -> float:
        return self.delta.total

    @property
    def F_after_predicted(self) -> float:
        return self.F_before + self.delta_F


@dataclass(frozen=True)
class LayerDecision:
    """The outcome of a review of one layer: an edit, or None (do nothing), and why."""

    layer_id: int
    edit: EditCandidate | None
    candidates: tuple[EditCandidate, ...] = field(default_factory=tuple)
    reason: str = ""

    @property
    def do_nothing(self) -> bool:
        return self.edit is None


# ---------------------------------------------------------------------- free energy
def _masks(view: LayerView) -> tuple[Tensor, Tensor]:
    in_play = view.active | view.cooling
    measured = in_play & torch.isfinite(view.phi_slow)
    return in_play, measured


def _shares(view: LayerView, measured: Tensor) -> Tensor:
    """Slow shares renormalised over measured experts (0 elsewhere)."""
    w = torch.where(measured, torch.nan_to_num(view.share_slow, nan=0.0).clamp_min(0.0), 0.0)
    total = w.sum()
    return w / total if float(total) > 0 else w


def _psi(view: LayerView, measured: Tensor) -> float:
    phi = torch.where(measured, view.phi_slow, float("nan"))
    psi = float(layer_coherence(phi, _shares(view, measured)))
    return psi if psi == psi else 0.0


def routing_overlap(view: LayerView) -> Tensor:
    """[E, E] `O_ef = C_ef / C_ee` clamped to [0, 1] (0 on the diagonal and where `C_ee` is 0).

    With the system's co-routing accumulator (row e sums, over tokens with e among the clean top-2, the
    router's interchangeability `min(1, p_f / p_e)`), `O_ef` is the fraction of e's traffic the router
    would nearly as soon give to f: ~1 for a duplicate, ~0 for a distinct expert behind a confident router.
    Not symmetric: a narrow expert can be subsumed by a broad one.
    """
    view = view.to_host()
    usage = view.coactivation.diagonal().clamp_min(0.0)
    rows = usage.unsqueeze(1)
    overlap = torch.where(rows > 0, view.coactivation.clamp_min(0.0) / rows.clamp_min(_EPS), 0.0)
    return overlap.clamp(0.0, 1.0).fill_diagonal_(0.0)


def _pair_overlap(view: LayerView) -> Tensor:
    """[E, E] symmetric: the overlap read from the less used expert's row (ties: the lower slot's row)."""
    o = routing_overlap(view)
    usage = view.coactivation.diagonal()
    e = torch.arange(view.num_slots)
    row_is_less = (usage.unsqueeze(1) < usage.unsqueeze(0)) | (
        (usage.unsqueeze(1) == usage.unsqueeze(0)) & (e.unsqueeze(1) < e.unsqueeze(0))
    )
    return torch.where(row_is_less, o, o.T)


def redundancy_matrix(view: LayerView, params: ObjectiveConfig | None = None) -> Tensor:
    """[E, E] symmetric pair scores r_ef (zero diagonal, zero where either expert is unmeasured)."""
    params = params if params is not None else ObjectiveConfig()
    view = view.to_host()
    _, measured = _masks(view)
    role = torch.nan_to_num(view.role, nan=0.0)
    unit = role / role.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    cos_role = (unit @ unit.T).clamp(0.0, 1.0)
    phi = torch.nan_to_num(view.phi_slow, nan=0.0)
    phi_sim = (1.0 - (phi.unsqueeze(0) - phi.unsqueeze(1)).abs() / 2.0).clamp(0.0, 1.0)
    r = (cos_role * phi_sim) ** params.redundancy_sharpness * _pair_overlap(view)
    pair = measured.unsqueeze(0) & measured.unsqueeze(1) & ~torch.eye(view.num_slots, dtype=torch.bool)
    return torch.where(pair, r, 0.0)


def _excess_bimodality(view: LayerView, in_play: Tensor, params: ObjectiveConfig) -> Tensor:
    b = torch.nan_to_num(view.bimodality, nan=0.0)
    return torch.where(in_play, (b - params.bimodality_threshold).clamp_min(0.0), 0.0)


def free_energy(view: LayerView, config: ChronoConfig) -> FreeEnergy:
    """F of one layer as its four weighted terms (see the module docstring)."""
    params = config.objective
    view = view.to_host()
    in_play, measured = _masks(view)
    r = redundancy_matrix(view, params)
    return FreeEnergy(
        misfit=1.0 - (1.0 - float(view.starvation)) * _psi(view, measured),
        complexity=config.objective.lambda_complexity * int(in_play.sum()),
        redundancy=config.objective.rho_redundancy * float(r.sum()) / 2.0,
        instability=config.objective.kappa_instability * float(_excess_bimodality(view, in_play, params).sum()),
    )


# ---------------------------------------------------------------------- candidates
def _moved_traffic_misfit(phi_e: float, w_e: float, absorbable: float, phi_f: float) -> float:
    """Predicted misfit change when expert e leaves and its traffic (weight `w_e` in Psi) moves on.

    The fraction `absorbable` of that traffic goes to a neighbour f that the router already finds nearly
    interchangeable with e, and is served at f's coherence `phi_f`; the rest has no expert that fits it,
    so its coherence is predicted to be `min(phi_e, 0)`: a coherent expert's unique service is lost
    (down to 0), and removing a decoherent expert is never credited for tokens nobody else can serve.
    """
    after = absorbable * phi_f + (1.0 - absorbable) * min(phi_e, 0.0)
    return w_e * (phi_e - after)


@dataclass(frozen=True)
class _Layer:
    """What every proposal of one review of one layer reads (computed once per layer and review)."""

    view: LayerView
    config: ChronoConfig
    f_before: float
    psi: float
    served: float  # 1 - starvation: Psi enters the misfit as (1 - s) * Psi (starved tokens fit no expert)
    shares: Tensor  # slow shares renormalised over measured experts
    redundancy: Tensor
    overlap: Tensor
    excess: Tensor
    measured: Tensor
    judged: Tensor  # active, not cooling, measured, enough evidence
    removable: Tensor  # judged, old enough for a removal to rest on its own history
    degrading: Tensor
    n_in_play: int
    concentrated: str  # why the layer counts as concentrated ("" when it does not)

    @property
    def can_remove(self) -> bool:
        return self.n_in_play - 1 >= self.config.lifecycle.min_experts_per_layer

    @property
    def can_add(self) -> bool:
        cap = self.config.lifecycle.max_experts_per_layer
        return self.n_in_play + 1 <= cap and self.n_in_play < self.view.num_slots

    def removal(self, e: int) -> tuple[float, float]:
        """The redundancy and instability deltas of removing expert e (its pairs and its excess leave)."""
        c = self.config.objective
        return -c.rho_redundancy * float(self.redundancy[e].sum()), -c.kappa_instability * float(self.excess[e])


def concentration(view: LayerView, config: ChronoConfig) -> str:
    """Why the layer's routing counts as concentrated (the collapse condition of the v2 alerts, on the slow
    shares of the experts in play; an alert raised on the layer now; or the mid clock still pressing to
    rebalance it), or "" when it does not. In a concentrated layer low traffic and look-alike experts are the
    router's doing: nothing is removed there."""
    c = config.objective
    in_play, _ = _masks(view)
    n = int(in_play.sum())
    alerts = sorted({a for a in view.alerts if a in CONCENTRATION_ALERTS})
    if alerts:
        return f"{', '.join(alerts)} raised on the layer"
    if view.pressure > c.concentration_pressure:
        return f"mid-clock pressure {view.pressure:.3f} > {c.concentration_pressure} (still being rebalanced)"
    shares = torch.where(in_play, torch.nan_to_num(view.share_slow, nan=0.0).clamp_min(0.0), 0.0)
    total = float(shares.sum())
    if n < 2 or total <= 0:
        return ""
    p = shares[in_play] / total
    nz = p[p > 1e-10]
    neff = float(torch.exp(-(nz * nz.log()).sum()))
    top2 = float(p.topk(min(2, n)).values.sum())
    if neff < c.concentration_neff * n:
        return f"Neff {neff:.2f} < {c.concentration_neff} x {n} experts"
    if n > 2 and top2 > c.concentration_top2:
        return f"top-2 share {top2:.2f} > {c.concentration_top2}"
    return ""


def _layer(view: LayerView, config: ChronoConfig) -> _Layer:
    view = view.to_host()
    params = config.objective
    in_play, measured = _masks(view)
    eligible = view.active & ~view.cooling
    judged = eligible & measured & (view.observations >= params.min_observations_to_judge)
    if view.evidence is not None:
        judged = judged & (view.evidence >= params.min_evidence_tokens)
    degrading = view.degrading if view.degrading is not None else torch.zeros_like(view.active)
    if view.jumped is not None:  # weights that jumped are repaired first, never judged on their readings
        degrading = degrading | view.jumped
    removable = judged.clone()
    if view.age is not None:
        removable = removable & (view.age >= params.min_age_to_remove)
    return _Layer(
        view=view, config=config, f_before=free_energy(view, config).total, psi=_psi(view, measured),
        served=1.0 - float(view.starvation), shares=_shares(view, measured),
        redundancy=redundancy_matrix(view, params), overlap=routing_overlap(view),
        excess=_excess_bimodality(view, in_play, params), measured=measured, judged=judged, removable=removable,
        degrading=degrading & eligible, n_in_play=int(in_play.sum()), concentrated=concentration(view, config),
    )


def _evidence(L: _Layer, e: int) -> str:
    ev = L.view.evidence
    tokens = f"{float(ev[e]):.0f} tokens of evidence" if ev is not None else "evidence not tracked"
    return f"{int(L.view.observations[e])} observations, {tokens}"


def propose_prune(view: LayerView, config: ChronoConfig, layer: _Layer | None = None) -> list[EditCandidate]:
    """PRUNE a judged expert that carries little traffic (below `prune_max_share` of its fair share) and is
    either persistently decoherent (phi_slow below the floor) or *vestigial*: below `prune_vestigial_share` of
    its fair share while the mid clock is not moving tokens away from it (lens offset >= 0), so that its
    emptiness is the router's own verdict. Its traffic must be absorbable and the layer not concentrated
    (starvation is not decoherence). Of several such experts, the one with the lowest predicted delta_F is
    proposed. A degrading expert is replaced, not pruned."""
    L = layer if layer is not None else _layer(view, config)
    v, params = L.view, config.objective
    if not L.can_remove or L.concentrated:
        return []
    phi, w = v.phi_slow, L.shares
    fair = 1.0 / max(L.n_in_play, 1)
    light = w < params.prune_max_share * fair
    decoherent = phi < params.prune_coherence_floor
    not_pushed_away = v.offset >= 0 if v.offset is not None else torch.ones_like(light)
    vestigial = (w < params.prune_vestigial_share * fair) & not_pushed_away
    prunable = L.removable & ~L.degrading & light & (decoherent | vestigial)
    if not bool(prunable.any()):
        return []
    # Each candidate's best absorber: the measured expert the router finds most interchangeable with it.
    others = L.measured.unsqueeze(0) & ~torch.eye(v.num_slots, dtype=torch.bool)
    a_all, f_all = torch.where(others, L.overlap, -1.0).max(dim=1)
    phi_f_all = torch.nan_to_num(phi, nan=0.0)[f_all]
    ok = prunable & (a_all >= params.prune_min_absorbable)  # traffic with nowhere to go: keep the expert
    if not bool(ok.any()):
        return []
    phi0 = torch.nan_to_num(phi, nan=0.0)
    stranded = phi0.clamp_max(0.0)
    moved = w * (phi0 - (a_all * phi_f_all + (1.0 - a_all) * stranded))
    total = (L.served * moved - params.lambda_complexity - params.rho_redundancy * L.redundancy.sum(dim=1)
             - params.kappa_instability * L.excess)
    e = int(torch.where(ok, total, float("inf")).argmin())
    f, a, phi_f = int(f_all[e]), float(a_all[e]), float(phi_f_all[e])
    misfit = L.served * _moved_traffic_misfit(float(phi[e]), float(w[e]), a, phi_f)
    red, ins = L.removal(e)
    if bool(decoherent[e]):
        why = (f"persistently decoherent, phi_slow={float(phi[e]):.3f} < floor {params.prune_coherence_floor} "
               f"over {_evidence(L, e)}, with little traffic (share {float(w[e]):.3f} < {params.prune_max_share} "
               f"x fair 1/{L.n_in_play})")
    else:
        shift = f"lens offset {float(v.offset[e]):+.2f}" if v.offset is not None else "no mid clock"
        why = (f"vestigial, share {float(w[e]):.4f} < {params.prune_vestigial_share} x fair 1/{L.n_in_play} "
               f"while the mid clock does not push tokens away from it ({shift}); phi_slow={float(phi[e]):.3f} "
               f"over {_evidence(L, e)}")
    return [EditCandidate(
        "prune", v.layer_id, e, L.f_before, FreeEnergy(misfit, -params.lambda_complexity, red, ins),
        f"L{v.layer_id} E{e}: {why}; {a:.0%} of its traffic absorbable by E{f} (phi_slow={phi_f:.3f})",
    )]


def propose_merge(view: LayerView, config: ChronoConfig, layer: _Layer | None = None) -> list[EditCandidate]:
    """MERGE the most redundant pair of judged experts (not in a concentrated layer); the more used one survives
    and absorbs the other's traffic (the router's interchangeability says how much of it the survivor can
    serve). Never credited with a coherence gain."""
    L = layer if layer is not None else _layer(view, config)
    v, params = L.view, config.objective
    if not L.can_remove or L.concentrated:
        return []
    ok = L.removable & ~L.degrading
    pair_ok = ok.unsqueeze(0) & ok.unsqueeze(1)
    rr = torch.where(pair_ok, L.redundancy, 0.0)
    if not (float(rr.max()) > 0 and float(rr.max()) >= params.merge_min_redundancy):
        return []
    phi = v.phi_slow
    flat = int(rr.argmax())
    a, b = divmod(flat, v.num_slots)
    share = torch.nan_to_num(v.share_slow, nan=0.0)
    survivor, absorbed = (a, b) if (float(share[a]), -a) >= (float(share[b]), -b) else (b, a)
    red, ins = L.removal(absorbed)
    misfit = L.served * max(0.0, _moved_traffic_misfit(
        float(phi[absorbed]), float(L.shares[absorbed]), float(L.overlap[absorbed, survivor]), float(phi[survivor])
    ))
    return [EditCandidate(
        "merge", v.layer_id, absorbed, L.f_before, FreeEnergy(misfit, -params.lambda_complexity, red, ins),
        f"L{v.layer_id} E{absorbed} into E{survivor}: most redundant pair r={float(rr[a, b]):.3f} "
        f"(role cos {float(_cos(v.role[a], v.role[b])):.3f}, phi_slow {float(phi[a]):.3f}/"
        f"{float(phi[b]):.3f}, routing overlap {float(L.overlap[a, b]):.3f})",
        partner_id=survivor,
    )]


def propose_split(view: LayerView, config: ChronoConfig, layer: _Layer | None = None) -> list[EditCandidate]:
    """SPLIT the most bimodal judged expert above the bimodality threshold. The children's predicted coherence
    (the detector's `centroid_phi`, the same estimator as phi) enters the misfit delta honestly, a penalty
    when it is below the parent's: a split must pay through the instability it removes beyond what it costs
    in coherence and complexity, and the audit rolls it back when the loss says otherwise."""
    L = layer if layer is not None else _layer(view, config)
    v, params = L.view, config.objective
    if not L.can_add or v.centroid_phi is None:
        return []
    bim = torch.where(L.judged & ~L.degrading, L.excess, 0.0)
    if not float(bim.max()) > 0:
        return []
    e = int(bim.argmax())
    if not bool(torch.isfinite(v.centroid_phi[:, e]).all()):
        return []
    phi = v.phi_slow
    q = v.centroid_weights[:, e] if v.centroid_weights is not None else torch.full((2,), 0.5, dtype=torch.float64)
    q = q / q.sum() if float(q.sum()) > 0 else torch.full((2,), 0.5, dtype=torch.float64)
    phi_children = float((q * v.centroid_phi[:, e]).sum())
    misfit = L.served * float(L.shares[e]) * (float(phi[e]) - phi_children)
    delta = FreeEnergy(misfit, params.lambda_complexity, 0.0, -params.kappa_instability * float(L.excess[e]))
    return [EditCandidate(
        "split", v.layer_id, e, L.f_before, delta,
        f"L{v.layer_id} E{e}: most bimodal expert, bimodality={float(v.bimodality[e]):.3f} "
        f"(threshold {params.bimodality_threshold}); children's coherence {phi_children:.3f} vs parent "
        f"{float(phi[e]):.3f} (predicted at the split), over {_evidence(L, e)}",
    )]


def propose_spawn(view: LayerView, config: ChronoConfig, layer: _Layer | None = None) -> list[EditCandidate]:
    """SPAWN when tokens are starved while the experts themselves are coherent: the new expert is predicted to
    serve a starved share (at most its fair share) at the layer's coherence. Allowed in a concentrated layer:
    new capacity is an answer to starvation."""
    L = layer if layer is not None else _layer(view, config)
    v, params = L.view, config.objective
    s = float(v.starvation)
    if not (L.can_add and s > params.starvation_floor and bool(L.judged.any())):
        return []
    median_phi = float(v.phi_slow[L.judged].median())
    if not median_phi > params.prune_coherence_floor:
        return []
    n = L.n_in_play
    taken = min(s, 1.0 / (n + 1))
    return [EditCandidate(
        "spawn", v.layer_id, None, L.f_before,
        FreeEnergy(-taken * max(L.psi, 0.0), params.lambda_complexity, 0.0, 0.0),
        f"L{v.layer_id}: {s:.1%} of tokens fit no expert (starvation) while experts are coherent "
        f"(median phi_slow={median_phi:.3f} > floor {params.prune_coherence_floor}); a new expert is "
        f"predicted to serve {taken:.1%} of the traffic (at most its fair share 1/{n + 1}) "
        f"at the layer's Psi={L.psi:.3f}",
    )]


def _identity_kept(v: LayerView, e: int) -> float:
    """Fast over slow identity of expert e, clamped to [0, 1] (1 when the identity clocks are unknown)."""
    if v.identity is None:
        return 1.0
    fast, slow = float(v.identity[0, e]), float(v.identity[1, e])
    if not (math.isfinite(fast) and math.isfinite(slow)) or slow <= 0:
        return 1.0
    return min(max(fast / slow, 0.0), 1.0)


def _propose_restore(L: _Layer) -> list[EditCandidate]:
    """REPLACE an expert whose weights jumped by its own shadow copy, taken before the jump: its tokens are
    predicted to be served again at its pre-jump (slow) coherence instead of what they get now, its fast
    coherence discounted by how far its output turned away from its own earlier direction (fast over slow
    identity): phi can hardly move while the expert serves something else (measured on the damaged start)."""
    v = L.view
    if v.jumped is None or v.phi_fast is None or v.shadow_step is None:
        return []
    candidates = v.jumped & L.judged & (v.shadow_step >= 0) & torch.isfinite(v.phi_fast)
    if not bool(candidates.any()):
        return []
    drift = v.drift if v.drift is not None else torch.zeros(v.num_slots, dtype=torch.float64)
    e = int(torch.where(candidates, torch.nan_to_num(drift, nan=0.0), -1.0).argmax())
    phi_e, phi_base = float(v.phi_fast[e]), float(v.phi_slow[e])
    kept = _identity_kept(v, e)
    phi_now = min(phi_e, phi_e * kept)  # a negative phi is not made to look better by the discount
    misfit = L.served * float(L.shares[e]) * (phi_now - phi_base)
    return [EditCandidate(
        "replace", v.layer_id, e, L.f_before, FreeEnergy(misfit, 0.0, 0.0, 0.0),
        f"L{v.layer_id} E{e}: weights jumped (relative distance {float(drift[e]):.2f} from its copy of step "
        f"{int(v.shadow_step[e])}; phi_fast={phi_e:.3f}, identity kept {kept:.3f}, phi_slow={phi_base:.3f}) "
        f"while carrying share "
        f"{float(L.shares[e]):.3f}; restored from that copy, keeping its router row",
        partner_id=e,
    )]


def propose_replace(view: LayerView, config: ChronoConfig, layer: _Layer | None = None) -> list[EditCandidate]:
    """REPLACE a degrading expert that still carries traffic. An expert whose weights jumped is restored from
    its own shadow copy (`partner_id == expert_id`; allowed in a concentrated layer: a jump is not a reading in
    flux). Otherwise (its fast coherence broke away from its layer: damaged weights, a bad update) it gets a
    perturbed copy of the expert the router finds most interchangeable with it, keeping its router row: its
    tokens are predicted to be served at the donor's coherence instead of its own (fast) one."""
    L = layer if layer is not None else _layer(view, config)
    restore = _propose_restore(L)
    if restore:
        return restore
    v = L.view
    if v.phi_fast is None or not bool(L.degrading.any()) or L.concentrated:
        return []  # in a layer being rebalanced, coherence is in flux: repairs wait
    candidates = L.degrading & L.judged & torch.isfinite(v.phi_fast)
    if v.jumped is not None:
        candidates = candidates & ~v.jumped  # waits for its own copy
    if not bool(candidates.any()):
        return []
    e = int(torch.where(candidates, v.phi_fast, float("inf")).argmin())
    donors = L.judged & ~L.degrading & L.measured
    donors[e] = False
    if not bool(donors.any()):
        return []
    f = int(torch.where(donors, L.overlap[e], -1.0).argmax())
    phi_e, phi_f = float(v.phi_fast[e]), float(v.phi_slow[f])
    misfit = L.served * float(L.shares[e]) * (phi_e - phi_f)
    return [EditCandidate(
        "replace", v.layer_id, e, L.f_before, FreeEnergy(misfit, 0.0, 0.0, 0.0),
        f"L{v.layer_id} E{e}: degrading (phi_fast={phi_e:.3f}, phi_slow={float(v.phi_slow[e]):.3f}) while "
        f"carrying share {float(L.shares[e]):.3f}; replaced by a copy of E{f} (phi_slow={phi_f:.3f}, routing "
        f"overlap {float(L.overlap[e, f]):.2f}), keeping its router row",
        partner_id=f,
    )]


PROPOSERS = (propose_prune, propose_merge, propose_split, propose_spawn, propose_replace)


def propose_edits(view: LayerView, config: ChronoConfig) -> list[EditCandidate]:
    """Candidate edits of one layer (at most one per kind), each with its predicted component deltas and a
    reason. Cooling experts are never proposed; bounds are respected."""
    layer = _layer(view, config)
    return [c for propose in PROPOSERS for c in propose(layer.view, config, layer)]


def _cos(u: Tensor, v: Tensor) -> Tensor:
    u, v = torch.nan_to_num(u, nan=0.0), torch.nan_to_num(v, nan=0.0)
    return (u * v).sum() / (u.norm() * v.norm()).clamp_min(_EPS)


