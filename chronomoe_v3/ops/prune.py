"""Prune: mask an expert and park its weights in the archive; restore: bring parked weights back."""

from __future__ import annotations

from ..adapters import LayerBanks
from .common import (
    check_can_add,
    check_can_remove,
    check_edit,
    choose_free_slot,
    clear_slot,
    fill_slot,
    finish,
    read_parked,
)
from .record import EditRecord
from .registry import ExpertRegistry
from .surgery import OptimizerSurgery


def prune(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    slot: int,
    *,
    step: int,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Archive the live expert in `slot`: park its weights and router row, zero them, mask the slot."""
    check_edit(registry, banks, layer, step, optimizer)
    victim = registry.live_record(layer, slot)
    check_can_remove(registry, layer)
    parked = read_parked(banks, slot)
    clear_slot(banks, slot)
    registry.retire(layer, slot, step, ended_by="prune", parked=parked)
    record = EditRecord(kind="prune", layer=layer, step=step, ended_ids=(victim.expert_id,), parked_slots=(slot,))
    return finish(record, banks, optimizer)


def restore(
    registry: ExpertRegistry,
    banks: LayerBanks,
    expert_id: str,
    *,
    step: int,
    slot: int | None = None,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Bring an archived expert's parked weights back, bit for bit, as a new expert (new id, `parent_id` =
    the archived id, origin `restore`) in `slot` (default: its old slot if free, else the lowest free)."""
    source = registry.expert(expert_id)
    layer = source.layer
    check_edit(registry, banks, layer, step, optimizer)
    parked = registry.archived_weights(expert_id)
    check_can_add(registry, layer)
    if slot is None and registry.expert_at(layer, source.slot) is None:
        slot = source.slot
    target = choose_free_slot(registry, layer, slot)
    fill_slot(banks, target, parked)
    registry.unpark(expert_id)
    born = registry.birth(layer, target, step, origin="restore", parent_id=expert_id)
    record = EditRecord(
        kind="restore", layer=layer, step=step, born_ids=(born.expert_id,), parent_id=expert_id,
        fresh_slots=(target,),
    )
    return finish(record, banks, optimizer)
