"""Shared pieces of the lifecycle operations: the edit record, validation, and the weight math."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..adapters import LayerBanks
from .record import EditError, EditRecord
from .registry import ExpertRegistry, Parked
from .surgery import OptimizerSurgery

LOG2 = math.log(2.0)


# ---------------------------------------------------------------------- validation (no side effects)
def check_edit(
    registry: ExpertRegistry, banks: LayerBanks, layer: int, step: int, optimizer: OptimizerSurgery | None
) -> None:
    """What every operation checks first: the step, the layer and its banks, the optimiser wiring."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise EditError(f"step={step!r} is invalid: expected an integer >= 0")
    check_layer_banks(registry, banks, layer)
    if optimizer is not None:
        optimizer.check(banks)


def check_layer_banks(registry: ExpertRegistry, banks: LayerBanks, layer: int) -> None:
    """The banks belong to `layer`: same slot count, and the mask agrees with the registry (a host sync)."""
    registry.check_layer(layer)
    n = registry.num_slots(layer)
    if banks.num_slots != n:
        raise EditError(f"banks have {banks.num_slots} slots; expected {n} for layer {layer} of the registry")
    expected = registry.active_mask(layer)
    if not torch.equal(banks.active_mask.detach().cpu(), expected):
        got = banks.active_mask.detach().cpu().nonzero().flatten().tolist()
        raise EditError(
            f"layer {layer}'s active mask has live slots {got}; expected {registry.live_slots(layer)} "
            "(the registry's): was the mask edited outside the lifecycle operations?"
        )


def check_can_add(registry: ExpertRegistry, layer: int) -> None:
    live, cap = registry.num_live(layer), registry.max_live(layer)
    if live + 1 > cap:
        raise EditError(
            f"layer {layer} has {live} live experts; adding one would exceed the maximum {cap} "
            f"(max_experts_per_layer={registry.config.lifecycle.max_experts_per_layer}, "
            f"{registry.num_slots(layer)} slots)"
        )


def check_can_remove(registry: ExpertRegistry, layer: int) -> None:
    live, low = registry.num_live(layer), registry.config.lifecycle.min_experts_per_layer
    if live - 1 < low:
        raise EditError(
            f"layer {layer} has {live} live experts; removing one would go below min_experts_per_layer={low}"
        )


def choose_free_slot(registry: ExpertRegistry, layer: int, slot: int | None) -> int:
    """`slot` if it is free, else (slot None) the lowest free slot."""
    if slot is None:
        free = registry.free_slots(layer)
        if not free:
            raise EditError(f"layer {layer} has no free slot: all {registry.num_slots(layer)} slots are live")
        return free[0]
    registry.check_slot(layer, slot)
    holder = registry.expert_at(layer, slot)
    if holder is not None:
        raise EditError(f"slot {slot} of layer {layer} holds {holder.expert_id}: expected a free slot")
    return slot


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
        raise EditError(f"perturbation scale={scale!r} is invalid: expected a finite number >= 0")
    return float(scale)


# ---------------------------------------------------------------------- weight math (pure)
def relative_noise(
    weights: Mapping[str, Tensor], scale: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """`scale * rms(w) * N(0, 1)` for each tensor (noise relative to the tensor's own size)."""
    out = {}
    for name, w in weights.items():
        rms = w.float().square().mean().sqrt()
        noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)
        out[name] = (noise * (scale * rms)).to(w.dtype)
    return out


def split_logit_shift(margin: float) -> float:
    """The common logit shift of two split children whose logits differ by `2 * margin` at their anchors:
    `-log(1 + exp(-2 margin))`, so that the children together hold exactly the parent's softmax mass there
    (`-log 2` at margin 0, where both children have the parent's row)."""
    return -math.log1p(math.exp(-2.0 * margin))


def separating_offsets(anchor_a: Tensor, anchor_b: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Router-row offsets `(d_a, d_b)` that give two split children different roles.

    Child A's row `w + d_a` keeps the parent's logit at its own anchor and sits `2 * margin` below it at
    B's anchor: `d_a . h_a = 0`, `d_a . h_b = -2 margin` (and symmetrically for B). Each is the
    minimum-norm solution, `d_a = -2 margin * P_a(h_b) / |P_a(h_b)|^2` with `P_a` the projection that
    removes the `h_a` direction, so the rows move only in the plane of the two anchors. The anchors are
    router inputs (e.g. the mean input of the tokens each role serves); anchors that are non-finite, zero,
    or (nearly) collinear cannot be separated by a bias-free linear row: EditError.
    """
    a, b = anchor_a.detach().double().flatten(), anchor_b.detach().double().flatten()
    if a.shape != b.shape or not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise EditError(
            f"router anchors of shapes {tuple(anchor_a.shape)} and {tuple(anchor_b.shape)} are invalid: expected "
            "two finite vectors of the router's input width"
        )

    def perp(u: Tensor, v: Tensor) -> Tensor:  # v without its u component
        uu = float(u @ u)
        return v - (float(u @ v) / uu) * u if uu > 0 else v

    pa, pb = perp(a, b), perp(b, a)
    na, nb = float(pa @ pa), float(pb @ pb)
    scale = max(float(a @ a), float(b @ b))
    if not (scale > 0 and min(na, nb) > 1e-6 * scale):
        raise EditError(
            "router anchors are zero or (nearly) collinear: no bias-free router row offset separates them "
            f"(|a|^2={float(a @ a):.3g}, |b|^2={float(b @ b):.3g}, cos={float(a @ b) / max(scale, 1e-300):.3g})"
        )
    d_a, d_b = (-2.0 * margin / na) * pa, (-2.0 * margin / nb) * pb
    return d_a.to(anchor_a.dtype).view_as(anchor_a), d_b.to(anchor_b.dtype).view_as(anchor_b)


def random_like_rms(
    template: Mapping[str, Tensor], rms: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Fresh Gaussian weights shaped like `template` with root-mean-square `rms[name]`."""
    return {
        name: (torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32) * rms[name]).to(w.dtype)
        for name, w in template.items()
    }


def weighted_average(a: Mapping[str, Tensor], b: Mapping[str, Tensor], wa: float, wb: float) -> dict[str, Tensor]:
    """`wa * a + wb * b` per tensor, computed in at least fp32 (weights already normalised)."""
    out = {}
    for name, x in a.items():
        dtype = torch.promote_types(x.dtype, torch.float32)
        out[name] = (wa * x.to(dtype) + wb * b[name].to(dtype)).to(x.dtype)
    return out


def normalise_usage(usage: tuple[float, float]) -> tuple[float, float]:
    """Token shares -> convex weights; (0, 0) means equal weights. Scaled by the larger weight first, so huge
    finite usages (whose sum overflows) and tiny ones (whose sum underflows) still give weights summing to 1."""
    if len(usage) != 2:
        raise EditError(f"usage={usage!r} is invalid: expected two weights (survivor, absorbed)")
    ws, wa = (float(u) for u in usage)
    if not (math.isfinite(ws) and math.isfinite(wa) and ws >= 0 and wa >= 0):
        raise EditError(f"usage={usage!r} is invalid: expected two finite weights >= 0")
    top = max(ws, wa)
    if top == 0:
        return (0.5, 0.5)
    ws, wa = ws / top, wa / top
    total = ws + wa
    return (ws / total, wa / total)


def check_finite_weights(what: str, parked: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Refuse (EditError, before anything is written) weights that hold NaN/Inf: an edit must never write
    non-finite weights (e.g. a perturbation or a router margin large enough to overflow the weights' dtype).
    Reads device values (a host sync): edits are host-side."""
    for part, tensors in parked.items():
        for name, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise EditError(
                    f"{what}: the new {part}.{name} would hold non-finite values (overflow of "
                    f"{value.dtype}?); refused, nothing was changed"
                )


# ---------------------------------------------------------------------- shared effects
def read_parked(banks: LayerBanks, slot: int) -> Parked:
    """Clones of a slot's expert weights and router row, the unit the archive stores."""
    return {"experts": banks.experts.read(slot), "router": banks.router.read(slot)}


@torch.no_grad()
def clear_slot(banks: LayerBanks, slot: int) -> None:
    """Mask a slot and zero its weights and router row (masked slots hold zeros; see OptimizerSurgery)."""
    banks.active_mask[slot] = False
    banks.experts.zero(slot)
    banks.router.zero(slot)


@torch.no_grad()
def fill_slot(banks: LayerBanks, slot: int, parked: Parked) -> None:
    """Write expert weights and router row into a slot and unmask it."""
    banks.experts.write(slot, parked["experts"])
    banks.router.write(slot, parked["router"])
    banks.active_mask[slot] = True


def finish(record: EditRecord, banks: LayerBanks, optimizer: OptimizerSurgery | None) -> EditRecord:
    if optimizer is not None:
        optimizer.apply(banks, record)
    return record
