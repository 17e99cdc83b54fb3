"""Fuzzing the public numeric entry points with hostile numbers (issue 13).

Every call below either succeeds, leaving only finite state behind (NaN/Inf readings are documented skips),
or raises a clear ValueError / IndexError / TypeError raised by this library (the raising frame is in
chronomoe_v3, and the message names the problem), never an exception from deep inside torch, and never after a
partial edit. Small shapes and modest example counts keep the file to a few seconds on 2 cores.
"""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import tree_equal
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chronomoe_v3.balance import aux_free_bias_update, load_balancing_loss
from chronomoe_v3.bias import SlowBias
from chronomoe_v3.clocks import ClockConfig, ThreeClockEMA
from chronomoe_v3.config import (
    BasinConfig,
    BiasConfig,
    BimodalityConfig,
    ChronoConfig,
    LifecycleConfig,
    MidClockConfig,
    ObjectiveConfig,
)
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.ops import ExpertRegistry
from chronomoe_v3.ops.common import normalise_usage
from chronomoe_v3.ops.record import EditError
from chronomoe_v3.system import ChronoSystem
from chronomoe_v3.telemetry import (
    AlertHistory,
    LayerSnapshot,
    RoutingEvent,
    SystemSnapshot,
    TokenCounter,
    compute_layer_metrics,
)
from chronomoe_v3.trace import MoETrace

torch.set_num_threads(1)

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ValueError, IndexError, TypeError)
FP32_MAX = float(torch.finfo(torch.float32).max)

# hostile reals: specials, float limits, fp32 limits, and ordinary numbers
HOSTILE = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 1e-38, FP32_MAX, -FP32_MAX,
                     1.7976931348623157e308, -1.7976931348623157e308, 3.5e38, 1.0 - 2**-25, 1.0 + 2**-23]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(-10, 10),
)
HUGE_INTS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63]))


def clear_error(exc: BaseException) -> None:
    """`exc` is one of the clear kinds, raised from this library's code with a message."""
    assert isinstance(exc, CLEAR), f"{type(exc).__name__}: {exc}"
    assert str(exc), "empty error message"
    frames = traceback.extract_tb(exc.__traceback__)
    assert frames and "chronomoe_v3" in frames[-1].filename, (
        f"{type(exc).__name__} raised outside the library ({frames[-1].filename}): {exc}"
    )


def attempt(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except Exception as exc:  # noqa: BLE001 - every exception is judged by clear_error
        clear_error(exc)
        return False, exc


def tensors(tree: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield "", tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            for name, t in tensors(v):
                yield f"{k}.{name}" if name else str(k), t
    elif isinstance(tree, (list, tuple)):
        for k, v in enumerate(tree):
            for name, t in tensors(v):
                yield f"{k}.{name}" if name else str(k), t


def assert_finite_state(tree: Any) -> None:
    """Every float tensor finite; `phi_last` may hold NaN (its documented 'unmeasured' value), never Inf."""
    for name, t in tensors(tree):
        if t.is_floating_point():
            ok = torch.isfinite(t) | torch.isnan(t) if name.endswith("phi_last") else torch.isfinite(t)
            assert bool(ok.all()), f"{name} holds non-finite values"


def f32(x: Any) -> torch.Tensor:
    """fp32 tensor of Python floats; values beyond the fp32 range become +-inf (as a cast would make them)."""
    return torch.tensor(x, dtype=torch.float64).float()


def values(n: int) -> st.SearchStrategy[list[float]]:
    return st.lists(HOSTILE, min_size=n, max_size=n)


# ---------------------------------------------------------------------- configs
@FUZZ
@given(
    field=st.sampled_from([
        (BiasConfig, "beta_min"), (BiasConfig, "beta_max"), (BiasConfig, "eta"), (BiasConfig, "tau"),
        (MidClockConfig, "gain"), (MidClockConfig, "max_offset"), (LifecycleConfig, "perturbation_scale"),
        (LifecycleConfig, "split_router_margin"), (ObjectiveConfig, "lambda_complexity"),
        (ObjectiveConfig, "min_evidence_tokens"), (BasinConfig, "token_decay"),
    ]),
    value=HOSTILE,
)
def test_real_config_fields_accept_only_fp32_finite_values(field: tuple[type, str], value: float) -> None:
    cls, name = field
    ok, out = attempt(lambda: cls(**{name: value}))
    if ok:
        got = getattr(out, name)
        assert math.isfinite(got) and abs(got) <= FP32_MAX
    else:
        assert name in str(out)


@FUZZ
@given(
    field=st.sampled_from([
        (ObjectiveConfig, "min_observations_to_judge"), (ObjectiveConfig, "min_age_to_remove"),
        (LifecycleConfig, "cooldown_steps"), (LifecycleConfig, "eval_interval"), (LifecycleConfig, "archive_capacity"),
        (BasinConfig, "vocab_limit"), (BasinConfig, "history"), (BimodalityConfig, "samples_per_expert"),
    ]),
    value=HUGE_INTS,
)
def test_integer_config_fields_stay_within_int64_and_their_limits(field: tuple[type, str], value: int) -> None:
    cls, name = field
    ok, out = attempt(lambda: cls(**{name: value}))
    if ok:
        assert 0 <= getattr(out, name) < 2**63
    else:
        assert name in str(out)


@FUZZ
@given(alpha=st.one_of(HOSTILE, st.floats(0.999999, 1.0), st.floats(0.0, 1e-6)))
def test_clock_retentions_are_usable_in_fp32(alpha: float) -> None:
    ok, out = attempt(lambda: ClockConfig("slow", alpha))
    if ok:
        a32 = float(torch.tensor(out.alpha, dtype=torch.float32))
        assert 0.0 < a32 < 1.0 and math.isfinite(out.half_life) and out.half_life > 0
    else:
        assert "alpha" in str(out)


@FUZZ
@given(low=HOSTILE, high=HOSTILE)
def test_beta_bounds_near_float_limits(low: float, high: float) -> None:
    ok, config = attempt(lambda: ChronoConfig(bias=BiasConfig(beta_min=low, beta_max=high)))
    if not ok:
        return
    bias = SlowBias(4, config)
    bias.update(torch.tensor([1.0, -1.0, float("nan"), 0.5]))
    beta = bias.beta
    assert bool(torch.isfinite(beta).all())
    # within the configured bounds themselves (the fp32 clamp uses the nearest fp32 numbers inside them)
    assert float(beta.min()) >= config.bias.beta_min and float(beta.max()) <= config.bias.beta_max


def test_beta_written_under_a_non_fp32_bound_loads_back() -> None:
    config = ChronoConfig(bias=BiasConfig(beta_min=-1.0, beta_max=1e-45))  # 1e-45 is no fp32 number
    bias = SlowBias(4, config)
    bias.update(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert float(bias.beta.max()) <= 1e-45
    SlowBias(4, config).load_state_dict(bias.state_dict())


# ---------------------------------------------------------------------- traces
@FUZZ
@given(
    t=st.integers(0, 6), k=st.integers(0, 3), h=st.integers(1, 4), e=st.integers(-1, 5),
    index_shift=st.sampled_from([0, 0, 0, -3, 7]), weight_dtype=st.sampled_from([torch.float32, torch.int64]),
    out_rank=st.sampled_from([2, 3, 3, 4]), fill=HOSTILE,
)
def test_trace_constructor_refuses_malformed_input_clearly(
    t: int, k: int, h: int, e: int, index_shift: int, weight_dtype: torch.dtype, out_rank: int, fill: float
) -> None:
    idx = (torch.arange(t * k).reshape(t, k) % max(e, 1)) + index_shift
    w = torch.full((t, k), 0.5).to(weight_dtype)
    shape = {2: (t * k, h), 3: (t, k, h), 4: (t, k, h, 1)}[out_rank]
    y = torch.full(shape, fill, dtype=torch.float64).float()  # fp64 values beyond fp32 become +-inf
    ok, trace = attempt(lambda: MoETrace.from_fused(idx, w, y, e))
    if ok:
        assert trace.num_tokens == t > 0 and trace.top_k == k > 0
        assert int(trace.topk_index.min()) >= 0 and int(trace.topk_index.max()) < e


@FUZZ
@given(n_tokens=st.integers(1, 8), bad=values(4), all_padding=st.booleans())
def test_observing_hostile_traces_keeps_observer_state_finite(
    n_tokens: int, bad: list[float], all_padding: bool
) -> None:
    layer = ChronoMoELayer(4, 4, 4, 2)
    system = ChronoSystem(layer, controller=None)
    idx = torch.stack([torch.arange(n_tokens) % 4, (torch.arange(n_tokens) + 1) % 4], dim=1)
    w = torch.full((n_tokens, 2), 0.5)
    y = torch.randn(n_tokens, 2, 4)
    y[0, 0] = f32(bad)
    w[-1, -1] = f32(bad[0])
    token_mask = torch.zeros(n_tokens, dtype=torch.bool) if all_padding else None
    trace = MoETrace(idx, w, y, 4, token_mask=token_mask)  # the per-step path: no value checks
    system.observers[0].observe(trace.validate(check_values=False), layer.active_mask)
    assert_finite_state(system.observers[0].state_dict())


# ---------------------------------------------------------------------- layer forward + system
@FUZZ
@given(
    shape=st.sampled_from([(0, 8), (3, 8), (2, 3, 8), (5, 7), (1, 1, 8), (40, 8)]),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.int64, torch.float64, torch.bool]),
    fill=HOSTILE, rows=st.integers(0, 3),
)
def test_layer_forward_with_hostile_input_is_clear_and_leaves_state_finite(
    shape: tuple[int, ...], dtype: torch.dtype, fill: float, rows: int
) -> None:
    torch.manual_seed(0)
    layer = ChronoMoELayer(8, 8, 4, 2)
    system = ChronoSystem(layer)
    layer.train()
    x = torch.randn(shape)
    if x.numel() and shape[-1] == 8:
        flat = x.view(-1, 8)
        flat[: min(rows, flat.shape[0])] = f32(fill)
    ok, out = attempt(lambda: layer(x.to(dtype)))
    if not ok:
        assert any(word in str(out) for word in ("dtype", "shape", "empty", "d_model"))
        assert system.global_step == 0  # a refused forward is not observed
        return
    assert out.shape == x.shape
    system.step()
    assert_finite_state(system.state_dict())
    assert_finite_state(dict(layer.state_dict()))


@FUZZ
@given(num_active=st.integers(1, 3), top_k=st.integers(1, 2), steps=st.integers(1, 4), empty_steps=st.integers(0, 3))
def test_one_or_few_active_experts_and_zero_token_steps(
    num_active: int, top_k: int, steps: int, empty_steps: int
) -> None:
    assume(top_k <= num_active)
    torch.manual_seed(0)
    layer = ChronoMoELayer(8, 8, 4, top_k, num_active=num_active)
    config = ChronoConfig(lifecycle=LifecycleConfig(min_experts_per_layer=1, eval_interval=1))
    system = ChronoSystem(layer, config=config)
    layer.train()
    for _ in range(steps):
        layer(torch.randn(6, 8))
        system.step()
        for _ in range(empty_steps):
            result = system.step()  # a window with zero tokens: skipped, never an alert
            assert result.snapshot is not None and result.snapshot.alerts == []
    assert_finite_state(system.state_dict())
    assert int(layer.active_mask.sum()) >= 1


def test_step_before_any_forward_is_a_clear_error() -> None:
    layer = ChronoMoELayer(8, 8, 4, 2)
    system = ChronoSystem(layer)
    with pytest.raises(RuntimeError, match="before any observed training forward"):  # a usage error, documented
        system.step()
    assert system.step_calls == 0


@FUZZ
@given(loss=st.one_of(HOSTILE, st.sampled_from([True, "1.0", None])))
def test_step_loss_values(loss: Any) -> None:
    layer = ChronoMoELayer(8, 8, 4, 2)
    system = ChronoSystem(layer, controller=None)
    layer.train()
    layer(torch.randn(4, 8))
    before = system.step_calls
    ok, _ = attempt(lambda: system.step(loss=loss))
    assert system.step_calls == before + (1 if ok else 0)
    assert all(math.isfinite(v) for _, v in system.losses)


# ---------------------------------------------------------------------- balancers and slow bias
@FUZZ
@given(load=values(5), bias=st.lists(st.floats(-1e30, 1e30), min_size=5, max_size=5), rate=HOSTILE,
       mask=st.lists(st.booleans(), min_size=5, max_size=5))
def test_aux_free_bias_update_stays_finite(load: list[float], bias: list[float], rate: float, mask: list[bool]) -> None:
    b = torch.tensor(bias, dtype=torch.float32)
    ok, new = attempt(lambda: aux_free_bias_update(b, torch.tensor(load, dtype=torch.float64),
                                                   torch.tensor(mask), rate=rate))
    if ok:
        assert bool(torch.isfinite(new).all())
        assert torch.equal(new[~torch.tensor(mask)], b[~torch.tensor(mask)])
    else:
        assert "rate" in str(new)


@FUZZ
@given(t=st.integers(0, 5), e=st.integers(1, 4), real=st.booleans(), wrong=st.sampled_from([None, "index", "mask"]))
def test_load_balancing_loss_shapes_and_empty_batches(t: int, e: int, real: bool, wrong: str | None) -> None:
    probs = torch.softmax(torch.randn(t, e), dim=-1)
    idx = torch.zeros(t if wrong != "index" else t + 1, 1, dtype=torch.long)
    token_mask = torch.full((t,), real) if wrong != "mask" else torch.ones(t + 2, dtype=torch.bool)
    ok, loss = attempt(lambda: load_balancing_loss(probs, idx, token_mask=token_mask))
    if ok:
        assert bool(torch.isfinite(loss)) and float(loss) >= 0
        if t == 0 or not real:
            assert float(loss) == 0.0


@FUZZ
@given(phi=values(6), start=st.lists(st.floats(-1, 1), min_size=6, max_size=6),
       mask=st.lists(st.booleans(), min_size=6, max_size=6))
def test_slow_bias_update_never_leaves_the_bounds(phi: list[float], start: list[float], mask: list[bool]) -> None:
    bias = SlowBias(6)
    bias.set_beta(torch.tensor(start))
    for _ in range(3):
        bias.update(f32(phi), torch.tensor(mask))
    assert bool(torch.isfinite(bias.beta).all())
    assert float(bias.beta.min()) >= -1.0 and float(bias.beta.max()) <= 1.0


@FUZZ
@given(value=values(3))
def test_set_beta_refusal_is_not_a_partial_edit(value: list[float]) -> None:
    bias = SlowBias(3)
    bias.set_beta(torch.tensor([0.1, -0.2, 0.3]))
    before = bias.beta.clone()
    ok, _ = attempt(lambda: bias.set_beta(f32(value)))
    if ok:
        assert torch.equal(bias.beta, f32(value))
    else:
        assert torch.equal(bias.beta, before)


@FUZZ
@given(x=values(4), alphas=values(3))
def test_clock_updates_store_nothing_non_finite(x: list[float], alphas: list[float]) -> None:
    clocks = ThreeClockEMA(4)
    clocks.update(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.ones(4, dtype=torch.bool))
    clocks.update(f32(x), torch.ones(4, dtype=torch.bool), alphas=f32(alphas))
    assert_finite_state(clocks.state_dict())


# ---------------------------------------------------------------------- edits: usage weights and the registry
@FUZZ
@given(usage=st.tuples(HOSTILE, HOSTILE))
def test_merge_usage_weights_are_convex_or_refused(usage: tuple[float, float]) -> None:
    ok, out = attempt(lambda: normalise_usage(usage))
    if ok:
        ws, wa = out
        assert math.isfinite(ws) and math.isfinite(wa) and ws >= 0 and wa >= 0
        assert ws + wa == pytest.approx(1.0)
    else:
        assert isinstance(out, EditError) and "usage" in str(out)


@FUZZ
@given(shares=values(4), phis=values(4))
def test_basin_records_are_all_or_nothing(shares: list[float], phis: list[float]) -> None:
    registry = ExpertRegistry([torch.tensor([True, True, True, False])])
    before = copy.deepcopy(registry.state_dict())
    ok, _ = attempt(lambda: registry.record_basin(0, f32(shares), f32(phis)))
    if not ok:
        assert tree_equal(registry.state_dict(), before)
    for record in registry.experts():
        assert all(math.isfinite(s) for s in record.basin.shares)


# ---------------------------------------------------------------------- telemetry
@FUZZ
@given(counts=st.lists(st.one_of(HUGE_INTS, HOSTILE), min_size=0, max_size=5), n=st.integers(-1, 6),
       top_k=st.integers(-1, 3), mode=st.sampled_from(["TRAIN", "INFER", "EVAL", ""]))
def test_routing_events_refuse_malformed_counts(counts: list[Any], n: int, top_k: int, mode: str) -> None:
    ok, event = attempt(lambda: RoutingEvent(0.0, "r", 1, mode, 0, n, top_k, counts, []))
    if ok:
        assert len(event.expert_token_counts) == event.n_experts
        assert all(isinstance(c, int) and c >= 0 for c in event.expert_token_counts)
        assert RoutingEvent.from_dict(event.to_dict()) == event


@FUZZ
@given(counts=values(3), dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]))
def test_router_output_tensors_with_hostile_counts(counts: list[float], dtype: torch.dtype) -> None:
    def build() -> RoutingEvent:
        return RoutingEvent.from_router_output("r", 0, "TRAIN", 0, torch.tensor(counts, dtype=torch.float64).to(dtype),
                                               3, 1)

    if dtype == torch.int64:
        assume(all(math.isfinite(c) and abs(c) < 2**62 for c in counts))
    ok, event = attempt(build)
    if ok:
        assert all(c >= 0 for c in event.expert_token_counts)


@FUZZ
@given(rows=st.lists(values(3), min_size=1, max_size=3), layer_id=st.integers(-2, 3))
def test_snapshots_from_hostile_windows(rows: list[list[float]], layer_id: int) -> None:
    history = AlertHistory()
    before = dict(history.counts)

    def build() -> SystemSnapshot:
        events = [RoutingEvent.from_router_output("r", s, "TRAIN", layer_id, f32(r), 3, 1)
                  for s, r in enumerate(rows)]
        return SystemSnapshot.from_events(events, 1, None, None, "r", "m", 2, history)

    ok, snap = attempt(build)
    if not ok:
        assert dict(history.counts) == before  # a refused window does not advance the alert counters
        return
    for layer in snap.layers:
        assert all(math.isfinite(s) for s in layer.utilization_shares)
        assert math.isfinite(layer.n_effective) and math.isfinite(layer.entropy)


@FUZZ
@given(shares=st.lists(HOSTILE, min_size=0, max_size=4))
def test_layer_snapshot_refuses_non_finite_shares(shares: list[float]) -> None:
    def build() -> LayerSnapshot:
        return LayerSnapshot(0, shares, 0.0, 0, 1.0, 1.0, 0, [])

    ok, snap = attempt(build)
    if ok:
        assert snap.n_experts == len(shares) > 0 and all(math.isfinite(s) for s in snap.utilization_shares)


@FUZZ
@given(big=st.integers(0, 2**62), n=st.integers(1, 5))
def test_huge_counts_give_finite_metrics(big: int, n: int) -> None:
    metrics = compute_layer_metrics([[big] + [0] * (n - 1), [0] * (n - 1) + [big]], n)
    for key in ("entropy", "n_effective", "top2_share", "gini_coefficient"):
        assert math.isfinite(metrics[key])


@FUZZ
@given(shape=st.sampled_from([(3,), (4,), (2, 3), ()]), fill=HOSTILE, layer_id=st.integers(-1, 2))
def test_token_counter_add_checks_shapes_and_refuses_bad_counts_at_report(
    shape: tuple[int, ...], fill: float, layer_id: int
) -> None:
    counter = TokenCounter(n_layers=2, n_slots=3, dtype=torch.float64)
    counter.add(0, torch.tensor([1.0, 2.0, 3.0]))
    ok, _ = attempt(lambda: counter.add(layer_id, torch.full(shape, fill, dtype=torch.float64)))
    before = counter.counts.clone()
    ok_events, events = attempt(lambda: counter.to_events("r", 1, "TRAIN", 1))
    if ok_events:
        assert all(c >= 0 for ev in events for c in ev.expert_token_counts)
        assert int(counter.counts.abs().sum()) == 0
    else:
        assert torch.equal(counter.counts.nan_to_num(-1.0), before.nan_to_num(-1.0))  # nothing consumed
    del ok
