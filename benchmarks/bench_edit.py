"""One structural edit, optimiser surgery included, on an E=64, H=4096 ChronoMoELayer.

Times spawn / split / merge / prune / restore (median over repeats; `torch.cuda.synchronize()` around each
call on GPU), plus the per-step cost of the masked-slot guard (zeroing masked gradient slices), and checks
that no parameter and no optimiser-state tensor was reallocated.
Writes `benchmarks/results/edit_<cpu|cuda>.json` and `.md`.

    python benchmarks/bench_edit.py                 # CUDA when available, else CPU
    python benchmarks/bench_edit.py --device cpu --d-ff 512 --threads 1
Target (PERF.md): <= 10 ms per edit on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import chronomoe_v3
from chronomoe_v3.adapters import banks_for
from chronomoe_v3.config import ChronoConfig, LifecycleConfig
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.ops import EditRecord, OptimizerSurgery, merge, prune, restore, spawn, split
from chronomoe_v3.ops.registry import ExpertRegistry

RESULTS = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], EditRecord | None]) -> tuple[float, EditRecord | None]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


def pointers(layer: torch.nn.Module, opt: torch.optim.Optimizer) -> list[int]:
    ptrs = [p.data_ptr() for p in layer.parameters()]
    for p in layer.parameters():
        ptrs += [v.data_ptr() for v in opt.state[p].values() if torch.is_tensor(v)]
    return ptrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--live", type=int, default=48)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    d_ff = args.d_ff
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    layer = ChronoMoELayer(args.d_model, d_ff, args.experts, 8, router_bias=True, device=device, dtype=dtype)
    layer.active_mask[args.live:] = False
    banks = banks_for(layer)
    config = ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=args.experts, min_experts_per_layer=2))
    registry = ExpertRegistry([layer.active_mask], config)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4, weight_decay=0.1)
    for p in layer.parameters():  # materialise the optimiser state, one parameter at a time (peak memory)
        p.grad = torch.zeros_like(p)
        opt.step()
        p.grad = None
    surgery = OptimizerSurgery(opt, [banks])
    ptrs_before = pointers(layer, opt)
    gen = torch.Generator(device=device).manual_seed(0)

    times: dict[str, list[float]] = {k: [] for k in ("split", "merge", "spawn", "prune", "restore")}
    step = 1
    for rep in range(args.warmup + args.repeats):
        cycle: dict[str, float] = {}
        cycle["split"], rec = timed(device, lambda s=step: split(
            registry, banks, 0, 0, step=s, generator=gen, optimizer=surgery))
        assert rec is not None
        child = rec.fresh_slots[0]
        cycle["merge"], _ = timed(device, lambda s=step, c=child: merge(
            registry, banks, 0, 0, c, step=s, usage=(0.5, 0.5), optimizer=surgery))
        cycle["spawn"], rec = timed(device, lambda s=step: spawn(
            registry, banks, 0, step=s, parent=1, generator=gen, optimizer=surgery))
        assert rec is not None
        born = rec.fresh_slots[0]
        cycle["prune"], rec = timed(device, lambda s=step, b=born: prune(
            registry, banks, 0, b, step=s, optimizer=surgery))
        assert rec is not None
        cycle["restore"], rec = timed(device, lambda s=step, i=rec.ended_ids[0]: restore(
            registry, banks, i, step=s, optimizer=surgery))
        assert rec is not None
        prune(registry, banks, 0, rec.fresh_slots[0], step=step, optimizer=surgery)
        for eid in registry.archived_ids():  # keep memory flat over repeats (not timed)
            registry.unpark(eid)
        if rep >= args.warmup:
            for k, v in cycle.items():
                times[k].append(v)
        step += 1

    unchanged = pointers(layer, opt) == ptrs_before
    for p in layer.parameters():  # the per-step guard works on gradients
        p.grad = torch.zeros_like(p)
    guard = [timed(device, surgery.drop_masked_grads)[0] for _ in range(args.repeats)]

    per_expert_mb = sum(t.numel() * t.element_size() for t in banks.experts.read(0).values()) / 2**20
    result = {
        "benchmark": "edit",
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "chronomoe_v3": chronomoe_v3.__version__,
        "python": platform.python_version(),
        "shape": {"experts": args.experts, "live": args.live, "d_model": args.d_model, "d_ff": d_ff,
                  "dtype": args.dtype, "router_bias": True, "expert_mb": round(per_expert_mb, 2)},
        "optimizer": "AdamW (surgery: fresh slices, first-step seeding, masked-slot guard)",
        "repeats": args.repeats,
        "median_ms": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "min_ms": {k: round(min(v), 3) for k, v in times.items()},
        "guard_per_step_ms": round(statistics.median(guard), 3),
        "masked_slots_during_guard": int((~layer.active_mask).sum()),
        "data_ptr_unchanged": unchanged,
        "target_ms_gpu": 10.0,
        "cpu_load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    assert unchanged, "a parameter or optimiser-state tensor was reallocated"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"edit_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Structural edit benchmark ({device.type})",
        "",
        f"Device: {result['device']}; torch {result['torch']}; chronomoe_v3 {result['chronomoe_v3']}; "
        f"Python {result['python']}.",
        f"Layer: E={args.experts} slots ({args.live} live), H={args.d_model}, d_ff={d_ff}, {args.dtype}, "
        f"router bias; {per_expert_mb:.1f} MiB per expert; AdamW with OptimizerSurgery.",
        f"Median of {args.repeats} repeats (after {args.warmup} warm-up), each including optimiser surgery.",
        "",
        "| edit | median ms | min ms |",
        "|---|---|---|",
        *[f"| {k} | {result['median_ms'][k]} | {result['min_ms'][k]} |" for k in times],
        f"| masked-slot guard, per optimiser step ({result['masked_slots_during_guard']} masked slots) | "
        f"{result['guard_per_step_ms']} | |",
        "",
        f"No parameter or optimiser-state tensor reallocated: **{unchanged}**. GPU target: <= 10 ms per edit.",
        f"Host 1-minute load average at the end: {result['cpu_load_average_1min']} (CPU timings are noisy on a "
        "shared host).",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
