"""Split: one expert becomes two children that share its routing mass."""

from __future__ import annotations

import torch

from ..banks import LayerBanks
from ..registry import ExpertRegistry
from .common import (
    LOG2,
    EditRecord,
    check_can_add,
    check_edit,
    check_scale,
    choose_free_slot,
    fill_slot,
    finish,
    relative_noise,
)
from .optimizer import OptimizerSurgery


def split(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    slot: int,
    *,
    step: int,
    new_slot: int | None = None,
    scale: float | None = None,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Replace the expert in `slot` by two `cooling` children: child A in `slot`, child B in `new_slot`
    (default: the lowest free slot). The parent is archived (weights parked).

    Expert weights: `parent + d` and `parent - d` (`antithetic`, the default: the children's mean is the
    parent, so where both are selected with equal gates the output moves only at second order in `scale`),
    or `parent + d1` and `parent + d2` (independent noise: first order), with `d` relative Gaussian noise of
    size `scale` (default `config.split_perturbation_scale`). Router: both children get the parent's row;
    their logits must drop by log 2 so that together they hold exactly the parent's softmax mass. With a
    router bias that shift is applied to both bias entries; without one it is returned in
    `record.logit_shift` for the caller to add to the children's logit bias (beta).
    Child A keeps the parent's optimiser state; child B (a newly unmasked slot) starts fresh.
    """
    check_edit(registry, banks, layer, step, optimizer)
    parent = registry.live_record(layer, slot)
    scale = check_scale(registry.config.split_perturbation_scale if scale is None else scale)
    check_can_add(registry, layer)
    target = choose_free_slot(registry, layer, new_slot)

    weights, router = banks.experts.read(slot), banks.router.read(slot)
    noise_a = relative_noise(weights, scale, generator)
    noise_b = {n: -d for n, d in noise_a.items()} if antithetic else relative_noise(weights, scale, generator)
    child_a = {n: w + noise_a[n] for n, w in weights.items()}
    child_b = {n: w + noise_b[n] for n, w in weights.items()}
    child_router = dict(router)
    if banks.router.has_bias:
        child_router["bias"] = router["bias"] - LOG2

    fill_slot(banks, slot, {"experts": child_a, "router": child_router})
    fill_slot(banks, target, {"experts": child_b, "router": child_router})
    registry.retire(layer, slot, step, ended_by="split", parked={"experts": weights, "router": router})
    a = registry.birth(layer, slot, step, origin="split", parent_id=parent.expert_id)
    b = registry.birth(layer, target, step, origin="split", parent_id=parent.expert_id)
    record = EditRecord(
        kind="split", layer=layer, step=step, born_ids=(a.expert_id, b.expert_id), ended_ids=(parent.expert_id,),
        parent_id=parent.expert_id, fresh_slots=(target,), kept_slots=(slot,),
        logit_shift={slot: -LOG2, target: -LOG2}, logit_shift_applied=banks.router.has_bias,
    )
    return finish(record, banks, optimizer)
