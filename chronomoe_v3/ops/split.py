"""Split: one expert becomes two children that share its routing mass."""

from __future__ import annotations

import torch

from ..adapters import LayerBanks
from .common import (
    check_can_add,
    check_edit,
    check_finite_weights,
    check_scale,
    choose_free_slot,
    fill_slot,
    finish,
    relative_noise,
    separating_offsets,
    split_logit_shift,
)
from .record import EditError, EditRecord
from .registry import ExpertRegistry
from .surgery import OptimizerSurgery


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
    router_margin: float = 0.0,
    router_anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> EditRecord:
    """Replace the expert in `slot` by two `cooling` children: child A in `slot`, child B in `new_slot`
    (default: the lowest free slot). The parent is archived (weights parked).

    Expert weights: `parent + d` and `parent - d` (`antithetic`, the default: the children's mean is the
    parent, so where both are selected with equal gates the output moves only at second order in `scale`),
    or `parent + d1` and `parent + d2` (independent noise: first order), with `d` relative Gaussian noise of
    size `scale` (default `config.lifecycle.perturbation_scale`).

    Router, `router_margin` 0 (the default): both children get the parent's row; their logits must drop by
    log 2 so that together they hold exactly the parent's softmax mass (the layer's function is unchanged
    up to the weight perturbation). Under top-1 routing the tie then goes to one child for every token.
    `router_margin` m > 0 with `router_anchors = (h_a, h_b)` (router inputs typical of the parent's two
    roles, e.g. `BimodalityState.router_mean`): the children's rows are the parent's plus the offsets of
    `separating_offsets`, so child A keeps the parent's logit at h_a and is `2m` below it at h_b (and vice
    versa), and both drop by `-log(1 + exp(-2m))` (`split_logit_shift`): at the anchors the children
    together hold exactly the parent's mass and the child of the role takes a fraction `1 / (1 + exp(-2m))`
    of it; the output there is unchanged up to the weight perturbation (exactly, under dense routing), and
    under top-k routing tokens near the anchors go to the child of their role.
    With a router bias the shift is applied to both bias entries; without one it is returned in
    `record.logit_shift` for the caller to add to the children's logit bias (beta).
    Child A keeps the parent's optimiser state; child B (a newly unmasked slot) starts fresh.
    """
    check_edit(registry, banks, layer, step, optimizer)
    parent = registry.live_record(layer, slot)
    scale = check_scale(registry.config.lifecycle.perturbation_scale if scale is None else scale)
    margin = check_scale(router_margin)
    check_can_add(registry, layer)
    target = choose_free_slot(registry, layer, new_slot)

    weights, router = banks.experts.read(slot), banks.router.read(slot)
    offset_a = offset_b = None
    if margin > 0:
        if router_anchors is None:
            raise EditError(f"router_margin={router_margin!r} needs router_anchors=(h_a, h_b); got None")
        offset_a, offset_b = separating_offsets(
            router_anchors[0].to(router["weight"].device), router_anchors[1].to(router["weight"].device), margin
        )
        if offset_a.shape != router["weight"].shape:
            raise EditError(
                f"router anchors have {offset_a.numel()} entries; expected the router row's shape "
                f"{tuple(router['weight'].shape)}"
            )
    shift = split_logit_shift(margin)
    noise_a = relative_noise(weights, scale, generator)
    noise_b = {n: -d for n, d in noise_a.items()} if antithetic else relative_noise(weights, scale, generator)
    child_a = {n: w + noise_a[n] for n, w in weights.items()}
    child_b = {n: w + noise_b[n] for n, w in weights.items()}
    router_a, router_b = dict(router), dict(router)
    if offset_a is not None and offset_b is not None:
        router_a["weight"] = router["weight"] + offset_a
        router_b["weight"] = router["weight"] + offset_b
    if banks.router.has_bias:
        router_a["bias"] = router_b["bias"] = router["bias"] + shift
    new_a, new_b = {"experts": child_a, "router": router_a}, {"experts": child_b, "router": router_b}
    check_finite_weights(f"split of slot {slot} (layer {layer}), child A", new_a)
    check_finite_weights(f"split of slot {slot} (layer {layer}), child B", new_b)

    fill_slot(banks, slot, new_a)
    fill_slot(banks, target, new_b)
    registry.retire(layer, slot, step, ended_by="split", parked={"experts": weights, "router": router})
    a = registry.birth(layer, slot, step, origin="split", parent_id=parent.expert_id)
    b = registry.birth(layer, target, step, origin="split", parent_id=parent.expert_id)
    record = EditRecord(
        kind="split", layer=layer, step=step, born_ids=(a.expert_id, b.expert_id), ended_ids=(parent.expert_id,),
        parent_id=parent.expert_id, fresh_slots=(target,), kept_slots=(slot,),
        logit_shift={slot: shift, target: shift}, logit_shift_applied=banks.router.has_bias,
    )
    return finish(record, banks, optimizer)
