import json

import pytest

from chronomoe_v3.telemetry import (
    COLLAPSE_CONFIRMED,
    PRE_COLLAPSE,
    AlertHistory,
    LayerSnapshot,
    RoutingEvent,
    SystemSnapshot,
    check_immediate_alerts,
    compute_layer_metrics,
)

HEALTHY = [100, 110, 95, 105, 100, 90, 100, 100]
DRIFTING = [300, 250, 100, 60, 40, 30, 20, 0]  # Neff < 4.8 and top2 0.69: PRE only
COLLAPSED = [500, 450, 50, 0, 0, 0, 0, 0]  # top2 0.95, dead experts: both conditions


def ev(counts, step, layer_id):
    return RoutingEvent.from_router_output("r", step, "TRAIN", layer_id, counts, len(counts), 2, timestamp=0.0)


def snapshot(step, per_layer, history, n_layers=2):
    events = [ev(c, step, lid) for lid, c in per_layer.items()]
    return SystemSnapshot.from_events(events, step, 1.0, None, "r", "m", n_layers, history, timestamp=float(step))


def kinds(snap, layer_id):
    return sorted({a.kind for a in snap.alerts_for(layer_id)})


def test_collapse_stream_fires_on_3rd_and_5th_and_miss_resets():
    history = AlertHistory()
    stream = [COLLAPSED] * 6 + [HEALTHY] + [COLLAPSED] * 3
    fired = []
    for step, counts in enumerate(stream):
        snap = snapshot(step, {0: HEALTHY, 1: counts}, history)
        assert snap.alerts_for(0) == []
        fired.append(kinds(snap, 1))
    assert fired[:2] == [[], []]
    assert fired[2] == [PRE_COLLAPSE]  # 3rd consecutive qualifying snapshot
    assert fired[3] == [PRE_COLLAPSE]
    assert fired[4] == [COLLAPSE_CONFIRMED, PRE_COLLAPSE]  # 5th
    assert fired[5] == [COLLAPSE_CONFIRMED, PRE_COLLAPSE]
    assert fired[6] == []  # a miss resets
    assert fired[7:] == [[], [], [PRE_COLLAPSE]]
    assert history.count(1, PRE_COLLAPSE) == 3
    assert [a.count for a in snapshot(10, {1: COLLAPSED}, history).alerts_for(1)] == [4]


def test_gradual_drift_into_collapse():
    history = AlertHistory()
    stream = [HEALTHY, DRIFTING, DRIFTING, DRIFTING, COLLAPSED, COLLAPSED, COLLAPSED, COLLAPSED, COLLAPSED]
    out = [kinds(snapshot(s, {0: HEALTHY, 1: c}, history), 1) for s, c in enumerate(stream)]
    assert out[3] == [PRE_COLLAPSE] and out[2] == []
    assert COLLAPSE_CONFIRMED not in sum(out[:8], [])
    assert out[8] == [COLLAPSE_CONFIRMED, PRE_COLLAPSE]


def test_out_of_range_layer_raises():
    with pytest.raises(ValueError, match=r"layer_id=2 outside range\(n_layers=2\)"):
        snapshot(0, {0: HEALTHY, 2: HEALTHY}, AlertHistory())


def test_layer_1_and_layer_11_do_not_leak():
    history = AlertHistory()
    for step in range(5):
        snap = snapshot(step, {1: HEALTHY, 11: COLLAPSED}, history, n_layers=12)
    assert snap.alerts_for(1) == []
    assert kinds(snap, 11) == [COLLAPSE_CONFIRMED, PRE_COLLAPSE]
    assert history.count(1, PRE_COLLAPSE) == 0
    assert history.count(11, PRE_COLLAPSE) == 5
    assert snap.layer(1).layer_id == 1 and snap.layer(10) is None


def test_none_history_is_an_error_not_silence():
    with pytest.raises(ValueError, match="alert_history is None"):
        SystemSnapshot.from_events([ev(HEALTHY, 0, 0)], 0, 1.0, None, "r", "m", 1, None)


def test_plain_dict_history_persists_in_place():
    store: dict[str, int] = {}
    for step in range(3):
        snap = SystemSnapshot.from_events([ev(COLLAPSED, step, 0)], step, 1.0, None, "r", "m", 1, store)
    assert kinds(snap, 0) == [PRE_COLLAPSE]
    assert store == {"PRE_COLLAPSE@0": 3, "COLLAPSE_CONFIRMED@0": 3}
    assert AlertHistory.from_dict(json.loads(json.dumps(store))).count(0, COLLAPSE_CONFIRMED) == 3


def test_layer_without_events_keeps_its_count():
    history = AlertHistory()
    for step in range(2):
        snapshot(step, {0: COLLAPSED}, history)
    snapshot(2, {1: HEALTHY}, history)
    assert kinds(snapshot(3, {0: COLLAPSED}, history), 0) == [PRE_COLLAPSE]


def test_balanced_two_expert_layer_raises_no_alert():
    history = AlertHistory()
    for step in range(6):
        snap = SystemSnapshot.from_events([ev([50, 50], step, 0)], step, 1.0, None, "r", "m", 1, history)
    assert snap.alerts == []
    assert snap.layers[0].top2_share == 1.0


def test_width_change_in_window_uses_latest_width():
    events = [ev([5, 5, 5, 5], 0, 0), ev([1, 1, 2], 1, 0)]
    snap = SystemSnapshot.from_events(events, 1, 1.0, None, "r", "m", 1, AlertHistory())
    assert snap.layers[0].utilization_shares == [0.25, 0.25, 0.5]


def test_immediate_alerts_have_no_persistence():
    layers = [LayerSnapshot(layer_id=i, **_metrics(c)) for i, c in enumerate([HEALTHY, DRIFTING, COLLAPSED])]
    alerts = check_immediate_alerts(layers)
    assert sorted((a.layer_id, a.kind) for a in alerts) == [
        (1, PRE_COLLAPSE), (2, COLLAPSE_CONFIRMED), (2, PRE_COLLAPSE),
    ]  # fmt: skip
    assert all(a.count == 1 and f"layer {a.layer_id}:" in a.message for a in alerts)


def _metrics(counts):
    m = compute_layer_metrics(counts)
    m.pop("gini_coefficient")
    return m


def test_snapshot_round_trip_and_loss_validation():
    history = AlertHistory()
    for step in range(5):
        snap = snapshot(step, {0: HEALTHY, 1: COLLAPSED}, history)
    back = SystemSnapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert back == snap
    with pytest.raises(ValueError, match="train_loss must be finite"):
        SystemSnapshot.from_events([], 0, float("nan"), None, "r", "m", 1, history)
    with pytest.raises(ValueError, match="val_loss must be finite"):
        SystemSnapshot(step=0, timestamp=0.0, train_loss=None, val_loss=float("inf"), layers=[])
