"""Revert: put back what some slots of a layer held before an edit (the rollback of an audited edit).

`snapshot_slots` records, before an edit, which expert each touched slot held and its weights (expert and
router row); `revert` later restores exactly that: a slot that was free is emptied again, a slot whose
expert survived the edit (a merge survivor) gets its weights back and keeps its id, and a slot whose expert
ended gets that expert's weights back as a new expert (origin `restore`, parent = the old id). Experts the
revert removes end with `rollback`; their weights are parked like any archived expert's. The layer ends with
the live count it had before the edit, so the bounds are not re-checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..adapters import LayerBanks
from .common import check_layer_banks, clear_slot, fill_slot, finish, read_parked
from .record import EditError, EditRecord
from .registry import ExpertRegistry, Parked
from .surgery import OptimizerSurgery


@dataclass(frozen=True)
class SlotSnapshot:
    """What one slot held: the id of its expert (None: free) and that expert's weights (None when free)."""

    slot: int
    expert_id: str | None
    weights: Parked | None

    def state_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "expert_id": self.expert_id, "weights": self.weights}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SlotSnapshot:
        weights = state["weights"]
        if weights is not None:
            weights = {part: {k: v for k, v in tensors.items() if isinstance(v, Tensor)}
                       for part, tensors in weights.items()}
        return cls(int(state["slot"]), None if state["expert_id"] is None else str(state["expert_id"]), weights)


def snapshot_slots(
    registry: ExpertRegistry, banks: LayerBanks, layer: int, slots: Sequence[int]
) -> tuple[SlotSnapshot, ...]:
    """Clones of what `slots` of `layer` hold now (call it before an edit that may be reverted)."""
    out = []
    for slot in sorted(set(slots)):
        record = registry.expert_at(layer, slot)
        weights = None if record is None else read_parked(banks, slot)
        out.append(SlotSnapshot(slot, None if record is None else record.expert_id, weights))
    return tuple(out)


def revert(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    before: Sequence[SlotSnapshot],
    *,
    step: int,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Restore the slots of `before` (see the module docstring). Validated first; nothing changes on error."""
    check_layer_banks(registry, banks, layer)
    if optimizer is not None:
        optimizer.check(banks)
    for snap in before:
        registry.check_slot(layer, snap.slot)
        if (snap.expert_id is None) != (snap.weights is None):
            raise EditError(f"snapshot of slot {snap.slot} is inconsistent: expert {snap.expert_id!r} with "
                            f"{'no ' if snap.weights is None else ''}weights")
    fresh, parked, kept = [], [], []
    born, ended = [], []
    for snap in before:
        now = registry.expert_at(layer, snap.slot)
        if snap.expert_id is None:
            if now is not None:
                registry.retire(layer, snap.slot, step, ended_by="rollback", parked=read_parked(banks, snap.slot))
                clear_slot(banks, snap.slot)
                ended.append(now.expert_id)
                parked.append(snap.slot)
            continue
        assert snap.weights is not None
        if now is not None and now.expert_id == snap.expert_id:
            fill_slot(banks, snap.slot, snap.weights)
            kept.append(snap.slot)
            continue
        if now is not None:
            registry.retire(layer, snap.slot, step, ended_by="rollback", parked=read_parked(banks, snap.slot))
            ended.append(now.expert_id)
        fill_slot(banks, snap.slot, snap.weights)
        if snap.expert_id in registry.archived_ids():
            registry.unpark(snap.expert_id)  # its weights are back in the bank: the archive lets them go
        record = registry.birth(layer, snap.slot, step, origin="restore", parent_id=snap.expert_id)
        born.append(record.expert_id)
        fresh.append(snap.slot)
    result = EditRecord(
        kind="rollback", layer=layer, step=step, born_ids=tuple(born), ended_ids=tuple(ended),
        fresh_slots=tuple(fresh), parked_slots=tuple(parked), kept_slots=tuple(kept),
    )
    return finish(result, banks, optimizer)
