import math

import numpy as np
import pytest
import torch

from chronomoe_v3.telemetry import (
    AlertHistory,
    RoutingEvent,
    SystemSnapshot,
    TokenCounter,
    compute_entropy,
    compute_gini_coefficient,
    compute_layer_metrics,
    compute_n_effective,
    compute_top2_share,
    compute_utilization_shares,
    count_dead_experts,
    count_nearly_dead_experts,
)


def ev(counts, step=0, layer_id=0):
    return RoutingEvent.from_router_output("r", step, "TRAIN", layer_id, counts, len(counts), 2, timestamp=float(step))


def test_shares_sum_counts_over_window():
    shares = compute_utilization_shares([ev([1, 3, 0, 0]), ev([0, 0, 0, 4])])
    np.testing.assert_allclose(shares, [1 / 8, 3 / 8, 0, 1 / 2])
    np.testing.assert_allclose(compute_utilization_shares([[1, 3, 0, 0], [0, 0, 0, 4]]), shares)
    np.testing.assert_array_equal(compute_utilization_shares([0, 0, 0]), [0, 0, 0])


def test_shares_reject_mixed_widths_and_bad_counts():
    with pytest.raises(ValueError, match="one n_experts"):
        compute_utilization_shares([ev([1, 2]), ev([1, 2, 3])])
    with pytest.raises(ValueError, match=r"counts\[1\].*fractional"):
        compute_utilization_shares([1.0, 0.5])
    with pytest.raises(ValueError, match="length n_experts=3"):
        compute_utilization_shares([1, 2], n_experts=3)


def test_entropy_neff_top2_hand_computed():
    s = [1 / 8, 3 / 8, 0, 1 / 2]
    h = -(1 / 8 * math.log(1 / 8) + 3 / 8 * math.log(3 / 8) + 1 / 2 * math.log(1 / 2))
    assert compute_entropy(s) == pytest.approx(h)
    assert compute_n_effective(s) == pytest.approx(math.exp(h))
    assert compute_top2_share(s) == pytest.approx(7 / 8)
    assert compute_n_effective([0.25] * 4) == pytest.approx(4.0)
    assert compute_top2_share([1.0]) == 1.0
    assert compute_entropy([1e-11, 1 - 1e-11]) == pytest.approx(0.0, abs=1e-9)


def test_dead_is_strict_and_nearly_dead_excludes_dead():
    s = np.array([0.0, 1e-9, 0.005, 0.0099, 0.01, 0.975])
    assert count_dead_experts(s) == 1
    assert count_nearly_dead_experts(s) == 3


def test_gini_hand_computed_and_documented_peak():
    # sum_ij |x_i - x_j| = 2 * (0.1+0.2+0.3+0.1+0.2+0.1) = 2.0; 2 n^2 mean = 2 * 16 * 0.25 = 8
    assert compute_gini_coefficient([0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.25)
    assert compute_gini_coefficient([0.25] * 4) == pytest.approx(0.0)
    assert compute_gini_coefficient([0, 0, 0, 1]) == pytest.approx(3 / 4)  # (n-1)/n
    assert compute_gini_coefficient([0, 0, 0, 1], normalized=True) == pytest.approx(1.0)


def test_metric_inputs_validated():
    with pytest.raises(ValueError, match="finite and >= 0"):
        compute_entropy([0.5, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        compute_top2_share([[0.5, 0.5]])


def test_layer_metrics_bundle():
    m = compute_layer_metrics([ev([2, 2, 0, 4])])
    assert m["dead_expert_count"] == 1
    assert m["active_experts"] == [0, 1, 3]
    assert m["top2_share"] == pytest.approx(0.75)
    assert m["utilization_shares"] == [0.25, 0.25, 0.0, 0.5]


def test_masked_slot_is_not_a_dead_expert():
    counter = TokenCounter(n_layers=1, n_slots=4)
    counter.add(0, torch.tensor([3, 0, 5, 2]))  # slot 1 is masked out: it gets no tokens by construction
    mask = torch.tensor([[True, False, True, True]])
    (event,) = counter.to_events("r", 1, "TRAIN", top_k=1, active_masks=mask)
    assert event.n_experts == 3
    assert event.expert_token_counts == [3, 5, 2]
    snap = SystemSnapshot.from_events([event], 1, None, None, "r", "m", 1, AlertHistory())
    assert snap.layers[0].dead_expert_count == 0
    assert snap.layers[0].n_experts == 3
