import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chronomoe_v3 import ClockConfig, ThreeClockEMA


# Up to the largest retention below 1 in fp32 (the clocks' dtype): closer to 1 is refused (it would never move).
@given(st.floats(min_value=1e-6, max_value=1 - 2**-24, allow_nan=False))
@settings(max_examples=200, deadline=None)
def test_alpha_half_life_round_trip(alpha):
    c = ClockConfig("x", alpha=alpha)
    back = ClockConfig("x", half_life=c.half_life)
    assert back.alpha == pytest.approx(alpha, rel=1e-12, abs=1e-15)
    assert c.half_life == pytest.approx(math.log(2) / -math.log(alpha), rel=1e-12)


def test_half_life_is_exact_not_truncated():
    assert ClockConfig("slow", alpha=0.999).half_life == pytest.approx(692.800549, rel=1e-8)
    assert ClockConfig("fast", alpha=0.9).half_life == pytest.approx(6.578813, rel=1e-6)
    assert ClockConfig("h", half_life=10).alpha == pytest.approx(0.5 ** 0.1, rel=1e-14)


@pytest.mark.parametrize("kwargs", [{"alpha": 1.0}, {"alpha": 0.0}, {"alpha": -0.1}, {"alpha": float("nan")},
                                    {"half_life": 0}, {"half_life": -3}, {"half_life": float("inf")},
                                    {}, {"alpha": 0.9, "half_life": 3.0}, {"alpha": "0.9"}])
def test_invalid_clock_rejected_before_arithmetic(kwargs):
    with pytest.raises(ValueError, match="ClockConfig"):
        ClockConfig("c", **kwargs)


def test_debiased_constant_signal_reads_itself_after_one_observation():
    ema = ThreeClockEMA(3)
    x = torch.tensor([0.7, -0.2, 0.4])
    ema.update(x, torch.tensor([True, True, False]))
    read = ema.read()
    assert torch.allclose(read[:, :2], x[:2].expand(3, 2), atol=1e-6)
    assert torch.isnan(read[:, 2]).all()
    for _ in range(999):
        ema.update(x, torch.tensor([True, True, False]))
    read = ema.read()
    # A plain zero-initialised EMA at 0.999 would read 1 - 0.999**1000 = 63% of the signal here.
    assert torch.allclose(read[2, :2], x[:2], atol=1e-5)
    assert ema.count.tolist() == [1000, 1000, 0]


def test_only_measured_entries_change_and_nan_never_leaks():
    ema = ThreeClockEMA(4)
    ema.update(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4, dtype=torch.bool))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(torch.tensor([float("nan"), 5.0, float("inf"), 1.0]), torch.tensor([False, True, False, False]))
    after = ema.state_dict()
    for k in before:
        if before[k].dim() == 0 or k == "alphas":
            continue
        changed = (before[k] != after[k])
        changed = changed.reshape(-1, 4).any(0) if changed.dim() > 1 else changed
        assert changed.tolist() == [False, True, False, False], k
    assert torch.isfinite(ema.value).all()


def test_ema_matches_formula_with_debias():
    alphas = (0.5, 0.8, 0.9)
    ema = ThreeClockEMA(1, alphas)
    xs = [1.0, 3.0, -2.0]
    for x in xs:
        ema.update(torch.tensor([x]), torch.tensor([True]))
    for c, a in enumerate(alphas):
        v = 0.0
        for x in xs:
            v = a * v + (1 - a) * x
        assert ema.read()[c, 0].item() == pytest.approx(v / (1 - a ** len(xs)), rel=1e-6)


def test_variable_retention_debias_stays_exact():
    ema = ThreeClockEMA(1)
    seq = [torch.tensor([0.5, 0.9, 0.999]), torch.tensor([0.7, 0.95, 0.999])]
    for a in seq:
        ema.update(torch.tensor([0.3]), torch.tensor([True]), alphas=a)
    assert torch.allclose(ema.read()[:, 0], torch.full((3,), 0.3), atol=1e-6)


def test_trailing_dims_and_reset():
    ema = ThreeClockEMA(2, trailing_shape=(3,))
    ema.update(torch.ones(2, 3), torch.tensor([True, True]))
    ema.reset_entries(torch.tensor([True, False]))
    read = ema.read()
    assert torch.isnan(read[:, 0]).all() and torch.allclose(read[:, 1], torch.ones(3, 3))
    assert ema.count.tolist() == [0, 1]


def test_bad_shapes_rejected():
    ema = ThreeClockEMA(3)
    with pytest.raises(ValueError, match="expected"):
        ema.update(torch.zeros(4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        ema.update(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="fast < mid < slow"):
        ThreeClockEMA(3, (0.99, 0.9, 0.999))
