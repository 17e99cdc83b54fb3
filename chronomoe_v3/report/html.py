"""The report pages (`index.html`, `compare.html`) and the two entry points that write a whole report.

Pages are self-contained: inline CSS, images by relative path, no network. Every string taken from a file
is escaped with `html.escape`. A small inline script records, on window load, how many `<img>` elements
loaded (`data-images-ok` on `<body>`) out of how many (`data-images-total`).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .load import Outcomes, PairedDelta, RunData, load_outcomes, load_run, paired_deltas

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; background: #fff; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; border: 1px solid #ddd; }
.caption { color: #555; font-style: italic; margin: .3em 0 1em; }
table { border-collapse: collapse; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ul.skipped li { font-family: ui-monospace, monospace; font-size: 90%; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: 85%; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = document.getElementsByTagName("img");
  var ok = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { ok += 1; }
  }
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesTotal = String(images.length);
});
"""

CAPTIONS = {
    "timeline": "Each marker is an executed edit at its training step, one row per layer, coloured by action; "
                "the label names the expert acted on, then after an arrow the new expert (split, spawn) or the "
                "merge survivor.",
    "phi": "Each line is one expert's phase coherence phi (the cosine between its mean output and the layer's "
           "mixture) at the fast (top), mid and slow (bottom) clocks; higher means more aligned, and gaps are "
           "steps where it was not measured or the expert did not exist.",
    "beta": "Each line is one expert's router-side bias: the slow clock's beta (coherent experts earn a little "
            "preference) and, with a mid clock, its selection offset (which moves tokens from dominant experts "
            "to starved ones); above zero the router favours the expert, below zero it is held back.",
    "audits": "Each point is one executed edit after its audit window: how much it was predicted to lower the "
              "layer's free energy (left of 0: predicted to help) against what the training loss did relative "
              "to its trend (above 0: it rose); red edits were judged harmful and rolled back.",
    "shares": "The coloured bands stack each expert's share of the tokens routed since the previous reading "
              "(the bands fill to 1); the black line on the right axis is Neff, the effective number of experts "
              "in use.",
    "lineage": "Each bar is one expert's life from its birth to its end (or to the last step if still alive), "
               "coloured by how it was born; a dotted line joins a child to its parent at the child's birth and a "
               "black marker shows how it ended.",
    "basins": "Each panel is one live expert; its bars are the tokens that were most often routed to it "
              "(sampled, decayed counts), most frequent at the top.",
}


@dataclass
class ReportResult:
    """What a render wrote: the output directory, the HTML page, every file written (PNGs then the page),
    and one note per thing that was skipped."""

    out_dir: Path
    index: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        f"<script>{SCRIPT}</script>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ])


def _figure_html(path: Path, heading: str, caption: str) -> list[str]:
    return [
        f"<h3>{_e(heading)}</h3>",
        f'<img src="{_e(quote(path.name))}" alt="{_e(heading)}">',
        f'<p class="caption">{_e(caption)}</p>',
    ]


def _skipped_html(notes: list[str]) -> list[str]:
    out = ["<h2>Skipped</h2>"]
    if not notes:
        return out + ["<p>Nothing skipped.</p>"]
    out.append(f"<p>{len(notes)} thing(s) could not be read or drawn:</p>")
    out.append('<ul class="skipped">')
    out += [f"<li>{_e(note)}</li>" for note in notes]
    return out + ["</ul>"]


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


# ---------------------------------------------------------------------------------------------------------
# index.html


def _summary_html(run: RunData) -> list[str]:
    meta = run.metadata
    items: list[str] = []
    if meta.get("model") or meta.get("version"):
        items.append(f"Model: {_e(meta.get('model', '?'))}, {_e(meta.get('library', 'chronomoe-v3'))} "
                     f"{_e(meta.get('version', '?'))}")
    created = None if run.manifest is None else run.manifest.get("created")
    if isinstance(created, (int, float)) and not isinstance(created, bool) and math.isfinite(created):
        items.append(f"Created: {_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(created)))}")
    layer_ids = run.layer_ids()
    parts = []
    for layer_id in layer_ids:
        info = run.layers.get(layer_id)
        if info is None:
            parts.append(f"L{layer_id}")
        else:
            extra = [f"{info.num_slots} slots"] + ([f"top-{info.top_k}"] if info.top_k else [])
            parts.append(f"L{layer_id}" + (f" {info.name}" if info.name else "") + f" ({', '.join(extra)})")
    items.append(f"Layers: {len(layer_ids)}" + (f": {_e('; '.join(parts))}" if parts else ""))
    if run.readings:
        steps = [r.step for r in run.readings]
        items.append(f"Steps covered: {min(steps)} to {max(steps)} ({len(run.readings)} readings)")
    else:
        items.append("Steps covered: none (no readings)")
    edits = Counter(d.action for d in run.decisions if d.action != "do_nothing")
    nothing = sum(1 for d in run.decisions if d.action == "do_nothing")
    kinds = ", ".join(f"{action} {count}" for action, count in sorted(edits.items())) or "none"
    items.append(f"Edits executed: {sum(edits.values())} ({_e(kinds)}); do-nothing records: {nothing}")
    alerts: Counter[tuple[str, int]] = Counter()
    for reading in run.readings:
        for layer in reading.layers.values():
            alerts.update((kind, layer.layer_id) for kind in layer.alerts)
    if alerts:
        text = ", ".join(f"{kind} on L{layer_id} at {count} reading(s)" for (kind, layer_id), count in
                         sorted(alerts.items()))
        items.append(f"Alerts seen: {_e(text)}")
    else:
        items.append("Alerts seen: none")
    if run.control:
        emergencies = sum(1 for c in run.control if c.get("emergency") is True)
        items.append(f"Control decisions: {len(run.control)} ({emergencies} emergency)")
    out = ["<h2>Summary</h2>", "<ul>"] + [f"<li>{item}</li>" for item in items] + ["</ul>"]
    config = meta.get("config")
    if isinstance(config, dict) and config:
        out += ["<details><summary>Configuration</summary>",
                f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>", "</details>"]
    return out


def _decisions_html(run: RunData) -> list[str]:
    edits = sorted((d for d in run.decisions if d.action != "do_nothing"), key=lambda d: (d.step, d.layer_id))
    nothing = len(run.decisions) - len(edits)
    out = ["<h3>Decisions</h3>",
           f"<p>{len(edits)} executed edit(s); {nothing} do-nothing record(s) (a review where doing nothing "
           f"beat every candidate) are counted but not listed.</p>"]
    if not edits:
        return out
    out += ['<table class="decisions">', "<tr><th>step</th><th>layer</th><th>action</th><th>expert</th>"
            "<th>child</th><th>predicted ΔF</th><th>trigger</th><th>reason</th></tr>"]
    for d in edits:
        out.append(
            f'<tr><td class="num">{d.step}</td><td class="num">{d.layer_id}</td><td>{_e(d.action)}</td>'
            f"<td>{_e(d.expert_id or '')}</td><td>{_e(d.child_id or '')}</td>"
            f'<td class="num">{_e(_num(d.free_energy.delta_F, "+.4g"))}</td><td>{_e(d.trigger)}</td>'
            f"<td>{_e(d.reason or '')}</td></tr>"
        )
    return out + ["</table>"]


def _audits_html(run: RunData) -> list[str]:
    if not run.audits:
        return []
    rolled = sum(a["verdict"] == "rolled_back" for a in run.audits)
    out = ["<h3>Audits</h3>",
           f"<p>{len(run.audits)} audited edit(s), {rolled} rolled back. Predicted: the edit's delta_F; realised: "
           "the layer's F after the audit window minus before; loss: the change against the trend before the "
           "edit.</p>",
           '<table class="decisions">', "<tr><th>edit step</th><th>layer</th><th>action</th><th>expert</th>"
           "<th>predicted ΔF</th><th>realised ΔF</th><th>loss change</th><th>verdict</th><th>reason</th></tr>"]
    for a in sorted(run.audits, key=lambda a: (a["edit_step"], a["layer_id"])):
        out.append(
            f'<tr><td class="num">{a["edit_step"]}</td><td class="num">{a["layer_id"]}</td><td>{_e(a["action"])}</td>'
            f"<td>{_e(a.get('expert_id') or '')}</td>"
            f'<td class="num">{_e(_num(a["predicted"].get("delta_F"), "+.4g"))}</td>'
            f'<td class="num">{_e(_num(a["realised"].get("delta_F"), "+.4g"))}</td>'
            f'<td class="num">{_e(_num(a["loss"].get("change"), "+.4g"))}</td><td>{_e(a["verdict"])}</td>'
            f"<td>{_e(a.get('reason', ''))}</td></tr>"
        )
    return out + ["</table>"]


def index_html(run: RunData, images: list[Path], notes: list[str]) -> str:
    """The report page of a run.

    Takes the loaded run, the PNG files written (their names are used as relative links) and every skipped
    note (loading and plotting). Returns the HTML text."""
    by_name = {p.name: p for p in images}
    title = f"chronomoe-v3 run report: {run.run_id}"
    body = [f"<h1>{_e(title)}</h1>", f"<p>Run directory: <code>{_e(run.run_dir)}</code></p>"]
    body += _summary_html(run)
    body.append("<h2>Lifecycle</h2>")
    if "timeline.png" in by_name:
        body += _figure_html(by_name["timeline.png"], "Lifecycle timeline", CAPTIONS["timeline"])
    body += _decisions_html(run)
    if "lineage.png" in by_name:
        body += _figure_html(by_name["lineage.png"], "Expert lineage", CAPTIONS["lineage"])
    body += _audits_html(run)
    if "audits.png" in by_name:
        body += _figure_html(by_name["audits.png"], "Audits", CAPTIONS["audits"])
    headings = {"phi": "Phase coherence phi", "beta": "Routing bias beta", "shares": "Token shares and Neff",
                "basins": "Most attracted tokens"}
    for layer_id in sorted(set(run.layer_ids()) | {b.layer for b in run.basins}):
        names = {kind: f"{kind}_L{layer_id}.png" for kind in headings}
        if not any(name in by_name for name in names.values()):
            continue
        info = run.layers.get(layer_id)
        body.append(f"<h2>Layer {layer_id}" + (f" ({_e(info.name)})" if info and info.name else "") + "</h2>")
        for kind, name in names.items():
            if name in by_name:
                body += _figure_html(by_name[name], f"{headings[kind]}, layer {layer_id}", CAPTIONS[kind])
    body += _skipped_html(notes)
    return _page(title, body)


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportResult:
    """Write a run's report: the PNG plots and `index.html`.

    Takes the run directory and the output directory (default `RUN_DIR/report`, created if needed). Returns
    a `ReportResult` with the files written and the skipped notes. Raises `ReportInputError` when `run_dir`
    does not exist, and OSError when the output cannot be written.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    from .plots import write_run_plots

    images, plot_notes = write_run_plots(run, out)
    notes = run.skipped + plot_notes
    index = out / "index.html"
    index.write_text(index_html(run, images, notes), encoding="utf-8")
    return ReportResult(out, index, images + [index], notes)


# ---------------------------------------------------------------------------------------------------------
# compare.html


def _finals_html(outcomes: Outcomes) -> list[str]:
    out = ["<h2>Final validation loss</h2>", "<table><tr><th>scenario</th><th>arm</th><th>n seeds</th>"
           "<th>mean ± sd (nats)</th></tr>"]
    for scenario in outcomes.scenarios():
        for arm in outcomes.arms():
            values = [r.final_val_nats for r in outcomes.runs if r.scenario == scenario and r.arm == arm]
            if not values:
                continue
            pair = PairedDelta(scenario, arm, [], values)
            sd = "n/a" if math.isnan(pair.sd) else f"{pair.sd:.4f}"
            out.append(f"<tr><td>{_e(scenario)}</td><td>{_e(arm)}</td><td class=\"num\">{len(values)}</td>"
                       f'<td class="num">{pair.mean:.4f} ± {sd}</td></tr>')
    return out + ["</table>"]


def _deltas_html(deltas: list[PairedDelta]) -> list[str]:
    out = ["<h2>Paired final delta vs plain</h2>",
           "<p>Per seed, the arm's final validation loss minus the plain arm's in the same scenario and seed; "
           "below zero the arm did better. Wins are the seeds with a delta below zero.</p>"]
    if not deltas:
        return out + ["<p>No arm could be paired with the plain arm.</p>"]
    out.append('<table class="deltas"><tr><th>scenario</th><th>arm</th><th>n seeds</th>'
               "<th>mean Δ ± sd (nats)</th><th>wins</th><th>per seed</th></tr>")
    for d in deltas:
        if d.n:
            sd = "n/a" if math.isnan(d.sd) else f"{d.sd:.4f}"
            mean = f"{d.mean:+.4f} ± {sd}"
        else:
            mean = "n/a"
        seeds = ", ".join(f"{s}: {v:+.4f}" for s, v in zip(d.seeds, d.deltas, strict=True))
        out.append(f"<tr><td>{_e(d.scenario)}</td><td>{_e(d.arm)}</td><td class=\"num\">{d.n}</td>"
                   f'<td class="num">{mean}</td><td class="num">{d.wins}</td><td>{_e(seeds)}</td></tr>')
    return out + ["</table>"]


def compare_html(outcomes: Outcomes, deltas: list[PairedDelta], images: list[Path], notes: list[str]) -> str:
    """The comparison page of a benchmark's outcomes.

    Takes the loaded outcomes, their paired deltas, the PNG files written and every skipped note. Returns the
    HTML text."""
    title = f"chronomoe-v3 benchmark comparison: {outcomes.path.name}"
    body = [f"<h1>{_e(title)}</h1>", f"<p>Source: <code>{_e(outcomes.path)}</code>; {len(outcomes.runs)} runs, "
            f"scenarios: {_e(', '.join(outcomes.scenarios()) or 'none')}; arms: "
            f"{_e(', '.join(outcomes.arms()) or 'none')}.</p>"]
    if outcomes.protocol:
        body += ["<details><summary>Protocol</summary>",
                 f"<pre>{_e(json.dumps(outcomes.protocol, indent=2, sort_keys=True, default=str))}</pre>",
                 "</details>"]
    captions = {
        "compare_val.png": ("Validation loss per scenario", "Each line is an arm's validation loss averaged over "
                            "seeds, with a band of one standard deviation; lower is better."),
        "compare_gap.png": ("Paired validation gap to plain", "Each line is an arm's validation loss minus the "
                            "plain arm's on the same seed (same initial weights and batches), averaged over "
                            "seeds, with a band of one standard deviation; below the zero line the arm is ahead."),
        "compare_neff.png": ("Smallest Neff per scenario", "Each line is an arm's smallest Neff over the MoE "
                             "layers, averaged over seeds; a drop towards 1 means a layer is collapsing onto "
                             "few experts."),
        "compare_delta.png": ("Paired final delta vs plain", "Each bar is an arm's mean paired delta of final "
                              "validation loss vs plain, with one standard deviation as error bar and the seeds "
                              "as dots; below the zero line the arm did better."),
    }
    for path in images:
        heading, caption = captions.get(path.name, (path.stem, ""))
        body += _figure_html(path, heading, caption)
    body += _deltas_html(deltas)
    body += _finals_html(outcomes)
    body += _skipped_html(notes)
    return _page(title, body)


def render_compare(outcomes_json: str | Path, out_dir: str | Path | None = None) -> ReportResult:
    """Write the benchmark comparison: `compare_val.png`, `compare_gap.png`, `compare_neff.png`, `compare_delta.png`,
    `compare.html`.

    Takes the outcomes JSON path and the output directory (default: the JSON's directory, created if needed).
    Returns a `ReportResult` with the files written and the skipped notes. Raises `ReportInputError` when the
    JSON does not exist or cannot be used at all, and OSError when the output cannot be written.
    """
    outcomes = load_outcomes(outcomes_json)
    out = Path(out_dir) if out_dir is not None else outcomes.path.parent
    out.mkdir(parents=True, exist_ok=True)
    deltas, pair_notes = paired_deltas(outcomes)
    from .plots import write_compare_plots

    images, plot_notes = write_compare_plots(outcomes, deltas, out)
    notes = outcomes.skipped + pair_notes + plot_notes
    page = out / "compare.html"
    page.write_text(compare_html(outcomes, deltas, images, notes), encoding="utf-8")
    return ReportResult(out, page, images + [page], notes)
