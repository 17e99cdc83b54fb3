"""Issue 13, ChronoSystem side: NaN/Inf inputs never poison state, checkpoints are validated by value before
anything changes, empty windows raise no alert, a failing step() changes nothing, memory stays bounded."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from helpers import tree_equal

from chronomoe_v3.bias import SlowBias, slow_bias_update
from chronomoe_v3.clocks import ThreeClockEMA
from chronomoe_v3.config import BiasConfig, ChronoConfig, LifecycleConfig
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.lifecycle.decisions import DecisionLog
from chronomoe_v3.system import AUDIT_HISTORY, ChronoSystem
from chronomoe_v3.telemetry import TokenCounter
from chronomoe_v3.toy.models import TinyMoELM

torch.set_num_threads(1)


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for k, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}.{k}")


def _non_finite(tree: Any) -> list[str]:
    """Float tensors holding NaN/Inf; `phi_last` may hold NaN (its documented 'unmeasured' value), never Inf."""
    bad = []
    for name, t in _tensors(tree):
        if not t.is_floating_point():
            continue
        ok = torch.isfinite(t) | torch.isnan(t) if name.endswith("phi_last") else torch.isfinite(t)
        if not bool(ok.all()):
            bad.append(name)
    return bad


def _lm(seed: int = 0) -> TinyMoELM:
    torch.manual_seed(seed)
    return TinyMoELM(24, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=4)


def _layer_system(seed: int = 0, **kw: Any) -> tuple[ChronoMoELayer, ChronoSystem]:
    torch.manual_seed(seed)
    layer = ChronoMoELayer(16, 16, 8, 2, num_active=6)
    layer.train()
    return layer, ChronoSystem(layer, **kw)


# ---------------------------------------------------------------------- 1. NaN/Inf tokens with a slow bias
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_token_through_tiny_lm_leaves_every_state_buffer_finite(bad: float) -> None:
    model = _lm()
    system = ChronoSystem(model, config=ChronoConfig(lifecycle=LifecycleConfig(eval_interval=1)))
    assert all(b is not None for b in system.biases)  # the slow bias is attached and routes every forward
    # The last position of the embedding output is poisoned: causal attention keeps it to that one token.
    hook = model.tok.register_forward_hook(
        lambda mod, inp, out: out.index_fill(1, torch.tensor([out.shape[1] - 1]), bad)
    )
    model.train()
    ids = torch.randint(0, 24, (2, 12))
    for _ in range(3):
        model(ids)
        system.step()  # eval_interval 1: beta updated from phi_slow at every step
    model(ids)
    assert _non_finite(system.state_dict()) == []
    assert _non_finite(dict(model.state_dict())) == []
    for bias in system.biases:
        assert bias is not None and bool(torch.isfinite(bias.beta).all())
    # nothing stuck: once the inputs are clean again the clocks measure and stay finite
    hook.remove()
    for _ in range(3):
        model(ids)
        system.step()
    assert int(system.observers[0].coherence.phi.count.sum()) > 0
    assert _non_finite(system.state_dict()) == []


def test_bad_tokens_in_the_layer_forward_leave_clocks_and_relevance_finite() -> None:
    layer, system = _layer_system()
    x = torch.randn(32, 16)
    x[3] = float("nan")
    x[7, 2] = float("inf")
    for _ in range(4):
        layer(x)
    system.step()
    layer(x)
    assert _non_finite(system.state_dict()) == []
    assert _non_finite(dict(layer.state_dict())) == []


def test_low_level_updates_store_nothing_non_finite() -> None:
    clocks = ThreeClockEMA(4, (0.9, 0.99, 0.999))
    measured = torch.ones(4, dtype=torch.bool)
    clocks.update(torch.tensor([0.5, float("nan"), float("inf"), 0.2]), measured)
    clocks.update(torch.tensor([0.5, 0.1, 0.1, 0.2]), measured, alphas=torch.tensor([float("nan"), 2.0, -1.0]))
    clocks.update(torch.tensor([3e38, 3e38, -3e38, 0.0]) * 10, measured)  # overflowing readings are skipped
    for t in clocks.state_dict().values():
        assert bool(torch.isfinite(t).all())
    beta = torch.zeros(4)
    new = slow_bias_update(beta, torch.tensor([float("nan"), float("inf"), 0.9, 0.1]), eta=0.5, tau=0.5,
                           beta_min=-1.0, beta_max=1.0)
    assert bool(torch.isfinite(new).all()) and beta.abs().sum() == 0  # inputs untouched
    bias = SlowBias(4)
    bias.update(torch.full((4,), float("nan")))
    assert torch.equal(bias.beta, torch.zeros(4))


# ---------------------------------------------------------------------- 2. load_state_dict validates values
def _trained_system() -> tuple[ChronoMoELayer, ChronoSystem, dict[str, Any]]:
    layer, system = _layer_system()
    for _ in range(3):
        layer(torch.randn(32, 16))
    system.step()
    layer(torch.randn(32, 16))
    return layer, system, system.state_dict()


def _set(path: tuple[Any, ...], value: Any):
    def mutate(state: dict[str, Any]) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        if isinstance(target, torch.Tensor):
            target[path[-1]] = value
        else:
            target[path[-1]] = value
    return mutate


def _poke(key: str, value: float, index: tuple[int, ...] = (0, 0)):
    def mutate(state: dict[str, Any]) -> None:
        state["observers"][0][key][index] = value
    return mutate


BAD_STATES = [
    ("nan slow clock", _poke("coherence.phi.value", float("nan"), (2, 0)), r"'coherence.phi.value'.*non-finite"),
    ("inf share clock", _poke("coherence.share.value", float("inf")), r"'coherence.share.value'.*non-finite"),
    ("inf phi_last", _poke("coherence.phi_last", float("inf"), (0,)), r"'coherence.phi_last'.*non-finite"),
    ("nan role", _poke("coherence.role.value", float("nan"), (0, 0, 0)), r"'coherence.role.value'"),
    ("decay above 1", _poke("coherence.phi.decay", 1.5), r"'coherence.phi.decay'.*\[0, 1\]"),
    ("negative clock count", _poke("coherence.phi.count", -1, (0,)), r"'coherence.phi.count'.*counts >= 0"),
    ("last_seen below -1", _poke("coherence.last_seen", -5, (0,)), r"'coherence.last_seen'.*>= -1"),
    ("negative token count", lambda s: s["counter"]["counts"].__setitem__((0, 1), -3), r"counter.counts.*>= 0"),
    ("negative layer step", _set(("layer_steps", 0), -1), r"layer_steps\[0\].*>= 0"),
    ("negative step calls", _set(("step_calls",), -2), r"step_calls.*>= 0"),
    ("fractional step calls", _set(("step_calls",), 1.5), r"step_calls.*integer"),
    ("last edit below -1", _set(("last_edit_step", 0), -9), r"last_edit_step\[0\].*>= -1"),
    ("negative alert counter", _set(("alert_history", "PRE_COLLAPSE@0"), -1), r"alert_history.*>= 0"),
    ("nan loss", _set(("losses",), [[1, float("nan")]]), r"losses\[0\] loss.*finite"),
    ("inf pressure", _set(("pressure",), {"0": float("inf")}), r"pressure\['0'\].*finite"),
]


@pytest.mark.parametrize(("name", "mutate", "match"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_refused_checkpoint_values_leave_the_system_bitwise_unchanged(name: str, mutate: Any, match: str) -> None:
    layer, system, saved = _trained_system()
    layer(torch.randn(32, 16))  # the live state now differs from the checkpoint
    before = copy.deepcopy(system.state_dict())
    bad = copy.deepcopy(saved)
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        system.load_state_dict(bad)
    assert tree_equal(system.state_dict(), before)
    system.load_state_dict(saved)  # the intact checkpoint still loads
    assert tree_equal(system.state_dict(), saved)


def test_checkpoint_with_fewer_live_experts_than_min_is_refused() -> None:
    layer, system, saved = _trained_system()
    bad = copy.deepcopy(saved)
    slots = bad["registry"]["slots"][0]
    for slot in range(1, len(slots)):
        slots[slot] = ""  # one live expert left; min_experts_per_layer is 2
    before = copy.deepcopy(system.state_dict())
    with pytest.raises(ValueError, match=r"min_experts_per_layer=2"):
        system.load_state_dict(bad)
    assert tree_equal(system.state_dict(), before)


def test_checkpoint_whose_registry_disagrees_with_the_active_mask_is_refused() -> None:
    layer, system, saved = _trained_system()
    with torch.no_grad():
        layer.active_mask[5] = False  # the model now routes to 5 slots, the saved registry has 6 live
    before = copy.deepcopy(system.state_dict())
    with pytest.raises(ValueError, match=r"routes to slots .* saved registry"):
        system.load_state_dict(saved)
    assert tree_equal(system.state_dict(), before)


def test_checkpoint_of_another_config_is_refused_naming_the_fields() -> None:
    _, _, saved = _trained_system()
    other = ChronoConfig(lifecycle=LifecycleConfig(cooldown_steps=7))
    layer2 = ChronoMoELayer(16, 16, 8, 2, num_active=6)
    system2 = ChronoSystem(layer2, config=other)
    before = copy.deepcopy(system2.state_dict())
    with pytest.raises(ValueError, match=r"another config.*lifecycle.cooldown_steps"):
        system2.load_state_dict(saved)
    assert tree_equal(system2.state_dict(), before)


def test_beta_outside_its_configured_bounds_is_refused_by_the_model_load() -> None:
    config = ChronoConfig(bias=BiasConfig(beta_min=-0.5, beta_max=0.5))
    layer, system = _layer_system(config=config)
    state = layer.state_dict()
    state["slow_bias.beta"] = torch.full((8,), 0.75)
    with pytest.raises(ValueError, match=r"beta_max=0.5"):
        layer.load_state_dict(state)
    state["slow_bias.beta"] = torch.full((8,), float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.load_state_dict(state)
    assert system.biases[0] is not None and torch.equal(system.biases[0].beta, torch.zeros(8))


# ---------------------------------------------------------------------- 3. empty windows
def test_steps_without_forwards_raise_no_false_alerts() -> None:
    layer, system = _layer_system()
    layer(torch.randn(32, 16))
    system.step()
    counts = dict(system.alert_history.counts)
    controller = copy.deepcopy(system.controller.state_dict())  # type: ignore[union-attr]
    for _ in range(8):
        result = system.step()
        assert result.snapshot is not None
        assert result.snapshot.alerts == []
        assert result.snapshot.layers == []  # an empty window is skipped, like a layer without events
    assert dict(system.alert_history.counts) == counts
    assert system.controller.state_dict()["layers"] == controller["layers"]  # type: ignore[union-attr]


# ---------------------------------------------------------------------- 4. a failing step() changes nothing
class Raising:
    def update(self, snapshot: Any, lenses: Any) -> list[Any]:
        raise RuntimeError("controller exploded")


class ReturnsNone:
    def update(self, snapshot: Any, lenses: Any) -> None:
        return None


class Recording:
    def __init__(self) -> None:
        self.snapshots: list[Any] = []

    def update(self, snapshot: Any, lenses: Any) -> list[Any]:
        self.snapshots.append(snapshot)
        return []


@pytest.mark.parametrize("bad", [Raising(), ReturnsNone()], ids=["raises", "returns None"])
def test_failing_controller_does_not_advance_the_step_or_drop_the_window(bad: Any) -> None:
    layer, system = _layer_system(controller=Recording())
    for _ in range(3):
        layer(torch.randn(32, 16))
    system.step()
    layer(torch.randn(32, 16))
    layer(torch.randn(32, 16))
    counts = system.counter.counts.clone()
    before = copy.deepcopy(system.state_dict())
    good = system.controller
    system.controller = bad
    with pytest.raises((RuntimeError, TypeError), match=r"exploded|returned NoneType; expected a list"):
        system.step()
    system.controller = good
    assert system.step_calls == 1
    assert torch.equal(system.counter.counts, counts)
    assert tree_equal(system.state_dict(), before)
    system.step()  # the next successful step sees the whole window
    snap = good.snapshots[-1]
    row = counts[0][layer.active_mask]
    expected = (row / row.sum()).tolist()
    assert snap.layer(0).utilization_shares == pytest.approx(expected)
    assert system.step_calls == 2 and int(system.counter.counts.sum()) == 0


def test_exception_late_in_step_restores_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, system = _layer_system(config=ChronoConfig(lifecycle=LifecycleConfig(eval_interval=1)))
    for _ in range(3):
        layer(torch.randn(32, 16))
    before = copy.deepcopy(system.state_dict())
    beta = system.biases[0].beta.clone()  # type: ignore[union-attr]

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("review failed")

    monkeypatch.setattr(system, "_review", boom)
    with pytest.raises(RuntimeError, match="review failed"):
        system.step()  # the beta update and the controller ran before the review raised
    assert tree_equal(system.state_dict(), before)
    assert torch.equal(system.biases[0].beta, beta)  # type: ignore[union-attr]
    monkeypatch.undo()
    assert system.step().snapshot is not None and system.step_calls == 1


# ---------------------------------------------------------------------- 5. TokenCounter validates before consuming
def test_token_counter_refuses_a_bad_count_without_consuming_any() -> None:
    counter = TokenCounter(n_layers=3, n_slots=4)
    counter.add(0, torch.tensor([1, 2, 3, 4]))
    counter.add(1, torch.tensor([0, 5, 0, 1]))
    counter.add(2, torch.tensor([2, -1, 0, 0]))  # only the last layer is bad
    before = counter.counts.clone()
    with pytest.raises(ValueError, match="non-negative"):
        counter.to_events("r", 1, "TRAIN", 2)
    assert torch.equal(counter.counts, before)
    floats = TokenCounter(n_layers=2, n_slots=2, dtype=torch.float32)
    floats.add(0, torch.tensor([1.0, 2.0]))
    floats.add(1, torch.tensor([float("nan"), 1.0]))
    kept = floats.counts.clone()
    with pytest.raises(ValueError):
        floats.to_events("r", 1, "TRAIN", 1)
    assert torch.equal(floats.counts.nan_to_num(-7.0), kept.nan_to_num(-7.0))


def test_token_counter_load_refuses_bad_values_unchanged() -> None:
    counter = TokenCounter(n_layers=1, n_slots=3)
    counter.add(0, torch.tensor([1, 2, 3]))
    for bad in (torch.tensor([[1, -2, 3]]), torch.tensor([[1.0, float("nan"), 3.0]]), torch.tensor([[0.5, 1, 1]])):
        with pytest.raises(ValueError, match=r"counts\[\(0, \d\)\]"):
            counter.load_state_dict({"counts": bad})
        assert counter.counts.tolist() == [[1, 2, 3]]


# ---------------------------------------------------------------------- 7. bounded in-memory histories
def test_decision_log_memory_is_bounded_and_the_file_keeps_everything(tmp_path: Any) -> None:
    from test_reliability_files import record as _record

    from chronomoe_v3.lifecycle.decisions import load_decisions

    log = DecisionLog(tmp_path / "d.jsonl", max_records=5)
    for step in range(12):
        log.append(_record(step))
    assert [r.step for r in log.records] == list(range(7, 12))
    assert [r.step for r in load_decisions(tmp_path / "d.jsonl")] == list(range(12))
    with pytest.raises(ValueError, match="max_records"):
        DecisionLog(max_records=0)


def test_system_histories_stay_bounded_over_many_steps() -> None:
    config = ChronoConfig(lifecycle=LifecycleConfig(eval_interval=1))
    config = replace(config, basins=replace(config.basins, history=4))
    layer, system = _layer_system(config=config)
    system.decision_log.max_records = 3
    for _ in range(12):
        layer(torch.randn(32, 16))
        system.step(loss=1.0)
    assert len(system.losses) <= 64
    assert len(system.decision_log.records) <= 3
    assert len(system.audit_log) <= AUDIT_HISTORY
    for record in system.registry.experts():
        assert len(record.basin) <= 4
    assert len(system.registry.archived_ids()) <= config.lifecycle.archive_capacity
