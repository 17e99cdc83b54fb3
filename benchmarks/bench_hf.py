"""Cost of chronomoe on a Hugging Face model: a training step of a tiny transformers Mixtral on CPU with (a) nothing
attached, (b) an `AuxLossFreeBalancer` (on the blocks' chronomoe state: the router hook that adds its bias),
(c) a `ChronoSystem` (its `step()` every 50 training steps, amortised), timed side by side in one run.

    python benchmarks/bench_hf.py                  # about a minute on a 2-core CPU; --threads N, --blocks N, --block N
    python benchmarks/bench_hf.py --device cuda    # a Mixtral-8x7B-shaped layer in bf16 on a GPU

A training step is forward + backward + AdamW step of `MixtralForCausalLM` (2 layers, hidden 64, 4 heads,
intermediate 128, 8 experts, top-2; the outcome benchmark's hf-mixtral shape) on a batch of 8 x 128 token ids,
next-token loss. With `--device cuda` the model is one Mixtral-8x7B-shaped decoder layer (hidden 4096, 32 heads, 8 KV
heads, intermediate 14336, 8 experts, top-2, vocabulary 1024) in bf16 on a batch of 4 x 2048 tokens; the loss is read
back once per block, not per step, and the device is synchronised at block edges.
The three models are built from the same seed. After a warm-up, each arm runs blocks of `--block`
training steps in turn (a, b, c, a, b, c, ...) so that drifts of a shared machine hit all three alike; the ChronoSystem
arm calls `system.step(loss=...)` once per block, inside the timed block, and that call is also timed on its own.
Reported: the median over blocks of the time per training step, and each arm's ratio to (a).
Writes benchmarks/results/hf_overhead_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chronomoe_v3 import ChronoSystem
from chronomoe_v3.balance import AuxLossFreeBalancer
from chronomoe_v3.system import find_moe_layers

ARMS = ("nothing", "auxfree", "chronomoe")
SHAPES = {
    "cpu": dict(vocab=96, hidden=64, heads=4, kv_heads=4, intermediate=128, layers=2, experts=8, top_k=2, batch=8,
                seq=128),
    "cuda": dict(vocab=1024, hidden=4096, heads=32, kv_heads=8, intermediate=14336, layers=1, experts=8, top_k=2,
                 batch=4, seq=2048),
}
SHAPE = dict(SHAPES["cpu"])
DEVICE = torch.device("cpu")


def build(seed: int) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
        max_position_embeddings=SHAPE["seq"], num_local_experts=SHAPE["experts"], num_experts_per_tok=SHAPE["top_k"],
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    if DEVICE.type == "cuda":
        model = model.to(device=DEVICE, dtype=torch.bfloat16)
    model.train()
    return model


class Arm:
    """One model, its optimiser and what is attached to it; `train_step()` runs one training step."""

    def __init__(self, name: str, batches: list[torch.Tensor], seed: int) -> None:
        self.name = name
        self.model = build(seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.batches = batches
        self.i = 0
        self.balancer = None
        if name == "auxfree":
            find_moe_layers(self.model)  # the blocks' chronomoe state (router hook) that holds the balancer's bias
            self.balancer = AuxLossFreeBalancer(self.model, optimizer=self.opt)
        self.system: ChronoSystem | None = None
        if name == "chronomoe":
            self.system = ChronoSystem(self.model)
            self.system.attach_optimizer(self.opt)
        self.losses: list[torch.Tensor] = []
        self.step_ms: list[float] = []  # system.step() alone

    def train_step(self) -> None:
        x = self.batches[self.i % len(self.batches)]
        self.i += 1
        logits = self.model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.detach())  # read back once per block (no per-step host sync on a GPU)

    def end_of_block(self, block: int) -> None:
        if self.system is None:
            return
        t0 = time.perf_counter()
        self.system.step(loss=float(torch.stack(self.losses[-block:]).float().mean()))
        self.step_ms.append((time.perf_counter() - t0) * 1e3)


def timed_block(arm: Arm, steps: int) -> float:
    """Milliseconds per training step over one block (the block's system.step() included)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        arm.train_step()
    arm.end_of_block(steps)
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def run(blocks: int, block: int, warmup: int, seed: int,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"] + 1), generator=g).to(DEVICE)
               for _ in range(16)]
    arms = [Arm(name, batches, seed) for name in ARMS]
    for arm in arms:
        for _ in range(warmup):
            arm.train_step()
        arm.end_of_block(warmup)  # the first system.step() (allocations) is not timed in a block
        arm.step_ms.clear()
    per_step: dict[str, list[float]] = {a.name: [] for a in arms}
    for b in range(blocks):
        for arm in arms:
            per_step[arm.name].append(timed_block(arm, block))
        progress(f"block {b + 1}/{blocks}: " + ", ".join(f"{n} {v[-1]:.2f} ms/step" for n, v in per_step.items()))
    median = {n: statistics.median(v) for n, v in per_step.items()}
    base = median["nothing"]
    chrono = next(a for a in arms if a.name == "chronomoe")
    return {
        "ms_per_step": median,
        "ratio_to_nothing": {n: m / base for n, m in median.items()},
        "ms_per_step_blocks": per_step,
        "block_spread_pct": {
            n: 100.0 * (max(v) - min(v)) / statistics.median(v) for n, v in per_step.items()
        },
        "system_step_ms": statistics.median(chrono.step_ms) if chrono.step_ms else None,
        "system_step_ms_amortised": (statistics.median(chrono.step_ms) / block) if chrono.step_ms else None,
        "final_loss": {a.name: float(a.losses[-1]) for a in arms},
    }


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    ms, ratio, spread = results["ms_per_step"], results["ratio_to_nothing"], results["block_spread_pct"]
    label = {"nothing": "(a) nothing attached", "auxfree": "(b) AuxLossFreeBalancer",
             "chronomoe": f"(c) ChronoSystem, step() every {meta['block']} steps"}
    lines = [
        f"# chronomoe on a Hugging Face Mixtral: training-step cost ({meta['device']})",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}, {meta['hardware']}, {meta['dtype']}; "
        f"`MixtralForCausalLM` with {SHAPE['layers']} layer(s), hidden {SHAPE['hidden']}, intermediate "
        f"{SHAPE['intermediate']}, {SHAPE['experts']} experts, top-{SHAPE['top_k']}; batch {SHAPE['batch']} x "
        f"{SHAPE['seq']} tokens; forward + backward + AdamW step. Median over {meta['blocks']} blocks of "
        f"{meta['block']} steps per arm, arms interleaved, after {meta['warmup']} warm-up steps. "
        f"Command: `{meta['command']}`",
        "",
        "| arm | ms / training step | vs (a) | spread over blocks |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label[n]} | {ms[n]:.2f} | {ratio[n]:.3f}x | {spread[n]:.0f}% |" for n in ARMS]
    if results["system_step_ms"] is not None:
        lines += ["", f"`system.step()` alone: {results['system_step_ms']:.2f} ms (median), "
                      f"{results['system_step_ms_amortised']:.3f} ms per training step amortised over "
                      f"{meta['block']} steps (included in (c) above)."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=8, help="timed blocks per arm (default 8)")
    p.add_argument("--block", type=int, default=50, help="training steps per block = the step() cadence (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per arm first (default 10)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: tiny matmuls, and 2 threads on a busy 2-core machine stall)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (tiny Mixtral) or cuda (a Mixtral-8x7B-shaped layer, bf16)")
    p.add_argument("--note", default="", help="a line added to the .md (e.g. what else ran on the machine)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    for name in ("blocks", "block"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be >= 1")
    if args.threads < 1:
        p.error(f"--threads={args.threads} must be >= 1")
    global DEVICE, SHAPE
    DEVICE = torch.device(args.device)
    if DEVICE.type not in SHAPES:
        p.error(f"--device={args.device!r}: expected cpu or cuda")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    SHAPE = dict(SHAPES[DEVICE.type])
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    results = run(args.blocks, args.block, args.warmup, args.seed)
    meta = {
        "transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "device": DEVICE.type, "dtype": "bf16" if DEVICE.type == "cuda" else "fp32",
        "hardware": (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda"
                     else f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"),
        "blocks": args.blocks, "block": args.block, "warmup": args.warmup, "seed": args.seed, "shape": SHAPE,
        "command": shlex.join(["python", "benchmarks/bench_hf.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": time.perf_counter() - started, "note": args.note,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"hf_overhead_{DEVICE.type}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = markdown(meta, results)
    (args.out / f"hf_overhead_{DEVICE.type}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
