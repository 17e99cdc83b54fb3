"""The outcome benchmark's --quick mode end to end (the CI smoke test of benchmarks/outcomes/run.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chronomoe_v3.report import render_report

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {"normal", "collapsed", "damaged", "under", "over"}
ARMS = {"plain", "aux", "auxfree", "chronomoe", "chronomoe+auxfree", "chronomoe+aux"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("outcomes_quick")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "outcomes" / "run.py"), "--quick", "--workers", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "outcomes.json").read_text())


def test_every_scenario_and_arm_ran(quick):
    _, data = quick
    assert data["failures"] == []
    runs = data["runs"]
    assert {(r["scenario"], r["arm"]) for r in runs} == {(s, a) for s in SCENARIOS for a in ARMS}
    for r in runs:
        assert len(r["eval_steps"]) == len(r["val_nats"]) and r["eval_steps"][-1] == data["protocol"]["steps"]
        assert all(v is not None and 0 < v < 10 for v in r["val_nats"])
        assert len(r["neff"]) == len(r["log_steps"]) and all(len(row) == 2 for row in r["neff"])
        assert r["ms_per_step"] > 0
    by = {(r["scenario"], r["arm"]): r for r in runs}
    for s in SCENARIOS:
        # every arm of a scenario starts from the same weights: the step-0 validation loss is identical
        assert len({by[(s, a)]["val_nats"][0] for a in ARMS}) == 1
    assert by[("over", "plain")]["active"][-1] == [16, 16]
    assert by[("under", "plain")]["active"][-1] == [4, 4]
    assert by[("damaged", "plain")]["damaged_slot"] is not None


def test_summary_markdown_and_plots(quick):
    out, data = quick
    summary = data["summary"]["scenarios"]
    assert set(summary) == SCENARIOS
    plain = {r["scenario"]: r["final_val_nats"] for r in data["runs"] if r["arm"] == "plain"}
    aux = {r["scenario"]: r["final_val_nats"] for r in data["runs"] if r["arm"] == "aux"}
    for s in SCENARIOS:
        mean, _ = summary[s]["aux"]["delta_vs_plain"]
        assert mean == pytest.approx(aux[s] - plain[s])
    md = (out / "outcomes.md").read_text()
    assert "## collapsed" in md and "paired Δ vs plain" in md
    for name in ("compare_val.png", "compare_gap.png", "compare_neff.png", "compare_delta.png", "compare.html"):
        assert (out / name).stat().st_size > 1000, name


def test_chronomoe_arms_leave_a_run_directory_the_report_draws(quick, tmp_path):
    out, _ = quick
    run_dir = out / "runs" / "normal-chronomoe-s0"
    assert (run_dir / "readings.jsonl").exists() and (run_dir / "basins.json").exists()
    result = render_report(run_dir, tmp_path / "report")
    assert (tmp_path / "report" / "index.html").exists()
    assert any(p.name == "phi_L0.png" for p in result.written)


def test_rerun_reuses_finished_runs(quick):
    out, data = quick
    before = (out / "raw").stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "outcomes" / "run.py"), "--quick", "--out", str(out),
         "--scenarios", "normal", "--arms", "plain", "--no-plots"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((out / "outcomes.json").read_text())
    assert again["runs"][0]["final_val_nats"] == next(
        r["final_val_nats"] for r in data["runs"] if r["scenario"] == "normal" and r["arm"] == "plain"
    )
    assert (out / "raw").stat().st_mtime_ns == before  # nothing was rerun


# ---------------------------------------------------------------------- the hf-mixtral model option
def test_hf_mixtral_model_runs_quick_and_its_records_are_cached_by_protocol(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    command = [sys.executable, str(ROOT / "benchmarks" / "outcomes" / "run.py"), "--quick", "--model", "hf-mixtral",
               "--scenarios", "normal", "collapsed", "--arms", "plain", "chronomoe", "--workers", "2", "--no-plots",
               "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "outcomes.json").read_text())
    assert data["failures"] == [] and data["protocol"]["model"] == "hf-mixtral"
    runs = {(r["scenario"], r["arm"]): r for r in data["runs"]}
    assert set(runs) == {(s, a) for s in ("normal", "collapsed") for a in ("plain", "chronomoe")}
    for r in runs.values():
        assert r["protocol"]["model"] == "hf-mixtral" and r["eval_steps"][-1] == data["protocol"]["steps"]
        assert all(v is not None and 0 < v < 10 for v in r["val_nats"])
        assert r["active"][-1] == [8, 8]  # fixed width 8, all active
    for s in ("normal", "collapsed"):  # the arms of a scenario start from the same weights
        assert runs[(s, "plain")]["val_nats"][0] == runs[(s, "chronomoe")]["val_nats"][0]
    # the +3 router bias on slots 0 and 1 concentrates the collapsed start on two experts per layer
    assert all(n < 2.5 for n in runs[("collapsed", "plain")]["neff"][0])
    assert all(n > 4 for n in runs[("normal", "plain")]["neff"][0])
    assert sorted(p.name for p in (out / "raw").iterdir())[0] == "hf-mixtral__collapsed__chronomoe__s0.json"
    assert (out / "runs" / "hf-mixtral-collapsed-chronomoe-s0" / "readings.jsonl").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "raw").iterdir()}
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "raw").iterdir()} == before  # cached, nothing rerun


def test_hf_mixtral_refuses_what_it_does_not_support_and_old_records_count_as_tiny():
    sys.path.insert(0, str(ROOT / "benchmarks" / "outcomes"))
    from harness import Protocol, RunSpec, check_supported

    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "outcomes" / "run.py"), "--quick", "--model", "hf-mixtral",
         "--scenarios", "damaged", "--arms", "plain", "aux", "--out", "/nonexistent"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--model hf-mixtral does not support ['damaged', 'aux']" in proc.stderr
    with pytest.raises(ValueError, match="'over' with arm 'plain' is not supported with model 'hf-mixtral'"):
        check_supported(RunSpec("over", "plain", 0, Protocol(model="hf-mixtral")))
    with pytest.raises(ValueError, match="model='big' is invalid"):
        check_supported(RunSpec("normal", "plain", 0, Protocol(model="big")))
    saved = Protocol().to_dict()
    del saved["model"]  # a record written before the model field
    assert Protocol().matches(saved) and not Protocol(model="hf-mixtral").matches(saved)
