"""benchmarks/bench_perf.py --quick on the CPU: it runs end to end and writes its JSON and Markdown (the CI
smoke test; no timing is asserted here, timings are the benchmark's to report)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_perf_quick_runs_and_writes_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_perf.py"), "--quick", "--shapes", "B", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "perf_cpu.json").read_text())
    assert "--quick" in data["meta"]["command"] and data["meta"]["torch"]
    shape = data["results"]["shapes"]["B"]
    for key in ("step_ms_plain", "step_ms_chrono", "step_ms_auxfree", "chrono_overhead_pct", "state_over_EH_fp32"):
        assert key in shape["training"], key
    for key in ("fwd_bwd_ms_chrono_layer", "fwd_bwd_ms_bmm_ffn", "layer_over_bmm"):
        assert key in shape["layer"], key
    assert data["results"]["graph_breaks"]["graph_break_count"] == 0
    assert "step_ms_chrono" in data["results"]["small"]
    md = (out / "perf_cpu.md").read_text()
    assert "Training step" in md and "Small model" in md
