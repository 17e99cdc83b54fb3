"""Audit: every executed edit is measured after it, beside its prediction, and undone when it proves harmful.

When an edit runs, `open_audit` keeps what it predicted (delta_F and its four components), the layer's F and
the edited slots' share and phi before it, the losses the training loop passed to `step(loss=...)` before it,
and the undo: a snapshot of the touched slots (weights, router rows, beta, selection biases). Once
`lifecycle.audit_steps` training steps have passed, `judge` reads the same quantities again:

- the realised delta_F of the layer (F now minus F before) beside the predicted one, component by component;
- the edited slots' share and phi now;
- with losses: the change of the loss against what its trend before the edit predicts (`expected`: the mean
  of the last readings before, moved by half their slope over the elapsed steps, never upwards), and the
  noise of that comparison (the spread of the step-to-step changes of the losses before, combined over the
  readings compared).

The edit is **harmful** when the loss rose above its expected value by more than `harm_z` noise units and
`harm_min_loss`; without losses, when the layer's F rose by more than `min_improvement` (the objective's own
bar, in the wrong direction). A harmful edit is rolled back (`ops.revert` with optimiser surgery; beta and the
selection biases of the slots restored). Either way the audit is logged (`audits.jsonl`, `AuditRecord`), so the
calibration of the predictions can be read off the run. Everything here is host-side arithmetic.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from ..config import ChronoConfig
from ..ops import SlotSnapshot
from .objective import FreeEnergy

# How many loss readings before an edit the audit compares with (and estimates the noise from).
LOSS_WINDOW = 8


@dataclass
class Audit:
    """An executed edit waiting for its verdict (see the module docstring). Plain data plus the undo tensors."""

    layer: int
    edit_step: int
    due_step: int
    action: str
    expert_id: str | None
    child_id: str | None
    predicted: FreeEnergy
    F_before: float
    slots: tuple[int, ...]
    before: tuple[SlotSnapshot, ...]
    router_before: dict[str, list[float]]  # per router-side state ("beta", "selection_0", ...): value per slot
    readings_before: dict[str, list[float | None]]  # "share", "phi": per slot of `slots`
    losses_before: list[tuple[int, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "edit_step": self.edit_step, "due_step": self.due_step, "action": self.action,
            "expert_id": self.expert_id, "child_id": self.child_id, "predicted": asdict(self.predicted),
            "F_before": self.F_before, "slots": list(self.slots), "before": [s.state_dict() for s in self.before],
            "router_before": {k: list(v) for k, v in self.router_before.items()},
            "readings_before": {k: list(v) for k, v in self.readings_before.items()},
            "losses_before": [list(p) for p in self.losses_before],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Audit:
        return cls(
            layer=int(state["layer"]), edit_step=int(state["edit_step"]), due_step=int(state["due_step"]),
            action=str(state["action"]), expert_id=state["expert_id"], child_id=state["child_id"],
            predicted=FreeEnergy(**{k: float(v) for k, v in state["predicted"].items()}),
            F_before=float(state["F_before"]), slots=tuple(int(s) for s in state["slots"]),
            before=tuple(SlotSnapshot.from_state_dict(dict(s)) for s in state["before"]),
            router_before={str(k): [float(x) for x in v] for k, v in state["router_before"].items()},
            readings_before={str(k): [None if x is None else float(x) for x in v]
                             for k, v in state["readings_before"].items()},
            losses_before=[(int(s), float(v)) for s, v in state["losses_before"]],
        )


@dataclass(frozen=True)
class AuditRecord:
    """One line of `audits.jsonl`: an edit's prediction beside what it did, and the verdict."""

    step: int
    layer_id: int
    edit_step: int
    action: str
    expert_id: str | None
    child_id: str | None
    predicted: dict[str, float]
    realised: dict[str, float]
    readings_before: dict[str, list[float | None]]
    readings_after: dict[str, list[float | None]]
    loss: dict[str, float | None]
    verdict: str  # "kept", "rolled_back", or "partial" (judged by `ChronoSystem.close()` before its window ended)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def loss_effect(
    before: Sequence[tuple[int, float]], after: Sequence[tuple[int, float]]
) -> dict[str, float | None]:
    """The loss after an edit against what its trend before predicts (see the module docstring):
    `{before, after, expected, change, noise}` (None where there are too few readings)."""
    out: dict[str, float | None] = {"before": None, "after": None, "expected": None, "change": None, "noise": None}
    before = [(s, v) for s, v in before if math.isfinite(v)][-LOSS_WINDOW:]
    after = [(s, v) for s, v in after if math.isfinite(v)]
    if not before or not after:
        return out
    last = before[-3:]
    level = statistics.fmean(v for _, v in last)
    anchor = statistics.fmean(s for s, _ in last)
    slope = 0.0
    if len(before) >= 3:
        xs = [s for s, _ in before]
        ys = [v for _, v in before]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = min(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var) if var > 0 else 0.0
    after_mean = statistics.fmean(v for _, v in after)
    after_at = statistics.fmean(s for s, _ in after)
    expected = level + 0.5 * slope * (after_at - anchor)
    out.update(before=level, after=after_mean, expected=expected, change=after_mean - expected)
    if len(before) >= 3:
        diffs = [b - a for (_, a), (_, b) in zip(before[:-1], before[1:], strict=True)]
        sigma = statistics.pstdev(diffs) / math.sqrt(2.0)
        out["noise"] = sigma * math.sqrt(1.0 / len(after) + 1.0 / len(last))
    return out


def judge(
    audit: Audit,
    F_after: FreeEnergy,
    readings_after: dict[str, list[float | None]],
    losses_after: Sequence[tuple[int, float]],
    config: ChronoConfig,
    step: int,
) -> tuple[bool, AuditRecord]:
    """The verdict on one audit: (harmful, the record to log)."""
    c = config.lifecycle
    realised = F_after.total - audit.F_before
    loss = loss_effect(audit.losses_before, losses_after)
    change, noise = loss["change"], loss["noise"]
    if change is not None:
        bar = max(c.harm_z * (noise or 0.0), c.harm_min_loss)
        harmful = change > bar
        why = (f"loss {'rose' if change > 0 else 'fell'} {change:+.4f} against its trend (noise {noise or 0.0:.4f}, "
               f"harm above {bar:.4f})")
    else:
        bar = config.objective.min_improvement
        harmful = realised > bar
        why = f"no loss readings; the layer's F moved {realised:+.4f} (harm above +{bar})"
    predicted = asdict(audit.predicted) | {"delta_F": audit.predicted.total}
    realised_parts = {"delta_F": realised, "F_before": audit.F_before, "F_after": F_after.total,
                      "misfit": F_after.misfit, "complexity": F_after.complexity,
                      "redundancy": F_after.redundancy, "instability": F_after.instability}
    record = AuditRecord(
        step=step, layer_id=audit.layer, edit_step=audit.edit_step, action=audit.action,
        expert_id=audit.expert_id, child_id=audit.child_id, predicted=predicted,
        realised={k: v for k, v in realised_parts.items() if _finite(v) is not None},
        readings_before=audit.readings_before, readings_after=readings_after,
        loss={k: None if v is None else _finite(v) for k, v in loss.items()},
        verdict="rolled_back" if harmful else "kept",
        reason=("harmful: " if harmful else "kept: ") + why,
    )
    return harmful, record


def slot_readings(share: Tensor, phi: Tensor, slots: Sequence[int]) -> dict[str, list[float | None]]:
    """`{"share": [...], "phi": [...]}` of `slots` (host tensors; NaN as None)."""
    def pick(t: Tensor) -> list[float | None]:
        return [_finite(float(t[s])) for s in slots]
    return {"share": pick(share), "phi": pick(phi)}
