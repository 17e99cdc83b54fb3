"""Cost of the data-parallel ChronoSystem: the one stacked all-reduce of every layer's statistics per forward,
against the DDP training step it rides on, measured side by side in one run (docs/distributed.md).

    python benchmarks/bench_distributed.py                                    # 2 CPU processes, gloo
    python benchmarks/bench_distributed.py --backend nccl --device cuda       # 2 GPUs (spawned)
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --backend nccl --device cuda

Per rank, a stack of ChronoMoELayer under DDP with AdamW; timed (medians over interleaved repeats):
`ddp` the DDP training step without ChronoSystem; `ddp+chrono` the same with the data-parallel system
attached (its measurement, the asynchronous stacked all-reduce, the fold); `allreduce` one blocking
all-reduce of a buffer of the stacked size alone. Writes benchmarks/results/distributed_<backend>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from chronomoe_v3 import ChronoConfig, ChronoSystem
from chronomoe_v3.config import LifecycleConfig

# the same two-layer stack and per-device shapes as bench_system.py (shape A of PERF.md on CUDA)
sys.path.insert(0, str(Path(__file__).parent))
from bench_system import SHAPES, Stack  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, fn: Any) -> float:
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _run(rank: int, world: int, args: argparse.Namespace) -> None:
    device = torch.device(f"cuda:{rank % max(torch.cuda.device_count(), 1)}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    s = SHAPES[args.device]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ChronoConfig(lifecycle=LifecycleConfig(eval_interval=10**6, max_experts_per_layer=s["E"]))
    models, systems, steps = {}, {}, {}
    for mode in ("ddp", "ddp+chrono"):
        torch.manual_seed(0)
        model = Stack(s["H"], s["I"], s["E"], s["K"], s["layers"]).to(device=device, dtype=dtype)
        if mode == "ddp+chrono":
            systems[mode] = ChronoSystem(model, config=config, controller=None,
                                         compile_observers=False if args.eager else None)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(s["T"], s["H"], device=device, dtype=dtype) * (1 + rank)

        def step(ddp: nn.Module = ddp, opt: torch.optim.Optimizer = opt, x: torch.Tensor = x) -> None:
            ddp(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        models[mode], steps[mode] = ddp, step
    system = systems["ddp+chrono"]
    for _ in range(3):  # warm-up: the first steps compile the observer where it is compiled
        for fn in steps.values():
            fn()
    system.step()  # folds the last forward; the reducer now knows the stacked size
    steps["ddp+chrono"]()
    dp = system._dp  # noqa: SLF001 - the benchmark reads the reducer's buffer size
    assert dp is not None
    nbytes = dp.bytes_last
    buffer = torch.zeros(nbytes // 4, device=device)
    steps["allreduce"] = lambda: dist.all_reduce(buffer)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            times[name].append(_timed(device, fn))
    system.step()
    med = {k: statistics.median(v) for k, v in times.items()}
    if rank != 0:
        return
    e, h, layers, w, samples = s["E"], s["H"], s["layers"], world, config.bimodality.samples_per_expert
    formula = layers * (e * (2 * h + e + 2) + 4 + w * (e * samples * (2 * h + 5) + 1)) * 4
    result = {
        "backend": args.backend, "device": str(device), "world_size": world, "dtype": str(dtype),
        "shape": s, "repeats": args.repeats,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": sys.version.split()[0],
        "median_ms": med,
        "chrono_overhead_ms": med["ddp+chrono"] - med["ddp"],
        "chrono_overhead_pct": 100 * (med["ddp+chrono"] / med["ddp"] - 1),
        "allreduce_pct_of_ddp_step": 100 * med["allreduce"] / med["ddp"],
        "allreduce_bytes_per_step": nbytes,
        "allreduce_bytes_formula": formula,
        "observers": "compiled" if system.compile_observers else "eager",
        "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    suffix = "_eager" if args.eager else ""
    (out / f"distributed_{args.backend}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Data-parallel ChronoSystem: {args.backend}, {world} x {result['gpu'] or result['cpu']} ({device.type}, "
        f"{dtype}), torch {torch.__version__}",
        "",
        f"Per rank: {layers} ChronoMoELayer, T={s['T']} tokens, H={h}, E={e}, k={s['K']}, I={s['I']}; "
        f"median of {args.repeats} interleaved repeats; observers {result['observers']}. "
        f"Command: `{result['command']}`",
        "",
        "| what | ms per step |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in med.items()),
        "",
        f"- stacked all-reduce: {nbytes} bytes per step ({nbytes / 2**20:.2f} MiB; formula "
        f"{formula} bytes), alone {med['allreduce']:.2f} ms = {result['allreduce_pct_of_ddp_step']:.1f}% of the "
        "DDP step (issued asynchronously: it overlaps the backward);",
        f"- ChronoSystem on the DDP step: +{result['chrono_overhead_ms']:.2f} ms "
        f"({result['chrono_overhead_pct']:.1f}%), measurement, reduction and fold together.",
        "",
    ]
    (out / f"distributed_{args.backend}{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        _run(rank, world, args)
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--eager", action="store_true",
                        help="eager observers (default: the system's default, compiled on CUDA)")
    args = parser.parse_args()
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(args.backend, timeout=timedelta(seconds=300))
        try:
            _run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
