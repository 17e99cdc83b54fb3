"""benchmarks/outcomes/acceptance.py judges a sweep: each point must be able to fail."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "outcomes"))

import acceptance  # noqa: E402

STEPS = list(range(0, 3001, 100))


def record(scenario, arm, seed, final, *, edits=(), neff=None, active=(8, 8), val=None, damaged_slot=None):
    log_steps = list(range(50, 3001, 50))
    return {
        "scenario": scenario, "arm": arm, "seed": seed, "final_val_nats": final,
        "eval_steps": STEPS, "val_nats": val if val is not None else [final] * len(STEPS),
        "log_steps": log_steps, "neff": neff if neff is not None else [[7.5, 7.5]] * len(log_steps),
        "active": [list(active)] * len(log_steps), "edits": list(edits), "damaged_slot": damaged_slot,
        "protocol": {"damage_step": 1500, "steps": 3000},
    }


def edit(step, action, expert, delta_f=-0.05, layer=1, reason=""):
    return {"step": step, "layer": layer, "action": action, "expert_id": expert, "child_id": None,
            "delta_F": delta_f, "trigger": "", "reason": reason}


def verdicts(runs, audits=None):
    return {p["point"]: p["verdict"] for p in acceptance.judge(runs, audits or {})}


def test_normal_tolerance_is_per_seed():
    runs = {}
    for s, d in enumerate([-0.01, 0.002, 0.0]):
        runs[("normal", "plain", s)] = record("normal", "plain", s, 1.70)
        runs[("normal", "chronomoe", s)] = record("normal", "chronomoe", s, 1.70 + d)
    v = verdicts(runs)
    assert v["normal: chronomoe - plain <= +0.003 in every seed"] == "PASS"
    runs[("normal", "chronomoe", 2)] = record("normal", "chronomoe", 2, 1.704)  # one seed +0.004
    assert verdicts(runs)["normal: chronomoe - plain <= +0.003 in every seed"] == "MISS"


def test_collapse_points_fail_on_late_recovery_a_worse_end_or_a_prune():
    runs = {}
    late = [[2.0, 2.0]] * 30 + [[7.0, 7.0]] * 30  # Neff >= 6 from step 1550 only
    for s in range(3):
        runs[("collapsed", "auxfree", s)] = record("collapsed", "auxfree", s, 1.73)
        runs[("collapsed", "chronomoe", s)] = record("collapsed", "chronomoe", s, 1.72)
    v = verdicts(runs)
    assert v["collapsed: chronomoe reaches Neff >= 6 in every layer within 1000 steps, every seed"] == "PASS"
    assert v["collapsed: chronomoe ends with val <= the aux-free arm's"] == "PASS"
    assert v["collapsed: no prune of an expert starved by the collapse"] == "PASS"
    runs[("collapsed", "chronomoe", 1)] = record("collapsed", "chronomoe", 1, 1.74, neff=late,
                                                 edits=[edit(1200, "prune", "L1_E3")])
    v = verdicts(runs)
    assert v["collapsed: chronomoe reaches Neff >= 6 in every layer within 1000 steps, every seed"] == "MISS"
    assert v["collapsed: chronomoe ends with val <= the aux-free arm's"] == "MISS"
    assert v["collapsed: no prune of an expert starved by the collapse"] == "MISS"


def test_damage_recovery_is_compared_with_every_baseline():
    runs = {}
    spike = [0.0] * 16 + [0.02, 0.01, 0.005] + [0.0] * 12  # the gap after the damage at 1500
    for arm, scale in (("plain", 1.0), ("aux", 1.0), ("auxfree", 1.0), ("chronomoe", 0.5)):
        for s in range(2):
            runs[("normal", arm, s)] = record("normal", arm, s, 1.70)
            val = [1.70 + scale * g for g in spike]
            edits = [edit(1550, "replace", "L1_E7")] if arm == "chronomoe" else []
            runs[("damaged", arm, s)] = record("damaged", arm, s, 1.70, val=val, edits=edits, damaged_slot=7)
    name = "damaged: the gap to the undamaged run closes faster than in every baseline arm (mean gap, 1000 steps)"
    v = verdicts(runs)
    assert v[name] == "PASS" and v["damaged: the damaged expert is flagged and replaced, every seed"] == "PASS"
    runs[("damaged", "auxfree", 0)]["val_nats"] = [1.70] * len(STEPS)  # aux-free never even notices
    runs[("damaged", "auxfree", 1)]["val_nats"] = [1.70] * len(STEPS)
    assert verdicts(runs)[name] == "MISS"
    runs[("damaged", "chronomoe", 1)]["edits"] = [edit(1550, "replace", "L1_E2")]  # replaced the wrong expert
    assert verdicts(runs)["damaged: the damaged expert is flagged and replaced, every seed"] == "MISS"


def test_edit_bar_busy_prunes_and_missing_runs():
    runs = {("over", "chronomoe", 0): record("over", "chronomoe", 0, 1.7, active=(16, 15), edits=[
        edit(2000, "prune", "L1_E1", reason="with little traffic (share 0.020 < 0.5 x fair 1/16)"),
    ])}
    v = verdicts(runs)
    assert v["every executed edit has predicted delta_F < -min_improvement"] == "PASS"
    assert v["no prune of an expert carrying >= half its fair share"] == "PASS"
    assert v["over: ends with fewer active experts, every seed"] == "PASS"
    assert v["under: ends below fixed-width plain by more than the seed spread"] == "N/A"
    runs[("over", "chronomoe", 0)]["edits"].append(edit(2500, "split", "L0_E2", delta_f=-0.005))
    runs[("over", "chronomoe", 0)]["edits"].append(
        edit(2600, "prune", "L0_E4", reason="with little traffic (share 0.040 < 0.5 x fair 1/16)"))
    v = verdicts(runs)
    assert v["every executed edit has predicted delta_F < -min_improvement"] == "MISS"
    assert v["no prune of an expert carrying >= half its fair share"] == "MISS"


def test_cli_writes_the_report(tmp_path):
    (tmp_path / "raw").mkdir()
    for s in range(2):
        for arm, final in (("plain", 1.70), ("chronomoe", 1.69)):
            (tmp_path / "raw" / f"normal__{arm}__s{s}.json").write_text(json.dumps(record("normal", arm, s, final)))
    run = tmp_path / "runs" / "normal-chronomoe-s0"
    run.mkdir(parents=True)
    audit = {"action": "split", "verdict": "kept", "predicted": {"delta_F": -0.03}, "realised": {"delta_F": 0.02},
             "loss": {"change": -0.01}}
    (run / "audits.jsonl").write_text(json.dumps(audit) + "\n")
    assert acceptance.main([str(tmp_path)]) == 0
    data = json.loads((tmp_path / "acceptance.json").read_text())
    assert data["calibration"]["split"]["sign_agreement_F"] == 0.0 and data["calibration"]["split"]["n"] == 1
    assert "| normal: chronomoe - plain <= +0.003 in every seed | PASS |" in (tmp_path / "acceptance.md").read_text()
    with pytest.raises(SystemExit):
        acceptance.main([str(tmp_path / "nowhere")])
