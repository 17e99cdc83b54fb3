"""The run directory ChronoSystem writes (docs/run_report.md) and StepResult.metrics."""

import json
import math

import pytest
import torch

from chronomoe_v3 import ChronoConfig, ChronoSystem, load_decisions
from chronomoe_v3.config import LifecycleConfig
from chronomoe_v3.telemetry import load_manifest, load_snapshots
from chronomoe_v3.toy.models import TinyMoELM


def _run(tmp_path, steps=6, tokens=True):
    torch.manual_seed(0)
    vocab = [chr(ord("a") + i) for i in range(20)]
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = ChronoConfig(lifecycle=LifecycleConfig(eval_interval=2, max_experts_per_layer=6))
    system = ChronoSystem(model, config=config, run_id="r1", output_dir=tmp_path)
    system.attach_optimizer(opt)
    if tokens:
        system.set_vocabulary(vocab)
    results = []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 20, (3, 8), generator=g)
        if tokens:
            system.observe_tokens(x)
        loss = model.loss(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        results.append(system.step(loss=float(loss.detach())))
    return system, results, tmp_path / "r1"


def test_run_directory_files(tmp_path):
    system, results, run_dir = _run(tmp_path)
    manifest = load_manifest(run_dir)
    meta = manifest["metadata"]
    assert meta["format"] == 1 and meta["model"] == "TinyMoELM" and meta["library"] == "chronomoe-v3"
    assert [lay["num_slots"] for lay in meta["layers"]] == [6, 6]
    assert meta["config"]["lifecycle"]["eval_interval"] == 2
    assert manifest["files"]["readings"] == "readings.jsonl"
    lines = [json.loads(s) for s in (run_dir / "readings.jsonl").read_text().splitlines()]
    assert [r["call"] for r in lines] == list(range(1, 7))
    assert [r["step"] for r in lines] == list(range(1, 7))
    first = lines[0]
    assert math.isfinite(first["loss"])
    assert len(first["layers"]) == 2
    layer = first["layers"][0]
    for key in ("expert_ids", "active", "phi_fast", "phi_mid", "phi_slow", "beta", "share", "share_slow",
                "bimodality", "degrading"):
        assert len(layer[key]) == 6, key
    assert layer["active"] == [True] * 5 + [False]
    assert layer["expert_ids"][5] is None and layer["expert_ids"][0] == "L0_E0"
    # one forward of 3 x 8 tokens, top-2: window shares of the active slots sum to 1
    assert math.isclose(sum(layer["share"]), 1.0, rel_tol=1e-6) and layer["share"][5] == 0.0
    assert layer["neff"] is not None and 1.0 <= layer["neff"] <= 5.0
    assert first["metrics"] == results[0].metrics
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["step"] == 6 and {e["expert_id"] for e in lineage["experts"]} >= {"L0_E0", "L1_E4"}
    basins = json.loads((run_dir / "basins.json").read_text())
    assert basins["vocabulary"][:3] == ["a", "b", "c"]
    entry = basins["experts"]["L0_E0"]
    assert entry["layer"] == 0 and entry["slot"] == 0 and entry["total"] > 0
    counts = [c for _, c in entry["tokens"]]
    assert counts == sorted(counts, reverse=True) and all(0 <= t < 20 for t, _ in entry["tokens"])
    assert len(load_snapshots(run_dir)) == 6
    assert (run_dir / "routing_events.jsonl").exists()
    assert load_decisions(run_dir / "lifecycle_decisions.jsonl") == list(system.decisions)


def test_metrics_are_flat_finite_scalars(tmp_path):
    _, results, _ = _run(tmp_path, steps=2, tokens=False)
    m = results[-1].metrics
    assert m["chronomoe/step"] == 2.0 and m["chronomoe/edits"] == 0.0
    assert m["chronomoe/L0/active"] == 5.0
    assert "chronomoe/L0/E0/phi_fast" in m and "chronomoe/L0/E5/phi_fast" not in m  # slot 5 is masked
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert not (tmp_path / "r1" / "basins.json").exists()


def test_token_basins_count_the_routed_ids_exactly():
    torch.manual_seed(0)
    model = TinyMoELM(10, d_model=16, n_heads=2, d_ff=16, max_experts=4, top_k=2)
    system = ChronoSystem(model)
    x = torch.randint(0, 10, (2, 5))
    routed = []
    handle = model.moe_layers[0].add_observer(lambda tr: routed.append(tr.topk_index.clone()))
    system.observe_tokens(x)
    model(x)
    handle.remove()
    tokens = system.observers[0].tokens
    assert tokens is not None
    table = tokens.counts
    expected = torch.zeros_like(table)
    for t, tok in enumerate(x.reshape(-1).tolist()):
        for e in routed[0][t].tolist():
            expected[e, tok] += 1
    assert torch.equal(table, expected)
    model(x)  # the ids were for one forward only: a second forward is not counted again
    assert torch.equal(tokens.counts, expected)
    with pytest.raises(ValueError, match="integer tensor"):
        system.observe_tokens(torch.zeros(3))
    with pytest.raises(ValueError, match="loss"):
        system.step(loss="high")  # type: ignore[arg-type]


def test_token_basins_survive_a_checkpoint(tmp_path):
    system, _, _ = _run(tmp_path, steps=3)
    state = system.state_dict()
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=5)
    other = ChronoSystem(model, config=system.config)
    other.load_state_dict(loaded)
    for mine, theirs in zip(other.observers, system.observers, strict=True):
        assert mine.tokens is not None and theirs.tokens is not None
        assert torch.equal(mine.tokens.counts, theirs.tokens.counts)
    assert other.vocabulary == system.vocabulary


def _steps(model, opt, system, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 20, (3, 8), generator=g)
        loss = model.loss(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        system.step(loss=float(loss.detach()))


def test_a_new_run_never_appends_to_an_old_runs_directory(tmp_path):
    _run(tmp_path, steps=4)
    torch.manual_seed(1)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"already held a run's records: moved them to .*r1\.1"):
        system = ChronoSystem(model, run_id="r1", output_dir=tmp_path)
    _steps(model, opt, system, 2, seed=5)
    fresh = [json.loads(s) for s in (tmp_path / "r1" / "readings.jsonl").read_text().splitlines()]
    old = [json.loads(s) for s in (tmp_path / "r1.1" / "readings.jsonl").read_text().splitlines()]
    assert [r["call"] for r in fresh] == [1, 2] and [r["call"] for r in old] == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match=r"r1\.2"):  # the next free name; nothing is overwritten
        ChronoSystem(model, run_id="r1", output_dir=tmp_path)


def test_resuming_a_run_takes_its_directory_back(tmp_path):
    system, _, run_dir = _run(tmp_path, steps=4)
    model_state = {k: v.clone() for k, v in system.model.state_dict().items()}
    state = system.state_dict()
    torch.manual_seed(0)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = ChronoConfig(lifecycle=LifecycleConfig(eval_interval=2, max_experts_per_layer=6))
    with pytest.warns(UserWarning, match="moved them"):
        resumed = ChronoSystem(model, config=config, run_id="r1", output_dir=tmp_path)
    resumed.attach_optimizer(opt)
    model.load_state_dict(model_state)  # the documented order: model, optimiser, then the system
    resumed.load_state_dict(state)
    assert not (tmp_path / "r1.1").exists()
    _steps(model, opt, resumed, 2, seed=7)
    calls = [json.loads(s)["call"] for s in (run_dir / "readings.jsonl").read_text().splitlines()]
    assert calls == [1, 2, 3, 4, 5, 6]  # one run's records, continued


def test_a_checkpoint_of_another_run_id_writes_to_that_run(tmp_path):
    system, _, _ = _run(tmp_path, steps=2)
    state = system.state_dict()
    torch.manual_seed(0)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = ChronoConfig(lifecycle=LifecycleConfig(eval_interval=2, max_experts_per_layer=6))
    other = ChronoSystem(model, config=config, output_dir=tmp_path)  # a random run id
    other.attach_optimizer(opt)
    model.load_state_dict(system.model.state_dict())
    other.load_state_dict(state)
    _steps(model, opt, other, 1, seed=3)
    calls = [json.loads(s)["call"] for s in (tmp_path / "r1" / "readings.jsonl").read_text().splitlines()]
    assert calls == [1, 2, 3]
