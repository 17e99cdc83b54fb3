"""Cost of the observe path (sufficient statistics + three clocks) against the MoE layer's expert
forward+backward, and against a straightforward per-expert Python-loop implementation of the same update,
measured side by side in one run.

    python benchmarks/bench_observe.py              # CPU, scaled-down shapes
    python benchmarks/bench_observe.py --device cuda  # the PERF.md shapes, bf16, plus a sync check

Writes benchmarks/results/observe_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from chronomoe_v3 import ChronoConfig, CoherenceState, MoETrace, compute_expert_stats
from chronomoe_v3.grouped import grouped_mm

GPU_SHAPES = {
    "A (E=64,k=8,H=2048,I=1024)": dict(T=16384, H=2048, E=64, K=8, I=1024),
    "B (E=8,k=2,H=4096,I=14336)": dict(T=16384, H=4096, E=8, K=2, I=14336),
    "C (E=256,k=8,H=2048,I=512)": dict(T=16384, H=2048, E=256, K=8, I=512),
}
CPU_SHAPES = {
    "A/16 (E=64,k=8,H=256,I=128)": dict(T=1024, H=256, E=64, K=8, I=128),
    "B/16 (E=8,k=2,H=512,I=1792)": dict(T=1024, H=512, E=8, K=2, I=1792),
    "C/16 (E=256,k=8,H=256,I=64)": dict(T=1024, H=256, E=256, K=8, I=64),
}


def timer(device: torch.device, fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def balanced_routing(t: int, e: int, k: int, device: torch.device) -> torch.Tensor:
    """Each token picks k distinct experts; loads balanced (as in PERF.md's balanced FFN timing)."""
    base = torch.arange(t, device=device).unsqueeze(1) * k + torch.arange(k, device=device)
    perm = torch.randperm(e, device=device)
    return perm[base % e]


def loop_observe(trace: MoETrace, value: torch.Tensor, decay: torch.Tensor, alphas: torch.Tensor) -> None:
    """The upstream-style update: per-expert gathers and means, a Python-loop cosine, then a device EMA."""
    idx, w, y = trace.topk_index, trace.topk_weight, trace.expert_out
    e_count = trace.num_experts
    mixture = (y.float() * w.float().unsqueeze(-1)).sum(1).sum(0)
    n = trace.num_tokens
    phis = []
    for e in range(e_count):
        sel = idx == e
        rows = y[sel].float()
        if rows.shape[0] == 0:
            phis.append(float("nan"))
            continue
        ybar = rows.mean(0)
        g = (rows * w[sel].float().unsqueeze(1)).sum(0)
        ref = (mixture - g) / n
        phis.append(float(torch.dot(ybar, ref) / (ybar.norm() * ref.norm() + 1e-30)))
    phi = torch.tensor(phis, device=value.device)
    measured = torch.isfinite(phi)
    a = alphas.view(-1, 1)
    value.copy_(torch.where(measured, a * value + (1 - a) * torch.nan_to_num(phi), value))
    decay.copy_(torch.where(measured, decay * a, decay))


def run_shape(
    name: str, shape: dict[str, int], device: torch.device, dtype: torch.dtype, repeats: int, compiled: bool = False
) -> dict:
    t, h, e, k, i = (shape[x] for x in ("T", "H", "E", "K", "I"))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    idx = balanced_routing(t, e, k, device)
    w = torch.softmax(torch.randn(t, k, device=device), -1)
    w_gate = (torch.randn(e, h, i, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    w_up = (torch.randn(e, h, i, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    w_down = (torch.randn(e, i, h, generator=g) / i**0.5).to(device, dtype).requires_grad_()
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    rows = x.index_select(0, order // k).requires_grad_()

    def ffn_fwd_bwd() -> torch.Tensor:
        out = grouped_mm(F.silu(grouped_mm(rows, w_gate, offsets)) * grouped_mm(rows, w_up, offsets), w_down, offsets)
        out.backward(torch.ones_like(out))
        return out

    out_sorted = ffn_fwd_bwd().detach()
    expert_out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted).view(t, k, h)
    trace = MoETrace(topk_index=idx, topk_weight=w, expert_out=expert_out, num_experts=e)
    state = CoherenceState(e, h, ChronoConfig(), device=device)

    def observe_eager() -> None:
        state.observe(compute_expert_stats(trace))

    observe: Callable[[], None] = torch.compile(observe_eager) if compiled else observe_eager

    value = torch.zeros(3, e, device=device)
    decay = torch.ones(3, e, device=device)
    alphas = torch.tensor([0.9, 0.99, 0.999], device=device)

    def loop() -> None:
        loop_observe(trace, value, decay, alphas)

    ms_ffn = timer(device, ffn_fwd_bwd, max(3, repeats // 4))
    ms_obs = timer(device, observe, repeats)
    ms_loop = timer(device, loop, max(3, repeats // 4))

    # In training the observe kernels are enqueued inside the forward while the GPU is still busy with the
    # expert FFN, so their host-side launch cost overlaps device work: the marginal cost of a step with
    # observation over a step without it is what a user pays. (On the CPU nothing overlaps.)
    def ffn_step(obs: Callable[[], None] | None) -> Callable[[], None]:
        def run() -> None:
            out = grouped_mm(F.silu(grouped_mm(rows, w_gate, offsets)) * grouped_mm(rows, w_up, offsets), w_down,
                             offsets)
            if obs is not None:
                obs()
            out.backward(torch.ones_like(out))
        return run

    reps = max(5, repeats // 2)
    ms_step_plain = timer(device, ffn_step(None), reps)
    ms_step_obs = timer(device, ffn_step(observe), reps)
    ms_step_plain2 = timer(device, ffn_step(None), reps)  # repeat: the spread of identical runs is the noise
    ms_step_loop = timer(device, ffn_step(loop), max(3, repeats // 4))
    base = min(ms_step_plain, ms_step_plain2)
    marginal_obs = max(ms_step_obs - base, 0.0)
    marginal_loop = max(ms_step_loop - base, 0.0)
    ms_graph = float("nan")
    syncs = "not checked (CPU)"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            observe()
            syncs = "0 (set_sync_debug_mode('error') raised nothing)"
        except RuntimeError:
            syncs = "SYNC at " + _where()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        try:  # device time of the observe kernels alone, without Python launch overhead
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    observe()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                observe()
            ms_graph = timer(device, graph.replay, repeats)
        except RuntimeError as exc:
            print(f"  CUDA graph capture of observe failed: {exc}")
    state_bytes = sum(b.numel() * b.element_size() for b in state.buffers())
    return {
        "shape": name,
        **shape,
        "dtype": str(dtype).replace("torch.", ""),
        "ffn_fwd_bwd_ms": ms_ffn,
        "observe_ms": ms_obs,
        "loop_observe_ms": ms_loop,
        "observe_pct_of_ffn": 100.0 * ms_obs / ms_ffn,
        "observe_device_ms_cuda_graph": ms_graph,
        "observe_device_pct_of_ffn": 100.0 * ms_graph / ms_ffn,
        "step_ms_without_observe": base,
        "step_ms_with_observe": ms_step_obs,
        "step_ms_with_loop_observe": ms_step_loop,
        "step_noise_ms": abs(ms_step_plain - ms_step_plain2),
        "marginal_observe_ms": marginal_obs,
        "marginal_observe_pct": 100.0 * marginal_obs / base,
        "marginal_loop_ms": marginal_loop,
        "marginal_loop_pct": 100.0 * marginal_loop / base,
        "loop_pct_of_ffn": 100.0 * ms_loop / ms_ffn,
        "speedup_vs_loop": ms_loop / ms_obs,
        "host_syncs_per_step": syncs,
        "state_bytes": state_bytes,
        "state_bytes_over_E_H_fp32": state_bytes / (4 * e * h),
    }


def _where() -> str:
    """The innermost frames of the current exception that belong to this project."""
    frames = [f for f in traceback.extract_tb(sys.exc_info()[2]) if "chronomoe_v3" in f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in reversed(frames[-3:])) or "?"


def check_training_step_syncs(device: torch.device) -> str:
    """A full training step of a ChronoMoELayer with coherence observers under sync-debug 'error'."""
    from chronomoe_v3 import ChronoMoELayer, attach_coherence

    layer = ChronoMoELayer(1024, 512, 16, 2, device=device, dtype=torch.bfloat16)
    attach_coherence(layer, CoherenceState(16, 1024, device=device))
    x = torch.randn(4096, 1024, device=device, dtype=torch.bfloat16)
    layer(x).float().square().mean().backward()  # warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().mean().backward()
        return "0 host syncs in forward + observe + backward"
    except RuntimeError:
        return "SYNC at " + _where()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--compile", action="store_true", help="torch.compile the observe path (fuses small kernels)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    rows = []
    for name, shape in shapes.items():
        print(f"timing {name} ...", flush=True)
        rows.append(run_shape(name, shape, device, dtype, args.repeats, args.compile))
    meta = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "training_step_sync_check": check_training_step_syncs(device) if cuda else "not checked (CPU)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("cuda" if cuda else "cpu") + ("_compiled" if args.compile else "")
    (args.out / f"observe_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Observe-path cost ({tag})",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; dtype {rows[0]['dtype']}; median of repeats.",
        f"Command: `python benchmarks/bench_observe.py --device {args.device}{' --compile' if args.compile else ''}`",
        "",
        "Isolated: each path timed alone (on a GPU the observe path is then bound by Python launch overhead).",
        "Marginal: a training step (FFN fwd, observe, FFN bwd) with observation minus the same step without it.",
        "Device: the observe kernels replayed from a CUDA graph (pure GPU time).",
        "",
        "| shape | FFN fwd+bwd ms | observe isolated ms (%) | observe device ms (%) | observe marginal ms (%) "
        "| loop isolated ms (%) | loop marginal ms (%) | speed-up isolated | host syncs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['ffn_fwd_bwd_ms']:.3f} | {r['observe_ms']:.3f} ({r['observe_pct_of_ffn']:.2f}%) | "
            f"{r['observe_device_ms_cuda_graph']:.3f} ({r['observe_device_pct_of_ffn']:.2f}%) | "
            f"{r['marginal_observe_ms']:.3f} ({r['marginal_observe_pct']:.2f}%, noise {r['step_noise_ms']:.3f}) | "
            f"{r['loop_observe_ms']:.3f} ({r['loop_pct_of_ffn']:.1f}%) | "
            f"{r['marginal_loop_ms']:.3f} ({r['marginal_loop_pct']:.1f}%) | {r['speedup_vs_loop']:.1f}x | "
            f"{r['host_syncs_per_step']} |"
        )
    lines += ["", f"Training-step sync check: {meta['training_step_sync_check']}", "",
              "State memory per layer (CoherenceState) in units of E*H fp32: "
              + ", ".join(f"{r['shape'].split()[0]}: {r['state_bytes_over_E_H_fp32']:.2f}" for r in rows)]
    (args.out / f"observe_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
