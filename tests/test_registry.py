import io
import math
from dataclasses import replace

import pytest
import torch
from helpers import lifecycle_config, tree_equal

from chronomoe_v3.config import BasinConfig, ChronoConfig
from chronomoe_v3.ops.basin import BasinHistory
from chronomoe_v3.ops.registry import EditError, ExpertRegistry, expert_id


def _registry(**cfg):
    fields = {"max_experts_per_layer": 6, "cooling_period": 10, **cfg}
    config = replace(lifecycle_config(**fields), basins=BasinConfig(history=3))
    masks = [torch.tensor([True, True, True, False, False, False]), torch.tensor([True, True, False, False])]
    return ExpertRegistry(masks, config)


def test_initial_experts_and_masks():
    reg = _registry()
    assert reg.num_layers == 2 and reg.num_slots(1) == 4
    assert [r.expert_id for r in reg.experts()] == ["L0_E0", "L0_E1", "L0_E2", "L1_E0", "L1_E1"]
    assert all(r.state == "active" and r.origin == "initial" for r in reg.experts())
    assert reg.active_mask(0).tolist() == [True, True, True, False, False, False]
    assert reg.free_slots(1) == [2, 3] and reg.slot_state(1, 2) == "free" and reg.slot_state(1, 0) == "active"
    assert reg.max_live(1) == 4 and reg.max_live(0) == 6


def test_ids_are_unique_when_slots_are_reused():
    reg = _registry()
    reg.retire(0, 1, 5, ended_by="prune", parked={"experts": {}, "router": {}})
    a = reg.birth(0, 1, 6, origin="spawn", parent_id="L0_E0")
    reg.retire(0, 1, 7, ended_by="prune", parked={"experts": {}, "router": {}})
    b = reg.birth(0, 1, 8, origin="spawn")
    assert (a.expert_id, b.expert_id) == ("L0_E1_g1", "L0_E1_g2")
    assert expert_id(2, 5, 0) == "L2_E5"
    ids = [r.expert_id for r in reg.experts()]
    assert len(ids) == len(set(ids))
    assert reg.expert("L0_E1").state == "archived" and reg.expert("L0_E1").ended_by == "prune"
    assert a.parent_id == "L0_E0" and a.born_step == 6


def test_cooling_experts_are_promoted_after_the_cooling_period():
    reg = _registry()
    born = reg.birth(0, 4, 100, origin="spawn")
    assert born.state == "cooling" and reg.active_mask(0)[4]
    assert reg.advance(109) == [] and born.state == "cooling"
    assert reg.advance(110) == [born.expert_id] and born.state == "active"


def test_transitions_validate_and_change_nothing_on_error():
    reg = _registry()
    before = reg.state_dict()
    with pytest.raises(EditError, match="holds L0_E0"):
        reg.birth(0, 0, 1, origin="spawn")
    with pytest.raises(EditError, match="slot 3 of layer 0 is free"):
        reg.retire(0, 3, 1, ended_by="prune", parked={})
    with pytest.raises(EditError, match="slot=9"):
        reg.expert_at(0, 9)
    with pytest.raises(EditError, match="layer=2"):
        reg.live_slots(2)
    with pytest.raises(EditError, match="origin='clone'"):
        reg.birth(0, 3, 1, origin="clone")
    with pytest.raises(EditError, match="'L9_E9' is unknown"):
        reg.birth(0, 3, 1, origin="spawn", parent_id="L9_E9")
    with pytest.raises(EditError, match="ended_by='gone'"):
        reg.retire(0, 0, 1, ended_by="gone", parked={})
    assert tree_equal(reg.state_dict(), before)


def test_initial_counts_respect_the_limits():
    with pytest.raises(ValueError, match="starts with 1 active experts"):
        ExpertRegistry([torch.tensor([True, False, False])], lifecycle_config(min_experts_per_layer=2))
    with pytest.raises(ValueError, match="starts with 4 active"):
        config = lifecycle_config(max_experts_per_layer=3, min_experts_per_layer=1)
        ExpertRegistry([torch.ones(4, dtype=torch.bool)], config)


def test_basin_history_is_a_bounded_ring_buffer():
    basin = BasinHistory(3)
    for i in range(5):
        basin.record(0.1 * i, float("nan") if i == 2 else 0.5, [f"L0_E{i}"])
    assert len(basin) == 3
    assert basin.shares == pytest.approx([0.2, 0.3, 0.4]) and math.isnan(basin.phis[0])
    assert basin.coactive == [["L0_E2"], ["L0_E3"], ["L0_E4"]]
    with pytest.raises(ValueError, match="share=-1.0"):
        basin.record(-1.0, 0.0)
    with pytest.raises(ValueError, match="phi=2.0"):
        basin.record(0.1, 2.0)
    with pytest.raises(ValueError, match="window=0"):
        BasinHistory(0)


def test_record_basin_stores_coactivated_ids():
    reg = _registry()
    share = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    phi = torch.tensor([0.9, float("nan"), 0.1, 0.0, 0.0, 0.0])
    coactive = torch.tensor([[1, 2], [0, -1], [0, 4], [0, 1], [0, 1], [0, 1]])
    for _ in range(4):
        reg.record_basin(0, share, phi, coactive)
    e0, e2 = reg.expert("L0_E0").basin, reg.expert("L0_E2").basin
    assert len(e0) == 3  # basin_window_size
    assert e0.coactive[-1] == ["L0_E1", "L0_E2"] and e2.coactive[-1] == ["L0_E0"]  # free slot 4 dropped
    assert math.isnan(reg.expert("L0_E1").basin.phis[-1])
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        reg.record_basin(0, share[:3], phi)




def test_state_dict_round_trips_through_weights_only_load():
    reg = _registry()
    parked = {"experts": {"w": torch.randn(3, 2)}, "router": {"weight": torch.randn(4), "bias": torch.tensor(0.5)}}
    reg.retire(0, 2, 3, ended_by="prune", parked=parked)
    reg.birth(0, 2, 4, origin="restore", parent_id="L0_E2")
    reg.birth(1, 3, 4, origin="spawn", parent_id="L1_E0")
    reg.expert("L0_E0").absorbed_ids.append("L0_E2")
    reg.record_basin(0, torch.rand(6), torch.tensor([0.1, float("nan"), 0.3, 0.0, 0.0, 0.0]))
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = _registry()
    fresh.load_state_dict(loaded)
    assert tree_equal(fresh.state_dict(), reg.state_dict())
    assert torch.equal(fresh.archived_weights("L0_E2")["experts"]["w"], parked["experts"]["w"])
    assert fresh.active_mask(1).tolist() == [True, True, False, True]
    # the generation counter survives: the next expert in slot 2 gets a new id
    fresh.retire(0, 2, 9, ended_by="prune", parked={})
    assert fresh.birth(0, 2, 10, origin="spawn").expert_id == "L0_E2_g2"


def test_load_state_dict_rejects_other_shapes():
    reg = _registry()
    other = ExpertRegistry([torch.tensor([True, True, False])], ChronoConfig())
    with pytest.raises(ValueError, match="slots \\[3\\] per layer; expected \\[6, 4\\]"):
        reg.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="format"):
        reg.load_state_dict({"format": 7})


def test_archive_keeps_at_most_capacity_parked_experts():
    import torch

    from chronomoe_v3.adapters import banks_for
    from chronomoe_v3.layers import ChronoMoELayer
    from chronomoe_v3.ops import prune, restore, spawn
    from chronomoe_v3.ops.registry import EditError, ExpertRegistry

    torch.manual_seed(0)
    layer = ChronoMoELayer(4, 4, 6, 1)
    banks = banks_for(layer)
    config = lifecycle_config(min_experts_per_layer=1, max_experts_per_layer=6, archive_capacity=2)
    registry = ExpertRegistry([layer.active_mask], config)
    pruned = [prune(registry, banks, 0, slot, step=1).ended_ids[0] for slot in (0, 1, 2)]
    assert registry.archived_ids() == pruned[1:]  # the oldest parked weights were dropped
    with pytest.raises(EditError, match="no parked weights"):
        restore(registry, banks, pruned[0], step=2)
    spawn(registry, banks, 0, step=2, parent=3)
    assert len(registry.archived_ids()) <= 2
