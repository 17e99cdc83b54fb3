"""What the shadow copies (ops/shadow.py) cost: `step()` time and the training steps after it, with and without.

Two systems side by side on the same model shape (bench_system's `Stack`: shape A on CUDA, bf16; a small
one on CPU), `step()` every `--every` training steps: the median training-step time, the median `step()` call
(with the refresh every second call), and the shadow's memory. Writes `benchmarks/results/shadow_<device>.json`
and `.md`.

    python benchmarks/bench_shadow.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_system import SHAPES, Stack  # noqa: E402

from chronomoe_v3 import ChronoConfig, ChronoSystem, ShadowConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def measure(device: torch.device, enabled: bool, calls: int, every: int) -> dict[str, float]:
    s = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Stack(s["H"], s["I"], s["E"], s["K"], s["layers"]).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base = ChronoConfig()
    config = replace(base, shadow=ShadowConfig(enabled=enabled),
                     lifecycle=replace(base.lifecycle, max_experts_per_layer=max(16, s["E"])))
    system = ChronoSystem(model, config=config, seed=0)
    system.attach_optimizer(opt)
    x = torch.randn(s["T"], s["H"], device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train, stepc = [], []
    for n in range((calls + 1) * every):
        sync()
        t0 = time.perf_counter()
        loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        train.append((time.perf_counter() - t0) * 1e3)
        if (n + 1) % every == 0:
            t0 = time.perf_counter()
            system.step()
            sync()
            stepc.append((time.perf_counter() - t0) * 1e3)
    out = {
        "train_step_ms": statistics.median(train[every:]),
        "step_call_ms": statistics.median(stepc[1:]),
        "step_call_max_ms": max(stepc[1:]),
    }
    shadow = system.shadows[0]
    if shadow is not None:
        mem = [sh.memory_bytes() for sh in system.shadows if sh is not None]
        out["shadow_copies_MiB"] = sum(m["copies"] for m in mem) / 2**20
        out["probes_and_sketch_MiB"] = sum(m["probes_and_sketch"] for m in mem) / 2**20
    system.detach()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=8, help="step() calls measured per condition")
    p.add_argument("--every", type=int, default=10, help="training steps per step() call")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = {}
    for enabled in (True, False, True, False):  # interleaved: the first pair warms up
        rows[f"shadow_{'on' if enabled else 'off'}"] = measure(device, enabled, args.calls, args.every)
    on, off = rows["shadow_on"], rows["shadow_off"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": SHAPES["cuda" if device.type == "cuda" else "cpu"], "every": args.every, **rows,
        "step_call_extra_ms": on["step_call_ms"] - off["step_call_ms"],
        "train_step_ratio_on_off": on["train_step_ms"] / off["train_step_ms"],
    }
    name = f"shadow_{device.type}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# Shadow copies: cost ({result['device']})", "",
        f"Command: `python benchmarks/bench_shadow.py --device {device.type}`; shape {result['shape']}, "
        f"`step()` every {args.every} training steps (the refresh every second call), medians.", "",
        "| | training step ms | step() ms (median / max) | shadow copies MiB | probes + sketch MiB |",
        "|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        md.append(f"| {k} | {r['train_step_ms']:.2f} | {r['step_call_ms']:.2f} / {r['step_call_max_ms']:.2f} | "
                  f"{r.get('shadow_copies_MiB', 0):.1f} | {r.get('probes_and_sketch_MiB', 0):.2f} |")
    md += ["", f"step() extra: {result['step_call_extra_ms']:.2f} ms per call; training step on/off: "
           f"{result['train_step_ratio_on_off']:.3f}x"]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
