"""Data-parallel ChronoSystem on CPU (gloo, 2 processes): ranks stay identical through lifecycle edits under DDP
and equal a single process over the global batch; ranks built differently fail at once, on every rank."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from chronomoe_v3.config import BasinConfig, ChronoConfig, DegradeConfig, LifecycleConfig, ObjectiveConfig
from chronomoe_v3.system import ChronoSystem
from chronomoe_v3.toy.models import TinyMoELM

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 24
VOCAB = 24
COLLECTIVE_TIMEOUT_S = 30  # a collective that waits longer fails (no hang)
JOIN_TIMEOUT_S = 120  # the whole spawned run; processes are killed past it
FAST = ChronoConfig(
    lifecycle=LifecycleConfig(eval_interval=3, cooldown_steps=6, cooling_period=6, audit_steps=6),
    degrade=DegradeConfig(min_observations=5),
    objective=ObjectiveConfig(min_observations_to_judge=5, min_evidence_tokens=50),
    basins=BasinConfig(history=8),
)
# a permissive prune rule: edits (and audits, rollbacks) happen within STEPS steps (as in test_system.py)
EDITFUL = replace(FAST, objective=replace(FAST.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                          prune_min_absorbable=0.0))


def _model(max_experts: int = 6) -> TinyMoELM:
    torch.manual_seed(0)
    return TinyMoELM(VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_experts=max_experts, top_k=2,
                     num_active=4)


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (4, 13), generator=g)


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _train(rank: int, world: int, device: str = "cpu", compiled: bool | None = None) -> dict[str, Any]:
    """STEPS training steps on this rank's share of each global batch (the whole batch when world == 1);
    `compiled`: the system's `compile_observers` (None: its default, compiled on CUDA only)."""
    model = _model().to(device)
    system = ChronoSystem(model, config=EDITFUL, run_id="dp", seed=0, compile_observers=compiled)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    net: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    system.attach_optimizer(opt)
    rows = 4 // world
    actions = []
    for step in range(STEPS):
        x = _batch(step)[rank * rows : (rank + 1) * rows].to(device)
        system.observe_tokens(x[:, :-1])
        logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        result = system.step(loss=float(loss.detach()))
        actions += [(a.step, a.layer_id, a.action, a.expert_id, a.child_id) for a in result.lifecycle_actions]
    return _cpu({"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                 "system": system.state_dict(), "actions": actions})


def _worker(rank: int, world: int, port: int, mode: str, out: str, backend: str = "gloo",
            compiled: bool | None = None) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        if mode == "train":
            device = f"cuda:{rank}" if backend == "nccl" else "cpu"
            torch.save(_train(rank, world, device, compiled), Path(out) / f"rank{rank}.pt")
        elif mode == "width":
            ChronoSystem(_model(max_experts=6 if rank == 0 else 8), config=FAST)
        elif mode == "config":
            config = FAST if rank == 0 else replace(FAST, lifecycle=replace(FAST.lifecycle, eval_interval=5))
            ChronoSystem(_model(), config=config)
        elif mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = _model()
            fully_shard(model.blocks[0].moe, mesh=init_device_mesh("cpu", (world,)))
            ChronoSystem(model, config=FAST)
        (Path(out) / f"done{rank}.txt").write_text("ok")
    except Exception as exc:  # reported to the test through a file, per rank
        (Path(out) / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _spawn(mode: str, out: Path, backend: str = "gloo", compiled: bool | None = None) -> float:
    """Run `_worker` on WORLD processes; kill them and fail past JOIN_TIMEOUT_S. Returns the wall time."""
    start = time.monotonic()
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), mode, str(out), backend, compiled), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = start + JOIN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{mode}: the ranks did not finish within {JOIN_TIMEOUT_S} s")
    return time.monotonic() - start


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}/{i}").items()}
    return {prefix: obj}


def _same(a: Any, b: Any, exact: bool) -> bool:
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            return torch.equal(a, b)
        tol = 0.0 if exact else 2e-4
        try:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)
        except AssertionError:
            return False
        return True
    if isinstance(a, float) and not exact:
        return abs(a - b) <= 2e-4 * (1 + abs(a)) or (a != a and b != b)
    return bool(a == b) or (isinstance(a, float) and a != a and b != b)


BACKENDS = [
    pytest.param("gloo", id="gloo-cpu"),
    pytest.param("gloo-compiled", id="gloo-cpu-compiled-observers"),
    pytest.param("nccl", id="nccl-2gpu", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
        reason="needs 2 CUDA devices and NCCL")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_stay_identical_through_edits_and_equal_one_process(tmp_path: Path, backend: str) -> None:
    compiled = True if backend == "gloo-compiled" else None  # the compiled fold (the default on CUDA), on CPU
    backend = backend.removesuffix("-compiled")
    seconds = _spawn("train", tmp_path, backend, compiled)
    errors = sorted(tmp_path.glob("error*.txt"))
    assert not errors, [e.read_text() for e in errors]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _train(0, 1, "cuda:0" if backend == "nccl" else "cpu", compiled)
    edits = [a for a in single["actions"] if a[2] != "rollback"]
    assert edits, "the run should make at least one lifecycle edit"
    # every rank holds bitwise the same parameters, registry, clocks, RNG, decision log and actions
    a, b = _flatten(ranks[0]), _flatten(ranks[1])
    assert a.keys() == b.keys()
    differ = [k for k in a if not _same(a[k], b[k], exact=True)]
    assert not differ, f"ranks differ in {differ[:10]}"
    # ... equal to one process over the global batch, within float tolerance (same edits, same decisions)
    assert ranks[0]["actions"] == single["actions"]
    s = _flatten(single)
    assert s.keys() == a.keys()
    for flat in (a, s):  # the attention's key bias has an exactly-zero gradient (softmax ignores a common shift):
        for key in [k for k in flat if k.endswith("qkv.bias")]:  # Adam turns its rounding noise into +-lr steps
            flat[key] = torch.cat([flat[key].view(3, -1)[0], flat[key].view(3, -1)[2]])
    decisions = ("/system/decisions",)
    differ = [k for k in a if not k.startswith(decisions) and not _same(a[k], s[k], exact=False)]
    assert not differ, f"rank 0 and the single process differ in {differ[:10]}"
    import json

    for ra, rs in zip(ranks[0]["system"]["decisions"], single["system"]["decisions"], strict=True):
        da, ds = _flatten(json.loads(ra)), _flatten(json.loads(rs))
        assert da.keys() == ds.keys()
        assert all(_same(da[k], ds[k], exact=False) for k in da), ra
    assert seconds < JOIN_TIMEOUT_S


@pytest.mark.parametrize(("mode", "field"), [("width", "num_slots"), ("config", "lifecycle.eval_interval")])
def test_a_rank_built_differently_fails_on_every_rank(tmp_path: Path, mode: str, field: str) -> None:
    seconds = _spawn(mode, tmp_path)
    for rank in range(WORLD):
        error = tmp_path / f"error{rank}.txt"
        assert error.exists(), f"rank {rank} raised nothing"
        text = error.read_text()
        assert text.startswith("ValueError") and "rank 1 differs from rank 0" in text and field in text, text
    assert seconds < COLLECTIVE_TIMEOUT_S + 30  # failed at attach, well before any collective timeout


def test_sharded_expert_banks_are_refused_clearly(tmp_path: Path) -> None:
    _spawn("fsdp", tmp_path)
    for rank in range(WORLD):
        error = tmp_path / f"error{rank}.txt"
        if not error.exists() and (tmp_path / f"done{rank}.txt").exists():
            pytest.fail(f"rank {rank} accepted a sharded expert bank")
        text = error.read_text()
        if "DTensor" not in text and "sharded" not in text:
            pytest.skip(f"fully_shard on CPU/gloo is not available here: {text}")
        assert text.startswith("ValueError") and "sharded (DTensor) expert weights" in text, text
