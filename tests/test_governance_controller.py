import json
import os

import pytest
import torch
from torch import nn

from chronomoe_v3.governance import ChronoLens, ControlConfig, ControlDecision, Controller, IdentityLens, topology_debt
from chronomoe_v3.telemetry import AlertHistory, RoutingEvent, SystemSnapshot

BALANCED = [100] * 8
COLLAPSED = [500, 450, 50, 0, 0, 0, 0, 0]


def snapshot(step, per_layer, n_layers=2, history=None):
    events = [
        RoutingEvent.from_router_output("r", step, "TRAIN", lid, c, len(c), 2, timestamp=0.0)
        for lid, c in per_layer.items()
    ]
    history = AlertHistory() if history is None else history
    return SystemSnapshot.from_events(events, step, 1.0, None, "r", "m", n_layers, history, timestamp=0.0)


def top2_counts(top2):
    """8-expert counts (sum 1000) with the given top2 share and the rest spread evenly."""
    top = round(1000 * top2)
    rest = (1000 - top) // 6
    return [top // 2, top - top // 2] + [rest] * 5 + [1000 - top - 5 * rest]


def test_debt_formula_hand_computed():
    # n=8, Neff=2, top2=0.95, dead=5: 0.4*(4.8-2)/4.8 + 0.4*0.8 + 0.2*5/7
    assert topology_debt(8, 2.0, 0.95, 5) == pytest.approx(0.4 * 2.8 / 4.8 + 0.4 * 0.8 + 0.2 * 5 / 7)
    assert topology_debt(8, 8.0, 0.25, 0) == 0.0
    assert topology_debt(8, 0.5, 1.0, 20) == pytest.approx(0.4 * (4.8 - 0.5) / 4.8 + 0.4 + 0.2)


def test_balanced_two_expert_layer_carries_no_debt():
    assert topology_debt(2, 2.0, 1.0, 0) == 0.0
    ctl = Controller(1, 2, ControlConfig(warmup_steps=0))
    for step in range(5):
        (d,) = ctl.update(snapshot(step, {0: [50, 50]}, 1), None)
    assert d.computed["debt"] == 0.0 and d.computed["pressure"] == 0.0
    assert d.actuator["abstain"] and d.actuator["scale"] == 0.0
    # a collapsed 2-expert layer still carries debt (Neff and dead terms)
    assert topology_debt(2, 1.0, 1.0, 1) == pytest.approx(0.4 * 0.2 / 1.2 + 0.2)


def test_pressure_ema_and_warmup_cap():
    ctl = Controller(2, 8)
    ctl.initialize("run")
    d0, d1 = ctl.update(snapshot(0, {0: COLLAPSED, 1: BALANCED}), None)
    debt = d0.computed["debt"]
    assert d0.computed["pressure"] == pytest.approx(0.2 * debt)
    assert d0.actuator["scale"] <= 0.02 and d0.computed["warmup"]
    (d0b, _) = ctl.update(snapshot(1, {0: COLLAPSED, 1: BALANCED}), None)
    assert d0b.computed["pressure"] == pytest.approx(0.8 * 0.2 * debt + 0.2 * debt)
    assert d1.actuator["abstain"] and d1.run_id == "run"
    ctl.update(snapshot(99, {0: COLLAPSED}), None)
    (late,) = ctl.update(snapshot(100, {0: COLLAPSED}), None)
    assert not late.computed["warmup"]
    assert late.actuator["scale"] == pytest.approx(min(late.computed["pressure"], 0.5))


def test_harm_guard_mode_switch_and_abstention_reachable_with_defaults():
    ctl = Controller(1, 8, ControlConfig(warmup_steps=0))
    rising = [0.80, 0.85, 0.90, 0.95, 0.95, 0.95]
    ds = [ctl.update(snapshot(s, {0: top2_counts(t)}, 1), None)[0] for s, t in enumerate(rising)]
    assert [d.computed["harm_detected"] for d in ds] == [False, True, True, True, False, False]
    assert [d.computed["backoff"] for d in ds][:4] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert [d.actuator["mode"] for d in ds][:3] == ["ANTI_DOMINANCE", "ANTI_DOMINANCE", "LIFT_TAIL"]
    assert ds[2].actuator["mode_switched_from"] == "ANTI_DOMINANCE" and "mode switch" in ds[2].notes
    assert ds[3].actuator["abstain"] and ds[3].actuator["scale"] == 0.0
    assert not ds[4].actuator["abstain"]  # recovered by 20%: 0.15
    assert ds[5].computed["backoff"] == pytest.approx(0.125 * 1.2 * 1.2)


def test_a_single_mode_cycle_backs_off_without_switching():
    """The built-in mid clock keeps ENTROPY_MAX: harm lowers its scale, it never switches to a weaker mode."""
    cfg = ControlConfig(warmup_steps=0, initial_mode="ENTROPY_MAX", mode_cycle=("ENTROPY_MAX",))
    ctl = Controller(1, 8, cfg)
    rising = [0.80, 0.85, 0.90, 0.95]
    ds = [ctl.update(snapshot(s, {0: top2_counts(t)}, 1), None)[0] for s, t in enumerate(rising)]
    assert [d.computed["backoff"] for d in ds] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert {d.actuator["mode"] for d in ds} == {"ENTROPY_MAX"}
    assert all(d.actuator["mode_switched_from"] is None and "mode switch" not in d.notes for d in ds)
    assert ds[3].actuator["abstain"]


def test_incoherent_thresholds_rejected():
    with pytest.raises(ValueError, match="mode switching and abstention are reachable"):
        ControlConfig(backoff_floor=0.2, abstain_backoff=0.15, mode_switch_backoff=0.15)
    with pytest.raises(ValueError, match="steering mode must be one of"):
        ControlConfig(initial_mode="CHAOS")
    with pytest.raises(ValueError, match="pressure_retention must be in"):
        ControlConfig(pressure_retention=1.0)


def test_decisions_do_not_alias():
    ctl = Controller(1, 8, ControlConfig(warmup_steps=0))
    (first,) = ctl.update(snapshot(0, {0: COLLAPSED}, 1), None)
    kept = json.dumps(first.to_dict())
    (second,) = ctl.update(snapshot(1, {0: top2_counts(0.99)}, 1), None)
    assert json.dumps(first.to_dict()) == kept
    second.computed["pressure"] = 123.0
    second.observed.clear()
    (third,) = ctl.update(snapshot(2, {0: COLLAPSED}, 1), None)
    assert third.computed["pressure"] < 1 and third.observed
    src = {"a": [1]}
    d = ControlDecision("r", 0, 0, src, {}, {})
    src["a"].append(2)
    assert d.observed == {"a": [1]}


def test_identity_lens_accepted():
    ctl = Controller(2, 8, ControlConfig(warmup_steps=0))
    lenses = {0: IdentityLens(0), 1: IdentityLens(1)}
    ds = ctl.update(snapshot(0, {0: COLLAPSED, 1: BALANCED}), lenses)
    assert all(d.actuator["lens_applied"] for d in ds)
    assert lenses[0].s == pytest.approx(ds[0].actuator["scale"]) and lenses[0].s > 0


def test_layer_ids_matched_exactly_and_validated():
    ctl = Controller(12, 8, ControlConfig(warmup_steps=0))
    hist = AlertHistory()
    lenses = [IdentityLens(i) for i in range(12)]
    for step in range(5):
        ds = ctl.update(snapshot(step, {1: BALANCED, 11: COLLAPSED}, 12, hist), lenses)
    by_layer = {d.layer_id: d for d in ds}
    assert by_layer[11].emergency and not by_layer[1].emergency
    assert lenses[1].s == 0.0 and lenses[11].s > 0
    with pytest.raises(ValueError, match=r"layer_id=3 outside range\(n_layers=2\)"):
        Controller(2, 8).update(snapshot(0, {3: BALANCED}, 4), None)


def test_active_width_follows_snapshot():
    ctl = Controller(1, 8, ControlConfig(warmup_steps=0))
    (d,) = ctl.update(snapshot(0, {0: [10, 10, 10, 10, 10, 10]}, 1), None)
    assert d.observed["n_experts"] == 6 and ctl.n_experts_per_layer == [6]
    assert d.computed["debt"] == 0.0


def test_state_dict_survives_weights_only_load(tmp_path):
    cfg = ControlConfig(warmup_steps=0)
    a = Controller(2, 8, cfg)
    a.initialize("run")
    for step in range(3):
        a.update(snapshot(step, {0: COLLAPSED, 1: top2_counts(0.8 + 0.05 * step)}), None)
    torch.save(a.state_dict(), tmp_path / "ctl.pt")
    b = Controller(2, 8, cfg)
    b.load_state_dict(torch.load(tmp_path / "ctl.pt", weights_only=True))
    nxt = snapshot(3, {0: COLLAPSED, 1: top2_counts(0.99)})
    assert [d.to_dict() for d in a.update(nxt, None)] == [d.to_dict() for d in b.update(nxt, None)]


def test_decision_files_only_with_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Controller(1, 8).update(snapshot(0, {0: COLLAPSED}, 1), None)
    assert os.listdir(tmp_path) == []
    ctl = Controller(1, 8, output_dir=tmp_path / "out")
    ctl.initialize("run7")
    ctl.update(snapshot(0, {0: COLLAPSED}, 1), None)
    ctl.update(snapshot(1, {0: COLLAPSED}, 1), None)
    lines = (tmp_path / "out" / "run7" / "control_decisions.jsonl").read_text().splitlines()
    assert [ControlDecision.from_dict(json.loads(x)).step for x in lines] == [0, 1]


def test_controller_steers_a_collapsed_router():
    torch.manual_seed(0)
    d_model, n_exp, top_k = 16, 8, 2
    router = nn.Linear(d_model, n_exp)
    with torch.no_grad():
        router.bias.zero_()
        router.bias[:2] = 2.5  # shares collapse onto experts 0 and 1
    x = torch.randn(2048, d_model)
    lens = ChronoLens(d_model, rank=4, layer_id=0)
    lens.bind_router(router, apply_as_hook=True)
    ctl = Controller(1, n_exp, ControlConfig(warmup_steps=0))
    ctl.initialize("steer")
    hist = AlertHistory()
    top2 = []
    for step in range(6):
        with torch.no_grad():
            idx = router(x).topk(top_k, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=n_exp)
        ev = RoutingEvent.from_router_output("steer", step, "TRAIN", 0, counts, n_exp, top_k)
        snap = SystemSnapshot.from_events([ev], step, 1.0, None, "steer", "toy", 1, hist)
        top2.append(snap.layers[0].top2_share)
        (d,) = ctl.update(snap, {0: lens})
        assert not d.computed["harm_detected"]
    assert top2[0] > 0.95
    assert top2[-1] < top2[0] - 0.05
    assert all(b < a for a, b in zip(top2[1:-1], top2[2:], strict=True))
