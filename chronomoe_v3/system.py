"""ChronoSystem: the one place that knows hooks, statistics, clocks, beta, bimodality, objective and edits.

Per observed training forward of each managed MoE layer (an observer on the layer; tensor ops only, no host
synchronisation): sufficient statistics -> coherence clocks (relevance-modulated when a slow bias routes)
-> bimodality detector (sampled outputs; each role's predicted coherence as a split child against the same
reference; each role's mean router input, the anchors of a split's router rows) -> device token
counts (telemetry) -> co-activation accumulator -> starvation EMA (slow retention) -> last-fired step.

`step()` is the host side: one transfer of the token counts builds a `SystemSnapshot` (persistent alerts)
for the mid clock (a controller: `update(snapshot, lenses) -> list`, duck-typed, or none); every
`lifecycle_eval_interval` calls the slow clock runs (beta update, promotions of cooled experts, basin
records, a review of every layer), and in between a review of emergency layers only (a degrading expert or
a COLLAPSE_CONFIRMED alert) may execute additive edits early (`lifecycle.py`).

Counting rules:
- Eval forwards are not observed (the layers call observers only in training mode).
- Gradient checkpointing: a forward re-run inside the backward pass (both reentrant and non-reentrant
  checkpointing recompute there) is not observed; the original forward is (reentrant checkpointing runs it
  under `no_grad`, which is still a training forward). Consequently a training-mode forward under
  `torch.no_grad()` outside backward *is* observed: use `model.eval()` for evaluation.
- The step of the system (registry births, cooldowns, the decision log) is the number of observed forwards
  of the most observed layer.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .adapters import LayerBanks, banks_for
from .balance import reset_expert_bias
from .bias import SlowBias
from .clocks import ema_debiased, ema_update
from .config import ChronoConfig
from .lifecycle.cycle import LayerParts, LifecycleAction, apply_edit, decision_record, expert_readings, review
from .lifecycle.decisions import DecisionLog, DecisionRecord
from .lifecycle.objective import LayerDecision, ObjectiveParams
from .observe.bimodality import BimodalityState, sample_expert_outputs
from .observe.coherence import CoherenceState
from .observe.stats import coherence_reference, compute_expert_stats, starvation_fraction
from .observe.tokens import TokenBasins
from .ops import ExpertRegistry, OptimizerSurgery
from .ops.surgery import _Pending
from .runlog import BASIN_TOP_TOKENS, DECISIONS_FILE, RunLog, finite_or_none, layer_metrics, reading_record
from .telemetry import COLLAPSE_CONFIRMED, AlertHistory, RoutingEvent, SystemSnapshot, TokenCounter
from .trace import MoETrace
from .version import __version__
from .view import LayerView

STATE_FORMAT = 1
LIFECYCLE_DECISIONS_FILE = DECISIONS_FILE
# Token-basin counts are multiplied by this at every step() call, so recent routing dominates the basins.
BASIN_DECAY = 0.9


@dataclass
class StepResult:
    """What one `step()` did: the mid clock's decisions, the slow clock's executed edits, per-layer
    readings (`{layer: {phi_fast, phi_mid, phi_slow, share_slow, beta, bimodality, active}}`, CPU tensors),
    and `metrics`, a flat `{name: float}` dict any logger takes as it is (names in docs/run_report.md)."""

    control_decisions: list[Any]
    lifecycle_actions: list[LifecycleAction]
    coherence_state: dict[int, dict[str, Tensor]]
    snapshot: SystemSnapshot | None = None
    layer_decisions: list[LayerDecision] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class _LayerState(nn.Module):
    """Per-layer state the system owns besides the layer's own slow bias (fp32 device buffers)."""

    coactivation: Tensor
    coactivation_tokens: Tensor
    last_fired: Tensor
    starvation_value: Tensor
    starvation_decay: Tensor
    alpha_slow: Tensor

    def __init__(self, num_experts: int, hidden_size: int, config: ChronoConfig, device: torch.device) -> None:
        super().__init__()
        self.coherence = CoherenceState(num_experts, hidden_size, config, device=device)
        self.bimodality = BimodalityState(num_experts, hidden_size, config, device=device)
        e = num_experts
        self.register_buffer("coactivation", torch.zeros(e, e, device=device))
        self.register_buffer("coactivation_tokens", torch.zeros((), device=device))
        self.register_buffer("last_fired", torch.zeros(e, dtype=torch.int64, device=device))
        self.register_buffer("starvation_value", torch.zeros(1, 1, device=device))
        self.register_buffer("starvation_decay", torch.ones(1, 1, device=device))
        self.register_buffer("alpha_slow", torch.tensor([config.alpha_slow], device=device), persistent=False)

    @property
    def starvation(self) -> Tensor:
        """Debiased slow EMA of the starvation fraction (NaN before the first observation)."""
        return ema_debiased(self.starvation_value, self.starvation_decay).view(())


def _find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module, LayerBanks]]:
    found = []
    for name, module in model.named_modules():
        if not (hasattr(module, "add_observer") and isinstance(getattr(module, "active_mask", None), Tensor)):
            continue
        try:
            banks = banks_for(module)
        except ValueError:
            continue
        found.append((name, module, banks))
    return found


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards)."""
    return bool(torch._C._current_graph_task_id() != -1)


class ChronoSystem:
    """Attach chronomoe-v3 to a model: observers on its MoE layers, the three clocks, lifecycle edits.

    `controller`: the mid clock, any object with `update(snapshot, lenses) -> list` (e.g.
    `governance.Controller`), or None. `run_id` names the run in logs (default: a random id, saved in the
    state). `output_dir`: where the lifecycle decision log `<output_dir>/<run_id>/lifecycle_decisions.jsonl`
    is appended (no file without it; records are always kept in `decision_log.records`).
    `compile_observers` runs the per-forward observer through `torch.compile` (default: on CUDA only, where
    the eager observer is bound by kernel-launch overhead; see benchmarks/results/system_cuda.md).
    """

    def __init__(
        self,
        model: nn.Module,
        controller: Any = None,
        config: ChronoConfig | None = None,
        run_id: str | None = None,
        output_dir: str | Path | None = None,
        *,
        objective_params: ObjectiveParams | None = None,
        seed: int = 0,
        compile_observers: bool | None = None,
    ) -> None:
        self.config = config if config is not None else ChronoConfig()
        if not isinstance(self.config, ChronoConfig):
            raise ValueError(f"config is a {type(self.config).__name__}; expected a ChronoConfig")
        if controller is not None and not callable(getattr(controller, "update", None)):
            raise ValueError(
                f"controller {type(controller).__name__} has no update(snapshot, lenses) method; expected a "
                "Controller-like object or None"
            )
        found = _find_moe_layers(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no MoE layer: expected at least one ChronoMoELayer (or a module "
                "with add_observer/active_mask whose class is registered with register_bank_factory)"
            )
        self.model = model
        self.controller = controller
        self.params = objective_params if objective_params is not None else ObjectiveParams()
        self.run_id = run_id if run_id is not None else f"run-{uuid.uuid4().hex[:12]}"
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.layer_names = [name for name, _, _ in found]
        self.layers: list[nn.Module] = [m for _, m, _ in found]
        self.banks: list[LayerBanks] = [b for _, _, b in found]
        self.top_k = [int(getattr(m, "top_k", 1)) for m in self.layers]
        device = self.banks[0].active_mask.device
        self.device = device
        self.states: list[_LayerState] = []
        self.biases: list[SlowBias | None] = []
        for layer, banks in zip(self.layers, self.banks, strict=True):
            e = banks.num_slots
            hidden = int(getattr(layer, "d_model", banks.router.param_slots()[0].param.shape[-1]))
            self.states.append(_LayerState(e, hidden, self.config, banks.active_mask.device))
            bias = getattr(layer, "slow_bias", None)
            attach = getattr(layer, "attach_slow_bias", None)
            if bias is None and callable(attach):
                bias = attach(self.config)
            self.biases.append(bias if isinstance(bias, SlowBias) else None)
        self.registry = ExpertRegistry([b.active_mask.detach().cpu() for b in self.banks], self.config)
        self.num_slots = max(b.num_slots for b in self.banks)
        self.counter = TokenCounter(len(self.layers), self.num_slots, device=device)
        self.alert_history = AlertHistory()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # On CUDA the observers' many small kernels are launch-bound in eager mode: torch.compile fuses them.
        self.compile_observers = device.type == "cuda" if compile_observers is None else bool(compile_observers)
        self._observe_compiled = torch.compile(self._observe) if self.compile_observers else self._observe
        if self.compile_observers:
            # One code object serves every layer and is specialised per layer index: make room for all of them
            # (torch's default limit of 8 would send layers past the 8th back to eager mode).
            import torch._dynamo.config as dynamo_config

            limit = getattr(dynamo_config, "recompile_limit", 8)
            dynamo_config.recompile_limit = max(limit, 2 * len(found) + 8)
        self.layer_steps = [0] * len(self.layers)
        self.step_calls = 0
        self.last_edit_step: list[int | None] = [None] * len(self.layers)
        self.decision_log = DecisionLog(self._log_path())
        self.runlog: RunLog | None = None
        if self.output_dir is not None:
            self.runlog = RunLog(self.output_dir, self.run_id, self._manifest_metadata())
        self.token_basins: TokenBasins | None = None
        self.vocabulary: list[str] | None = None
        self._token_ids: Tensor | None = None
        self._token_generation = 0
        self._token_used = [0] * len(self.layers)
        self.surgery: OptimizerSurgery | None = None
        self._pending_surgery: list[tuple[int, int, int, int]] | None = None
        self._handles: list[RemovableHandle] = [
            layer.add_observer(self._make_observer(i)) for i, layer in enumerate(self.layers)  # type: ignore[operator]
        ]

    def _log_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / self.run_id / LIFECYCLE_DECISIONS_FILE

    def _manifest_metadata(self) -> dict[str, Any]:
        layers = [
            {"layer_id": i, "name": name, "num_slots": banks.num_slots, "top_k": self.top_k[i],
             "hidden_size": st.coherence.hidden_size}
            for i, (name, banks, st) in enumerate(zip(self.layer_names, self.banks, self.states, strict=True))
        ]
        return {"library": "chronomoe-v3", "version": __version__, "model": type(self.model).__name__,
                "config": self.config.to_dict(), "layers": layers}

    # ------------------------------------------------------------------ token basins (optional)
    def observe_tokens(self, token_ids: Tensor) -> None:
        """Hand the system the token ids of the batch about to be forwarded (`[B, S]` or `[T]`, in the order
        the MoE layers see their tokens); each layer's next observed forward with as many tokens counts, per
        expert, the ids routed to it (`token_basins`, bounded at `ChronoConfig.basin_vocab_limit` ids). The
        run report shows each expert's most attracted tokens. Optional; no host sync."""
        if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(f"token_ids is {type(token_ids).__name__} "
                             f"{getattr(token_ids, 'dtype', '')}; expected an integer tensor")
        if self.token_basins is None:
            self.token_basins = TokenBasins(
                len(self.layers), self.num_slots, self.config.basin_vocab_limit, device=self.device
            )
        self._token_ids = token_ids.detach().reshape(-1)
        self._token_generation += 1

    def set_vocabulary(self, vocabulary: Sequence[str]) -> None:
        """Strings of the token ids (index = id), so that the run report can print tokens, not ids."""
        words = list(vocabulary)
        if not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary must be a sequence of strings (index = token id)")
        self.vocabulary = words

    def _count_tokens(self, i: int, trace: MoETrace) -> None:
        ids = self._token_ids
        if ids is None or self.token_basins is None or self._token_used[i] == self._token_generation:
            return
        if ids.shape[0] != trace.num_tokens:
            return  # this forward is not the batch the ids describe
        self._token_used[i] = self._token_generation
        self.token_basins.add(i, ids.to(trace.topk_index.device), trace.topk_index, trace.kept_slots())

    # ------------------------------------------------------------------ fast clock (per forward, no host sync)
    def _make_observer(self, i: int) -> Any:
        observe = self._observe_compiled if self.compile_observers else self._observe

        def _observe(trace: MoETrace) -> None:
            if _in_backward():
                return
            observe(i, trace)
            self._count_tokens(i, trace)
            self.layer_steps[i] += 1  # Python bookkeeping stays outside the (possibly compiled) observer

        return _observe

    @torch.no_grad()
    def _observe(self, i: int, trace: MoETrace) -> None:
        st, mask = self.states[i], self.banks[i].active_mask
        stats = compute_expert_stats(trace)
        relevance = trace.bridge.relevance if trace.bridge is not None else None
        st.coherence.observe(stats, mask, relevance)
        samples, valid, inputs, gate = sample_expert_outputs(trace, generator=self.generator, details=True)
        reference = coherence_reference(stats, self.config.coherence_estimator)
        usable = trace.router_input is not None and inputs.shape[-1] == st.bimodality.router_size
        load = stats.counts / stats.num_tokens.clamp_min(1.0)
        st.bimodality.update(
            samples, valid, mask, reference=reference, router_input=inputs if usable else None, gate=gate, load=load
        )
        counts = stats.counts
        if counts.shape[0] < self.num_slots:
            counts = torch.cat([counts, counts.new_zeros(self.num_slots - counts.shape[0])])
        self.counter.add(i, counts)
        self._accumulate_coactivation(st, trace, mask)
        if trace.router_logits_clean is not None:
            starved = starvation_fraction(
                trace.router_logits_clean, mask, self.top_k[i], trace.token_mask, self.params.starvation_confidence
            )
            value, decay = ema_update(
                st.starvation_value, st.starvation_decay, starved.view(1), torch.ones(1, dtype=torch.bool,
                                                                                      device=starved.device),
                st.alpha_slow,
            )
            st.starvation_value.copy_(value)
            st.starvation_decay.copy_(decay)
        # coherence.step was advanced by observe: the step index of this forward is step - 1
        st.last_fired.copy_(torch.where(stats.counts > 0, st.coherence.step - 1, st.last_fired))

    @staticmethod
    def _accumulate_coactivation(st: _LayerState, trace: MoETrace, mask: Tensor) -> None:
        """Co-routing from the clean router (any top-k): for each real token and each expert e among its clean
        top-2, row e adds the router's interchangeability of every active f, `min(1, p_f / p_e)`
        (`C_ee += 1`). `C_ef / C_ee` is then how nearly the router would give e's tokens to f: ~1 for a
        duplicate, ~0 for a distinct expert behind a confident router, however often it is the runner-up
        (a co-selection count cannot tell these apart). Without clean logits: co-selection of the top-k."""
        e = trace.num_experts
        t = trace.topk_index.shape[0]
        if trace.router_logits_clean is None:
            index, keep = trace.topk_index.to(torch.long), trace.kept_slots()
            target = torch.where(keep, index, torch.full_like(index, e))
            onehot = torch.zeros(t, e + 1, device=index.device).scatter_(1, target, 1.0)[:, :e]
            st.coactivation.add_(onehot.T @ onehot)
        else:
            logp = torch.log_softmax(trace.router_logits_clean.float().masked_fill(~mask, float("-inf")), dim=-1)
            index = logp.topk(min(2, e), dim=-1).indices  # [T, 2]
            keep = mask[index]
            if trace.token_mask is not None:
                keep = keep & trace.token_mask.unsqueeze(1)
            own = logp.gather(1, index)  # [T, 2]
            ratio = torch.exp((logp.unsqueeze(1) - own.unsqueeze(-1)).clamp_max(0.0)).nan_to_num(0.0)  # [T, 2, E]
            ratio = ratio * keep.unsqueeze(-1)
            st.coactivation.index_add_(0, index.reshape(-1), ratio.reshape(-1, e))
        if trace.token_mask is not None:
            st.coactivation_tokens.add_(trace.token_mask.float().sum().to(st.coactivation_tokens.device))
        else:
            st.coactivation_tokens.add_(float(t))

    # ------------------------------------------------------------------ host side
    @property
    def global_step(self) -> int:
        """Observed forwards of the most observed layer."""
        return max(self.layer_steps)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> OptimizerSurgery:
        """Keep `optimizer`'s state in step with edits (fresh moments for new slots, masked slots held at 0).
        Masked slots are zeroed now (see `ops.optimizer`)."""
        if self.surgery is not None:
            self.surgery.remove()
        self.surgery = OptimizerSurgery(optimizer, self.banks)
        if self._pending_surgery is not None:
            self._restore_pending(self._pending_surgery)
            self._pending_surgery = None
        return self.surgery

    def detach(self) -> None:
        """Remove every observer and optimiser hook. (A slow bias the system attached stays on its layer.)"""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.surgery is not None:
            self.surgery.remove()
            self.surgery = None

    def _snapshot(self) -> tuple[SystemSnapshot, list[RoutingEvent]]:
        masks = torch.zeros(len(self.layers), self.num_slots, dtype=torch.bool, device=self.device)
        for i, banks in enumerate(self.banks):
            masks[i, : banks.num_slots] = banks.active_mask.to(self.device)
        top_k = min(self.top_k)
        events = self.counter.to_events(self.run_id, self.global_step, "TRAIN", top_k, active_masks=masks)
        snapshot = SystemSnapshot.from_events(
            events, self.global_step, None, None, self.run_id, type(self.model).__name__, len(self.layers),
            self.alert_history,
        )
        return snapshot, events

    def readings(self) -> dict[int, dict[str, Tensor]]:
        out: dict[int, dict[str, Tensor]] = {}
        for i, st in enumerate(self.states):
            clocks = st.coherence.phi_clocks.detach().cpu()
            bias = self.biases[i]
            out[i] = {
                "phi_fast": clocks[0], "phi_mid": clocks[1], "phi_slow": clocks[2],
                "share_slow": st.coherence.share_clocks[2].detach().cpu(),
                "beta": bias.beta.detach().cpu().clone() if bias is not None else torch.zeros(clocks.shape[1]),
                "bimodality": st.bimodality.bimodality.detach().cpu(),
                "active": self.banks[i].active_mask.detach().cpu().clone(),
            }
        return out

    def layer_view(self, i: int) -> LayerView:
        """What the slow objective reads for layer i (on the host)."""
        st = self.states[i]
        e = self.banks[i].num_slots
        cooling = torch.tensor([self.registry.slot_state(i, s) == "cooling" for s in range(e)], dtype=torch.bool)
        tokens = float(st.coactivation_tokens)
        coact = (st.coactivation / max(tokens, 1.0)).detach().cpu()
        starvation = float(st.starvation)
        fired = (st.coherence.step - st.last_fired) <= self.config.basin_window_size
        return LayerView(
            layer_id=i,
            active=self.banks[i].active_mask.detach().cpu().clone(),
            cooling=cooling,
            phi_slow=st.coherence.phi_slow.detach().cpu(),
            share_slow=st.coherence.share_clocks[2].detach().cpu(),
            fired=fired.detach().cpu(),
            role=st.coherence.role_vectors.detach().cpu(),
            bimodality=st.bimodality.bimodality.detach().cpu(),
            coactivation=coact,
            starvation=0.0 if math.isnan(starvation) else min(max(starvation, 0.0), 1.0),
            observations=st.coherence.observations.detach().cpu(),
            centroid_phi=st.bimodality.centroid_phi.detach().cpu(),
            centroid_weights=st.bimodality.centroid_weights.detach().cpu(),
        ).to_host()

    def emergency_flags(self, snapshot: SystemSnapshot | None) -> dict[int, str]:
        """Layers with an emergency and why: degrading experts (`CoherenceState.degrading`) or COLLAPSE_CONFIRMED."""
        alerts = set()
        if snapshot is not None:
            alerts = {int(a.layer_id) for a in snapshot.alerts if a.kind == COLLAPSE_CONFIRMED}
        out: dict[int, str] = {}
        for i, st in enumerate(self.states):
            why = []
            degrading = st.coherence.degrading(self.banks[i].active_mask).detach().cpu()
            if bool(degrading.any()):
                why.append(f"degrading experts {degrading.nonzero().flatten().tolist()}")
            if i in alerts:
                why.append("COLLAPSE_CONFIRMED alert")
            if why:
                out[i] = " and ".join(why)
        return out

    def step(
        self, snapshot: SystemSnapshot | None = None, lenses: Any = None, loss: float | None = None
    ) -> StepResult:
        """Run the mid clock, and the slow clock when due (or an emergency review); see the module docstring.
        `loss` (e.g. the evaluation loss) is recorded in the run directory's readings."""
        if self.global_step == 0:
            raise RuntimeError(
                "ChronoSystem.step() was called before any observed training forward: run at least one forward "
                "of the model in training mode (model.train()) first"
            )
        if loss is not None and not (isinstance(loss, (int, float)) and not isinstance(loss, bool)):
            raise ValueError(f"loss={loss!r} is invalid: expected a number or None")
        events: list[RoutingEvent] = []
        if snapshot is None:
            snapshot, events = self._snapshot()
        window_masks = [b.active_mask.detach().cpu().clone() for b in self.banks]
        control = list(self.controller.update(snapshot, lenses)) if self.controller is not None else []
        self.step_calls += 1
        review_due = self.step_calls % self.config.lifecycle_eval_interval == 0
        step = self.global_step
        if review_due:
            for i, st in enumerate(self.states):
                bias = self.biases[i]
                if bias is not None:
                    bias.update(st.coherence.phi_slow, self.banks[i].active_mask)
            self.registry.advance(step)
        emergency = self.emergency_flags(snapshot)
        actions: list[LifecycleAction] = []
        decisions: list[LayerDecision] = []
        if review_due or emergency:
            actions, decisions = self._review(step, review_due, emergency)
        if review_due:
            for i, st in enumerate(self.states):
                share = torch.nan_to_num(st.coherence.share_clocks[2], nan=0.0).clamp_min(0.0)
                self.registry.record_basin(i, share, st.coherence.phi_slow)
                st.coactivation.zero_()
                st.coactivation_tokens.zero_()
        readings = self.readings()
        layers = [self._layer_record(i, readings[i], snapshot, window_masks[i]) for i in range(len(self.layers))]
        metrics: dict[str, float] = {"chronomoe/step": float(step), "chronomoe/edits": float(len(actions))}
        for layer in layers:
            metrics.update(layer_metrics(layer))
        if self.token_basins is not None:
            self.token_basins.decay(BASIN_DECAY)
        if self.runlog is not None:
            record = reading_record(step, self.step_calls, None if loss is None else float(loss), layers, metrics)
            self.runlog.write_step(record, snapshot, events, control)
            self.runlog.write_lineage(step, (r.to_dict() for r in self.registry.experts()))
            if self.token_basins is not None:
                self.runlog.write_basins(step, self.vocabulary, self._basins())
        return StepResult(control, actions, readings, snapshot, decisions, metrics)

    def _layer_record(
        self, i: int, reading: Mapping[str, Tensor], snapshot: SystemSnapshot | None, window_mask: Tensor
    ) -> dict[str, Any]:
        """Layer i's entry of a `readings.jsonl` line (docs/run_report.md)."""
        e = self.banks[i].num_slots
        share = [0.0] * e
        neff = top2 = dead = None
        alerts: list[str] = []
        layer = snapshot.layer(i) if snapshot is not None else None
        if layer is not None:
            slots = window_mask.nonzero().flatten().tolist()
            if len(slots) == len(layer.utilization_shares):
                for slot, s in zip(slots, layer.utilization_shares, strict=True):
                    share[slot] = float(s)
            neff, top2, dead = float(layer.n_effective), float(layer.top2_share), int(layer.dead_expert_count)
            alerts = [a.kind for a in snapshot.alerts_for(i)] if snapshot is not None else []
        st = self.states[i]
        mask = self.banks[i].active_mask
        lens = getattr(self.layers[i], "lens", None)
        scale = getattr(lens, "scale", None)

        def row(t: Tensor) -> list[float | None]:
            return [finite_or_none(v) for v in t.tolist()]

        return {
            "layer_id": i,
            "expert_ids": [None if (r := self.registry.expert_at(i, s)) is None else r.expert_id for s in range(e)],
            "active": [bool(a) for a in reading["active"].tolist()],
            "phi_fast": row(reading["phi_fast"]), "phi_mid": row(reading["phi_mid"]),
            "phi_slow": row(reading["phi_slow"]), "beta": row(reading["beta"]), "share": share,
            "share_slow": row(reading["share_slow"]), "bimodality": row(reading["bimodality"]),
            "degrading": [bool(d) for d in st.coherence.degrading(mask).detach().cpu().tolist()],
            "neff": neff, "top2": top2, "dead": dead,
            "psi_slow": finite_or_none(float(st.coherence.layer_psi(2))), "alerts": alerts,
            "lens_scale": float(scale) if isinstance(scale, Tensor) else 0.0,
        }

    def _basins(self) -> dict[str, dict[str, Any]]:
        assert self.token_basins is not None
        out: dict[str, dict[str, Any]] = {}
        for i in range(len(self.layers)):
            for slot, (total, pairs) in enumerate(self.token_basins.top(i, BASIN_TOP_TOKENS)):
                record = self.registry.expert_at(i, slot)
                if record is not None and total > 0:
                    out[record.expert_id] = {
                        "layer": i, "slot": slot, "total": total, "tokens": [[t, c] for t, c in pairs],
                    }
        return out

    def _review(
        self, step: int, review_due: bool, emergency: Mapping[int, str]
    ) -> tuple[list[LifecycleAction], list[LayerDecision]]:
        views = {i: self.layer_view(i) for i in range(len(self.layers))}
        cooldown_ok = {
            i: last is None or step - last >= self.config.cooldown_steps for i, last in enumerate(self.last_edit_step)
        }
        flags = {i: i in emergency for i in views}
        decisions = review(
            views, self.config, cooldown_ok=cooldown_ok, emergency=flags, review_due=review_due, params=self.params
        )
        actions: list[LifecycleAction] = []
        for d in decisions:
            i = d.layer_id
            if not review_due and not flags[i]:
                continue
            trigger = (
                f"scheduled review (every {self.config.lifecycle_eval_interval} step() calls)" if review_due
                else f"emergency review: {emergency[i]}"
            )
            if review_due and i in emergency:
                trigger += f"; emergency: {emergency[i]}"
            slot_ids = [
                None if (r := self.registry.expert_at(i, s)) is None else r.expert_id
                for s in range(self.banks[i].num_slots)
            ]
            edit = d.edit
            if edit is None:
                rec = decision_record(d, step=step, run_id=self.run_id, trigger=trigger, slot_ids=slot_ids,
                                      readings=expert_readings(views[i], self.states[i].coherence, None, None))
                if rec is not None:
                    self.decision_log.append(rec)
                continue
            readings = expert_readings(views[i], self.states[i].coherence, self.biases[i], edit.expert_id)
            parts = LayerParts(self.banks[i], self.states[i].coherence, self.states[i].bimodality, self.biases[i])
            record = apply_edit(edit, parts, self.registry, views[i], step=step, generator=self.generator,
                                surgery=self.surgery)
            self._reset_slots(i, record.slots)
            if self.token_basins is not None:
                renamed = list(record.kept_slots) if record.kind == "split" else []  # child A: a new expert
                self.token_basins.reset_slots(i, list(record.fresh_slots) + list(record.parked_slots) + renamed)
            sibling = record.kept_slots[0] if record.kind == "split" and record.kept_slots else None
            reset_expert_bias(self.layers[i], record.fresh_slots, record.parked_slots, inherit_from=sibling)
            self.last_edit_step[i] = step
            rec = decision_record(d, step=step, run_id=self.run_id, trigger=trigger, slot_ids=slot_ids,
                                  readings=readings, record=record)
            assert rec is not None
            self.decision_log.append(rec)
            actions.append(LifecycleAction(
                step=step, layer_id=i, action=edit.action, expert_id=rec.expert_id, child_id=rec.child_id,
                reason=rec.reason or "", trigger=trigger, delta_F=edit.delta_F, record=record,
            ))
        return actions, decisions

    @torch.no_grad()
    def _reset_slots(self, i: int, slots: Sequence[int]) -> None:
        """Co-activation rows/columns and last-fired steps of edited slots start over."""
        st = self.states[i]
        idx = torch.as_tensor(list(slots), dtype=torch.long, device=st.coactivation.device)
        st.coactivation.index_fill_(0, idx, 0.0)
        st.coactivation.index_fill_(1, idx, 0.0)
        st.last_fired.index_fill_(0, idx, 0)
        st.last_fired.index_copy_(0, idx, st.coherence.step.expand(idx.shape[0]).clone())

    @property
    def decisions(self) -> list[DecisionRecord]:
        return list(self.decision_log.records)

    # ------------------------------------------------------------------ persistence
    def _pending_state(self) -> list[tuple[int, int, int, int]]:
        if self.surgery is None:
            return list(self._pending_surgery or [])
        out = []
        for p in self.surgery._pending:
            for b, banks in enumerate(self.banks):
                for r, row in enumerate(banks.param_slots()):
                    if row.param is p.param:
                        out.append((b, r, p.slot, p.steps_left))
        return out

    def _restore_pending(self, pending: Sequence[tuple[int, int, int, int]]) -> None:
        assert self.surgery is not None
        opt = self.surgery.optimizer
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        restored = []
        for b, r, slot, left in pending:
            row = self.banks[b].param_slots()[r]
            assert row.expert_dim is not None
            restored.append(_Pending(row.param, groups[id(row.param)], row.expert_dim, slot, left))
        self.surgery._pending = restored

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; plain containers and tensors (`torch.load(weights_only=True)`)."""
        controller_state = None
        if self.controller is not None and callable(getattr(self.controller, "state_dict", None)):
            controller_state = self.controller.state_dict()
        return {
            "format": STATE_FORMAT,
            "run_id": self.run_id,
            "config": self.config.to_dict(),
            "layer_names": list(self.layer_names),
            "layer_steps": list(self.layer_steps),
            "step_calls": self.step_calls,
            "last_edit_step": [-1 if s is None else s for s in self.last_edit_step],
            "layers": [{k: v.clone() for k, v in st.state_dict().items()} for st in self.states],
            "beta": [None if b is None else b.beta.detach().clone() for b in self.biases],
            "active_masks": [b.active_mask.detach().clone() for b in self.banks],
            "registry": self.registry.state_dict(),
            "counter": self.counter.state_dict(),
            "alert_history": self.alert_history.to_dict(),
            "controller": controller_state,
            "rng": self.generator.get_state(),
            "decisions": [r.to_json() for r in self.decision_log.records],
            "surgery_pending": [list(p) for p in self._pending_state()],
            "token_basins": None if self.token_basins is None else self.token_basins.counts.detach().clone(),
            "vocabulary": None if self.vocabulary is None else list(self.vocabulary),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`. Everything is validated on copies first: on error (ValueError naming what
        differs) the system is unchanged."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"ChronoSystem state format {got!r} is unsupported: expected {STATE_FORMAT}")
        names = list(state["layer_names"])
        if names != self.layer_names:
            raise ValueError(f"saved state has MoE layers {names}; this system has {self.layer_names}")
        new_states = []
        for i, (st, saved) in enumerate(zip(self.states, state["layers"], strict=True)):
            clone = copy.deepcopy(st)
            for key, value in saved.items():
                mine = clone.state_dict().get(key)
                if mine is not None and tuple(mine.shape) != tuple(value.shape):
                    raise ValueError(
                        f"layer {i} ({names[i]}) state {key!r} has shape {tuple(value.shape)}; this system expects "
                        f"{tuple(mine.shape)} (a different number of expert slots or hidden width?)"
                    )
            try:
                clone.load_state_dict(saved, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"layer {i} ({names[i]}) state does not match: {exc}") from None
            new_states.append(clone)
        betas = list(state["beta"])
        for i, (bias, beta) in enumerate(zip(self.biases, betas, strict=True)):
            if (bias is None) != (beta is None) or (bias is not None and beta.shape != bias.beta.shape):
                raise ValueError(f"layer {i} saved beta {None if beta is None else tuple(beta.shape)}; expected "
                                 f"{None if bias is None else tuple(bias.beta.shape)}")
        masks = list(state["active_masks"])
        for i, (banks, m) in enumerate(zip(self.banks, masks, strict=True)):
            if tuple(m.shape) != tuple(banks.active_mask.shape):
                raise ValueError(f"layer {i} saved active mask has shape {tuple(m.shape)}; expected "
                                 f"{tuple(banks.active_mask.shape)}")
        registry = copy.deepcopy(self.registry)
        registry.load_state_dict(state["registry"])
        counter = copy.deepcopy(self.counter)
        counter.load_state_dict(state["counter"])
        controller = None
        loadable = self.controller is not None and hasattr(self.controller, "load_state_dict")
        if state["controller"] is not None and loadable:
            controller = copy.deepcopy(self.controller)
            controller.load_state_dict(state["controller"])
        records = [DecisionRecord.from_dict(json.loads(s)) for s in state["decisions"]]
        generator = torch.Generator(device=self.device)
        generator.set_state(state["rng"])
        pending = [tuple(int(x) for x in p) for p in state["surgery_pending"]]
        basin_counts = state.get("token_basins")
        basins = None
        if basin_counts is not None:
            basins = TokenBasins(len(self.layers), self.num_slots, self.config.basin_vocab_limit, device=self.device)
            if tuple(basin_counts.shape) != tuple(basins.counts.shape):
                raise ValueError(f"saved token basins have shape {tuple(basin_counts.shape)}; expected "
                                 f"{tuple(basins.counts.shape)} (layers, slots, basin_vocab_limit + 1)")
            basins.counts.copy_(basin_counts)
        for b, r, _, _ in pending:
            if not (0 <= b < len(self.banks) and 0 <= r < len(self.banks[b].param_slots())):
                raise ValueError(f"saved optimiser-surgery entry ({b}, {r}) names no parameter of this system")
        # ---- commit (nothing below can fail on a validated state)
        for st, new in zip(self.states, new_states, strict=True):
            st.load_state_dict(new.state_dict())
        with torch.no_grad():
            for bias, beta in zip(self.biases, betas, strict=True):
                if bias is not None:
                    bias.beta.copy_(beta)
            for banks, m in zip(self.banks, masks, strict=True):
                banks.active_mask.copy_(m)
        self.registry = registry
        self.counter = counter
        if controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.run_id = str(state["run_id"])
        self.layer_steps = [int(s) for s in state["layer_steps"]]
        self.step_calls = int(state["step_calls"])
        self.last_edit_step = [None if int(s) < 0 else int(s) for s in state["last_edit_step"]]
        self.alert_history = AlertHistory(dict(state["alert_history"]))
        self.generator = generator
        self.token_basins = basins
        vocabulary = state.get("vocabulary")
        self.vocabulary = None if vocabulary is None else [str(w) for w in vocabulary]
        if self.output_dir is not None and self.decision_log.path != self._log_path():
            self.decision_log = DecisionLog(self._log_path())
        self.decision_log.records = records
        if self.surgery is not None:
            self._restore_pending(pending)  # type: ignore[arg-type]
        else:
            self._pending_surgery = pending  # type: ignore[assignment]
