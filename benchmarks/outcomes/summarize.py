"""Aggregate outcome-benchmark runs: paired deltas, balance, recovery, edit effects; JSON summary and markdown."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

REALISED_WINDOW = 300  # steps over which an edit's realised effect is read
RECOVERED_GAP = 0.005  # nats/char: a damaged run has recovered when it is this close to its undamaged twin
NEFF_RECOVERED = 6.0


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(m: float | None, sd: float | None = None, digits: int = 4, signed: bool = False) -> str:
    if m is None:
        return "-"
    s = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return s if sd is None else f"{s} ± {sd:.{digits}f}"


def value_at(steps: Sequence[int], values: Sequence[float], step: int, after: bool) -> float | None:
    """The value at the last recorded step <= `step` (after=False) or the first >= `step` (after=True)."""
    pairs = list(zip(steps, values, strict=True))
    if after:
        later = [v for s, v in pairs if s >= step]
        return later[0] if later else None
    earlier = [v for s, v in pairs if s <= step]
    return earlier[-1] if earlier else None


def gap_curve(run: dict[str, Any], reference: dict[str, Any]) -> tuple[list[int], list[float]]:
    """`run`'s validation curve minus `reference`'s at the eval steps both have."""
    ref = dict(zip(reference["eval_steps"], reference["val_nats"], strict=True))
    steps, gaps = [], []
    for s, v in zip(run["eval_steps"], run["val_nats"], strict=True):
        if s in ref and v is not None and ref[s] is not None:
            steps.append(s)
            gaps.append(v - ref[s])
    return steps, gaps


def min_neff(run: dict[str, Any]) -> list[float]:
    return [min(v for v in row if v is not None) if any(v is not None for v in row) else float("nan")
            for row in run["neff"]]


def first_step_at_or_above(steps: Sequence[int], values: Sequence[float], level: float) -> int | None:
    for s, v in zip(steps, values, strict=True):
        if v is not None and math.isfinite(v) and v >= level:
            return s
    return None


def summarize(runs: Iterable[dict[str, Any]], protocol: dict[str, Any]) -> dict[str, Any]:
    """The per-(scenario, arm) summary and per-edit effects of a set of run records."""
    runs = list(runs)
    index = {(r["scenario"], r["arm"], r["seed"]): r for r in runs}
    scenarios = [s for s in ("normal", "collapsed", "damaged", "under", "over") if any(r["scenario"] == s
                                                                                       for r in runs)]
    arms_order = ("plain", "aux", "auxfree", "chronomoe", "chronomoe+auxfree", "chronomoe+aux")
    out: dict[str, Any] = {"scenarios": {}, "edits": []}
    for sc in scenarios:
        arms = [a for a in arms_order if any(r["scenario"] == sc and r["arm"] == a for r in runs)]
        table = {}
        for arm in arms:
            seeds = sorted(r["seed"] for r in runs if r["scenario"] == sc and r["arm"] == arm)
            rs = [index[(sc, arm, s)] for s in seeds]
            finals = [r["final_val_nats"] for r in rs]
            deltas, ratios = [], []
            for s, r in zip(seeds, rs, strict=True):
                base = index.get((sc, "plain", s))
                if base is not None and r["final_val_nats"] is not None and base["final_val_nats"] is not None:
                    deltas.append(r["final_val_nats"] - base["final_val_nats"])
                    ratios.append(r["ms_per_step"] / base["ms_per_step"])
            last_neff = [r["neff"][-1] for r in rs if r["neff"]]
            entry: dict[str, Any] = {
                "seeds": seeds,
                "final_val_nats": mean_sd(finals),
                "final_val_bits": mean_sd([r["final_val_bits"] for r in rs]),
                "delta_vs_plain": mean_sd(deltas) if arm != "plain" else (0.0, 0.0),
                "delta_per_seed": deltas if arm != "plain" else [],
                "wins": sum(d < 0 for d in deltas) if arm != "plain" else None,
                "neff_final": [mean_sd([row[i] for row in last_neff])[0] for i in range(len(last_neff[0]))]
                if last_neff else [],
                "min_neff_final": mean_sd([min_neff(r)[-1] for r in rs if r["neff"]]),
                "active_final": [mean_sd([r["active"][-1][i] for r in rs])[0] for i in range(len(rs[0]["active"][-1]))]
                if rs and rs[0]["active"] else [],
                "dead_final": mean_sd([sum(r["dead"][-1]) for r in rs if r["dead"]])[0],
                "max_over_mean_final": mean_sd([max(r["max_over_mean"][-1]) for r in rs if r["max_over_mean"]])[0],
                "time_ratio": mean_sd(ratios) if arm != "plain" else (1.0, 0.0),
                "ms_per_step": mean_sd([r["ms_per_step"] for r in rs]),
                "edits": dict(Counter(e["action"] for r in rs for e in r["edits"])),
                "edits_per_run": len([e for r in rs for e in r["edits"]]) / max(len(rs), 1),
                "active_params_per_token": rs[0].get("active_params_per_token") if rs else None,
            }
            if sc == "collapsed":
                reach = [first_step_at_or_above(r["log_steps"], min_neff(r), NEFF_RECOVERED) for r in rs]
                entry["steps_to_neff6"] = reach
            if sc == "damaged":
                entry.update(damage_recovery(rs, index, protocol))
            table[arm] = entry
        out["scenarios"][sc] = table
    for r in runs:
        base = index.get((r["scenario"], "plain", r["seed"]))
        for e in r["edits"]:
            row = dict(e, scenario=r["scenario"], arm=r["arm"], seed=r["seed"], realised=None)
            if base is not None:
                steps, gaps = gap_curve(r, base)
                before = value_at(steps, gaps, e["step"], after=False)
                after = value_at(steps, gaps, e["step"] + REALISED_WINDOW, after=True)
                if before is not None and after is not None:
                    row["realised"] = after - before
            out["edits"].append(row)
    return out


def damage_recovery(
    runs: Sequence[dict[str, Any]], index: dict[tuple[str, str, int], dict[str, Any]], protocol: dict[str, Any]
) -> dict[str, Any]:
    """Gap to the same arm's undamaged (`normal`) run after the damage: the jump, the steps until it is below
    `RECOVERED_GAP`, and its mean over the 1000 steps after the damage."""
    d = protocol["damage_step"]
    horizon = min(1000, protocol["steps"] - d)
    jumps, recovery, means = [], [], []
    for r in runs:
        twin = index.get(("normal", r["arm"], r["seed"]))
        if twin is None:
            continue
        steps, gaps = gap_curve(r, twin)
        after = [(s, g) for s, g in zip(steps, gaps, strict=True) if s > d]
        if not after:
            continue
        jumps.append(after[0][1])
        closed = next((s - d for s, g in after if g <= RECOVERED_GAP), None)
        recovery.append(closed)
        window = [g for s, g in after if s <= d + horizon]
        means.append(statistics.fmean(window) if window else None)
    return {
        "damage_jump": mean_sd(jumps), "recovery_steps": recovery, "gap_mean_after": mean_sd(means),
    }


# ---------------------------------------------------------------------- markdown
def markdown(summary: dict[str, Any], protocol: dict[str, Any], command: str) -> str:
    lines = [
        "# Outcome benchmark", "",
        f"Command: `{command}`", "",
        "Protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()), "",
        "Paired delta = the arm's final validation loss minus the plain arm's, same seed (same initial weights and "
        "batches); negative is better. wins = seeds where the arm beat plain. Neff per layer over the last log "
        "window of training. time = training-step time relative to plain (includes `step()`).", "",
    ]
    for sc, table in summary["scenarios"].items():
        lines += [f"## {sc}", ""]
        extra = {"collapsed": "steps to Neff>=6 (per seed)", "damaged": "gap jump / mean gap 1000 steps / recovery"}
        head = ("| arm | final val nats/char | paired Δ vs plain | wins | Neff end (per layer) | active end | dead end "
                "| max/mean load | edits | time |")
        if sc in extra:
            head += f" {extra[sc]} |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for arm, e in table.items():
            n = len(e["seeds"])
            edits = ", ".join(f"{k} {v}" for k, v in sorted(e["edits"].items())) or "-"
            neff = " / ".join(fmt(v, digits=2) for v in e["neff_final"])
            active = " / ".join(fmt(v, digits=1) for v in e["active_final"])
            wins = "-" if e["wins"] is None else f"{e['wins']}/{n}"
            row = (f"| {arm} | {fmt(*e['final_val_nats'])} | {fmt(*e['delta_vs_plain'], signed=True)} | {wins} | "
                   f"{neff} | {active} | {fmt(e['dead_final'], digits=1)} | {fmt(e['max_over_mean_final'], digits=2)} "
                   f"| {edits} | {fmt(*e['time_ratio'], digits=2)}x |")
            if sc == "collapsed":
                row += " " + ", ".join("never" if s is None else str(s) for s in e["steps_to_neff6"]) + " |"
            if sc == "damaged":
                rec = ", ".join("never" if s is None else str(s) for s in e["recovery_steps"])
                row += (f" {fmt(*e['damage_jump'], signed=True)} / {fmt(*e['gap_mean_after'], signed=True)} / "
                        f"{rec} |")
            lines.append(row)
        lines.append("")
    edits = summary["edits"]
    if edits:
        lines += ["## Every executed edit", "",
                  f"realised = change of the paired validation gap (arm − plain, same seed) from the edit to "
                  f"{REALISED_WINDOW} steps later (negative: the arm gained on plain over that window).", "",
                  "| scenario | arm | seed | step | layer | action | expert | predicted ΔF | realised Δ val | reason |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in edits:
            reason = (e.get("reason") or "").replace("|", "/")
            if len(reason) > 160:
                reason = reason[:157] + "..."
            lines.append(
                f"| {e['scenario']} | {e['arm']} | {e['seed']} | {e['step']} | {e['layer']} | {e['action']} | "
                f"{e['expert_id'] or '-'} | {e['delta_F']:+.4f} | {fmt(e['realised'], signed=True)} | {reason} |"
            )
        lines.append("")
    return "\n".join(lines)
