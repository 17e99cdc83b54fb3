"""Spawn: bring a new expert into a free slot (clone-and-perturb a parent, or a fresh random expert)."""

from __future__ import annotations

import torch

from ..adapters import LayerBanks
from ..config import SPAWN_STRATEGIES
from .common import (
    check_can_add,
    check_edit,
    check_finite_weights,
    check_scale,
    choose_free_slot,
    fill_slot,
    finish,
    random_like_rms,
    relative_noise,
)
from .record import EditError, EditRecord
from .registry import ExpertRegistry
from .surgery import OptimizerSurgery


def spawn(
    registry: ExpertRegistry,
    banks: LayerBanks,
    layer: int,
    *,
    step: int,
    parent: int | None = None,
    strategy: str | None = None,
    slot: int | None = None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    optimizer: OptimizerSurgery | None = None,
) -> EditRecord:
    """A new `cooling` expert in `slot` (default: the lowest free slot).

    `clone_and_perturb` (needs `parent`, a live slot): the parent's weights and router row (bias entry
    copied) plus relative Gaussian noise of size `scale` (default `config.lifecycle.perturbation_scale`).
    `random`: Gaussian weights and router row whose RMS matches the live experts' (per tensor), and the
    mean live router bias. `parent` is then optional (recorded as lineage only). Strategy defaults to
    `config.lifecycle.spawn_strategy`. `generator` must live on the weights' device.
    """
    strategy = registry.config.lifecycle.spawn_strategy if strategy is None else strategy
    check_edit(registry, banks, layer, step, optimizer)
    if strategy not in SPAWN_STRATEGIES:
        raise EditError(f"strategy={strategy!r} is invalid: expected one of {list(SPAWN_STRATEGIES)}")
    if strategy == "clone_and_perturb" and parent is None:
        raise EditError("strategy 'clone_and_perturb' needs parent=<a live slot>; got parent=None")
    parent_id = registry.live_record(layer, parent).expert_id if parent is not None else None
    scale = check_scale(registry.config.lifecycle.perturbation_scale if scale is None else scale)
    check_can_add(registry, layer)
    target = choose_free_slot(registry, layer, slot)

    if strategy == "clone_and_perturb":
        assert parent is not None
        experts, router = banks.experts.read(parent), banks.router.read(parent)
        for name, delta in relative_noise(experts, scale, generator).items():
            experts[name] += delta
        router["weight"] += relative_noise({"weight": router["weight"]}, scale, generator)["weight"]
    else:
        live = registry.live_slots(layer)
        template = banks.experts.read(live[0])
        experts = random_like_rms(template, banks.experts.weight_rms(live), generator)
        router = banks.router.read(live[0])
        router["weight"] = random_like_rms(
            {"weight": router["weight"]}, banks.router.weight_rms(live), generator
        )["weight"]
        if "bias" in router:
            assert banks.router.bias is not None
            router["bias"] = banks.router.bias.detach()[live].mean()

    new = {"experts": experts, "router": router}
    check_finite_weights(f"spawn into slot {target} (layer {layer})", new)
    fill_slot(banks, target, new)
    born = registry.birth(layer, target, step, origin="spawn", parent_id=parent_id)
    record = EditRecord(
        kind="spawn", layer=layer, step=step, born_ids=(born.expert_id,), parent_id=parent_id, fresh_slots=(target,)
    )
    return finish(record, banks, optimizer)
