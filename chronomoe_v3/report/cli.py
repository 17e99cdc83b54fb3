"""Command line: `chronomoe-v3 report RUN_DIR [--out DIR]` and `chronomoe-v3 compare OUTCOMES_JSON [--out DIR]`.

Exit codes: 0 when the page was written (even if things were skipped; the notes go to standard error),
2 for a usage error or an input that does not exist or cannot be used at all, 1 when the output cannot be
written.
"""

from __future__ import annotations

import argparse
import sys

from .html import ReportResult, render_compare, render_report
from .load import ReportInputError

PROG = "chronomoe-v3"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Reports of chronomoe-v3 runs and benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser("report", help="plots and index.html of a run directory",
                                 description="Write PNG plots and index.html for a run directory "
                                             "(docs/run_report.md).")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, e.g. runs/<run_id>")
    report.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/report)")
    compare = commands.add_parser("compare", help="plots and compare.html of a benchmark's outcomes.json",
                                  description="Plot benchmark arms side by side from an outcomes JSON.")
    compare.add_argument("outcomes", metavar="OUTCOMES_JSON", help="the outcome benchmark's outcomes.json")
    compare.add_argument("--out", metavar="DIR", default=None,
                         help="output directory (default: the JSON's directory)")
    return parser


def _print_result(result: ReportResult) -> None:
    print(f"{PROG}: wrote {len(result.written)} file(s) to {result.out_dir}; open {result.index}")
    if result.skipped:
        print(f"{PROG}: skipped {len(result.skipped)} thing(s):", file=sys.stderr)
        for note in result.skipped:
            print(f"  skipped: {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Takes the arguments (default: `sys.argv[1:]`); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and usage errors; hand back the code instead
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "report":
            result = render_report(args.run_dir, args.out)
        else:
            result = render_compare(args.outcomes, args.out)
    except ReportInputError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG} {args.command}: error: cannot write the output: {err}", file=sys.stderr)
        return 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
