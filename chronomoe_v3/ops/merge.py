"""Merge: two experts become one; the survivor takes the usage-weighted average, the other is archived."""

from __future__ import annotations

import math

import torch

from ..adapters import LayerBanks
from .common import (
    check_can_remove,
    check_edit,
    check_finite_weights,
    clear_slot,
    fill_slot,
    finish,
    normalise_usage,
    weighted_average,
)
from .record import EditError, EditRecord
from .registry import ExpertRegistry
from .surgery import OptimizerSurgery


def merge(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    survivor: int,
    absorbed: int,
    *,
    step: int,
    usage: tuple[float, float] = (1.0, 1.0),
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """Fold the expert in `absorbed` into the one in `survivor`.

    Expert weights and router rows become `ws * survivor + wa * absorbed` with `(ws, wa)` the normalised
    `usage` (e.g. token shares; (0, 0) means equal). The survivor's bias becomes `logaddexp(b_s, b_a)`, so
    two experts with equal router rows keep their joint softmax mass exactly; without a router bias that
    shift (log 2 for equal biases; in general `logaddexp(beta_s, beta_a) - beta_s`) is returned in
    `record.logit_shift` for the caller's logit bias (beta). The survivor keeps its id and optimiser state;
    the absorbed expert is archived (weights parked, `successor_id` = survivor) and its slot masked.
    """
    check_edit(registry, banks, layer, step, optimizer)
    keep = registry.live_record(layer, survivor)
    gone = registry.live_record(layer, absorbed)
    if survivor == absorbed:
        raise EditError(f"cannot merge expert {keep.expert_id} (slot {survivor}) with itself: expected two slots")
    ws, wa = normalise_usage(usage)
    check_can_remove(registry, layer)

    experts_s, experts_a = banks.experts.read(survivor), banks.experts.read(absorbed)
    router_s, router_a = banks.router.read(survivor), banks.router.read(absorbed)
    merged_router = weighted_average({"weight": router_s["weight"]}, {"weight": router_a["weight"]}, ws, wa)
    shift = math.log(2.0)
    if banks.router.has_bias:
        b_s, b_a = router_s["bias"], router_a["bias"]
        dtype = torch.promote_types(b_s.dtype, torch.float32)
        joint = torch.logaddexp(b_s.to(dtype), b_a.to(dtype))
        merged_router["bias"] = joint.to(b_s.dtype)
        shift = float(joint - b_s.to(dtype))
    merged = {"experts": weighted_average(experts_s, experts_a, ws, wa), "router": merged_router}
    if not math.isfinite(shift):
        raise EditError(f"merge of slots {survivor} and {absorbed} (layer {layer}): the logit shift {shift!r} is "
                        "not finite; refused, nothing was changed")
    check_finite_weights(f"merge of slots {survivor} and {absorbed} (layer {layer})", merged)

    fill_slot(banks, survivor, merged)
    clear_slot(banks, absorbed)
    registry.retire(
        layer, absorbed, step, ended_by="merge", parked={"experts": experts_a, "router": router_a},
        successor_id=keep.expert_id,
    )
    keep.absorbed_ids.append(gone.expert_id)
    record = EditRecord(
        kind="merge", layer=layer, step=step, ended_ids=(gone.expert_id,), parent_id=keep.expert_id,
        parked_slots=(absorbed,), kept_slots=(survivor,), logit_shift={survivor: shift},
        logit_shift_applied=banks.router.has_bias,
    )
    return finish(record, banks, optimizer)
