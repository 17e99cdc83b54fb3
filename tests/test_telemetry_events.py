import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronomoe_v3.telemetry import RoutingEvent


def make_event(**kw):
    base = dict(
        timestamp=1700000000.125,
        run_id="run",
        step=3,
        mode="TRAIN",
        layer_id=1,
        n_experts=4,
        top_k=2,
        expert_token_counts=[5, 0, 2, 9],
        active_experts=[0, 2, 3],
    )
    base.update(kw)
    return RoutingEvent(**base)


def test_field_order_matches_v2_contract():
    names = list(RoutingEvent.__dataclass_fields__)
    assert names == [
        "timestamp", "run_id", "step", "mode", "layer_id", "n_experts", "top_k",
        "expert_token_counts", "active_experts", "router_prob_sums", "loss", "aux_loss",
    ]  # fmt: skip


def test_token_count_is_dispatched_tokens():
    assert make_event().token_count == 16


def test_from_router_output_tensor_counts():
    ev = RoutingEvent.from_router_output("r", 0, "INFER", 0, torch.tensor([0, 4, 0, 1]), 4, 1)
    assert ev.expert_token_counts == [0, 4, 0, 1]
    assert ev.active_experts == [1, 3]
    assert ev.token_count == 5
    assert ev.mode == "INFER"


def test_from_router_output_accepts_integral_floats():
    ev = RoutingEvent.from_router_output("r", 0, "TRAIN", 0, torch.tensor([2.0, 0.0]), 2, 1)
    assert ev.expert_token_counts == [2, 0]
    assert all(type(c) is int for c in ev.expert_token_counts)


def test_to_dict_from_dict_round_trip_exact_through_json():
    ev = make_event(router_prob_sums=[0.1, 0.2, 0.30000000000000004, 1 / 3], loss=2.5, aux_loss=0.01)
    d = ev.to_dict()
    assert d["token_count"] == 16
    back = RoutingEvent.from_dict(json.loads(json.dumps(d)))
    assert back == ev
    assert back.to_dict() == d


@given(
    counts=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=16),
    ts=st.floats(min_value=0, max_value=2e9, allow_nan=False),
    loss=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)
def test_round_trip_property(counts, ts, loss):
    ev = RoutingEvent.from_router_output("r", 1, "TRAIN", 0, counts, len(counts), 1, loss=loss, timestamp=ts)
    assert RoutingEvent.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="EVAL"), "mode must be one of"),
        (dict(expert_token_counts=[1, 2, 3]), "expert_token_counts must have length n_experts=4"),
        (dict(expert_token_counts=[1, -2, 3, 4]), r"expert_token_counts\[1\] must be a non-negative"),
        (dict(expert_token_counts=[1, 2.5, 3, 4]), r"expert_token_counts\[1\].*fractional 2.5"),
        (dict(loss=float("nan")), "loss must be finite"),
        (dict(aux_loss=float("inf")), "aux_loss must be finite"),
        (dict(step=-1), "step must be an integer >= 0"),
        (dict(n_experts=0, expert_token_counts=[]), "n_experts must be an integer >= 1"),
        (dict(active_experts=[0, 7]), "active_experts must be distinct indices in range"),
        (dict(router_prob_sums=[0.5]), "router_prob_sums must have length n_experts=4"),
        (dict(run_id=3), "run_id must be a str"),
    ],
)
def test_bad_input_names_field(kw, match):
    with pytest.raises(ValueError, match=match):
        make_event(**kw)


def test_from_router_output_rejects_bad_counts():
    with pytest.raises(ValueError, match="used_capacity.*fractional"):
        RoutingEvent.from_router_output("r", 0, "TRAIN", 0, torch.tensor([1.5, 2.0]), 2, 1)
    with pytest.raises(ValueError, match="used_capacity must have length n_experts=3"):
        RoutingEvent.from_router_output("r", 0, "TRAIN", 0, torch.tensor([1, 2]), 3, 1)
    with pytest.raises(ValueError, match=r"used_capacity\[0\] must be a non-negative"):
        RoutingEvent.from_router_output("r", 0, "TRAIN", 0, torch.tensor([-1, 2]), 2, 1)
    with pytest.raises(ValueError, match="used_capacity must be 1-D"):
        RoutingEvent.from_router_output("r", 0, "TRAIN", 0, torch.ones(2, 2), 2, 1)


def test_from_dict_rejects_unknown_keys_and_bad_token_count():
    d = make_event().to_dict()
    with pytest.raises(ValueError, match="token_count=99 disagrees"):
        RoutingEvent.from_dict({**d, "token_count": 99})
    with pytest.raises(ValueError, match="unknown keys"):
        RoutingEvent.from_dict({**d, "bogus": 1})
    del d["step"]
    with pytest.raises(ValueError, match="missing keys"):
        RoutingEvent.from_dict(d)
