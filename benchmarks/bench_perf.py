"""Issue 14, "leave it on in every run": every performance target measured side by side in one run.

    python benchmarks/bench_perf.py                          # CPU, scaled-down shapes
    python benchmarks/bench_perf.py --device cuda            # bf16, shapes A, B, C of PERF.md, T=16384
    python benchmarks/bench_perf.py --quick                  # a smoke run (tiny shapes, few repeats)
    python benchmarks/bench_perf.py --device cuda --shapes A,C --repeats 30

Per shape (two ChronoMoELayers + AdamW, same initial weights in every condition), timed interleaved (one
step of each condition in turn, `--repeats` rounds, medians):
- training step: plain, + ChronoSystem, + the aux-loss-free balancer (`balance.AuxLossFreeBalancer`): the
  overheads in % of plain, and the ratio of ChronoSystem's overhead to the balancer's;
- first-step stall of ChronoSystem (its first training step minus a plain step: the compile of the observer
  where it is compiled);
- one layer's forward+backward (input gradients included): ChronoMoELayer vs a batched-matmul SwiGLU expert
  FFN (`torch.bmm` over `[E, cap, H]` rows dispatched with the same routing, gate-weighted scatter back) vs
  transformers' `MixtralSparseMoeBlock` (experts implementation `grouped_mm` where transformers has it);
- state bytes per layer of the system's observer / (E * H * 4);
and once: graph breaks of the compiled system observer (`torch._dynamo.explain`), and the outcome
benchmark's small model (TinyMoELM: 2 MoE layers, 8 slots, top-2, d_model 64; batch 16 x 128) per step
plain / + ChronoSystem / + balancer.

Writes benchmarks/results/perf_<device>.json and .md (with the command line, device and library versions).
Timings are medians of interleaved repeats; the noise column is the spread of the plain condition measured
twice in the same rounds.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chronomoe_v3 import ChronoConfig, ChronoMoELayer, ChronoSystem
from chronomoe_v3.balance import AuxLossFreeBalancer
from chronomoe_v3.config import LifecycleConfig
from chronomoe_v3.observe.bimodality import draw_permutation
from chronomoe_v3.toy.models import TinyMoELM
from chronomoe_v3.trace import MoETrace

SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "cuda": {
        "A": dict(T=16384, H=2048, E=64, K=8, I=1024),
        "B": dict(T=16384, H=4096, E=8, K=2, I=14336),
        "C": dict(T=16384, H=2048, E=256, K=8, I=512),
    },
    "cpu": {  # the same families, scaled to a 2-core CPU
        "A": dict(T=1024, H=128, E=16, K=4, I=64),
        "B": dict(T=1024, H=256, E=8, K=2, I=512),
        "C": dict(T=1024, H=128, E=32, K=4, I=32),
    },
    "quick": {
        "A": dict(T=128, H=32, E=8, K=2, I=32),
        "B": dict(T=128, H=64, E=4, K=2, I=64),
        "C": dict(T=128, H=32, E=16, K=4, I=16),
    },
}
TARGETS = {  # issue 14: max training-step overhead of ChronoSystem, % (GPU)
    "A": 2.0, "B": 1.0, "C": 4.0,
}
SMALL = dict(vocab=65, d_model=64, n_layers=2, n_heads=4, d_ff=128, slots=8, top_k=2, batch=16, seq=128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    device: torch.device, fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median ms of each fn, timed in turn within each round (host clock around a synchronised region)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


class Stack(nn.Module):
    def __init__(self, s: dict[str, int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ChronoMoELayer(s["H"], s["I"], s["E"], s["K"], layer_id=n) for n in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def config_for(e: int) -> ChronoConfig:
    bound = max(e, ChronoConfig().lifecycle.max_experts_per_layer)
    return ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=bound))


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def observer_state_bytes(system: ChronoSystem, i: int) -> int:
    return sum(t.numel() * t.element_size() for t in system.observers[i].state_dict().values())


# ---------------------------------------------------------------------- training step
def bench_training(device: torch.device, dtype: torch.dtype, s: dict[str, int], repeats: int) -> dict[str, Any]:
    def build() -> tuple[Stack, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Stack(s).to(device, dtype)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    x = torch.randn(s["T"], s["H"], device=device, dtype=dtype)
    plain, opt_p = build()
    chrono, opt_c = build()
    balanced, opt_b = build()
    step_plain = make_step(plain, opt_p, x)
    step_chrono = make_step(chrono, opt_c, x)
    step_bal = make_step(balanced, opt_b, x)
    for _ in range(2):
        step_plain()
    sync(device)
    system = ChronoSystem(chrono, config=config_for(s["E"]))
    system.attach_optimizer(opt_c)
    AuxLossFreeBalancer(balanced, optimizer=opt_b)
    sync(device)
    t0 = time.perf_counter()
    step_chrono()
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    med = interleaved(
        device, {"plain": step_plain, "chrono": step_chrono, "auxfree": step_bal, "plain_again": step_plain}, repeats
    )
    base = min(med["plain"], med["plain_again"])
    out: dict[str, Any] = {f"step_ms_{k}": v for k, v in med.items()}
    out["chrono_overhead_pct"] = 100.0 * (med["chrono"] - base) / base
    out["auxfree_overhead_pct"] = 100.0 * (med["auxfree"] - base) / base
    out["noise_pct"] = 100.0 * abs(med["plain"] - med["plain_again"]) / base
    bal = med["auxfree"] - base
    # None where the balancer's cost is below the timer's resolution (the ratio is then meaningless)
    out["chrono_over_auxfree"] = (med["chrono"] - base) / bal if bal > 0 else None
    out["first_step_stall_s"] = max(first - base, 0.0) / 1e3
    out["compiled_observers"] = system.compile_observers
    out["state_bytes_per_layer"] = [observer_state_bytes(system, i) for i in range(len(system.layers))]
    out["state_over_EH_fp32"] = max(out["state_bytes_per_layer"]) / (s["E"] * s["H"] * 4)
    t0 = time.perf_counter()
    system.step()
    out["system_step_ms"] = (time.perf_counter() - t0) * 1e3
    system.detach()
    return out


# ---------------------------------------------------------------------- one layer, forward + backward
class BmmExperts(nn.Module):
    """The reference expert FFN: SwiGLU by `torch.bmm` over `[E, cap, H]` rows dispatched by a fixed routing
    (capacity `cap = ceil(T*K/E)`, overflow dropped), gate-weighted scatter back. Routing is computed once,
    outside the timed region."""

    def __init__(self, layer: ChronoMoELayer, x: Tensor) -> None:
        super().__init__()
        self.layer = layer
        t, k, e = x.shape[0], layer.top_k, layer.max_experts
        with torch.no_grad():
            routing = layer.route(x)
        flat = routing.topk_index.reshape(-1)
        cap = math.ceil(t * k / e)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=e)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=x.device) - starts[flat[order]]
        dest = flat[order] * cap + rank
        ok = rank < cap
        slot_of = torch.full((e * cap,), t * k, dtype=torch.long, device=x.device)
        slot_of[dest[ok]] = order[ok]
        valid = slot_of < t * k
        self.cap = cap
        self.token = torch.where(valid, slot_of // k, torch.zeros_like(slot_of))
        weight = routing.topk_weight.reshape(-1).to(x.dtype)
        self.weight = torch.where(valid, weight[slot_of.clamp_max(t * k - 1)], torch.zeros((), dtype=x.dtype,
                                                                                           device=x.device))

    def forward(self, x: Tensor) -> Tensor:
        e, h = self.layer.max_experts, x.shape[-1]
        rows = x.index_select(0, self.token).view(e, self.cap, h)
        g = torch.bmm(rows, self.layer.w_gate)
        u = torch.bmm(rows, self.layer.w_up)
        y = torch.bmm(F.silu(g) * u, self.layer.w_down).reshape(e * self.cap, h)
        return torch.zeros_like(x).index_add_(0, self.token, y * self.weight.unsqueeze(1))


def mixtral_block(s: dict[str, int], device: torch.device, dtype: torch.dtype) -> tuple[nn.Module | None, str]:
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as exc:
        return None, f"transformers unavailable ({exc})"
    for impl in ("grouped_mm", None):
        try:
            kwargs: dict[str, Any] = {} if impl is None else {"experts_implementation": impl}
            cfg = MixtralConfig(hidden_size=s["H"], intermediate_size=s["I"], num_local_experts=s["E"],
                                num_experts_per_tok=s["K"], **kwargs)
            block = MixtralSparseMoeBlock(cfg).to(device, dtype)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0.0, 0.02)
            used = getattr(cfg, "_experts_implementation", None) or "eager"
            return block, f"transformers {transformers.__version__}, experts {used}"
        except (TypeError, ValueError, KeyError) as exc:
            last = exc
    return None, f"MixtralSparseMoeBlock failed: {last}"


def bench_layer(device: torch.device, dtype: torch.dtype, s: dict[str, int], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    layer = ChronoMoELayer(s["H"], s["I"], s["E"], s["K"]).to(device, dtype)
    x = torch.randn(s["T"], s["H"], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(s["T"], s["H"], device=device, dtype=dtype)
    bmm = BmmExperts(layer, x.detach())
    block, note = mixtral_block(s, device, dtype)

    def fwd_bwd(fn: Callable[[Tensor], Tensor], inp: Tensor) -> Callable[[], None]:
        def run() -> None:
            inp.grad = None
            for p in layer.parameters():
                p.grad = None
            fn(inp).backward(grad.view_as(inp))

        return run

    fns: dict[str, Callable[[], None]] = {"chrono_layer": fwd_bwd(layer, x), "bmm_ffn": fwd_bwd(bmm, x)}
    if block is not None:
        x3 = x.detach().view(1, s["T"], s["H"]).clone().requires_grad_(True)

        def mixtral() -> None:
            x3.grad = None
            for p in block.parameters():
                p.grad = None
            block(x3).backward(grad.view_as(x3))

        fns["mixtral_block"] = mixtral
    med = interleaved(device, fns, repeats)
    out: dict[str, Any] = {f"fwd_bwd_ms_{k}": v for k, v in med.items()}
    out["layer_over_bmm"] = med["chrono_layer"] / med["bmm_ffn"]
    if "mixtral_block" in med:
        out["layer_over_mixtral"] = med["chrono_layer"] / med["mixtral_block"]
    out["mixtral_note"] = note
    return out


# ---------------------------------------------------------------------- graph breaks
def graph_breaks(device: torch.device) -> dict[str, Any]:
    """`torch._dynamo.explain` of the system's per-forward observer on a captured trace."""
    torch.manual_seed(0)
    model = TinyMoELM(40, d_model=32, n_layers=2, d_ff=64, max_experts=8, top_k=2).to(device)
    system = ChronoSystem(model, config=config_for(8), compile_observers=False)
    traces: list[MoETrace] = []
    model.moe_layers[0].add_observer(traces.append)
    model.loss(torch.randint(0, 40, (2, 16), device=device), torch.randint(0, 40, (2, 16), device=device))
    trace = traces[0]
    torch._dynamo.reset()
    explain = torch._dynamo.explain(system._observe)(0, trace, draw_permutation(trace, system.generator))
    torch._dynamo.reset()
    return {"graph_break_count": explain.graph_break_count,
            "break_reasons": [str(r.reason) for r in explain.break_reasons]}


# ---------------------------------------------------------------------- small model
def small_model_step(
    device: torch.device, arm: str, x: Tensor, p: dict[str, int] = SMALL
) -> tuple[Callable[[], None], ChronoSystem | None]:
    """One training step of the outcome benchmark's TinyMoELM on batch `x`, plain, with `ChronoSystem`
    (`arm="chrono"`, its defaults) or with the aux-loss-free balancer (`"auxfree"`); and the system, if any."""
    torch.manual_seed(0)
    model = TinyMoELM(p["vocab"], d_model=p["d_model"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                      d_ff=p["d_ff"], max_experts=p["slots"], top_k=p["top_k"], max_seq_len=p["seq"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    system = None
    if arm == "chrono":
        system = ChronoSystem(model, seed=0)
        system.attach_optimizer(opt)
    elif arm == "auxfree":
        AuxLossFreeBalancer(model, rate=1e-3, optimizer=opt)

    def step() -> None:
        if system is not None:
            system.observe_tokens(x)
        loss = model.loss(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, system


def bench_small(device: torch.device, repeats: int, quick: bool) -> dict[str, Any]:
    p = dict(SMALL)
    if quick:
        p.update(batch=2, seq=32)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the outcome benchmark runs
    try:
        x = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(0)).to(device)

        def build(arm: str) -> Callable[[], None]:
            return small_model_step(device, arm, x, p)[0]

        plain, auxfree = build("plain"), build("auxfree")
        plain()
        sync(device)
        chrono = build("chrono")
        t0 = time.perf_counter()
        chrono()
        sync(device)
        first = time.perf_counter() - t0
        med = interleaved(device, {"plain": plain, "chrono": chrono, "auxfree": auxfree, "plain_again": plain},
                          repeats)
    finally:
        torch.set_num_threads(threads)
    base = min(med["plain"], med["plain_again"])
    return {
        "protocol": p,
        **{f"step_ms_{k}": v for k, v in med.items()},
        "chrono_overhead_pct": 100.0 * (med["chrono"] - base) / base,
        "auxfree_overhead_pct": 100.0 * (med["auxfree"] - base) / base,
        "noise_pct": 100.0 * abs(med["plain"] - med["plain_again"]) / base,
        "first_step_stall_s": max(first - base / 1e3, 0.0),
    }


# ---------------------------------------------------------------------- report
def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        f"# Issue 14: performance of leaving ChronoSystem on ({meta['device_type']})",
        "",
        f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}, "
        f"Python {meta['python']}. Command: `{meta['command']}`. Medians of {meta['repeats']} interleaved rounds.",
        "",
        "## Training step (two layers + AdamW)",
        "",
        "| shape | T, H, E, k, I | plain | +ChronoSystem | +aux-free | system overhead | aux-free overhead | "
        "system / aux-free | noise | first-step stall | state / (E H fp32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["shapes"].items():
        s, t = r["shape"], r["training"]
        ratio = "-" if t["chrono_over_auxfree"] is None else f"{t['chrono_over_auxfree']:.1f}x"
        lines.append(
            f"| {name} | {s['T']}, {s['H']}, {s['E']}, {s['K']}, {s['I']} | {t['step_ms_plain']:.2f} ms | "
            f"{t['step_ms_chrono']:.2f} ms | {t['step_ms_auxfree']:.2f} ms | {t['chrono_overhead_pct']:+.1f}% | "
            f"{t['auxfree_overhead_pct']:+.1f}% | {ratio} | {t['noise_pct']:.1f}% | "
            f"{t['first_step_stall_s']:.2f} s | {t['state_over_EH_fp32']:.2f} |"
        )
    lines += [
        "",
        "## One layer forward + backward (input gradients included)",
        "",
        "| shape | ChronoMoELayer | bmm expert FFN | Mixtral block | layer / bmm | layer / Mixtral |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["shapes"].items():
        lay = r["layer"]
        mix = lay.get("fwd_bwd_ms_mixtral_block")
        mix_ms = "-" if mix is None else f"{mix:.2f} ms"
        mix_ratio = "-" if mix is None else f"{lay['layer_over_mixtral']:.2f}x"
        lines.append(
            f"| {name} | {lay['fwd_bwd_ms_chrono_layer']:.2f} ms | {lay['fwd_bwd_ms_bmm_ffn']:.2f} ms | "
            f"{mix_ms} | {lay['layer_over_bmm']:.2f}x | {mix_ratio} |"
        )
    notes = sorted({r["layer"]["mixtral_note"] for r in results["shapes"].values()})
    lines += ["", f"Mixtral block: {'; '.join(notes)}.", ""]
    small = results["small"]
    lines += [
        "## Small model (outcome benchmark's TinyMoELM)",
        "",
        f"Protocol {small['protocol']}.",
        "",
        "| plain | +ChronoSystem | +aux-free | system overhead | aux-free overhead | noise | first-step stall |",
        "|---|---|---|---|---|---|---|",
        f"| {small['step_ms_plain']:.2f} ms | {small['step_ms_chrono']:.2f} ms | {small['step_ms_auxfree']:.2f} ms | "
        f"{small['chrono_overhead_pct']:+.1f}% | {small['auxfree_overhead_pct']:+.1f}% | {small['noise_pct']:.1f}% | "
        f"{small['first_step_stall_s']:.2f} s |",
        "",
        f"Graph breaks in the compiled system observer (`torch._dynamo.explain`): "
        f"{results['graph_breaks']['graph_break_count']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="A,B,C", help="comma-separated subset of A,B,C")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 20; --quick 3)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    # Cold compile caches: the first-step stalls are what a fresh machine pays, not a cache hit of an earlier run.
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ[var] = tempfile.mkdtemp(prefix=f"bench_perf_{var.split('_')[0].lower()}_")
        atexit.register(shutil.rmtree, os.environ[var], True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = SHAPES["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown shapes {unknown}: expected a subset of {sorted(table)}")
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = "absent"
    meta = {
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "benchmarks/bench_perf.py", *(sys.argv[1:] if argv is None else argv)]),
        "targets_gpu_overhead_pct": TARGETS,
        "compile_caches": "cold (fresh inductor and triton cache directories for this run)",
    }
    results: dict[str, Any] = {"shapes": {}}
    for name in names:
        s = table[name]
        print(f"shape {name} {s}", flush=True)
        training = bench_training(device, dtype, s, repeats)
        layer = bench_layer(device, dtype, s, repeats)
        results["shapes"][name] = {"shape": s, "training": training, "layer": layer}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["graph_breaks"] = graph_breaks(device)
    results["small"] = bench_small(device, repeats, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (args.out / f"perf_{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    md = markdown(meta, results)
    (args.out / f"perf_{tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
