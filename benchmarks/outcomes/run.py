"""Outcome benchmark: does attaching chronomoe make MoE training better? (protocol: harness.py, docs/results.md)

    python benchmarks/outcomes/run.py --quick                 # CI smoke test: 1 seed, 300 small steps
    python benchmarks/outcomes/run.py --workers 16            # the full sweep: 5 scenarios x 6 arms x 3 seeds
    python benchmarks/outcomes/run.py --scenarios collapsed --arms plain chronomoe --seeds 0 1 2
    python benchmarks/outcomes/run.py --model hf-mixtral       # a transformers Mixtral of the same shape

`--model hf-mixtral` runs the scenarios normal and collapsed with the arms plain, auxfree, chronomoe and
chronomoe+auxfree (harness.py says how its collapsed start is built), into `<out>` =
`benchmarks/results/outcomes_hf-mixtral[_quick]` by default, records named `hf-mixtral__<scenario>__...`.

Each (scenario, arm, seed) runs in its own process (one thread each) and writes its record to
`<out>/raw/<scenario>__<arm>__s<seed>.json` as soon as it finishes, so an interrupted sweep loses nothing:
rerun the same command and finished runs are reused (`--fresh` reruns them). Chronomoe arms also write their
run directory to `<out>/runs/` (`chronomoe-v3 report <out>/runs/<run>` draws it). At the end the records are
summarised into `<out>/outcomes.json` and `<out>/outcomes.md`, and `chronomoe-v3 compare` draws the
validation curves, Neff and paired deltas side by side (`<out>/compare_*.png`, `compare.html`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ARMS, HF_ARMS, HF_SCENARIOS, MODELS, SCENARIOS, Protocol, RunSpec, run_to_file  # noqa: E402
from summarize import markdown, summarize  # noqa: E402

from chronomoe_v3.jsonl import write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "outcomes"

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 300 small steps (< 2 min on 2 cores)")
    p.add_argument("--model", default="tiny", choices=MODELS,
                   help="tiny (TinyMoELM, default) or hf-mixtral (transformers MixtralForCausalLM, same shape)")
    p.add_argument("--scenarios", nargs="+", default=None, choices=SCENARIOS,
                   help="default: all the model supports")
    p.add_argument("--arms", nargs="+", default=None, choices=ARMS, help="default: all the model supports")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 3000, quick 300)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="parallel processes")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default {DEFAULT_OUT}[_quick])")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose record already exists")
    p.add_argument("--no-plots", action="store_true", help="skip the comparison plots")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing: summarise the records already in <out>/raw (missing runs are listed)")
    args = p.parse_args(argv)
    hf = args.model == "hf-mixtral"
    if args.scenarios is None:
        args.scenarios = list(HF_SCENARIOS if hf else SCENARIOS)
    if args.arms is None:
        args.arms = list(HF_ARMS if hf else ARMS)
    if hf:
        bad = [s for s in args.scenarios if s not in HF_SCENARIOS] + [a for a in args.arms if a not in HF_ARMS]
        if bad:
            p.error(f"--model hf-mixtral does not support {bad}: it runs the scenarios {list(HF_SCENARIOS)} with "
                    f"the arms {list(HF_ARMS)}")
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.workers < 1:
        p.error(f"--workers={args.workers} must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps={args.steps} must be >= 1")
    if args.out is None:
        name = DEFAULT_OUT.name + ("_hf-mixtral" if hf else "") + ("_quick" if args.quick else "")
        args.out = DEFAULT_OUT.with_name(name)
    if "damaged" in args.scenarios and "normal" not in args.scenarios:
        print("note: the damaged scenario's recovery is measured against the normal scenario's runs; "
              "without them only its losses are reported", file=sys.stderr)
    return args


def protocol_for(args: argparse.Namespace) -> Protocol:
    from dataclasses import replace

    protocol = Protocol.quick() if args.quick else Protocol()
    if args.steps is not None:
        scale = args.steps / protocol.steps
        protocol = replace(protocol, steps=args.steps, damage_step=max(1, int(protocol.damage_step * scale)))
    return replace(protocol, model=getattr(args, "model", "tiny"))


def raw_path(out: Path, scenario: str, arm: str, seed: int, model: str = "tiny") -> Path:
    prefix = "" if model == "tiny" else f"{model}__"  # tiny keeps the names of the records made before models
    return out / "raw" / f"{prefix}{scenario}__{arm.replace('+', '-')}__s{seed}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    protocol = protocol_for(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/outcomes/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    jobs = []
    for scenario in args.scenarios:
        for arm in args.arms:
            for seed in args.seeds:
                path = raw_path(out, scenario, arm, seed, protocol.model)
                if path.exists() and not args.fresh:
                    try:
                        if protocol.matches(json.loads(path.read_text())["protocol"]):
                            continue
                    except (ValueError, KeyError):
                        pass
                spec = RunSpec(scenario, arm, seed, protocol, run_dir=str(out / "runs"))
                jobs.append((spec, path))
    if args.summarize_only:
        for spec, _ in jobs:
            print(f"missing: {spec.scenario}/{spec.arm}/s{spec.seed}", file=sys.stderr)
        jobs = []
    # longest first: chronomoe arms and the 16-slot scenario
    jobs.sort(key=lambda j: ("chronomoe" in j[0].arm) + (j[0].scenario == "over"), reverse=True)
    started = time.time()
    failures = []
    if jobs:
        bar = tqdm(total=len(jobs), desc="runs", unit="run") if tqdm is not None else None
        with ProcessPoolExecutor(max_workers=min(args.workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_to_file, spec, str(path)): spec for spec, path in jobs}
            for fut in as_completed(futures):
                spec = futures[fut]
                try:
                    fut.result()
                except Exception as err:  # keep the other runs going; report at the end
                    failures.append(f"{spec.scenario}/{spec.arm}/s{spec.seed}: {type(err).__name__}: {err}")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{spec.scenario}/{spec.arm}/s{spec.seed}")
        if bar is not None:
            bar.close()
    records = []
    for scenario in args.scenarios:
        for arm in args.arms:
            for seed in args.seeds:
                path = raw_path(out, scenario, arm, seed, protocol.model)
                if path.exists():
                    records.append(json.loads(path.read_text()))
    summary = summarize(records, protocol.to_dict())
    payload = {
        "format": 1, "command": command, "protocol": protocol.to_dict(), "seconds": time.time() - started,
        "torch": __import__("torch").__version__, "runs": records, "summary": summary, "failures": failures,
    }
    write_json_atomic(out / "outcomes.json", payload)
    (out / "outcomes.md").write_text(markdown(summary, protocol.to_dict(), command) + "\n", encoding="utf-8")
    print(f"{len(records)} runs summarised in {out / 'outcomes.md'} ({time.time() - started:.0f} s)")
    if not args.no_plots:
        try:
            from chronomoe_v3.report import render_compare
        except ImportError as err:
            print(f"comparison plots skipped: {err}", file=sys.stderr)
        else:
            render_compare(out / "outcomes.json", out)
            print(f"comparison plots in {out}")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
