"""The report's PNG plots (matplotlib, Agg canvas; imported only when a plot is drawn).

Figures are built as `matplotlib.figure.Figure` with an Agg canvas, not through pyplot, so drawing a
report never changes the caller's pyplot backend or figure list. Every `plot_*` function takes the loaded
data and the PNG path, writes the file and returns None, or returns a note saying why it drew nothing
(its data is absent); it never raises for missing data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .load import Outcomes, PairedDelta, RunData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CLOCKS = ("phi_fast", "phi_mid", "phi_slow")
ACTION_COLOURS = {
    "split": "tab:blue", "spawn": "tab:green", "prune": "tab:red", "merge": "tab:purple", "replace": "tab:orange",
    "rollback": "tab:gray",
}
ORIGIN_COLOURS = {
    "initial": "tab:gray", "spawn": "tab:green", "split": "tab:blue", "restore": "tab:orange", "replace": "tab:olive",
}
END_MARKERS = {"prune": "x", "merge": "v", "split": ">", "replace": "d", "rollback": "s"}
MAX_LEGEND = 16
MAX_LABELLED_EDITS = 40
DPI = 100


# ---------------------------------------------------------------------------------------------------------
# matplotlib plumbing


def _figure(width: float, height: float) -> Figure:
    """A new Figure with its own Agg canvas (matplotlib is imported here, on first use)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a vocabulary glyph missing from the font
        fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")


def _colours(n: int) -> list[Any]:
    """n distinct colours (tab10 up to 10, tab20 up to 20, then a continuous map)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def _legend(ax: Axes, count: int, **kwargs: Any) -> None:
    """A legend outside the right edge when there are at most MAX_LEGEND entries."""
    if 0 < count <= MAX_LEGEND:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **kwargs)


def _plain_text(text: str) -> str:
    """Text shown literally by matplotlib (a `$` would otherwise start math mode)."""
    return text.replace("$", r"\$")


def token_label(token_id: int, vocabulary: Sequence[str] | None) -> str:
    """A token's label: its vocabulary string written as repr (quotes; newline as \\n) or `#id` without one."""
    if vocabulary is not None and 0 <= token_id < len(vocabulary):
        return repr(vocabulary[token_id])
    return f"#{token_id}"


# ---------------------------------------------------------------------------------------------------------
# per-expert series of one layer


def _expert_order(run: RunData, layer_id: int) -> list[str]:
    """Expert ids seen in a layer's readings, in order of first appearance."""
    order: dict[str, None] = {}
    for reading in run.readings:
        layer = reading.layers.get(layer_id)
        if layer is not None:
            order.update((eid, None) for eid in layer.expert_ids if eid is not None)
    return list(order)


def _series(run: RunData, layer_id: int, key: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps of the readings that have the layer, and per expert id its `key` values there (NaN = unknown
    or not living in the layer at that step)."""
    rows = [r.layers[layer_id] for r in run.readings if layer_id in r.layers]
    steps = np.array([r.step for r in run.readings if layer_id in r.layers], dtype=float)
    out = {eid: np.full(len(rows), np.nan) for eid in _expert_order(run, layer_id)}
    for i, layer in enumerate(rows):
        values = layer.slots[key]
        for slot, eid in enumerate(layer.expert_ids):
            if eid is not None and values[slot] is not None:
                out[eid][i] = values[slot]
    return steps, out


def _scalar_series(run: RunData, layer_id: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r.step, r.layers[layer_id].scalars.get(key)) for r in run.readings if layer_id in r.layers]
    steps = np.array([s for s, _ in rows], dtype=float)
    values = np.array([np.nan if v is None else v for _, v in rows], dtype=float)
    return steps, values


def _any_known(series: dict[str, np.ndarray]) -> bool:
    return any(bool(np.isfinite(v).any()) for v in series.values())


def _layer_title(run: RunData, layer_id: int) -> str:
    info = run.layers.get(layer_id)
    return _plain_text(f"layer {layer_id}" + (f" ({info.name})" if info is not None and info.name else ""))


# ---------------------------------------------------------------------------------------------------------
# run plots


def plot_phi(run: RunData, layer_id: int, path: Path) -> str | None:
    """Each expert's phi at the fast, mid and slow clocks over the steps (one panel per clock).

    Takes the run, a layer id and the PNG path; returns None when written, else why it was not drawn."""
    panels = [_series(run, layer_id, key) for key in CLOCKS]
    if not any(_any_known(series) for _, series in panels):
        return f"{path.name}: not drawn, layer {layer_id} has no phi readings"
    experts = _expert_order(run, layer_id)
    colours = dict(zip(experts, _colours(len(experts)), strict=True))
    fig = _figure(10, 8)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, key, (steps, series) in zip(axes, CLOCKS, panels, strict=True):
        for eid, values in series.items():
            ax.plot(steps, values, marker=".", markersize=3, linewidth=1, color=colours[eid], label=_plain_text(eid))
        ax.set_ylabel(f"{key} (coherence)")
        ax.set_title(f"{key.split('_')[1]} clock", fontsize=10)
        ax.grid(alpha=0.3)
    _legend(axes[0], len(experts), title="expert")
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"Phase coherence phi per expert, {_layer_title(run, layer_id)}")
    _save(fig, path)
    return None


def plot_beta(run: RunData, layer_id: int, path: Path) -> str | None:
    """Each expert's router-side biases over the steps: the slow clock's beta and, where the run has a mid
    clock, its selection offset (one panel each).

    Takes the run, a layer id and the PNG path; returns None when written, else why it was not drawn."""
    panels = []
    for key, label in (("beta", "beta (slow clock)"), ("offset", "selection offset (mid clock)")):
        steps, series = _series(run, layer_id, key)
        if _any_known(series) and any(np.nanmax(np.abs(v)) > 0 for v in series.values() if np.isfinite(v).any()):
            panels.append((steps, series, label))
    if not panels:
        steps, series = _series(run, layer_id, "beta")
        if not _any_known(series):
            return f"{path.name}: not drawn, layer {layer_id} has no beta readings"
        panels.append((steps, series, "beta (slow clock)"))
    fig = _figure(10, 3.6 * len(panels) + 0.8)
    axes = list(np.atleast_1d(fig.subplots(len(panels), 1, sharex=True, squeeze=False)).ravel())
    for ax, (steps, series, label) in zip(axes, panels, strict=True):
        colours = _colours(len(series))
        ax.axhline(0.0, color="black", linewidth=0.8)
        for colour, (eid, values) in zip(colours, series.items(), strict=True):
            ax.plot(steps, values, marker=".", markersize=3, linewidth=1, color=colour, label=_plain_text(eid))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        _legend(ax, len(series), title="expert")
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"Router-side biases per expert, {_layer_title(run, layer_id)}")
    _save(fig, path)
    return None


def plot_audits(run: RunData, path: Path) -> str | None:
    """Every audited edit: its predicted delta_F against what the loss then did (change against its trend),
    coloured by verdict; without loss readings, against the realised delta_F of the layer.

    Takes the run and the PNG path; returns None when written, else why it was not drawn."""
    if not run.audits:
        return f"{path.name}: not drawn, no edit has been audited"
    fig = _figure(8, 5)
    ax = fig.subplots()
    colours = {"kept": "tab:blue", "rolled_back": "tab:red"}
    use_loss = any(a["loss"].get("change") is not None for a in run.audits)
    for verdict, colour in colours.items():
        pts = [(a["predicted"]["delta_F"],
                a["loss"].get("change") if use_loss else a["realised"].get("delta_F"), a)
               for a in run.audits if a["verdict"] == verdict]
        pts = [(x, y, a) for x, y, a in pts if isinstance(y, (int, float))]
        if not pts:
            continue
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=colour, label=verdict.replace("_", " "))
        for x, y, a in pts:
            ax.annotate(_plain_text(f"{a['action']} {a.get('expert_id') or ''}"), (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("predicted delta_F of the edit (below 0: predicted to help)")
    ax.set_ylabel("loss change against its trend" if use_loss else "realised delta_F of the layer")
    ax.set_title("Audits: what each edit predicted and what followed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def plot_shares(run: RunData, layer_id: int, path: Path) -> str | None:
    """Token shares of the experts stacked over the steps, with Neff on a second y axis.

    Takes the run, a layer id and the PNG path; returns None when written, else why it was not drawn."""
    steps, series = _series(run, layer_id, "share")
    _, neff = _scalar_series(run, layer_id, "neff")
    if not _any_known(series):
        return f"{path.name}: not drawn, layer {layer_id} has no share readings"
    colours = _colours(len(series))
    fig = _figure(10, 4.5)
    ax = fig.subplots()
    stacked = [np.nan_to_num(v) for v in series.values()]
    ax.stackplot(steps, *stacked, labels=[_plain_text(e) for e in series], colors=colours, alpha=0.85)
    ax.set_xlabel("training step")
    ax.set_ylabel("token share (stacked)")
    ax.set_ylim(0, max(1.0, float(np.sum(stacked, axis=0).max())))
    ax.set_title(f"Token shares and Neff, {_layer_title(run, layer_id)}")
    count = len(series)
    if np.isfinite(neff).any():
        twin = ax.twinx()
        twin.plot(steps, neff, color="black", linewidth=2, marker="o", markersize=3, label="Neff")
        twin.set_ylabel("Neff (effective number of experts)")
        twin.set_ylim(bottom=0)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        if count + 1 <= MAX_LEGEND:
            ax.legend(handles + h2, labels + l2, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8,
                      frameon=False, title="expert")
    else:
        _legend(ax, count, title="expert")
    _save(fig, path)
    return None


def plot_timeline(run: RunData, path: Path) -> str | None:
    """Every executed edit (action other than do_nothing) at its step, one row per layer, coloured by action.

    Takes the run and the PNG path; returns None when written, else why it was not drawn."""
    edits = [d for d in run.decisions if d.action != "do_nothing"]
    if not edits:
        return f"{path.name}: not drawn, no executed edits in the decision log"
    layers = sorted(set(run.layer_ids()) | {d.layer_id for d in edits})
    row = {layer_id: i for i, layer_id in enumerate(layers)}
    actions = [a for a in ACTION_COLOURS if any(d.action == a for d in edits)]
    offset = {a: (i - (len(actions) - 1) / 2) * 0.15 for i, a in enumerate(actions)}
    fig = _figure(11, 1.6 + 0.7 * len(layers))
    ax = fig.subplots()
    for action in actions:
        chosen = [d for d in edits if d.action == action]
        ax.scatter([d.step for d in chosen], [row[d.layer_id] + offset[action] for d in chosen], s=60,
                   color=ACTION_COLOURS[action], label=f"{action} ({len(chosen)})", zorder=3)
        if len(edits) <= MAX_LABELLED_EDITS:
            for d in chosen:  # acted-on expert, and the new expert or merge survivor after an arrow
                text = " → ".join(x for x in (d.expert_id, d.child_id) if x)
                ax.annotate(_plain_text(text), (d.step, row[d.layer_id] + offset[action]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
    if run.readings:
        ax.set_xlim(min(r.step for r in run.readings), max(r.step for r in run.readings) * 1.02 + 1)
    ax.set_yticks(range(len(layers)), [_layer_title(run, layer_id) for layer_id in layers])
    ax.set_ylim(-0.6, len(layers) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("training step")
    ax.set_title("Lifecycle timeline: executed edits per layer")
    ax.grid(axis="x", alpha=0.3)
    _legend(ax, len(actions), title="action")
    _save(fig, path)
    return None


def plot_lineage(run: RunData, path: Path) -> str | None:
    """Every expert's life as a bar from its birth to its end (or the last step), with a line to its parent.

    Takes the run and the PNG path; returns None when written, else why it was not drawn."""
    if not run.lineage:
        return f"{path.name}: not drawn, no lineage records"
    lives = sorted(run.lineage, key=lambda life: life.layer)  # stable: birth order within a layer
    row = {life.expert_id: i for i, life in enumerate(lives)}
    last = run.last_step() or 0
    span = max(1, last - min(life.born_step for life in lives))
    fig = _figure(11, 1.5 + 0.25 * len(lives))
    ax = fig.subplots()
    for life in lives:
        y = row[life.expert_id]
        end = life.ended_step if life.ended_step is not None else last
        colour = ORIGIN_COLOURS.get(life.origin or "initial", "tab:gray")
        ax.barh(y, max(end - life.born_step, span * 0.004), left=life.born_step, height=0.6, color=colour,
                alpha=0.45 if life.ended_step is not None else 0.9, edgecolor="black", linewidth=0.4)
        if life.ended_by is not None and life.ended_step is not None:
            ax.plot(life.ended_step, y, marker=END_MARKERS.get(life.ended_by, "*"), color="black", markersize=6)
        if life.parent_id is not None and life.parent_id in row:
            ax.plot([life.born_step, life.born_step], [row[life.parent_id], y], color="black", linewidth=0.8,
                    linestyle=":")
            ax.plot(life.born_step, row[life.parent_id], marker="o", color="black", markersize=3)
    for i in range(1, len(lives)):
        if lives[i].layer != lives[i - 1].layer:
            ax.axhline(i - 0.5, color="gray", linewidth=0.8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    origins = [o for o in ORIGIN_COLOURS if any((life.origin or "initial") == o for life in lives)]
    ends = [e for e in END_MARKERS if any(life.ended_by == e for life in lives)]
    handles: list[Any] = [Patch(color=ORIGIN_COLOURS[o], label=f"born: {o}") for o in origins]
    handles += [Line2D([], [], marker=END_MARKERS[e], color="black", linestyle="", label=f"ended: {e}") for e in ends]
    if any(life.parent_id in row for life in lives):
        handles.append(Line2D([], [], color="black", linestyle=":", marker="o", markersize=3, label="from parent"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_yticks(range(len(lives)), [_plain_text(life.expert_id) for life in lives], fontsize=7)
    ax.set_ylim(len(lives) - 0.5, -0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("expert (grouped by layer, in birth order)")
    ax.set_title("Expert lineage: each expert's life, with lines to its parent")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return None


def plot_basins(run: RunData, layer_id: int, path: Path) -> str | None:
    """Small multiples of each live expert's most attracted tokens (counts), labelled from the vocabulary.

    Takes the run, a layer id and the PNG path; returns None when written, else why it was not drawn."""
    basins = sorted((b for b in run.basins if b.layer == layer_id and b.tokens), key=lambda b: b.slot)
    if not basins:
        return f"{path.name}: not drawn, no basins for layer {layer_id}"
    ncols = min(4, len(basins))
    nrows = math.ceil(len(basins) / ncols)
    height = max(len(b.tokens[:20]) for b in basins) * 0.17 + 0.9
    fig = _figure(3.2 * ncols, height * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, basin in zip(axes, basins, strict=False):
        tokens = basin.tokens[:20]
        labels = [_plain_text(token_label(t, run.vocabulary)) for t, _ in tokens]
        ax.barh(range(len(tokens)), [c for _, c in tokens], color="tab:blue")
        ax.set_yticks(range(len(tokens)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(_plain_text(f"{basin.expert_id} (slot {basin.slot}, total {basin.total:,.0f})"), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("count", fontsize=7)
    for ax in axes[len(basins):]:
        ax.set_visible(False)
    fig.suptitle(f"Most attracted tokens per live expert, {_layer_title(run, layer_id)}")
    fig.tight_layout()
    _save(fig, path)
    return None


def write_run_plots(run: RunData, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw every plot of the report that has data into `out_dir`.

    Takes the loaded run and the output directory (which must exist). Returns the PNG paths written, in
    page order, and a note per plot not drawn."""
    written: list[Path] = []
    notes: list[str] = []

    def attempt(name: str, draw: Callable[..., str | None], *args: Any) -> None:
        path = out_dir / name
        note = draw(run, *args, path)
        if note is None:
            written.append(path)
        else:
            notes.append(note)

    attempt("timeline.png", plot_timeline)
    for layer_id in run.layer_ids():
        attempt(f"phi_L{layer_id}.png", plot_phi, layer_id)
        attempt(f"beta_L{layer_id}.png", plot_beta, layer_id)
        attempt(f"shares_L{layer_id}.png", plot_shares, layer_id)
    attempt("lineage.png", plot_lineage)
    attempt("audits.png", plot_audits)
    for layer_id in sorted({b.layer for b in run.basins}):
        attempt(f"basins_L{layer_id}.png", plot_basins, layer_id)
    return written, notes


# ---------------------------------------------------------------------------------------------------------
# comparison plots


def _mean_sd(rows: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step (union over rows), the mean and sample sd of the rows that have a finite value there."""
    steps = sorted({s for row in rows for s in row})
    means, sds = [], []
    for s in steps:
        values = [row[s] for row in rows if s in row and math.isfinite(row[s])]
        means.append(float(np.mean(values)) if values else math.nan)
        sds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return np.array(steps, dtype=float), np.array(means), np.array(sds)


def _panels(n: int, height: float) -> tuple[Figure, list[Axes]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(5.2 * ncols, height * nrows)
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _curve_panels(
    path: Path,
    scenarios: list[str],
    arms: list[str],
    curves: Callable[[str, str], list[dict[int, float]]],
    ylabel: str,
    title: str,
    zero_line: bool = False,
) -> None:
    """One panel per scenario, one line per arm: the mean over its curves (`curves(scenario, arm)`, one
    `{step: value}` per seed) with a band of one sd."""
    colours = dict(zip(arms, _colours(len(arms)), strict=True))
    fig, axes = _panels(len(scenarios), 4.0)
    for ax, scenario in zip(axes, scenarios, strict=True):
        for arm in arms:
            rows = curves(scenario, arm)
            if not rows:
                continue
            steps, mean, sd = _mean_sd(rows)
            ax.plot(steps, mean, color=colours[arm], label=_plain_text(f"{arm} (n={len(rows)})"))
            ax.fill_between(steps, mean - sd, mean + sd, color=colours[arm], alpha=0.2, linewidth=0)
        if zero_line:
            ax.axhline(0.0, color="black", linewidth=1)
        ax.set_title(_plain_text(scenario))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_compare_val(outcomes: Outcomes, path: Path) -> str | None:
    """One panel per scenario: each arm's mean validation curve over seeds with a band of one sd.

    Takes the loaded outcomes and the PNG path; returns None when written, else why it was not drawn."""
    scenarios = [s for s in outcomes.scenarios() if any(r.scenario == s and r.eval_steps for r in outcomes.runs)]
    if not scenarios:
        return f"{path.name}: not drawn, no run has a validation curve"

    def curves(scenario: str, arm: str) -> list[dict[int, float]]:
        return [dict(zip(r.eval_steps, r.val_nats, strict=True)) for r in outcomes.runs
                if r.scenario == scenario and r.arm == arm and r.eval_steps]

    _curve_panels(path, scenarios, outcomes.arms(), curves, "validation loss (nats)",
                  "Validation loss: mean over seeds ± 1 sd")
    return None


def plot_compare_gap(outcomes: Outcomes, path: Path) -> str | None:
    """One panel per scenario: each non-plain arm's paired validation gap (its curve minus the plain arm's,
    same seed, at the eval steps both have), mean over seeds with a band of one sd, and a zero line.

    Takes the loaded outcomes and the PNG path; returns None when written, else why it was not drawn."""
    plain = {(r.scenario, r.seed): dict(zip(r.eval_steps, r.val_nats, strict=True))
             for r in outcomes.runs if r.arm == "plain"}
    scenarios = [s for s in outcomes.scenarios() if any(k[0] == s for k in plain)]
    arms = [a for a in outcomes.arms() if a != "plain"]
    if not scenarios or not arms:
        return f"{path.name}: not drawn, no arm could be paired with the plain arm"

    def curves(scenario: str, arm: str) -> list[dict[int, float]]:
        rows = []
        for r in outcomes.runs:
            base = plain.get((r.scenario, r.seed))
            if r.scenario == scenario and r.arm == arm and base is not None:
                rows.append({s: v - base[s] for s, v in zip(r.eval_steps, r.val_nats, strict=True) if s in base})
        return rows

    _curve_panels(path, scenarios, arms, curves, "val nats − plain (below 0 = better)",
                  "Paired validation gap to the plain arm: mean over seeds ± 1 sd", zero_line=True)
    return None


def plot_compare_neff(outcomes: Outcomes, path: Path) -> str | None:
    """One panel per scenario: each arm's mean over seeds of the smallest Neff over the MoE layers.

    Takes the loaded outcomes and the PNG path; returns None when written, else why it was not drawn."""

    def min_neff(row: list[float | None]) -> float:
        known = [v for v in row if v is not None]
        return min(known) if known else math.nan

    scenarios = [s for s in outcomes.scenarios() if any(r.scenario == s and r.log_steps for r in outcomes.runs)]
    if not scenarios:
        return f"{path.name}: not drawn, no run has Neff readings"
    arms = outcomes.arms()
    colours = dict(zip(arms, _colours(len(arms)), strict=True))
    fig, axes = _panels(len(scenarios), 4.0)
    for ax, scenario in zip(axes, scenarios, strict=True):
        for arm in arms:
            runs = [r for r in outcomes.runs if r.scenario == scenario and r.arm == arm and r.log_steps]
            if not runs:
                continue
            rows = [{s: min_neff(row) for s, row in zip(r.log_steps, r.neff, strict=True)} for r in runs]
            steps, mean, _ = _mean_sd(rows)
            ax.plot(steps, mean, color=colours[arm], label=_plain_text(f"{arm} (n={len(runs)})"))
        ax.set_title(_plain_text(scenario))
        ax.set_xlabel("training step")
        ax.set_ylabel("min over layers of Neff")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Smallest Neff over the MoE layers: mean over seeds")
    fig.tight_layout()
    _save(fig, path)
    return None


def plot_compare_delta(deltas: list[PairedDelta], path: Path) -> str | None:
    """Per scenario, per non-plain arm: mean paired delta of final validation loss, sd error bars, zero line.

    Takes the paired deltas and the PNG path; returns None when written, else why it was not drawn."""
    scenarios = list(dict.fromkeys(d.scenario for d in deltas if d.n))
    if not scenarios:
        return f"{path.name}: not drawn, no arm could be paired with the plain arm"
    fig, axes = _panels(len(scenarios), 4.0)
    for ax, scenario in zip(axes, scenarios, strict=True):
        chosen = [d for d in deltas if d.scenario == scenario and d.n]
        colours = _colours(len(chosen))
        x = np.arange(len(chosen))
        sds = [0.0 if math.isnan(d.sd) else d.sd for d in chosen]
        ax.bar(x, [d.mean for d in chosen], yerr=sds, capsize=5, color=colours, alpha=0.7)
        for i, d in enumerate(chosen):
            ax.scatter([i] * d.n, d.deltas, color="black", s=12, zorder=3)
        ax.axhline(0.0, color="black", linewidth=1)
        ax.set_xticks(x, [_plain_text(f"{d.arm}\n(n={d.n})") for d in chosen])
        ax.set_title(_plain_text(scenario))
        ax.set_ylabel("final val nats − plain (below 0 = better)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Paired final delta vs plain: mean ± 1 sd over seeds (dots: seeds)")
    fig.tight_layout()
    _save(fig, path)
    return None


def write_compare_plots(outcomes: Outcomes, deltas: list[PairedDelta], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw `compare_val.png`, `compare_gap.png`, `compare_neff.png` and `compare_delta.png` into `out_dir`
    (which must exist).

    Takes the loaded outcomes, their paired deltas and the directory. Returns the paths written and a note
    per plot not drawn."""
    written: list[Path] = []
    notes: list[str] = []
    for name, note in (
        ("compare_val.png", plot_compare_val(outcomes, out_dir / "compare_val.png")),
        ("compare_gap.png", plot_compare_gap(outcomes, out_dir / "compare_gap.png")),
        ("compare_neff.png", plot_compare_neff(outcomes, out_dir / "compare_neff.png")),
        ("compare_delta.png", plot_compare_delta(deltas, out_dir / "compare_delta.png")),
    ):
        if note is None:
            written.append(out_dir / name)
        else:
            notes.append(note)
    return written, notes
