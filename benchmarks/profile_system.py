"""Where the time of `ChronoSystem` goes, on the outcome benchmark's small model or a bench_perf shape (a
diagnostic, not a benchmark).

Times one training step of TinyMoELM plain and with the system attached, then with parts of the system
switched off (the observer, the hooks, the slow bias), and prints the profiler's ops that the system adds.
Usage: `python benchmarks/profile_system.py [--device cuda] [--shape small|A|B|C] [--profile]`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_perf import SHAPES, SMALL, Stack, config_for, make_step, small_model_step  # noqa: E402
from bench_system import median_ms  # noqa: E402

from chronomoe_v3 import ChronoSystem  # noqa: E402


def build(device: torch.device, chrono: bool, shape: str = "small") -> tuple[Callable[[], None], ChronoSystem | None]:
    if shape != "small":
        s = SHAPES["cuda" if device.type == "cuda" else "cpu"][shape]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        stack = Stack(s).to(device, dtype)
        optim = torch.optim.AdamW(stack.parameters(), lr=1e-4)
        xs = torch.randn(s["T"], s["H"], device=device, dtype=dtype)
        sys_ = ChronoSystem(stack, config=config_for(s["E"]), seed=0) if chrono else None
        if sys_ is not None:
            sys_.attach_optimizer(optim)
        return make_step(stack, optim, xs), sys_
    x = torch.randint(0, SMALL["vocab"], (SMALL["batch"], SMALL["seq"]), generator=torch.Generator().manual_seed(0))
    return small_model_step(device, "chrono" if chrono else "plain", x.to(device))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="with --profile: also the Python profile")
    ap.add_argument("--shape", default="small", help="small (TinyMoELM) or a bench_perf shape: A, B, C")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    plain, _ = build(device, False, args.shape)
    variants = {}
    for mode in ("full", "no observer", "no hooks", "no hooks, no bias"):
        step, system = build(device, True, args.shape)
        assert system is not None
        if mode != "full":
            system._observe = lambda i, trace, perm: None  # type: ignore[method-assign]
        if "hooks" in mode:
            for layer in system.layers:
                layer._observers.clear()
        if "bias" in mode:
            for layer in system.layers:
                layer.slow_bias = None
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        for _ in range(5):
            step()
            plain()
        variants[mode] = (step, first)
    rows: dict[str, list[float]] = {k: [] for k in ["plain", *variants]}
    for _ in range(3):
        rows["plain"].append(median_ms(device, plain, 30))
        for k, (fn, _) in variants.items():
            rows[k].append(median_ms(device, fn, 30))
    base = min(rows["plain"])
    for k, v in rows.items():
        print(f"{k:22s} {min(v):8.2f} ms  overhead {min(v) - base:+7.2f} ms ({100 * (min(v) - base) / base:+.1f}%)"
              + (f"  first step {variants[k][1]:.2f} s" if k in variants else ""))
    if args.profile:
        full = variants["full"][0]
    if args.profile and args.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            full()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
        print(s.getvalue())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

        def ops(fn: Callable[[], None]) -> dict[str, tuple[float, float, float]]:
            with profile(activities=acts) as prof:
                for _ in range(10):
                    fn()
            return {e.key: (e.self_cpu_time_total / 1e4, getattr(e, "self_device_time_total", 0.0) / 1e4,
                            e.count / 10) for e in prof.key_averages()}

        a, b = ops(plain), ops(full)
        diff = sorted(((b.get(k, (0, 0, 0))[0] - a.get(k, (0, 0, 0))[0], b.get(k, (0, 0, 0))[1]
                        - a.get(k, (0, 0, 0))[1], b.get(k, (0, 0, 0))[2] - a.get(k, (0, 0, 0))[2], k)
                       for k in set(a) | set(b)), reverse=True)
        print("per step: self CPU ms added, device ms added, calls added, op (by CPU time)")
        for r in diff[:40]:
            print(f"{r[0]:8.3f} {r[1]:8.3f} {r[2]:7.1f}  {r[3][:90]}")
        if device.type == "cuda":
            print("the same, by device time")
            for r in sorted(diff, key=lambda r: -r[1])[:40]:
                print(f"{r[0]:8.3f} {r[1]:8.3f} {r[2]:7.1f}  {r[3][:90]}")


if __name__ == "__main__":
    main()
