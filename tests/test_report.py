"""The run report (`chronomoe-v3 report`) and the benchmark comparison (`chronomoe-v3 compare`).

Run directories are synthetic, written here by the spec (`docs/run_report.md`, format 1): 2 layers of 8 slots,
10 readings, a split in layer 0, a prune in layer 1, do-nothing records, lineage and basins with a vocabulary.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chronomoe_v3.lifecycle.decisions import CompetingEdit, DecisionRecord, ExpertCoherence, PredictedFreeEnergy
from chronomoe_v3.report import load_run, render_compare, render_report
from chronomoe_v3.report.cli import main

RUN_ID = "run-test"
NUM_SLOTS = 8
STEPS = [100 * i for i in range(1, 11)]
SPLIT_STEP, PRUNE_STEP = 500, 700
SPLIT_REASON = "split: L0_E2 is bimodal <phi_slow> & its share grows"
PRUNE_REASON = "prune: L1_E7 carries no tokens \"dead\" since step 300"
VOCABULARY = ["\n", " ", "$x$", "the", "<b>", "é", "and"] + [f"tok{i}" for i in range(7, 40)]
EXPECTED_PNGS = {
    "timeline.png", "lineage.png", "audits.png",
    "phi_L0.png", "beta_L0.png", "shares_L0.png", "basins_L0.png",
    "phi_L1.png", "beta_L1.png", "shares_L1.png", "basins_L1.png",
}


# ---------------------------------------------------------------------------------------------------------
# a synthetic run directory


def expert_ids_at(layer: int, step: int) -> list[str | None]:
    """Who lives in which slot: layer 0 starts with 6 experts and splits L0_E2 at SPLIT_STEP into L0_E2_g1
    (slot 2) and L0_E6 (slot 6); layer 1 starts full and prunes L1_E7 at PRUNE_STEP."""
    if layer == 0:
        ids: list[str | None] = [f"L0_E{e}" for e in range(6)] + [None, None]
        if step >= SPLIT_STEP:
            ids[2], ids[6] = "L0_E2_g1", "L0_E6"
        return ids
    ids = [f"L1_E{e}" for e in range(8)]
    if step >= PRUNE_STEP:
        ids[7] = None
    return ids


def layer_reading(layer: int, step: int) -> dict[str, Any]:
    ids = expert_ids_at(layer, step)
    active = [eid is not None for eid in ids]
    weights = [(1.0 + 0.5 * math.sin(e + step / 300)) if a else 0.0 for e, a in enumerate(active)]
    total = sum(weights)
    share = [w / total for w in weights]
    neff = math.exp(-sum(s * math.log(s) for s in share if s > 0))

    def per_slot(offset: float, scale: float) -> list[float | None]:
        return [round(scale * math.cos(e + offset + step / 400), 4) if a else None for e, a in enumerate(active)]

    phi_fast = per_slot(0.0, 0.8)
    if step == STEPS[0]:
        phi_fast[3] = None  # never measured yet
    return {
        "layer_id": layer,
        "expert_ids": ids,
        "active": active,
        "phi_fast": phi_fast,
        "phi_mid": per_slot(0.5, 0.6),
        "phi_slow": per_slot(1.0, 0.5),
        "beta": [round(0.01 * math.sin(e * 1.7 + step / 250), 5) if a else 0.0 for e, a in enumerate(active)],
        "share": share,
        "share_slow": [round(s * 0.9 + 0.1 / NUM_SLOTS, 4) for s in share],
        "bimodality": per_slot(2.0, 0.3),
        "degrading": [False] * NUM_SLOTS,
        "neff": neff,
        "top2": sum(sorted(share)[-2:]),
        "dead": 0,
        "psi_slow": 0.4,
        "alerts": ["PRE_COLLAPSE"] if layer == 1 and step in (300, 400) else [],
        "lens_scale": 0.0,
    }


def reading_line(call: int, step: int) -> dict[str, Any]:
    layers = [layer_reading(layer, step) for layer in (0, 1)]
    metrics = {f"chronomoe/L{lay['layer_id']}/neff": lay["neff"] for lay in layers}
    metrics.update({"chronomoe/step": float(step), "chronomoe/edits": 0.0})
    return {"step": step, "call": call, "time": 1764547200.0 + call, "loss": 3.0 - 0.1 * call, "layers": layers,
            "metrics": metrics}


def decision(step: int, layer: int, action: str, expert: str | None, child: str | None, delta: float,
             reason: str | None, trigger: str = "scheduled") -> DecisionRecord:
    fe = PredictedFreeEnergy(10.0, 10.0 + delta, delta, misfit_delta=delta)
    coherence = ExpertCoherence(0.1, 0.2, 0.3, 0.0, 0.5) if expert else ExpertCoherence()
    competing = (CompetingEdit("merge", "L0_E1", 0.2, "not worth it", "L0_E4"),) if action == "do_nothing" else ()
    return DecisionRecord(step, RUN_ID, "slow", action, layer, expert, coherence, fe, trigger, competing, child,
                          reason)


DECISIONS = [
    decision(300, 0, "do_nothing", None, None, 0.0, "no candidate beat doing nothing"),
    decision(SPLIT_STEP, 0, "split", "L0_E2", "L0_E6", -0.25, SPLIT_REASON),
    decision(PRUNE_STEP, 1, "prune", "L1_E7", None, -0.125, PRUNE_REASON, trigger="utilisation_fallback"),
    decision(800, 1, "do_nothing", None, None, 0.0, None),
]


def life(eid: str, layer: int, slot: int, born: int = 0, origin: str = "initial", parent: str | None = None,
         ended: int | None = None, ended_by: str | None = None) -> dict[str, Any]:
    return {"expert_id": eid, "layer": layer, "slot": slot, "state": "archived" if ended is not None else "active",
            "born_step": born, "origin": origin, "parent_id": parent, "absorbed_ids": [], "ended_step": ended,
            "ended_by": ended_by, "successor_id": None}


def lineage() -> dict[str, Any]:
    experts = [life(f"L0_E{e}", 0, e) for e in range(6)] + [life(f"L1_E{e}", 1, e) for e in range(8)]
    experts[2].update(state="archived", ended_step=SPLIT_STEP, ended_by="split")
    experts[13].update(state="archived", ended_step=PRUNE_STEP, ended_by="prune")
    experts += [life("L0_E2_g1", 0, 2, SPLIT_STEP, "split", "L0_E2"), life("L0_E6", 0, 6, SPLIT_STEP, "split", "L0_E2")]
    return {"step": STEPS[-1], "experts": experts}


def basins() -> dict[str, Any]:
    experts = {}
    for layer in (0, 1):
        for slot, eid in enumerate(expert_ids_at(layer, STEPS[-1])):
            if eid is None:
                continue
            tokens = [[(slot * 3 + k) % len(VOCABULARY), 1000 - 40 * k - slot] for k in range(12)]
            experts[eid] = {"layer": layer, "slot": slot, "total": sum(c for _, c in tokens) + 500, "tokens": tokens}
    return {"step": STEPS[-1], "vocabulary": VOCABULARY, "experts": experts}


def manifest() -> dict[str, Any]:
    layers = [{"layer_id": l, "name": f"blocks.{l}.moe", "num_slots": NUM_SLOTS, "top_k": 2, "hidden_size": 64}
              for l in (0, 1)]
    return {"run_id": RUN_ID, "created": 1764547200.0, "schema_version": 1,
            "files": {"routing_events": "routing_events.jsonl", "snapshots": "snapshots.jsonl"},
            "metadata": {"format": 1, "library": "chronomoe-v3", "version": "0.3.0.dev0", "model": "TinyMoELM",
                         "config": {"tau": 0.3, "review_every": 100}, "layers": layers}}


def control_lines() -> list[dict[str, Any]]:
    return [{"run_id": RUN_ID, "step": step, "layer_id": layer, "observed": {"neff": 7.0},
             "computed": {"debt": 0.1}, "actuator": {"lens_scale": 0.0}, "emergency": False, "notes": ""}
            for step in STEPS[:3] for layer in (0, 1)]


def audit_lines() -> list[dict[str, Any]]:
    return [
        {"step": 320, "layer_id": 0, "edit_step": 20, "action": "split", "expert_id": "L0_E2", "child_id": "L0_E6",
         "predicted": {"misfit": -0.02, "complexity": 0.01, "redundancy": 0.0, "instability": -0.03,
                       "delta_F": -0.04}, "realised": {"delta_F": -0.01}, "readings_before": {"share": [0.2]},
         "readings_after": {"share": [0.1]}, "loss": {"change": -0.004, "noise": 0.002}, "verdict": "kept",
         "reason": "kept: loss fell"},
        {"step": 360, "layer_id": 1, "edit_step": 60, "action": "prune", "expert_id": "L1_E3", "child_id": None,
         "predicted": {"misfit": 0.01, "complexity": -0.01, "redundancy": 0.0, "instability": 0.0,
                       "delta_F": -0.02}, "realised": {"delta_F": 0.03}, "readings_before": {"share": [0.05]},
         "readings_after": {"share": [0.0]}, "loss": {"change": 0.05, "noise": 0.002}, "verdict": "rolled_back",
         "reason": "harmful: loss rose <b>"},
    ]


def jsonl(records: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_run(root: Path, files: tuple[str, ...] | None = None) -> Path:
    """A synthetic run directory `root/RUN_ID` with all files of the spec (or only those named in `files`)."""
    run = root / RUN_ID
    run.mkdir(parents=True)
    content = {
        "run_manifest.json": json.dumps(manifest(), indent=2),
        "readings.jsonl": jsonl([reading_line(i + 1, step) for i, step in enumerate(STEPS)]),
        "lifecycle_decisions.jsonl": "".join(d.to_json() + "\n" for d in DECISIONS),
        "control_decisions.jsonl": jsonl(control_lines()),
        "lineage.json": json.dumps(lineage()),
        "basins.json": json.dumps(basins()),
        "audits.jsonl": jsonl(audit_lines()),
    }
    for name, text in content.items():
        if files is None or name in files:
            (run / name).write_text(text, encoding="utf-8")
    return run


def replace_line(path: Path, lineno: int, raw: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = raw
    path.write_bytes(b"\n".join(lines))


# ---------------------------------------------------------------------------------------------------------
# checks


def assert_real_png(path: Path) -> None:
    """A PNG that opens, has a sensible size and more than one colour."""
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, (path, pixels.shape)
    colours = {tuple(p) for p in pixels[:: max(1, pixels.shape[0] // 200), :: max(1, pixels.shape[1] // 200)]
               .reshape(-1, pixels.shape[2]).tolist()}
    assert len(colours) > 5, f"{path.name} is (nearly) one flat colour"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, str, str]:
    root = tmp_path_factory.mktemp("full")
    run = write_run(root)
    out = root / "out"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["report", str(run), "--out", str(out)])
    return run, out, code, stdout.getvalue(), stderr.getvalue()


# ---------------------------------------------------------------------------------------------------------
# the full run


def test_full_run_writes_every_plot(full_report: tuple[Path, Path, int, str, str]) -> None:
    _, out, code, stdout, stderr = full_report
    assert code == 0, stderr
    assert str(out / "index.html") in stdout
    assert stderr == ""
    assert {p.name for p in out.glob("*.png")} == EXPECTED_PNGS
    for name in sorted(EXPECTED_PNGS):
        assert_real_png(out / name)


def test_index_html_references_plots_and_decisions(full_report: tuple[Path, Path, int, str, str]) -> None:
    _, out, _, _, _ = full_report
    page = (out / "index.html").read_text(encoding="utf-8")
    assert RUN_ID in page.split("</title>")[0]
    for name in EXPECTED_PNGS:
        assert f'<img src="{name}"' in page
    # reasons are in the table, escaped
    assert "split: L0_E2 is bimodal &lt;phi_slow&gt; &amp; its share grows" in page
    assert "prune: L1_E7 carries no tokens &quot;dead&quot; since step 300" in page
    assert "<phi_slow>" not in page
    table = page.split('<table class="decisions">')[1].split("</table>")[0]
    assert table.count("<tr>") == 3  # header + split + prune
    assert "L0_E6" in table and "utilisation_fallback" in table and "-0.25" in table and "-0.125" in table
    assert "no candidate beat doing nothing" not in page  # do-nothing records are counted, not listed
    assert "2 do-nothing record(s)" in page
    assert "Steps covered: 100 to 1000 (10 readings)" in page
    assert "split 1" in page and "prune 1" in page
    assert "PRE_COLLAPSE on L1 at 2 reading(s)" in page
    assert "Nothing skipped." in page
    assert "data-images-ok" not in page  # set by the script at load time
    assert "document.body.dataset.imagesOk" in page and "http" not in page.replace("http-equiv", "")


def test_loader_reads_the_full_run(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path))
    assert run.skipped == []
    assert run.run_id == RUN_ID
    assert [r.step for r in run.readings] == STEPS
    assert run.readings[0].layers[0].slots["phi_fast"][3] is None
    assert run.readings[-1].layers[1].expert_ids[7] is None
    assert [d.action for d in run.decisions] == ["do_nothing", "split", "prune", "do_nothing"]
    assert len(run.control) == 6
    assert {life.expert_id for life in run.lineage} >= {"L0_E2_g1", "L0_E6"}
    assert run.vocabulary == VOCABULARY and len(run.basins) == 7 + 7
    assert sorted(run.layers) == [0, 1] and run.layers[0].num_slots == NUM_SLOTS


def test_render_report_python_api_default_out(tmp_path: Path) -> None:
    run = write_run(tmp_path, files=("run_manifest.json", "lineage.json", "basins.json"))
    result = render_report(run)
    assert result.out_dir == run / "report"
    assert result.index == run / "report" / "index.html" and result.index.exists()
    assert {p.name for p in result.written} == {"lineage.png", "basins_L0.png", "basins_L1.png", "index.html"}
    # vocabulary labels are drawn as repr: nothing raises on "\n", " ", "$x$"
    assert_real_png(run / "report" / "basins_L0.png")


# ---------------------------------------------------------------------------------------------------------
# partial and damaged run directories


def test_partial_directory_only_readings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path, files=("readings.jsonl",))
    code, stdout, stderr = run_cli(["report", str(run)], capsys)
    assert code == 0
    out = run / "report"
    assert {p.name for p in out.glob("*.png")} == {f"{k}_L{l}.png" for k in ("phi", "beta", "shares") for l in (0, 1)}
    for name in ("run_manifest.json: missing", "lifecycle_decisions.jsonl: missing", "lineage.json: missing",
                 "basins.json: missing", "timeline.png: not drawn", "lineage.png: not drawn"):
        assert name in stderr
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "run_manifest.json: missing" in page and "Nothing skipped." not in page
    assert RUN_ID in page  # the directory name stands in for the run id


def test_torn_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path)
    path = run / "readings.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 1100, "call": 11, "layers": [{"layer_id": 0, "expe')
    code, _, stderr = run_cli(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "readings.jsonl line 11: torn last line" in stderr
    assert len(load_run(run).readings) == 10
    assert "readings.jsonl line 11: torn last line" in (tmp_path / "out" / "index.html").read_text(encoding="utf-8")


def test_binary_garbage_in_the_middle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path)
    replace_line(run / "readings.jsonl", 4, b"\x00\xff\xfe\x89PNG garbage \xc3\x28")
    replace_line(run / "lifecycle_decisions.jsonl", 2, b"\x1b[0m\x00\x00 {not json")
    replace_line(run / "control_decisions.jsonl", 1, b"[" * 100_000 + b"]" * 100_000)
    code, _, stderr = run_cli(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "readings.jsonl line 4: not UTF-8 text (byte 0xff at column 2)" in stderr
    assert "lifecycle_decisions.jsonl line 2: not valid JSON" in stderr
    assert "control_decisions.jsonl line 1: not valid JSON (nested too deeply)" in stderr
    data = load_run(run)
    assert [r.step for r in data.readings] == [s for s in STEPS if s != 400]
    assert [d.action for d in data.decisions] == ["do_nothing", "prune", "do_nothing"]
    assert (tmp_path / "out" / "timeline.png").exists()


def test_garbage_json_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path)
    (run / "lineage.json").write_bytes(b"\xff\xd8\xff\xe0 binary")
    (run / "basins.json").write_text("[1, 2, 3]", encoding="utf-8")
    (run / "run_manifest.json").write_text('{"run_id": "run-test", "metadata": {"layers": [{"layer_id": "zero"}]}}',
                                           encoding="utf-8")
    code, _, stderr = run_cli(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "lineage.json: not UTF-8 text (byte 0xff at column 1)" in stderr
    assert "basins.json: the file holds a list; expected a JSON object" in stderr
    assert "run_manifest.json: metadata.layers[0]: missing key 'num_slots'" in stderr
    assert not (tmp_path / "out" / "lineage.png").exists()


def test_record_with_wrong_list_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path)
    line = reading_line(3, STEPS[2])
    line["layers"][1]["phi_fast"] = line["layers"][1]["phi_fast"][:7]
    bad_type = reading_line(5, STEPS[4])
    bad_type["layers"][0]["share"][0] = "lots"
    replace_line(run / "readings.jsonl", 3, json.dumps(line).encode())
    replace_line(run / "readings.jsonl", 5, json.dumps(bad_type).encode())
    replace_line(run / "readings.jsonl", 6, b'{"stp": 600, "layers": []}')
    code, _, stderr = run_cli(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert ("readings.jsonl line 3, layers[1] (layer 1): phi_fast has 7 entries; expected 8 "
            "(the layer's slot count)") in stderr
    assert "readings.jsonl line 5, layers[0] (layer 0): share[0]='lots' is invalid: expected a finite number" in stderr
    assert "readings.jsonl line 6: missing key 'step'" in stderr
    data = load_run(run)
    third = next(r for r in data.readings if r.step == STEPS[2])
    assert sorted(third.layers) == [0]  # only the bad layer of the line is left out
    assert all(r.step != 600 for r in data.readings)
    assert_real_png(tmp_path / "out" / "phi_L1.png")


def test_invalid_records_of_other_files(tmp_path: Path) -> None:
    run = write_run(tmp_path)
    bad = DECISIONS[1].to_dict()
    bad["action"] = "explode"
    replace_line(run / "lifecycle_decisions.jsonl", 2, json.dumps(bad).encode())
    data = lineage()
    data["experts"][0]["state"] = "zombie"
    data["experts"][1]["slot"] = 8
    (run / "lineage.json").write_text(json.dumps(data), encoding="utf-8")
    b = basins()
    b["experts"]["L0_E0"]["tokens"][0] = [1, 2, 3]
    (run / "basins.json").write_text(json.dumps(b), encoding="utf-8")
    notes = load_run(run).skipped
    assert "lifecycle_decisions.jsonl line 2: action='explode' is invalid: expected one of" in "\n".join(notes)
    assert "lineage.json experts[0] ('L0_E0'): state='zombie' is invalid: expected one of cooling, active, archived" \
        in notes
    assert "lineage.json experts[1] ('L0_E1'): slot=8 is invalid: expected < 8 (the layer's slot count)" in notes
    assert "basins.json experts['L0_E0']: tokens[0]=[1, 2, 3] is invalid: expected a [token id, count] pair" in notes


def test_text_from_files_is_drawn_and_shown_literally(tmp_path: Path) -> None:
    """Ids, names and tokens with `$` (matplotlib math), `<` and `&` (HTML) are shown as they are."""
    run = tmp_path / "odd"
    run.mkdir()
    ids = ["E$\\frac$", "<b>&amp;"]
    layer = {"layer_id": 0, "expert_ids": ids, "share": [0.5, 0.5], "phi_fast": [0.1, 0.2], "beta": [0.0, 0.1]}
    (run / "readings.jsonl").write_text(jsonl([{"step": s, "layers": [layer]} for s in (1, 2, 3)]), encoding="utf-8")
    info = {"layer_id": 0, "name": "blocks.$x.moe", "num_slots": 2}
    (run / "run_manifest.json").write_text(json.dumps({"run_id": "<run>", "metadata": {"layers": [info]}}))
    basin = {"layer": 0, "slot": 0, "total": 3, "tokens": [[0, 2], [1, 1]]}
    (run / "basins.json").write_text(json.dumps({"vocabulary": ["$\\alpha", "a$b$c"], "experts": {ids[0]: basin}}))
    result = render_report(run)
    assert {p.name for p in result.written} >= {"phi_L0.png", "beta_L0.png", "shares_L0.png", "basins_L0.png"}
    page = result.index.read_text(encoding="utf-8")
    assert "&lt;run&gt;" in page and "<run>" not in page


def test_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    code, stdout, stderr = run_cli(["report", str(run)], capsys)
    assert code == 0
    assert "index.html" in stdout
    assert list((run / "report").glob("*.png")) == []
    page = (run / "report" / "index.html").read_text(encoding="utf-8")
    assert "readings.jsonl: missing" in page and "Steps covered: none" in page
    assert "<img" not in page


def test_missing_directory_is_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such-run"
    code, stdout, stderr = run_cli(["report", str(missing)], capsys)
    assert code == 2
    assert stdout == ""
    assert str(missing) in stderr and "does not exist" in stderr and len(stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "chronomoe_v3.report", "report", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr
    usage = subprocess.run([sys.executable, "-m", "chronomoe_v3.report"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_import_does_not_import_matplotlib() -> None:
    code = "import sys, chronomoe_v3.report, chronomoe_v3; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# compare


FINALS = {  # (scenario, arm) -> final val nats per seed 0, 1
    ("steady", "plain"): (3.00, 3.10),
    ("steady", "chrono"): (2.90, 3.05),
    ("steady", "bias"): (3.02, 3.20),
    ("shift", "plain"): (4.00, 4.20),
    ("shift", "chrono"): (3.70, 4.30),
    ("shift", "bias"): (4.10, 4.30),
}


def outcome_run(scenario: str, arm: str, seed: int, final: float) -> dict[str, Any]:
    eval_steps = [0, 100, 200, 300]
    val = [final + 1.5 - 0.5 * i + 0.05 * seed for i in range(3)] + [final]
    log_steps = [0, 50, 100, 150, 200, 250, 300]
    neff = [[8.0 - 0.3 * i - seed * 0.1, 7.5 - 0.2 * i - (0.5 if arm == "plain" else 0.0)] for i in range(7)]
    return {"scenario": scenario, "arm": arm, "seed": seed, "eval_steps": eval_steps, "val_nats": val,
            "final_val_nats": final, "log_steps": log_steps, "neff": neff, "wall_s": 12.5}


def write_outcomes(path: Path) -> Path:
    runs = [outcome_run(s, a, seed, finals[seed]) for (s, a), finals in FINALS.items() for seed in (0, 1)]
    runs.append(outcome_run("steady", "chrono", 2, 2.5))  # no plain seed 2: cannot be paired
    broken = outcome_run("shift", "bias", 3, 1.0)
    broken["val_nats"] = broken["val_nats"][:2]
    runs.append(broken)
    runs.append({"scenario": "shift", "arm": "bias"})
    path.write_text(json.dumps({"format": 1, "protocol": {"steps": 300, "seeds": [0, 1]}, "runs": runs,
                                "extra": "ignored"}), encoding="utf-8")
    return path


def test_compare_writes_plots_and_paired_deltas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bench").mkdir()
    src = write_outcomes(tmp_path / "bench" / "outcomes.json")
    out = tmp_path / "cmp"
    code, stdout, stderr = run_cli(["compare", str(src), "--out", str(out)], capsys)
    assert code == 0, stderr
    for name in ("compare_val.png", "compare_neff.png", "compare_delta.png"):
        assert_real_png(out / name)
    page = (out / "compare.html").read_text(encoding="utf-8")
    for name in ("compare_val.png", "compare_neff.png", "compare_delta.png"):
        assert f'<img src="{name}"' in page

    def row(scenario: str, arm: str, n: int, cell: str, wins: int) -> str:
        return (f'<tr><td>{scenario}</td><td>{arm}</td><td class="num">{n}</td><td class="num">{cell}</td>'
                f'<td class="num">{wins}</td>')

    # by hand: steady/chrono = (-0.10, -0.05): mean -0.075, sd 0.05/sqrt(2) = 0.03536
    assert row("steady", "chrono", 2, "-0.0750 ± 0.0354", 2) in page
    # steady/bias = (+0.02, +0.10): mean +0.06, sd 0.08/sqrt(2) = 0.05657
    assert row("steady", "bias", 2, "+0.0600 ± 0.0566", 0) in page
    # shift/chrono = (-0.30, +0.10): mean -0.10, sd 0.40/sqrt(2) = 0.28284
    assert row("shift", "chrono", 2, "-0.1000 ± 0.2828", 1) in page
    # shift/bias = (+0.10, +0.10): mean +0.10, sd 0
    assert row("shift", "bias", 2, "+0.1000 ± 0.0000", 0) in page
    assert "scenario &#x27;steady&#x27;, arm &#x27;chrono&#x27;, seed 2: no &#x27;plain&#x27; run to pair with" in page
    assert "outcomes.json runs[13]: val_nats has 2 entries; expected 4 (one per eval step)" in stderr
    assert "outcomes.json runs[14]: missing key 'seed'" in stderr


def test_compare_default_out_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_outcomes(tmp_path / "outcomes.json")
    result = render_compare(src)
    assert result.out_dir == tmp_path and (tmp_path / "compare.html").exists()
    assert (tmp_path / "compare_delta.png").exists()
    code, _, stderr = run_cli(["compare", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and str(tmp_path / "missing.json") in stderr
    (tmp_path / "bad.json").write_bytes(b"\x00\x01 not json")
    code, _, stderr = run_cli(["compare", str(tmp_path / "bad.json")], capsys)
    assert code == 2 and "bad.json" in stderr


def test_audits_are_tabled_and_plotted(tmp_path: Path) -> None:
    run = write_run(tmp_path)
    result = render_report(run, tmp_path / "out")
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "2 audited edit(s), 1 rolled back" in html
    assert "harmful: loss rose &lt;b&gt;" in html and "rolled_back" in html
    assert_real_png(tmp_path / "out" / "audits.png")
    assert not [n for n in result.skipped if "audits" in n]


def test_replacements_and_rollbacks_are_drawn(tmp_path: Path) -> None:
    """The timeline and the lineage know every edit kind the system logs (replace, rollback), and a lineage
    ending nobody planned for still draws (a marker of its own instead of a KeyError)."""
    run = write_run(tmp_path)
    extra = [
        decision(900, 1, "replace", "L1_E3", "L1_E3_g1", -0.05, "replace: degrading"),
        decision(1200, 1, "rollback", "L1_E3", "L1_E3_g1", 0.0, "harmful: loss rose"),
    ]
    with (run / "lifecycle_decisions.jsonl").open("a", encoding="utf-8") as f:
        f.write("".join(d.to_json() + "\n" for d in extra))
    data = json.loads((run / "lineage.json").read_text())
    for e in data["experts"]:
        if e["expert_id"] == "L1_E3":
            e.update(state="archived", ended_step=900, ended_by="replace")
    data["experts"].append(life("L1_E3_g1", 1, 3, 900, "replace", "L1_E0", ended=1200, ended_by="rollback"))
    data["experts"].append(life("L1_E3_r", 1, 3, 1200, "restore", "L1_E3", ended=1300, ended_by="something_new"))
    (run / "lineage.json").write_text(json.dumps(data))
    result = render_report(run, tmp_path / "out")
    skipped = [n for n in result.skipped if "lineage" in n or "timeline" in n]
    assert len(skipped) == 1 and "something_new" in skipped[0], result.skipped  # said, not drawn
    assert_real_png(tmp_path / "out" / "lineage.png")
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "replace" in html and "rollback" in html
