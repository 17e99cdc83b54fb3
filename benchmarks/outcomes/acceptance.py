"""Judge an outcome sweep against the judgement issue's acceptance points, and report the calibration of the
slow objective (predicted vs realised effect of every audited edit).

    python benchmarks/outcomes/acceptance.py benchmarks/results/outcomes_h200cpu

Reads `<out>/raw/*.json` (the runs' records) and `<out>/runs/*/audits.jsonl` (chronomoe arms' audits);
writes `<out>/acceptance.json` and `<out>/acceptance.md`. Each point is PASS, MISS (with the measured
margin) or N/A (the runs it needs are missing). Nothing here is tuned: the thresholds are the issue's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from summarize import NEFF_RECOVERED, RECOVERED_GAP, gap_curve  # noqa: E402

NORMAL_TOLERANCE = 0.003  # nats/char: chronomoe may cost at most this much on a healthy run (per seed)
COLLAPSE_DEADLINE = 1000  # steps: Neff >= 6 in every layer by then
BASELINES = ("plain", "aux", "auxfree")


Key = tuple[str, str, int]  # (scenario, arm, seed)


def load(out: Path) -> tuple[dict[Key, dict[str, Any]], dict[Key, list[dict[str, Any]]]]:
    runs: dict[Key, dict[str, Any]] = {}
    for path in sorted((out / "raw").glob("*.json")):
        r = json.loads(path.read_text())
        runs[(r["scenario"], r["arm"], int(r["seed"]))] = r
    audits: dict[Key, list[dict[str, Any]]] = {}
    for (scenario, arm, seed) in runs:
        path = out / "runs" / f"{scenario}-{arm}-s{seed}" / "audits.jsonl"
        if path.exists():
            audits[(scenario, arm, seed)] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return runs, audits


def seeds_of(runs: dict[Key, Any], scenario: str, *arms: str) -> list[int]:
    """Seeds for which every named arm of the scenario has a record."""
    sets = [{s for (sc, a, s) in runs if sc == scenario and a == arm} for arm in arms]
    return sorted(set.intersection(*sets)) if sets else []


def point(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"point": name, "verdict": "N/A" if ok is None else ("PASS" if ok else "MISS"), "detail": detail}


def final(runs: dict[Key, dict[str, Any]], scenario: str, arm: str, seed: int) -> float:
    return float(runs[(scenario, arm, seed)]["final_val_nats"])


def steps_to_neff(run: dict[str, Any], level: float = NEFF_RECOVERED) -> int | None:
    for step, neff in zip(run["log_steps"], run["neff"], strict=True):
        if min(neff) >= level:
            return int(step)
    return None


def judge(runs: dict[Key, dict[str, Any]], audits: dict[Key, list[dict[str, Any]]],
          min_improvement: float = 0.01) -> list[dict[str, Any]]:
    points = []
    # -- normal start
    seeds = seeds_of(runs, "normal", "plain", "chronomoe")
    deltas = [final(runs, "normal", "chronomoe", s) - final(runs, "normal", "plain", s) for s in seeds]
    points.append(point(
        "normal: chronomoe - plain <= +0.003 in every seed",
        all(d <= NORMAL_TOLERANCE for d in deltas) if seeds else None,
        ", ".join(f"s{s} {d:+.4f}" for s, d in zip(seeds, deltas, strict=True)),
    ))
    seeds = seeds_of(runs, "normal", "auxfree", "chronomoe+auxfree")
    deltas = [final(runs, "normal", "chronomoe+auxfree", s) - final(runs, "normal", "auxfree", s) for s in seeds]
    mean = statistics.fmean(deltas) if deltas else math.nan
    points.append(point(
        "normal: chronomoe+auxfree - auxfree <= +0.003", (mean <= NORMAL_TOLERANCE) if seeds else None,
        f"mean {mean:+.4f}; " + ", ".join(f"s{s} {d:+.4f}" for s, d in zip(seeds, deltas, strict=True)),
    ))
    # -- collapsed start
    seeds = seeds_of(runs, "collapsed", "chronomoe")
    reach = {s: steps_to_neff(runs[("collapsed", "chronomoe", s)]) for s in seeds}
    points.append(point(
        "collapsed: chronomoe reaches Neff >= 6 in every layer within 1000 steps, every seed",
        all(v is not None and v <= COLLAPSE_DEADLINE for v in reach.values()) if seeds else None,
        ", ".join(f"s{s} {'never' if v is None else v}" for s, v in reach.items()),
    ))
    seeds = seeds_of(runs, "collapsed", "chronomoe", "auxfree")
    deltas = [final(runs, "collapsed", "chronomoe", s) - final(runs, "collapsed", "auxfree", s) for s in seeds]
    points.append(point(
        "collapsed: chronomoe ends with val <= the aux-free arm's", all(d <= 0 for d in deltas) if seeds else None,
        ", ".join(f"s{s} {d:+.4f}" for s, d in zip(seeds, deltas, strict=True)) + " (chronomoe - auxfree)",
    ))
    prunes = [(s, e["step"], e["expert_id"]) for (sc, a, s), r in runs.items() if sc == "collapsed" and a == "chronomoe"
              for e in r["edits"] if e["action"] == "prune"]
    seeds = seeds_of(runs, "collapsed", "chronomoe")
    points.append(point(
        "collapsed: no prune of an expert starved by the collapse", (not prunes) if seeds else None,
        "prunes: " + (", ".join(f"s{s}@{st} {eid}" for s, st, eid in prunes) or "none"),
    ))
    # -- damaged expert
    seeds = seeds_of(runs, "damaged", "chronomoe")
    handled = {}
    for s in seeds:
        r = runs[("damaged", "chronomoe", s)]
        slot = r.get("damaged_slot")
        hits = [e for e in r["edits"] if e["action"] == "replace" and e["layer"] == 1
                and e["expert_id"] is not None and e["expert_id"].split("_")[1] == f"E{slot}"]
        handled[s] = hits[0]["step"] if hits else None
    points.append(point(
        "damaged: the damaged expert is flagged and replaced, every seed",
        all(v is not None for v in handled.values()) if seeds else None,
        ", ".join(f"s{s} {'not replaced' if v is None else f'replaced at {v}'}" for s, v in handled.items()),
    ))
    gaps: dict[str, float] = {}
    recovery: dict[str, list[int | None]] = {}
    for arm in ("chronomoe", *BASELINES):
        means, rec = [], []
        for s in seeds_of(runs, "damaged", arm):
            if ("normal", arm, s) not in runs:
                continue
            run = runs[("damaged", arm, s)]
            d = run["protocol"]["damage_step"]
            steps, gap = gap_curve(run, runs[("normal", arm, s)])
            after = [(st, g) for st, g in zip(steps, gap, strict=True) if st > d]
            window = [g for st, g in after if st <= d + 1000]
            if window:
                means.append(statistics.fmean(window))
            rec.append(next((st - d for st, g in after if g <= RECOVERED_GAP), None))
        if means:
            gaps[arm] = statistics.fmean(means)
            recovery[arm] = rec
    ok = None
    if "chronomoe" in gaps and all(b in gaps for b in BASELINES):
        ok = all(gaps["chronomoe"] < gaps[b] for b in BASELINES)
    points.append(point(
        "damaged: the gap to the undamaged run closes faster than in every baseline arm (mean gap, 1000 steps)", ok,
        "; ".join(f"{a} {g:+.4f} (recovered after {', '.join('never' if x is None else str(x) for x in recovery[a])})"
                  for a, g in gaps.items()),
    ))
    # -- under capacity
    seeds = seeds_of(runs, "under", "chronomoe")
    growth = {s: [e["action"] for e in runs[("under", "chronomoe", s)]["edits"] if e["action"] in ("spawn", "split")]
              for s in seeds}
    points.append(point(
        "under: spawns (grows into free slots), every seed",
        all(any(a == "spawn" for a in g) for g in growth.values()) if seeds else None,
        ", ".join(f"s{s} {g.count('spawn')} spawn / {g.count('split')} split" for s, g in growth.items()),
    ))
    seeds = seeds_of(runs, "under", "plain", "chronomoe")
    deltas = [final(runs, "under", "chronomoe", s) - final(runs, "under", "plain", s) for s in seeds]
    ok = None
    detail = "needs the under plain runs"
    if len(deltas) >= 2:
        mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
        ok = mean < 0 and -mean > sd and all(d < 0 for d in deltas)
        per_seed = ", ".join(f"s{s} {d:+.4f}" for s, d in zip(seeds, deltas, strict=True))
        detail = f"mean {mean:+.4f} ± {sd:.4f} ({per_seed})"
    points.append(point("under: ends below fixed-width plain by more than the seed spread", ok, detail))
    # -- over capacity
    seeds = seeds_of(runs, "over", "chronomoe")
    active = {s: runs[("over", "chronomoe", s)]["active"][-1] for s in seeds}
    points.append(point(
        "over: ends with fewer active experts, every seed",
        all(sum(a) < 32 for a in active.values()) if seeds else None,
        ", ".join(f"s{s} {a[0]}/{a[1]}" for s, a in active.items()),
    ))
    seeds = seeds_of(runs, "over", "plain", "chronomoe")
    deltas = [final(runs, "over", "chronomoe", s) - final(runs, "over", "plain", s) for s in seeds]
    ok = None
    detail = "-"
    if len(deltas) >= 2:
        mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
        ok = abs(mean) <= max(2 * sd / math.sqrt(len(deltas)), NORMAL_TOLERANCE)
        detail = f"mean {mean:+.4f} ± {sd:.4f}"
    points.append(point("over: validation loss within noise of the fixed-width run", ok, detail))
    # -- every edit
    edits = [(k, e) for k, r in runs.items() if "chronomoe" in k[1] for e in r["edits"] if e["action"] != "rollback"]
    bad = [(k, e) for k, e in edits if not e["delta_F"] < -min_improvement]
    points.append(point(
        "every executed edit has predicted delta_F < -min_improvement", not bad,
        f"{len(edits)} edits, {len(bad)} above the bar",
    ))
    audited = sum(1 for v in audits.values() for a in v if a.get("verdict") != "partial")
    partial = sum(1 for v in audits.values() for a in v if a.get("verdict") == "partial")
    rollbacks = sum(1 for v in audits.values() for a in v if a.get("verdict") == "rolled_back")
    points.append(point(
        "every executed edit has a logged realised effect (audit)",
        (audited + partial >= len(edits)) if audits else None,
        f"{audited} full audits + {partial} partial (judged at the end of the run) for {len(edits)} edits "
        f"({rollbacks} rolled back)",
    ))
    heavy, unknown = [], []
    for k, e in edits:
        if e["action"] != "prune":
            continue
        m = re.search(r"share ([0-9.]+) < ([0-9.]+) x fair 1/(\d+)", e["reason"])
        if m is None:
            unknown.append((k, e["step"]))  # a reason that does not state the share (older versions)
        elif float(m.group(1)) >= 0.5 / int(m.group(3)):
            heavy.append((k, e["step"]))
    n_prunes = sum(1 for _, e in edits if e["action"] == "prune")
    points.append(point(
        "no prune of an expert carrying >= half its fair share", False if heavy else (None if unknown else True),
        f"{n_prunes} prunes, {len(heavy)} of a busy expert"
        + (f", {len(unknown)} whose reason does not state the share" if unknown else ""),
    ))
    return points


def calibration(audits: dict[Key, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per action: how often the realised change of F (and of the loss against its trend) has the sign the
    prediction gave it (negative = better)."""
    rows: dict[str, list[tuple[float, float, float | None]]] = defaultdict(list)
    for items in audits.values():
        for a in items:
            if a.get("verdict") == "partial":  # judged on a shorter window at the end of a run
                continue
            loss = a.get("loss") or {}
            rows[a["action"]].append((
                float(a["predicted"]["delta_F"]), float(a["realised"]["delta_F"]),
                None if loss.get("change") is None else float(loss["change"]),
            ))
    out = {}
    for action, vals in sorted(rows.items()):
        f_agree = sum(1 for p, r, _ in vals if (p < 0) == (r < 0))
        losses = [x for _, _, x in vals if x is not None]
        out[action] = {
            "n": len(vals),
            "predicted_dF_mean": statistics.fmean(p for p, _, _ in vals),
            "realised_dF_mean": statistics.fmean(r for _, r, _ in vals),
            "sign_agreement_F": f_agree / len(vals),
            "loss_vs_trend_mean": statistics.fmean(losses) if losses else None,
            "loss_better_fraction": (sum(1 for x in losses if x < 0) / len(losses)) if losses else None,
        }
    return out


def markdown(points: list[dict[str, Any]], calib: dict[str, Any], out: Path) -> str:
    lines = [f"# Acceptance ({out.name})", "", "| point | verdict | measured |", "|---|---|---|"]
    lines += [f"| {p['point']} | {p['verdict']} | {p['detail']} |" for p in points]
    lines += ["", "## Calibration of the slow objective (audited edits)", "",
              "realised ΔF = F at the audit (300 steps later) minus F before the edit; loss vs trend = the training "
              "loss change over the audit window minus the change the pre-edit trend predicted (negative: better).",
              "", "| action | audited | mean predicted ΔF | mean realised ΔF | sign agreement (F) | mean loss vs trend "
              "| loss better |", "|---|---|---|---|---|---|---|"]
    for action, c in calib.items():
        lt = "-" if c["loss_vs_trend_mean"] is None else f"{c['loss_vs_trend_mean']:+.4f}"
        lb = "-" if c["loss_better_fraction"] is None else f"{c['loss_better_fraction']:.0%}"
        lines.append(f"| {action} | {c['n']} | {c['predicted_dF_mean']:+.4f} | {c['realised_dF_mean']:+.4f} | "
                     f"{c['sign_agreement_F']:.0%} | {lt} | {lb} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="an outcome sweep's output directory (with raw/ and runs/)")
    args = p.parse_args(argv)
    if not (args.out / "raw").is_dir():
        p.error(f"{args.out / 'raw'} does not exist: expected the output directory of benchmarks/outcomes/run.py")
    runs, audits = load(args.out)
    points = judge(runs, audits)
    calib = calibration(audits)
    (args.out / "acceptance.json").write_text(json.dumps({"points": points, "calibration": calib}, indent=1) + "\n")
    text = markdown(points, calib, args.out)
    (args.out / "acceptance.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
