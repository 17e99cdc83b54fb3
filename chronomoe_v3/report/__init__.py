"""The run report: PNG plots and an HTML page of a run directory, and a comparison of benchmark arms.

`render_report(run_dir, out_dir=None)` reads a run directory (`docs/run_report.md`) and writes
`phi_L{l}.png`, `beta_L{l}.png`, `shares_L{l}.png`, `timeline.png`, `lineage.png`, `basins_L{l}.png` and
`index.html`; `render_compare(outcomes_json, out_dir=None)` writes `compare_*.png` and `compare.html`.
Both skip (and list) whatever cannot be read. Command line: `chronomoe-v3 report RUN_DIR [--out DIR]`,
`chronomoe-v3 compare OUTCOMES_JSON [--out DIR]` (or `python -m chronomoe_v3.report ...`).
matplotlib is imported only when a plot is drawn.
"""

from .html import ReportResult, render_compare, render_report
from .load import Outcomes, PairedDelta, ReportInputError, RunData, load_outcomes, load_run, paired_deltas

__all__ = [
    "Outcomes",
    "PairedDelta",
    "ReportInputError",
    "ReportResult",
    "RunData",
    "load_outcomes",
    "load_run",
    "paired_deltas",
    "render_compare",
    "render_report",
]
