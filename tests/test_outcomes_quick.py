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
