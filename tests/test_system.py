"""ChronoSystem: observation, step with/without controllers, persistence, error cases, exact resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from chronomoe_v3.config import BasinConfig, ChronoConfig, DegradeConfig, LifecycleConfig, ObjectiveConfig
from chronomoe_v3.governance.controller import Controller
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.lifecycle.decisions import load_decisions
from chronomoe_v3.system import ChronoSystem
from chronomoe_v3.toy.models import TinyMoELM

torch.set_num_threads(1)

FAST = ChronoConfig(
    lifecycle=LifecycleConfig(eval_interval=3, cooldown_steps=6, cooling_period=6, audit_steps=6),
    degrade=DegradeConfig(min_observations=5),
    objective=ObjectiveConfig(min_observations_to_judge=5, min_evidence_tokens=50),
    basins=BasinConfig(history=8),
)
# For the resume test: a permissive prune rule, so that edits (and audits, rollbacks) happen within 24 steps.
EDITFUL = replace(FAST, objective=replace(FAST.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                          prune_min_absorbable=0.0))


def _model(seed: int = 0) -> TinyMoELM:
    torch.manual_seed(seed)
    return TinyMoELM(24, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=4)


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 24, (4, 13), generator=g)


def _train_step(model: TinyMoELM, opt: torch.optim.Optimizer, step: int) -> float:
    x = _batch(step)
    loss = model.loss(x[:, :-1], x[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_model_without_moe_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="no MoE layer"):
        ChronoSystem(nn.Sequential(nn.Linear(4, 4)))


def test_step_before_forward_is_a_clear_error() -> None:
    system = ChronoSystem(_model(), config=FAST)
    with pytest.raises(RuntimeError, match="before any observed training forward"):
        system.step()


def test_controller_without_update_is_refused() -> None:
    with pytest.raises(ValueError, match="update"):
        ChronoSystem(_model(), controller=object())


def test_eval_forwards_do_not_update_state() -> None:
    model = _model()
    system = ChronoSystem(model, config=FAST)
    model.eval()
    with torch.no_grad():
        model(_batch(0))
    assert system.global_step == 0
    assert all(int(st.coherence.step) == 0 for st in system.observers)
    model.train()
    model(_batch(0))
    assert system.layer_steps == [1, 1]


def test_checkpoint_recompute_is_counted_once() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = ChronoMoELayer(8, 8, 4, 2)
    system = ChronoSystem(layer, config=FAST)
    x = torch.randn(10, 8, requires_grad=True)
    for reentrant in (True, False):
        before = system.global_step
        out = checkpoint(layer, x, use_reentrant=reentrant)
        out.sum().backward()
        assert system.global_step == before + 1, f"use_reentrant={reentrant}"


class _DuckController:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def update(self, snapshot: Any, lenses: Any) -> list[str]:
        self.calls.append(snapshot.step)
        return [f"seen {snapshot.step}"]


@pytest.mark.parametrize("kind", ["builtin", "none", "duck"])
def test_step_with_each_kind_of_controller(kind: str) -> None:
    model = _model()
    controller: Any = {"builtin": Controller(2, 4), "none": None, "duck": _DuckController()}[kind]
    system = ChronoSystem(model, controller=controller, config=FAST)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    for step in range(4):
        _train_step(model, opt, step)
        result = system.step()
    assert set(result.coherence_state) == {0, 1}
    assert result.snapshot is not None and len(result.snapshot.layers) == 2
    if kind == "none":
        assert result.control_decisions == []
    elif kind == "duck":
        assert result.control_decisions == ["seen 4"] and controller.calls == [1, 2, 3, 4]
    else:
        assert len(result.control_decisions) == 2
    # The slow objective sees the mid clock's offsets (a prune must not take an expert the lens holds down).
    for i in (0, 1):
        offset = system.layer_view(i).offset
        if kind == "none":
            assert offset is None
        else:
            assert offset is not None and torch.equal(offset, system.lenses[i].offset.cpu())


def test_detach_removes_hooks() -> None:
    model = _model()
    system = ChronoSystem(model, config=FAST)
    model(_batch(0))
    system.detach()
    model(_batch(1))
    assert system.global_step == 1


def test_state_dict_is_weights_only_safe_and_load_validates(tmp_path: Path) -> None:
    model = _model()
    system = ChronoSystem(model, controller=Controller(2, 4), config=FAST)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    for step in range(7):
        _train_step(model, opt, step)
        system.step()
    torch.save(system.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    system.load_state_dict(state)

    other = ChronoSystem(TinyMoELM(24, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_experts=5, top_k=2,
                                   num_active=4), config=FAST)
    before = {k: v.clone() for k, v in other.observers[0].state_dict().items()}
    with pytest.raises(ValueError, match=r"saved state has \[6, 6\] expert slots per MoE layer; .* has \[5, 5\]"):
        other.load_state_dict(state)
    after = other.observers[0].state_dict()
    assert all(torch.allclose(before[k].double(), after[k].double(), rtol=0, atol=0, equal_nan=True) for k in before)
    assert other.global_step == 0

    three = ChronoSystem(TinyMoELM(24, d_model=16, n_layers=3, n_heads=2, d_ff=16, max_experts=6, top_k=2,
                                   num_active=4), config=FAST)
    with pytest.raises(ValueError, match="MoE layers"):
        three.load_state_dict(state)


# ---------------------------------------------------------------------- exact resume in a fresh process
_SCRIPT = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_system import EDITFUL, _model, _train_step
    from chronomoe_v3.system import ChronoSystem
    from chronomoe_v3.governance.controller import Controller

    n, half = int(sys.argv[1]), int(sys.argv[2])
    mode, ckpt, out, logdir = sys.argv[3:7]
    model = _model()
    system = ChronoSystem(model, controller=Controller(2, 4), config=EDITFUL, run_id="resume", output_dir=logdir)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    system.attach_optimizer(opt)
    start = 0
    if mode == "resume":
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        system.load_state_dict(saved["system"])
        start = half
    for step in range(start, n):
        loss = _train_step(model, opt, step)
        system.step(loss=loss)
        if mode == "first" and step + 1 == half:
            torch.save({{"model": model.state_dict(), "opt": opt.state_dict(), "system": system.state_dict()}}, ckpt)
            break
    torch.save({{"model": model.state_dict(), "opt": opt.state_dict(), "system": system.state_dict()}}, out)
''')


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def test_resume_in_fresh_process_is_bitwise_identical(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    n, half = 24, 12

    def run(mode: str, out: str, logdir: str) -> None:
        subprocess.run(
            [sys.executable, str(script), str(n), str(half), mode, str(tmp_path / "ckpt.pt"), out, logdir],
            check=True, capture_output=True, timeout=120,
        )

    run("full", str(tmp_path / "full.pt"), str(tmp_path / "log_full"))
    run("first", str(tmp_path / "first.pt"), str(tmp_path / "log_resumed"))
    run("resume", str(tmp_path / "resumed.pt"), str(tmp_path / "log_resumed"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    a, b = _flatten(full), _flatten(resumed)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]) or (
                a[key].is_floating_point() and torch.equal(a[key].isnan(), b[key].isnan())
                and torch.equal(a[key].nan_to_num(), b[key].nan_to_num())
            ), key
        elif key.endswith("timestamp"):
            continue
        else:
            assert a[key] == b[key], key
    log_full = [r.to_dict() for r in load_decisions(tmp_path / "log_full" / "resume" / "lifecycle_decisions.jsonl")]
    log_res = [r.to_dict() for r in load_decisions(tmp_path / "log_resumed" / "resume" / "lifecycle_decisions.jsonl")]
    assert log_full == log_res
    assert any(r["action"] != "do_nothing" for r in log_full), "the run should make at least one edit"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
def test_training_step_with_system_attached_never_syncs_the_host():
    from chronomoe_v3.toy.models import TinyMoELM

    torch.manual_seed(0)
    # bf16: the grouped expert matmul's native CUDA kernel (the fp32 fallback reads group offsets on the host)
    model = TinyMoELM(64, d_model=64, n_layers=2, d_ff=128, max_experts=8, top_k=2, num_active=6)
    model = model.to("cuda", torch.bfloat16)
    system = ChronoSystem(model, config=FAST)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    system.attach_optimizer(opt)
    x = torch.randint(0, 64, (8, 32), device="cuda")

    def train_step() -> None:
        loss = model.loss(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()  # warm-up (lazy optimiser state, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    system.step()  # host transfers happen here, and only here


def test_checkpoint_from_another_config_raises_naming_the_fields() -> None:
    from dataclasses import replace

    from chronomoe_v3 import ClockConfig

    model = _model()
    system = ChronoSystem(model, config=FAST)
    for step in range(4):
        _train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), step)
    state = system.state_dict()
    other_config = replace(
        FAST, coherence=replace(FAST.coherence, slow=ClockConfig("slow", alpha=0.998)),
        lifecycle=replace(FAST.lifecycle, cooldown_steps=7),
    )
    other = ChronoSystem(_model(), config=other_config)
    with pytest.raises(ValueError, match=r"\['coherence.slow.alpha', 'lifecycle.cooldown_steps'\] differ"):
        other.load_state_dict(state)
    assert other.global_step == 0
    ChronoSystem(_model(), config=ChronoConfig.from_dict(state["config"])).load_state_dict(state)


def test_constants_are_not_saved_and_layer_state_is_saved_once() -> None:
    model = _model()
    system = ChronoSystem(model, config=FAST)
    _train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), 0)
    state = system.state_dict()
    for observer in state["observers"]:
        constants = [k for k in observer if k.rsplit(".", 1)[-1] in ("alpha", "alphas", "alpha_floor")]
        assert constants == [], constants
    assert "beta" not in state and "active_masks" not in state  # the model's state holds them
    assert any(k.endswith("slow_bias.beta") for k in model.state_dict())
    assert any(k.endswith("active_mask") for k in model.state_dict())


def test_loading_before_the_model_state_is_refused() -> None:
    model = _model()
    system = ChronoSystem(model, config=FAST)
    system.registry.retire(0, 1, 0, "prune", parked={"experts": {}, "router": {}})
    state = system.state_dict()
    fresh = ChronoSystem(_model(), config=FAST)  # its layer 0 still routes to slot 1
    with pytest.raises(ValueError, match="load the model's state_dict"):
        fresh.load_state_dict(state)


# ---------------------------------------------------------------------- compiled observers: default, fallback
def test_compile_default_follows_the_environment(monkeypatch):
    from chronomoe_v3.system import COMPILE_ENV, default_compile

    cpu, other = torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert default_compile(cpu) and not default_compile(other)
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not default_compile(cpu) and not ChronoSystem(_model()).compile_observers
    monkeypatch.setenv(COMPILE_ENV, "true")
    assert default_compile(other)
    monkeypatch.setenv(COMPILE_ENV, "maybe")
    with pytest.raises(ValueError, match=r"CHRONOMOE_COMPILE_OBSERVERS='maybe' is invalid"):
        ChronoSystem(_model())


class _FakeCompileError(RuntimeError):
    pass


_FakeCompileError.__module__ = "torch._inductor.exc"  # what a backend failure looks like to the system


def test_a_failed_compile_falls_back_to_the_eager_observer_without_losing_the_forward():
    model = _model()
    system = ChronoSystem(model, compile_observers=True)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise _FakeCompileError("C++ compiler not found")

    system._observe_compiled = broken
    ids = torch.randint(0, 24, (2, 12))
    with pytest.warns(RuntimeWarning, match="could not compile its observers .*C\\+\\+ compiler not found"):
        model.loss(ids, ids)
    assert not system.compile_observers
    assert int(system.observers[0].coherence.step) == 1 and system.layer_steps == [1, 1]
    model.loss(ids, ids)  # eager from now on, no second warning
    assert int(system.observers[0].coherence.step) == 2


def test_an_observer_error_that_is_not_the_compilers_is_raised():
    model = _model()
    system = ChronoSystem(model, compile_observers=True)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a real bug")

    system._observe_compiled = broken
    ids = torch.randint(0, 24, (2, 12))
    with pytest.raises(RuntimeError, match="a real bug"):
        model.loss(ids, ids)
    assert system.compile_observers
