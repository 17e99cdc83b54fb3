"""Replace: swap an expert for a perturbed copy of another one's weights, keeping its router row.

The response to an expert whose coherence collapsed while it still carries traffic (a `degrading` flag:
damaged weights, a bad update): the router keeps sending it the same tokens, and they get a working function
at once instead of waiting for gradient descent to repair noise. The old expert is archived with its weights
(restorable, so an audit can roll the replacement back); the new one is born `cooling` in the same slot.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..adapters import LayerBanks
from .common import check_edit, check_finite_weights, check_scale, fill_slot, finish, read_parked, relative_noise
from .record import EditError, EditRecord
from .registry import ExpertRegistry, Parked
from .surgery import OptimizerSurgery


def replace(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    slot: int,
    source: int,
    *,
    step: int,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Archive the expert in `slot` and write there the expert weights of `source` (a live slot) plus relative
    Gaussian noise of size `scale` (default `config.lifecycle.perturbation_scale`); `slot`'s router row is
    kept. The new expert (origin `replace`, parent = the source) starts with fresh optimiser state."""
    check_edit(registry, banks, layer, step, optimizer)
    victim = registry.live_record(layer, slot)
    donor = registry.live_record(layer, source)
    if slot == source:
        raise EditError(f"cannot replace expert {victim.expert_id} (slot {slot}) by itself: expected another slot")
    scale = check_scale(registry.config.lifecycle.perturbation_scale if scale is None else scale)
    parked = read_parked(banks, slot)
    experts = banks.experts.read(source)
    for name, delta in relative_noise(experts, scale, generator).items():
        experts[name] += delta
    what = f"replace of slot {slot} (layer {layer}) by slot {source}"
    return _swap_in(registry, banks, layer, slot, experts, parked, donor.expert_id, what, step, optimizer)


def _swap_in(
    registry: ExpertRegistry, banks: LayerBanks, layer: int, slot: int, experts: Mapping[str, Tensor],
    parked: Parked, parent_id: str, what: str, step: int, optimizer: OptimizerSurgery | None,
) -> EditRecord:
    """Write `experts` into `slot` (router row kept), archive the old expert, and birth the new one."""
    victim = registry.live_record(layer, slot)
    new = {"experts": dict(experts), "router": parked["router"]}
    check_finite_weights(what, new)
    fill_slot(banks, slot, new)
    registry.retire(layer, slot, step, ended_by="replace", parked=parked)
    born = registry.birth(layer, slot, step, origin="replace", parent_id=parent_id)
    record = EditRecord(
        kind="replace", layer=layer, step=step, born_ids=(born.expert_id,), ended_ids=(victim.expert_id,),
        parent_id=parent_id, fresh_slots=(slot,),
    )
    return finish(record, banks, optimizer)


def restore_own(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    slot: int,
    weights: Mapping[str, Tensor],
    *,
    step: int,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Replace the expert in `slot` by its own earlier weights `weights` (its shadow copy, `ops/shadow.py`):
    the response to an expert whose weights jumped. Archived and reborn like `replace` (origin `replace`,
    parent = the expert it was), router row kept, fresh optimiser state."""
    check_edit(registry, banks, layer, step, optimizer)
    victim = registry.live_record(layer, slot)
    parked = read_parked(banks, slot)
    experts = {name: w.clone() for name, w in weights.items()}
    if set(experts) != set(parked["experts"]):
        raise EditError(
            f"restore of slot {slot} (layer {layer}) got weights {sorted(experts)}; expected "
            f"{sorted(parked['experts'])}"
        )
    what = f"restore of slot {slot} (layer {layer}) from its shadow copy"
    return _swap_in(registry, banks, layer, slot, experts, parked, victim.expert_id, what, step, optimizer)
