"""Long run: memory over 10^6 observed forwards of a small ChronoMoELayer with a ChronoSystem attached.

    python benchmarks/long_run.py                      # 1_000_000 forwards (default)
    python benchmarks/long_run.py --forwards 200000    # a shorter run
    python benchmarks/long_run.py --tracemalloc        # also trace Python allocations (slower)

Each forward is a training-mode forward (observed by the system) of `ChronoMoELayer(d_model=16, d_ff=16,
8 slots, top-2, 6 active)` on 32 tokens drawn from a fixed mixture, so that routing is uneven and the slow
objective has something to act on; `step()` runs every `--step-every` forwards with lifecycle edits enabled
(a permissive prune rule, so that prunes, spawns, audits and rollbacks do happen). No backward pass: the run
measures the system's state, not training.

Every `--sample-every` forwards it samples the process's resident set size (`/proc/self/statm`), the number of
Python objects the garbage collector tracks, the sizes of the system's in-memory histories (decision records,
audit records, registry records, parked experts) and, with `--tracemalloc`, the traced Python allocation total.
"Flat" means the RSS grew by less than `--flat-mb` (default 4 MB) over the second half of the run.

Writes benchmarks/results/long_run.json, long_run.md and (when matplotlib is installed) long_run.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from chronomoe_v3 import ChronoConfig, ChronoMoELayer, ChronoSystem
from chronomoe_v3.config import DegradeConfig, LifecycleConfig, ObjectiveConfig

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def run_config() -> ChronoConfig:
    base = ChronoConfig(
        lifecycle=LifecycleConfig(eval_interval=2, cooldown_steps=2000, cooling_period=2000, audit_steps=2000),
        degrade=DegradeConfig(min_observations=50),
        objective=ObjectiveConfig(min_observations_to_judge=50, min_evidence_tokens=500.0, min_age_to_remove=2000),
    )
    # permissive prune rule: edits (and their audits and rollbacks) keep happening over the run
    return replace(base, objective=replace(base.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                           prune_min_absorbable=0.0))


def sample(system: ChronoSystem, forwards: int, start: float, traced: bool) -> dict[str, Any]:
    return {
        "forwards": forwards,
        "seconds": round(time.perf_counter() - start, 3),
        "rss_mb": round(rss_mb(), 3),
        "gc_objects": len(gc.get_objects()),
        "tracemalloc_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 3) if traced else None,
        "decision_records": len(system.decision_log.records),
        "audit_records": len(system.audit_log),
        "registry_records": sum(1 for _ in system.registry.experts()),
        "parked_experts": len(system.registry.archived_ids()),
        "step_calls": system.step_calls,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forwards", type=int, default=1_000_000)
    parser.add_argument("--step-every", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=0, help="default: forwards / 200")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--flat-mb", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "long_run")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.forwards < 2 * args.step_every:
        parser.error(f"--forwards must be at least 2 x --step-every ({2 * args.step_every})")
    every = args.sample_every or max(args.forwards // 200, 1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = ChronoMoELayer(16, 16, 8, 2, num_active=6)
    layer.train()
    system = ChronoSystem(layer, config=run_config(), seed=0)
    # a fixed mixture of 4 token clusters, so that experts specialise unevenly
    centres = torch.randn(4, 16) * 2.0
    weights = torch.tensor([0.55, 0.25, 0.15, 0.05])
    gen = torch.Generator().manual_seed(1)
    try:
        from tqdm import tqdm

        bar: Any = tqdm(total=args.forwards, unit="fwd", mininterval=2.0, disable=args.no_progress)
    except ImportError:  # pragma: no cover - tqdm is a dev dependency
        bar = None
    if args.tracemalloc:
        tracemalloc.start()
    gc.collect()
    start = time.perf_counter()
    samples = [sample(system, 0, start, args.tracemalloc)]
    edits: dict[str, int] = {}
    with torch.no_grad():
        for n in range(1, args.forwards + 1):
            cluster = torch.multinomial(weights, args.tokens, replacement=True, generator=gen)
            x = centres[cluster] + torch.randn(args.tokens, 16, generator=gen)
            layer(x)
            if n % args.step_every == 0:
                for action in system.step().lifecycle_actions:
                    edits[action.action] = edits.get(action.action, 0) + 1
            if n % every == 0 or n == args.forwards:
                samples.append(sample(system, n, start, args.tracemalloc))
            if bar is not None and n % 1000 == 0:
                bar.update(1000)
    if bar is not None:
        bar.update(args.forwards - bar.n)
        bar.close()
    seconds = time.perf_counter() - start
    half = [s for s in samples if s["forwards"] >= args.forwards // 2]
    rss = [s["rss_mb"] for s in samples]
    growth = half[-1]["rss_mb"] - half[0]["rss_mb"]
    summary = {
        "forwards": args.forwards,
        "step_every": args.step_every,
        "tokens_per_forward": args.tokens,
        "layer": "ChronoMoELayer(d_model=16, d_ff=16, max_experts=8, top_k=2, num_active=6)",
        "seconds": round(seconds, 1),
        "forwards_per_second": round(args.forwards / seconds, 1),
        "projected_seconds_1e6": round(seconds / args.forwards * 1_000_000, 1),
        "rss_mb_start": rss[0],
        "rss_mb_end": rss[-1],
        "rss_mb_max": max(rss),
        "rss_mb_second_half_growth": round(growth, 3),
        "gc_objects_start": samples[0]["gc_objects"],
        "gc_objects_end": samples[-1]["gc_objects"],
        "gc_objects_second_half_growth": half[-1]["gc_objects"] - half[0]["gc_objects"],
        "flat": growth < args.flat_mb,
        "flat_threshold_mb": args.flat_mb,
        "lifecycle_actions": edits,
        "step_calls": system.step_calls,
        "final": samples[-1],
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "samples": samples}, indent=1) + "\n")
    write_markdown(args.out.with_suffix(".md"), summary, samples)
    plotted = plot(args.out.with_suffix(".png"), samples)
    print(json.dumps(summary, indent=1))
    if not plotted:
        print("matplotlib not installed: no plot written")
    return 0


def write_markdown(path: Path, summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    s = summary
    lines = [
        "# Long run: memory over observed forwards",
        "",
        f"`python benchmarks/long_run.py --forwards {s['forwards']}` on {s['machine']['cpus']} CPU cores "
        f"({s['machine']['platform']}, torch {s['machine']['torch']}).",
        "",
        f"{s['layer']} with a ChronoSystem attached, {s['tokens_per_forward']} tokens per forward, step() every "
        f"{s['step_every']} forwards ({s['step_calls']} calls), lifecycle edits enabled.",
        "",
        "| forwards | seconds | RSS start MB | RSS end MB | RSS max MB | RSS growth, 2nd half (MB) | flat |",
        "|---|---|---|---|---|---|---|",
        f"| {s['forwards']} | {s['seconds']} | {s['rss_mb_start']:.1f} | {s['rss_mb_end']:.1f} | "
        f"{s['rss_mb_max']:.1f} | {s['rss_mb_second_half_growth']:+.2f} | {'yes' if s['flat'] else 'NO'} |",
        "",
        f"Throughput {s['forwards_per_second']} forwards/s (projected {s['projected_seconds_1e6'] / 60:.1f} min "
        f"for 10^6). GC-tracked objects {s['gc_objects_start']} -> {s['gc_objects_end']} "
        f"({s['gc_objects_second_half_growth']:+d} over the second half). Lifecycle actions: "
        f"{s['lifecycle_actions'] or 'none'}.",
        "",
        "In-memory histories at the end: "
        f"{s['final']['decision_records']} decision records, {s['final']['audit_records']} audit records, "
        f"{s['final']['registry_records']} registry records, {s['final']['parked_experts']} parked experts.",
        "",
        "| forwards | RSS MB | GC objects | decision records | audit records | registry records |",
        "|---|---|---|---|---|---|",
    ]
    stride = max(len(samples) // 10, 1)
    for row in samples[::stride] + ([samples[-1]] if (len(samples) - 1) % stride else []):
        lines.append(
            f"| {row['forwards']} | {row['rss_mb']:.1f} | {row['gc_objects']} | {row['decision_records']} | "
            f"{row['audit_records']} | {row['registry_records']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, samples: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [s["forwards"] for s in samples]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [s["rss_mb"] for s in samples], label="RSS (MB)")
    if samples[-1]["tracemalloc_mb"] is not None:
        ax.plot(x, [s["tracemalloc_mb"] for s in samples], label="tracemalloc (MB)")
    ax.set_xlabel("observed forwards")
    ax.set_ylabel("MB")
    ax.set_title("ChronoSystem long run: memory over time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
