"""The slow clock's cycle: propose -> score -> select -> apply -> log (SPEC 7-9).

`review` proposes and scores candidate edits for every layer (`objective.propose_edits`) and selects under
the cycle's rules (`objective.select_edits`: cooldowns, emergencies, budget). `apply_edit` executes one
selected edit on real weights through `ops` (optimiser surgery included) and carries the per-slot state
along: router side (slow bias beta, an aux-loss-free balancer's bias) here, fast state (clocks, detector,
co-routing, token basins) through `LayerObserver.on_edit`. `decision_record` writes the SPEC 9 line.
Nothing here knows the system: callers pass the registry, the layer's banks and its state objects.

Per-slot state after an edit:
- prune / merge: the freed slot forgets its history (clocks, detector) and its beta returns to 0;
- merge: the survivor keeps its history; where the router has no bias, the joint-mass shift the op returns
  (`log 2` for equal rows) is added to the survivor's beta (clipped to the beta bounds);
- split: both children inherit the parent's clock history (they are `cooling`, so never judged on it);
  the detector hands role 1 to the child in the parent's slot and role 2 to the new slot. The children's
  router rows separate the two roles (`config.lifecycle.split_router_margin`, default 2: at its role's mean
  router input a child takes 1 / (1 + e^-4) = 98% of the parent's routing mass): anchored at the
  detector's per-role mean router inputs, each child keeps the parent's logit for its own role's tokens and
  sits `2 * margin` below it for the other role's (`ops.split`), so the roles go to different children even
  under top-1 routing, where the router may get no gradient to break a tie. Without usable anchors (never
  measured, or collinear) both children keep the parent's row. Both children start at the parent's beta
  plus the op's mass-preserving shift (`-log(1 + exp(-2 margin))`; `-log 2` at margin 0) where the router
  has no bias (clipped), i.e. at or below it;
- spawn: the new slot starts fresh with beta 0. The clone parent (`clone_and_perturb`) is the most used
  judged expert of the layer;
- an aux-loss-free balancer's bias (`balance.reset_expert_bias`): a new expert takes the mean bias of the
  layer's other live experts (a split child: its sibling's), a masked slot returns to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapters import LayerBanks
from ..balance import reset_expert_bias
from ..bias import SlowBias
from ..config import ChronoConfig
from ..observe.bimodality import BimodalityState
from ..observe.coherence import CoherenceState
from ..observe.observer import LayerObserver
from ..ops import (
    EditError,
    EditRecord,
    ExpertRegistry,
    OptimizerSurgery,
    ShadowBank,
    SlotSnapshot,
    merge,
    prune,
    replace,
    restore_own,
    revert,
    spawn,
    split,
)
from ..ops.common import separating_offsets
from ..view import LayerView
from .audit import LOSS_WINDOW, Audit, AuditRecord, slot_readings
from .decisions import CompetingEdit, DecisionRecord, ExpertCoherence, PredictedFreeEnergy
from .objective import ACTIONS, EditCandidate, LayerDecision, propose_edits
from .select import select_edits


@dataclass(frozen=True)
class LifecycleAction:
    """One executed edit: what the slow clock did, to whom, and why."""

    step: int
    layer_id: int
    action: str
    expert_id: str | None
    child_id: str | None
    reason: str
    trigger: str
    delta_F: float
    record: EditRecord


@dataclass
class LayerParts:
    """What an edit of one layer touches besides the registry: its weights (`banks`), its fast state
    (`observer`), and its router-side per-slot state (the slow bias; selection biases: an aux-loss-free
    balancer's bias, the mid clock's `LogitLens` offset), and the shadow copies of its experts (`shadow`: what a
    replacement of an expert by its own earlier weights reads; slots an edit rewrites are forgotten there)."""

    banks: LayerBanks
    observer: LayerObserver
    bias: SlowBias | None = None
    selection_biases: tuple[Tensor, ...] = ()
    shadow: ShadowBank | None = None


def review(
    views: Mapping[int, LayerView],
    config: ChronoConfig,
    *,
    cooldown_ok: Mapping[int, bool],
    emergency: Mapping[int, bool],
    review_due: bool,
    barred: Mapping[int, Sequence[str]] | None = None,
) -> list[LayerDecision]:
    """Propose and score candidates for each layer, then select under the cycle's rules. `barred[layer]`: edit
    kinds not proposed in that layer now (a recent edit of that kind there was rolled back)."""
    barred = barred or {}
    candidates = {
        lid: [c for c in propose_edits(view, config) if c.action not in barred.get(lid, ())]
        for lid, view in views.items()
    }
    return select_edits(candidates, config, cooldown_ok, emergency, review_due=review_due)


def _slot_mask(num_slots: int, slots: Sequence[int], device: torch.device) -> Tensor:
    mask = torch.zeros(num_slots, dtype=torch.bool, device=device)
    mask[list(slots)] = True
    return mask


def _set_beta(bias: SlowBias | None, slot: int, value: float) -> None:
    if bias is None:
        return
    c = bias.config
    v = min(max(value, c.bias.beta_min), c.bias.beta_max)
    bias.set_beta(v, _slot_mask(bias.num_experts, [slot], bias.beta.device))


def _beta(bias: SlowBias | None, slot: int) -> float:
    return 0.0 if bias is None else float(bias.beta[slot])


def apply_edit(
    edit: EditCandidate,
    parts: LayerParts,
    registry: ExpertRegistry,
    view: LayerView,
    *,
    step: int,
    generator: torch.Generator | None = None,
    surgery: OptimizerSurgery | None = None,
) -> EditRecord:
    """Execute one selected edit on the layer's weights, registry and optimiser, then carry the per-slot state:
    router side here (beta, the balancer's bias), fast state through `parts.observer.on_edit(record)`.

    `view` is the (host) LayerView the edit was chosen from (usage weights for merge, clone parent for spawn).
    """
    layer = edit.layer_id
    banks, bim, bias = parts.banks, parts.observer.bimodality, parts.bias
    split_router_margin = parts.observer.config.lifecycle.split_router_margin
    view = view.to_host()
    share = torch.nan_to_num(view.share_slow, nan=0.0)
    if edit.action == "prune":
        assert edit.expert_id is not None
        record = prune(registry, banks, layer, edit.expert_id, step=step, optimizer=surgery)
    elif edit.action == "merge":
        assert edit.expert_id is not None and edit.partner_id is not None
        survivor, absorbed = edit.partner_id, edit.expert_id
        usage = (float(share[survivor]), float(share[absorbed]))
        record = merge(
            registry, banks, layer, survivor, absorbed, step=step, usage=usage, optimizer=surgery
        )
        if not record.logit_shift_applied:
            _set_beta(bias, survivor, _beta(bias, survivor) + record.logit_shift.get(survivor, 0.0))
    elif edit.action == "split":
        assert edit.expert_id is not None
        parent = edit.expert_id
        parent_beta = _beta(bias, parent)
        anchors = split_anchors(bim, parent) if split_router_margin > 0 else None
        record = split(
            registry, banks, layer, parent, step=step, generator=generator, optimizer=surgery,
            router_margin=split_router_margin if anchors is not None else 0.0, router_anchors=anchors,
        )
        target = record.fresh_slots[0]
        for child in (parent, target):
            shift = 0.0 if record.logit_shift_applied else record.logit_shift[child]
            _set_beta(bias, child, parent_beta + shift)
    elif edit.action == "spawn":
        judged = view.active & ~view.cooling
        clone = int(torch.where(judged, share, -1.0).argmax()) if bool(judged.any()) else None
        strategy = None if clone is not None else "random"
        record = spawn(
            registry, banks, layer, step=step, parent=clone, strategy=strategy, generator=generator,
            optimizer=surgery,
        )
    elif edit.action == "replace" and edit.partner_id == edit.expert_id:  # its own earlier weights
        assert edit.expert_id is not None
        if parts.shadow is None:
            raise EditError(
                f"restore of slot {edit.expert_id} (layer {layer}) needs the layer's shadow copies; got none"
            )
        record = restore_own(
            registry, banks, layer, edit.expert_id, parts.shadow.weights(edit.expert_id), step=step, optimizer=surgery
        )
    elif edit.action == "replace":
        assert edit.expert_id is not None and edit.partner_id is not None
        record = replace(
            registry, banks, layer, edit.expert_id, edit.partner_id, step=step, generator=generator,
            optimizer=surgery,
        )
    else:
        raise ValueError(f"edit action {edit.action!r} is invalid: expected one of {list(ACTIONS)}")
    for slot in list(record.parked_slots) + ([] if edit.action == "split" else list(record.fresh_slots)):
        _set_beta(bias, slot, 0.0)
    if edit.action != "replace":  # a replacement keeps its slot's router row, so its selection biases too
        sibling = record.kept_slots[0] if record.kind == "split" and record.kept_slots else None
        for selection_bias in parts.selection_biases:
            reset_expert_bias(selection_bias, banks.active_mask, record.fresh_slots, record.parked_slots, sibling)
    parts.observer.on_edit(record)
    if parts.shadow is not None:  # rewritten slots: their copy no longer describes them
        parts.shadow.forget(record.slots)
    return record


def slots_touched(edit: EditCandidate, registry: ExpertRegistry) -> tuple[int, ...]:
    """The slots an edit will change, known before it runs (a new expert takes the lowest free slot)."""
    layer = edit.layer_id
    slots = [s for s in (edit.expert_id, edit.partner_id if edit.action == "merge" else None) if s is not None]
    if edit.action in ("split", "spawn"):
        free = registry.free_slots(layer)
        slots += free[:1]
    return tuple(sorted(set(slots)))


def router_state(parts: LayerParts, slots: Sequence[int]) -> dict[str, list[float]]:
    """The router-side per-slot values of `slots` (beta, each selection bias), for an undo."""
    out: dict[str, list[float]] = {}
    if parts.bias is not None:
        out["beta"] = [float(parts.bias.beta[s]) for s in slots]
    for k, t in enumerate(parts.selection_biases):
        out[f"selection_{k}"] = [float(t[s]) for s in slots]
    return out


def open_audit(
    edit: EditCandidate,
    record: EditRecord,
    parts: LayerParts,
    before: tuple[SlotSnapshot, ...],
    router_before: dict[str, list[float]],
    view: LayerView,
    *,
    step: int,
    child_id: str | None,
    expert_id: str | None,
    losses: Sequence[tuple[int, float]],
) -> Audit:
    """Start the audit of an edit that has just run (`before`/`router_before` taken before it ran)."""
    config = parts.observer.config
    slots = tuple(s.slot for s in before)
    view = view.to_host()
    return Audit(
        layer=edit.layer_id, edit_step=step, due_step=step + config.lifecycle.audit_steps, action=edit.action,
        expert_id=expert_id, child_id=child_id, predicted=edit.delta, F_before=edit.F_before, slots=slots,
        before=before, router_before=router_before,
        readings_before=slot_readings(torch.nan_to_num(view.share_slow, nan=0.0), view.phi_slow, slots),
        losses_before=[(int(s), float(v)) for s, v in losses if s <= step][-LOSS_WINDOW:],
    )


def roll_back(
    audit: Audit, parts: LayerParts, registry: ExpertRegistry, *, step: int, surgery: OptimizerSurgery | None = None
) -> EditRecord:
    """Undo an audited edit: the slots get back their experts' weights (`ops.revert`, optimiser state fresh
    where an expert is restored), beta and the selection biases their values, and the fast state follows
    (`on_edit`)."""
    record = revert(registry, parts.banks, audit.layer, audit.before, step=step, optimizer=surgery)
    slots = list(audit.slots)
    if parts.bias is not None and "beta" in audit.router_before:
        c = parts.bias.config.bias
        values = torch.zeros(parts.bias.num_experts)
        for slot, v in zip(slots, audit.router_before["beta"], strict=True):
            values[slot] = min(max(v, c.beta_min), c.beta_max)
        parts.bias.set_beta(values, _slot_mask(parts.bias.num_experts, slots, torch.device("cpu")))
    for k, t in enumerate(parts.selection_biases):
        saved = audit.router_before.get(f"selection_{k}")
        if saved is not None:
            with torch.no_grad():
                t[slots] = torch.tensor(saved, dtype=t.dtype, device=t.device)
    parts.observer.on_edit(record)
    if parts.shadow is not None:  # rewritten slots: their copy no longer describes them
        parts.shadow.forget(record.slots)
    return record


def split_anchors(bim: BimodalityState, parent: int) -> tuple[Tensor, Tensor] | None:
    """The parent's two per-role mean router inputs (role 1 -> the child in the parent's slot, role 2 -> the
    new slot), or None where they cannot anchor a split (never measured, zero or collinear)."""
    means = bim.router_mean[:, parent].detach()
    anchors = (means[0], means[1])
    try:
        separating_offsets(anchors[0], anchors[1], 1.0)
    except EditError:
        return None
    return anchors


def expert_readings(view: LayerView, coh: CoherenceState, bias: SlowBias | None, slot: int | None) -> ExpertCoherence:
    """The acted-on expert's readings for the log (None for spawn / do nothing)."""
    if slot is None:
        return ExpertCoherence()
    clocks = coh.phi_clocks[:, slot].detach().cpu().tolist()

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return ExpertCoherence(
        phi_fast=num(clocks[0]), phi_mid=num(clocks[1]), phi_slow=num(clocks[2]),
        beta=None if bias is None else float(bias.beta[slot]),
        bimodality=num(float(view.bimodality[slot])),
        evidence=None if view.evidence is None else num(float(view.evidence[slot])),
    )


def _id(ids: Sequence[str | None], slot: int | None) -> str | None:
    return None if slot is None else ids[slot]


def decision_record(
    decision: LayerDecision,
    *,
    step: int,
    run_id: str,
    trigger: str,
    slot_ids: Sequence[str | None],
    readings: ExpertCoherence,
    record: EditRecord | None = None,
) -> DecisionRecord | None:
    """The SPEC 9 line of one layer's decision; None for a do-nothing with no candidate to beat.

    `slot_ids` are the registry ids living in each slot *before* the edit.
    """
    edit = decision.edit
    competing = tuple(
        CompetingEdit(c.action, _id(slot_ids, c.expert_id), c.delta_F, c.reason, _id(slot_ids, c.partner_id))
        for c in decision.candidates
        if c is not edit
    )
    if edit is None:
        if not decision.candidates:
            return None
        f_before = decision.candidates[0].F_before
        return DecisionRecord(
            step=step, run_id=run_id, clock="slow", action="do_nothing", layer_id=decision.layer_id, expert_id=None,
            coherence_state=ExpertCoherence(), free_energy=PredictedFreeEnergy.unchanged(f_before),
            trigger=trigger, competing_edits=competing, reason=decision.reason,
        )
    child: str | None = None
    if record is not None:
        if edit.action in ("spawn", "split", "replace"):
            child = record.born_ids[-1] if record.born_ids else None
        elif edit.action == "merge":
            child = _id(slot_ids, edit.partner_id)
    d = edit.delta
    return DecisionRecord(
        step=step, run_id=run_id, clock="slow", action=edit.action, layer_id=decision.layer_id,
        expert_id=_id(slot_ids, edit.expert_id), child_id=child, coherence_state=readings,
        free_energy=PredictedFreeEnergy(
            edit.F_before, edit.F_after_predicted, edit.delta_F, d.misfit, d.complexity, d.redundancy, d.instability
        ),
        trigger=trigger, competing_edits=competing, reason=f"{decision.reason}; {edit.reason}",
    )


def rollback_record(audit: Audit, verdict: AuditRecord, *, run_id: str, F_now: float) -> DecisionRecord:
    """The decision-log line of a rollback: which edit was undone, and why (the audit's verdict)."""
    return DecisionRecord(
        step=verdict.step, run_id=run_id, clock="slow", action="rollback", layer_id=audit.layer,
        expert_id=audit.expert_id, coherence_state=ExpertCoherence(),
        free_energy=PredictedFreeEnergy.unchanged(F_now),
        trigger=f"audit of the {audit.action} at step {audit.edit_step}", child_id=audit.child_id,
        reason=verdict.reason,
    )
