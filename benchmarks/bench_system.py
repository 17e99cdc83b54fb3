"""Cost of leaving ChronoSystem on: a training step (forward, backward, AdamW step) of a model built from
ChronoMoELayer, with and without the system's observers attached, measured side by side in one run.

    python benchmarks/bench_system.py                 # CPU, small shapes
    python benchmarks/bench_system.py --device cuda   # bf16, shape A of PERF.md per layer

The system's observers do more than the coherence path of bench_observe.py: bimodality sampling, router
co-routing, token counters, starvation and last-fired tracking. step() (the host transfer and the slow clock)
runs at eval checkpoints, not per training step, and is timed separately.
Writes benchmarks/results/system_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from chronomoe_v3 import ChronoConfig, ChronoMoELayer, ChronoSystem
from chronomoe_v3.config import LifecycleConfig

SHAPES = {
    "cuda": dict(T=16384, H=2048, E=64, K=8, I=1024, layers=2),
    "cpu": dict(T=1024, H=256, E=16, K=2, I=256, layers=2),
}


class Stack(nn.Module):
    def __init__(self, h: int, i: int, e: int, k: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ChronoMoELayer(h, i, e, k, layer_id=n) for n in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def median_ms(device: torch.device, fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    device = torch.device(args.device)
    shape = SHAPES[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Stack(shape["H"], shape["I"], shape["E"], shape["K"], shape["layers"]).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(shape["T"], shape["H"], device=device, dtype=dtype)

    def train_step() -> None:
        loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    results = {}
    results["step_ms_without"] = median_ms(device, train_step, args.repeats)
    system = ChronoSystem(model, config=ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=shape["E"])))
    system.attach_optimizer(opt)
    results["step_ms_with"] = median_ms(device, train_step, args.repeats)
    system.detach()
    results["step_ms_without_again"] = median_ms(device, train_step, args.repeats)
    system = ChronoSystem(model, config=ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=shape["E"])))
    system.attach_optimizer(opt)
    train_step()
    results["system_step_ms"] = median_ms(device, system.step, max(3, args.repeats // 4))
    base = min(results["step_ms_without"], results["step_ms_without_again"])
    results["overhead_pct"] = 100.0 * (results["step_ms_with"] - base) / base
    results["noise_pct"] = 100.0 * abs(results["step_ms_without"] - results["step_ms_without_again"]) / base
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (args.out / f"system_{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = [
        f"# ChronoSystem left on: training-step cost ({tag})",
        "",
        f"Device {meta['device']}, torch {meta['torch']}, {meta['dtype']}; {shape['layers']} ChronoMoELayers with "
        f"T={shape['T']}, H={shape['H']}, E={shape['E']}, k={shape['K']}, I={shape['I']}; AdamW; median of "
        f"{args.repeats}. Command: `python benchmarks/bench_system.py --device {args.device}`",
        "",
        "| training step without | with ChronoSystem | without (again) | overhead | noise | system.step() |",
        "|---|---|---|---|---|---|",
        f"| {results['step_ms_without']:.2f} ms | {results['step_ms_with']:.2f} ms | "
        f"{results['step_ms_without_again']:.2f} ms | {results['overhead_pct']:.1f}% | {results['noise_pct']:.1f}% | "
        f"{results['system_step_ms']:.2f} ms |",
    ]
    (args.out / f"system_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
