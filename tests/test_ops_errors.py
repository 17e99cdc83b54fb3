"""Every refused edit names the offending value and leaves registry, weights, mask and optimiser state as they were."""


import pytest
import torch
from helpers import lifecycle_config, tree_equal

from chronomoe_v3.adapters import banks_for
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.ops import OptimizerSurgery, merge, prune, restore, spawn, split
from chronomoe_v3.ops.registry import EditError, ExpertRegistry

E = 6




@pytest.fixture
def rig():
    torch.manual_seed(0)
    layer = ChronoMoELayer(4, 4, E, 2, router_bias=True)
    layer.active_mask[4:] = False
    banks = banks_for(layer)
    registry = ExpertRegistry([layer.active_mask], lifecycle_config(min_experts_per_layer=3, max_experts_per_layer=5))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    surgery = OptimizerSurgery(opt, [banks])
    for _ in range(2):
        opt.zero_grad()
        sum(p.square().sum() for p in layer.parameters()).backward()
        opt.step()
    prune(registry, banks, 0, 3, step=2, optimizer=surgery)  # L0_E3 archived, slot 3 free
    return layer, banks, registry, opt, surgery


def _snapshot(layer, registry, opt):
    return {
        "registry": registry.state_dict(),
        "params": {n: p.detach().clone() for n, p in layer.named_parameters()},
        "mask": layer.active_mask.clone(),
        "opt": opt.state_dict(),
    }


def _calls(layer, banks, registry, surgery):
    o = {"optimizer": surgery}
    return [
        ("slot 3 of layer 0 is free \\(its last expert L0_E3 is archived\\)",
         lambda: prune(registry, banks, 0, 3, step=3, **o)),
        ("slot=9", lambda: prune(registry, banks, 0, 9, step=3, **o)),
        ("slot=-1", lambda: split(registry, banks, 0, -1, step=3, **o)),
        ("layer=1", lambda: prune(registry, banks, 1, 0, step=3, **o)),
        ("step=-4", lambda: spawn(registry, banks, 0, step=-4, parent=0, **o)),
        ("below min_experts_per_layer=3", lambda: prune(registry, banks, 0, 0, step=3, **o)),
        ("below min_experts_per_layer=3", lambda: merge(registry, banks, 0, 0, 1, step=3, **o)),
        ("with itself", lambda: merge(registry, banks, 0, 1, 1, step=3, **o)),
        ("slot 4 of layer 0 is free", lambda: merge(registry, banks, 0, 0, 4, step=3, **o)),
        ("usage=\\(-1.0, 1.0\\)", lambda: merge(registry, banks, 0, 0, 1, step=3, usage=(-1.0, 1.0), **o)),
        ("holds L0_E0: expected a free slot", lambda: spawn(registry, banks, 0, step=3, parent=1, slot=0, **o)),
        ("slot 5 of layer 0 is free", lambda: spawn(registry, banks, 0, step=3, parent=5, **o)),
        ("needs parent", lambda: spawn(registry, banks, 0, step=3, strategy="clone_and_perturb", **o)),
        ("strategy='grow'", lambda: spawn(registry, banks, 0, step=3, strategy="grow", **o)),
        ("scale=-0.1", lambda: split(registry, banks, 0, 0, step=3, scale=-0.1, **o)),
        ("scale=nan", lambda: spawn(registry, banks, 0, step=3, parent=0, scale=float("nan"), **o)),
        ("holds L0_E1: expected a free slot", lambda: split(registry, banks, 0, 0, step=3, new_slot=1, **o)),
        ("'L0_E0' is active with no parked weights", lambda: restore(registry, banks, "L0_E0", step=3, **o)),
        ("'L7_E1' is unknown", lambda: restore(registry, banks, "L7_E1", step=3, **o)),
    ]


def test_refused_edits_change_nothing(rig):
    layer, banks, registry, opt, surgery = rig
    before = _snapshot(layer, registry, opt)
    calls = _calls(layer, banks, registry, surgery)
    for pattern, call in calls:
        with pytest.raises(EditError, match=pattern):
            call()
        assert tree_equal(_snapshot(layer, registry, opt), before), pattern
    assert issubclass(EditError, ValueError)


def test_limits_on_the_number_of_experts(rig):
    layer, banks, registry, opt, surgery = rig
    spawn(registry, banks, 0, step=3, parent=0, optimizer=surgery)
    spawn(registry, banks, 0, step=3, parent=0, optimizer=surgery)  # 5 live = max_experts_per_layer
    before = _snapshot(layer, registry, opt)
    for call in (
        lambda: spawn(registry, banks, 0, step=4, parent=0, optimizer=surgery),
        lambda: split(registry, banks, 0, 0, step=4, optimizer=surgery),
        lambda: restore(registry, banks, "L0_E3", step=4, optimizer=surgery),
    ):
        with pytest.raises(EditError, match="would exceed the maximum 5"):
            call()
        assert tree_equal(_snapshot(layer, registry, opt), before)


def test_full_layer_has_no_free_slot():
    layer = ChronoMoELayer(4, 4, 3, 2)
    registry = ExpertRegistry([torch.tensor([True, True, False])], lifecycle_config(max_experts_per_layer=8))
    layer.active_mask[2] = False
    banks = banks_for(layer)
    spawn(registry, banks, 0, step=1, parent=0)
    with pytest.raises(EditError, match="exceed the maximum 3 .*3 slots"):
        spawn(registry, banks, 0, step=2, parent=0)


def test_wiring_mistakes_are_refused(rig):
    layer, banks, registry, opt, surgery = rig
    other = OptimizerSurgery(opt, [])
    with pytest.raises(EditError, match="not attached"):
        spawn(registry, banks, 0, step=3, parent=0, optimizer=other)
    layer.active_mask[5] = True  # edited behind the registry's back
    with pytest.raises(EditError, match=r"live slots \[0, 1, 2, 5\]; expected \[0, 1, 2\]"):
        spawn(registry, banks, 0, step=3, parent=0, optimizer=surgery)
    layer.active_mask[5] = False
    small = banks_for(ChronoMoELayer(4, 4, 4, 2))
    with pytest.raises(EditError, match="banks have 4 slots; expected 6"):
        prune(registry, small, 0, 0, step=3)
