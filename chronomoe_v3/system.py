"""ChronoSystem: the three clocks wired onto a model's MoE layers, scheduled, and saved.

The system finds the MoE layers through their registered adapters (`adapters.py`), gives each a
`LayerObserver` (the fast clock: `observe/`), routes the layer with a slow bias where the layer supports one,
and keeps the registry, the token counter (telemetry) and the decision log. It holds no math of its own.

Per observed training forward of each layer (tensor ops only, no host synchronisation): the layer's observer
folds the trace into its fast state (`LayerObserver.observe`), the token counter adds the layer's counts, and
the token basins count the batch's ids when the training loop handed them over (`observe_tokens`).

`step()` is the host side: one transfer of the token counts builds a `SystemSnapshot` (persistent alerts)
for the mid clock (a controller: `update(snapshot, lenses) -> list`, duck-typed, or none); every
`lifecycle.eval_interval` calls the slow clock runs (beta update, promotions of cooled experts, basin records,
a review of every layer: `lifecycle/cycle.py`), and in between a review of emergency layers only (a
degrading expert or a COLLAPSE_CONFIRMED alert) may execute additive edits early. With an `output_dir`, each
call also writes the run directory (`runlog.py`, docs/run_report.md).

Counting rules (one guard, in the layer: `layers.in_backward_recompute`):
- Eval forwards are not observed (layers call observers only in training mode).
- Gradient checkpointing: a forward re-run inside the backward pass (reentrant or not) is not observed; the
  original forward is (reentrant checkpointing runs it under `no_grad`, which is still a training forward).
  Consequently a training-mode forward under `torch.no_grad()` outside backward *is* observed: use
  `model.eval()` for evaluation.
- The step of the system (registry births, cooldowns, the decision log) is the number of observed forwards
  of the most observed layer.

Persistence: `state_dict()` is composed of the parts' own `state_dict`s (observers, registry, counter,
optimiser surgery, controller) plus the schedule; the model's state holds what lives on the layers (weights,
active masks, beta). Resume: build the model, the system (same config), the optimiser, `attach_optimizer`,
then load the model's, the optimiser's and the system's states, in that order.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .adapters import LayerBanks, MoELayerAdapter, adapter_for, registered_classes
from .bias import SlowBias
from .config import ChronoConfig
from .distributed import StatisticsReducer, check_same_setup, fingerprint, process_group_of, refuse_sharded_banks
from .governance import ControlConfig, Controller, LogitLens
from .grouped import native_group_sums
from .integrations import register_adapters_for
from .lifecycle.audit import Audit, AuditRecord, judge, slot_readings
from .lifecycle.cycle import (
    LayerParts,
    LifecycleAction,
    apply_edit,
    decision_record,
    expert_readings,
    open_audit,
    review,
    roll_back,
    rollback_record,
    router_state,
    slots_touched,
)
from .lifecycle.decisions import DecisionLog, DecisionRecord
from .lifecycle.objective import GROWING_ACTIONS, REMOVING_ACTIONS, LayerDecision, free_energy
from .observe.bimodality import draw_permutation
from .observe.observer import LayerObserver, Measurement
from .observe.tokens import TokenBasins
from .ops import ExpertRegistry, OptimizerSurgery, ShadowBank, snapshot_slots
from .runlog import (
    BASIN_TOP_TOKENS,
    DECISIONS_FILE,
    RunLog,
    finite_or_none,
    holds_no_records,
    layer_metrics,
    reading_record,
    set_aside_previous_run,
)
from .telemetry import COLLAPSE_CONFIRMED, AlertHistory, RoutingEvent, SystemSnapshot, TokenCounter
from .trace import MoETrace
from .version import __version__
from .view import LayerView

STATE_FORMAT = 2
LIFECYCLE_DECISIONS_FILE = DECISIONS_FILE
BUILTIN = "builtin"  # the default controller: the v2 lens controller driving a LogitLens per layer
SHADOW_SEED_OFFSET = 7919  # the shadow probes' generator: seed + this, apart from the system's own draws
LOSS_HISTORY = 64  # (step, loss) readings kept for the audits
AUDIT_HISTORY = 1000  # audit verdicts kept in memory (`audit_log`); the run directory's audits.jsonl keeps all


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


def _fail(where: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"checkpoint {where} = {value!r} is invalid: expected {expected}; nothing was loaded")


def _int_at_least(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(where, value, f"an integer >= {low}")
    return value


def _finite_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, value, "a finite number")
    return float(value)


def _first_bad(t: Tensor, bad: Tensor) -> str:
    index = tuple(int(v) for v in bad.nonzero()[0].tolist())
    return f"{float(t[index])} at index {index}" if t.dim() else str(float(t))


def check_observer_values(layer: str, state: Mapping[str, Any]) -> None:
    """Values of one layer's saved observer state (shapes are checked by the observer's own load): floats finite
    (`phi_last` may hold NaN = unmeasured, never Inf), retention products (`*.decay`) in [0, 1], counts >= 0,
    `last_seen` >= -1 (never seen). ValueError naming the key, the value and the expected range."""
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"checkpoint layer {layer} observer state {key!r} is {type(value).__name__}; "
                             "expected a tensor; nothing was loaded")
        where = f"layer {layer} observer state {key!r}"
        v = value.detach().cpu()
        if v.dtype == torch.bool or v.numel() == 0:
            continue
        if v.is_floating_point():
            v = v.double()
            bad = ~(torch.isfinite(v) | torch.isnan(v)) if key.endswith("phi_last") else ~torch.isfinite(v)
            if bool(bad.any()):
                raise ValueError(f"checkpoint {where} holds a non-finite value ({_first_bad(v, bad)}); expected "
                                 "finite values; nothing was loaded")
        name = key.rsplit(".", 1)[-1]
        if name == "decay":
            bad = (v < 0) | (v > 1)
            expected = "retention products in [0, 1]"
        elif name == "last_seen":
            bad = v < -1
            expected = "steps >= -1 (-1 = never seen)"
        elif name in ("count", "counts", "step", "nonfinite_skips", "coactivation", "coactivation_tokens",
                      "evidence"):
            bad = v < 0
            expected = "counts >= 0"
        else:
            continue
        if bool(bad.any()):
            raise ValueError(f"checkpoint {where} holds {_first_bad(v, bad)}; expected {expected}; nothing was loaded")


def check_state_values(state: Mapping[str, Any], layer_names: Sequence[str]) -> None:
    """Validate the values of a `ChronoSystem.state_dict()` (not only shapes) before anything is loaded:
    non-finite or out-of-range observer state (`check_observer_values`), negative or non-integer steps, step
    calls, token counts and alert counters, non-finite losses or pressures. ValueError naming the key."""
    n = len(layer_names)
    steps = state["layer_steps"]
    if not isinstance(steps, Sequence) or len(steps) != n:
        raise _fail("layer_steps", steps, f"{n} integers >= 0 (one per MoE layer)")
    for i, v in enumerate(steps):
        _int_at_least(f"layer_steps[{i}]", v, 0)
    _int_at_least("step_calls", state["step_calls"], 0)
    last = state["last_edit_step"]
    if not isinstance(last, Sequence) or len(last) != n:
        raise _fail("last_edit_step", last, f"{n} integers >= -1 (one per MoE layer; -1 = never)")
    for i, v in enumerate(last):
        _int_at_least(f"last_edit_step[{i}]", v, -1)
    observers = state["observers"]
    if not isinstance(observers, Sequence) or len(observers) != n:
        raise _fail("observers", type(observers).__name__, f"{n} observer states (one per MoE layer)")
    for i, (name, saved) in enumerate(zip(layer_names, observers, strict=True)):
        if not isinstance(saved, Mapping):
            raise _fail(f"observers[{i}]", type(saved).__name__, "a mapping of tensors")
        check_observer_values(f"{i} ({name!r})", saved)
    counts = state["counter"]["counts"]
    if not isinstance(counts, Tensor):
        raise _fail("counter.counts", type(counts).__name__, "a tensor")
    c = counts.detach().cpu()
    c = c.double() if c.is_floating_point() else c
    bad = ~torch.isfinite(c) | (c < 0) if c.is_floating_point() else c < 0
    if bool(bad.any()):
        raise ValueError(f"checkpoint counter.counts holds {_first_bad(c, bad)}; expected token counts >= 0; "
                         "nothing was loaded")
    alerts = state["alert_history"]
    if not isinstance(alerts, Mapping):
        raise _fail("alert_history", type(alerts).__name__, "a mapping of alert counters")
    for key, v in alerts.items():
        _int_at_least(f"alert_history[{key!r}]", v, 0)
    for j, pair in enumerate(state["losses"]):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise _fail(f"losses[{j}]", pair, "a [step, loss] pair")
        _int_at_least(f"losses[{j}] step", pair[0], 0)
        _finite_number(f"losses[{j}] loss", pair[1])
    for key, v in state["pressure"].items():
        _finite_number(f"pressure[{key!r}]", v)
    for j, entry in enumerate(state["barred"]):
        if not isinstance(entry, Sequence) or len(entry) != 3:
            raise _fail(f"barred[{j}]", entry, "a [layer, action, until] triple")
        _int_at_least(f"barred[{j}] layer", entry[0], 0)
        _int_at_least(f"barred[{j}] until", entry[2], 0)


@torch.no_grad()
def _observe_layer(observer: LayerObserver, trace: MoETrace, active_mask: Tensor, perm: Tensor) -> Tensor:
    """One layer's per-forward fast-state update (`LayerObserver.observe`); returns its token counts `[E]`.
    What `ChronoSystem(compile_observers=True)` compiles: the layer is an argument, not a constant."""
    counts: Tensor = observer.observe(trace, active_mask, perm=perm).counts
    return counts


@torch.no_grad()
def _fold_layer(observer: LayerObserver, measured: Measurement, active_mask: Tensor) -> None:
    """Data parallel: fold one layer's reduced readings into its fast state (`LayerObserver.fold`); compiled
    like `_observe_layer` when the observers are (the fold holds most of the observer's small kernels)."""
    observer.fold(measured, active_mask)


COMPILE_ENV = "CHRONOMOE_COMPILE_OBSERVERS"


def default_compile(device: torch.device) -> bool:
    """Whether a `ChronoSystem` on `device` compiles its observers by default: `CHRONOMOE_COMPILE_OBSERVERS`
    when set (`0`/`1`, `false`/`true`), else yes on CUDA and on the CPU."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    if value:
        raise ValueError(f"{COMPILE_ENV}={value!r} is invalid: expected 0 or 1 (or leave it unset)")
    return device.type in ("cuda", "cpu")


def _compile_failure(err: BaseException) -> bool:
    """An error raised by torch.compile's frontend or backend (not by the observer's own checks)."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoELayerAdapter]]:
    """`(name, adapter)` of every submodule of `model` whose class has a registered adapter, in module order.
    Adapters of the libraries `model`'s classes come from (transformers) are registered first (`integrations`)."""
    register_adapters_for(model)
    found = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            found.append((name, adapter))
    return found


class ChronoSystem:
    """Attach chronomoe-v3 to a model: observers on its MoE layers, the three clocks, lifecycle edits.

    `controller`: the mid clock. By default (`"builtin"`) the v2 lens controller
    (`governance.Controller`, ENTROPY_MAX steering) drives a `governance.LogitLens` on each layer's router
    (docs/system.md); any object with `update(snapshot, lenses) -> list` may replace it (it then drives the
    same lenses unless `step(lenses=...)` passes others); `controller=None` turns the mid clock off (the
    explicit opt-out: no lenses are attached). `run_id` names the run in logs (default: a random id, saved in the
    state). `output_dir`: where the run directory `<output_dir>/<run_id>/` is written (decision log,
    readings, lineage, telemetry; docs/run_report.md); without it records are kept in memory only
    (`decision_log.records`). `seed` seeds the generator of the detector's sampling and of edit perturbations.
    `compile_observers` runs the per-forward observer through `torch.compile` (default: on CUDA and on the
    CPU, where the eager observer's many small operations cost more than the arithmetic: about half the
    overhead, for a one-off compile of ~10 s at the first training step; benchmarks/results/perf_*.md). The
    environment variable `CHRONOMOE_COMPILE_OBSERVERS=0` (or `1`) sets the default without code changes; a
    compile that fails (no C++ compiler for the CPU backend, say) falls back to the eager observer with a
    warning.
    `process_group`: the data-parallel group to reduce the per-forward statistics over (default: the default
    group when torch.distributed is initialised; none otherwise). Every rank then holds the same state, takes
    the same decisions and applies the same edits; rank 0 alone writes the run directory (docs/distributed.md).
    """

    def __init__(
        self,
        model: nn.Module,
        controller: Any = BUILTIN,
        config: ChronoConfig | None = None,
        run_id: str | None = None,
        output_dir: str | Path | None = None,
        *,
        seed: int = 0,
        compile_observers: bool | None = None,
        process_group: Any = None,
    ) -> None:
        self.config = config if config is not None else ChronoConfig()
        if not isinstance(self.config, ChronoConfig):
            raise ValueError(f"config is a {type(self.config).__name__}; expected a ChronoConfig")
        if controller is not None and controller != BUILTIN and not callable(getattr(controller, "update", None)):
            raise ValueError(
                f"controller {type(controller).__name__} has no update(snapshot, lenses) method; expected a "
                f"Controller-like object, {BUILTIN!r} (the default) or None (mid clock off)"
            )
        found = find_moe_layers(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no MoE layer: expected at least one module of a class with a registered "
                f"adapter ({registered_classes()}; see chronomoe_v3.adapters.register_adapter)"
            )
        self.model = model
        self.run_id = run_id if run_id is not None else f"run-{uuid.uuid4().hex[:12]}"
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.layer_names = [name for name, _ in found]
        self.adapters: list[MoELayerAdapter] = [a for _, a in found]
        self.layers: list[nn.Module] = [a.module for a in self.adapters]
        self.banks: list[LayerBanks] = [a.banks() for a in self.adapters]
        self.top_k = [a.top_k for a in self.adapters]
        refuse_sharded_banks(self.layer_names, [[ps.param for ps in b.param_slots()] for b in self.banks])
        # Data parallel: every rank must be built alike (checked once, here); then per forward one stacked
        # all-reduce of every layer's statistics (distributed.py); rank 0 alone writes the run directory.
        group = process_group_of(process_group)
        self._dp: StatisticsReducer | None = None
        self._dp_tokens: dict[int, TokenBasins] = {}  # token-basin counts added since the last step()
        if group is not None:
            check_same_setup(fingerprint(self.config.to_dict(), {
                "names": list(self.layer_names), "num_slots": [b.num_slots for b in self.banks],
                "hidden_size": [a.hidden_size for a in self.adapters], "top_k": list(self.top_k),
                "router_size": [a.router_input_size for a in self.adapters],
            }), group)
            self._dp = StatisticsReducer(group, self.banks[0].active_mask.device)
            if self._dp.rank != 0:
                self.output_dir = None
        self.device = self.banks[0].active_mask.device
        self.observers = [
            LayerObserver(
                b.num_slots, a.hidden_size, a.top_k, self.config, router_size=a.router_input_size,
                device=b.active_mask.device,
            )
            for a, b in zip(self.adapters, self.banks, strict=True)
        ]
        self.biases: list[SlowBias | None] = [a.slow_bias(self.config) for a in self.adapters]
        if controller == BUILTIN:
            widths = [b.num_slots for b in self.banks]
            # One steering mode: the log-share pull of ENTROPY_MAX is the one strong enough to revive a starved
            # expert through a selection offset (ANTI_DOMINANCE / LIFT_TAIL pull at most 1/n); a harm backoff
            # then only lowers the scale instead of switching to a mode too weak to finish the job.
            control = ControlConfig(
                initial_mode="ENTROPY_MAX", mode_cycle=("ENTROPY_MAX",), neff_fraction=self.config.mid.neff_fraction
            )
            controller = Controller(len(self.adapters), widths, control)
        self.controller = controller
        self.lenses: dict[int, LogitLens] = {}
        if controller is not None:
            for i, (adapter, banks) in enumerate(zip(self.adapters, self.banks, strict=True)):
                lens = LogitLens(banks.num_slots, self.config.mid.gain, self.config.mid.max_offset, layer_id=i)
                adapter.set_logit_lens(lens.to(banks.active_mask.device))
                self.lenses[i] = lens
        self.registry = ExpertRegistry([b.active_mask.detach().cpu() for b in self.banks], self.config)
        # Shadow copies of the expert weights (ops/shadow.py): probes from their own generator, so that the
        # system's draws (perturbations, samples) are the same with or without them.
        sc = self.config.shadow
        probe_gen = torch.Generator().manual_seed(seed + SHADOW_SEED_OFFSET)
        self.shadows: list[ShadowBank | None] = [
            ShadowBank(b.experts, probes=sc.probes, storage=sc.storage, generator=probe_gen) if sc.enabled else None
            for b in self.banks
        ]
        self._jumps: dict[int, tuple[Tensor, Tensor]] = {}  # per layer at this step(): (jumped, drift) on the host
        self._live: dict[int, Tensor] = {}  # per layer at this step(): the live sketch, until an edit changes weights
        self.num_slots = max(b.num_slots for b in self.banks)
        self.counter = TokenCounter(len(self.layers), self.num_slots, device=self.device)
        self.alert_history = AlertHistory()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # The observers' many small operations are launch-bound (CUDA) or dispatch-bound (CPU) in eager mode:
        # torch.compile fuses them.
        if compile_observers is None:
            compile_observers = default_compile(self.device)
        native_group_sums(self.device)  # probe the grouped statistics kernel eagerly, before any compile
        self.compile_observers = bool(compile_observers)
        # One free function of the layer's observer (not a method specialised on the layer index): one compiled
        # graph serves every layer of the same shape, so the first-step compile does not grow with depth.
        self._observe_compiled = torch.compile(_observe_layer) if self.compile_observers else _observe_layer
        self._fold_compiled = torch.compile(_fold_layer) if self.compile_observers else _fold_layer
        if self.compile_observers:
            # Layers of different shapes (or token counts) still compile their own graphs: make room for them
            # (torch's default limit of 8 would send layers past the 8th back to eager mode).
            import torch._dynamo.config as dynamo_config

            limit = getattr(dynamo_config, "recompile_limit", 8)
            dynamo_config.recompile_limit = max(limit, 2 * len(found) + 8)
        self.layer_steps = [0] * len(self.layers)
        self.step_calls = 0
        self.last_edit_step: list[int | None] = [None] * len(self.layers)
        # A run directory that already holds records is set aside (never appended to by another run); resuming
        # that run with load_state_dict moves it back.
        self._set_aside: tuple[Path, Path] | None = None
        if self.output_dir is not None:
            run_dir = self.output_dir / self.run_id
            moved = set_aside_previous_run(run_dir)
            if moved is not None:
                self._set_aside = (run_dir, moved)
                warnings.warn(
                    f"{run_dir} already held a run's records: moved them to {moved} so that this run starts its "
                    "own (load_state_dict of that run's checkpoint moves them back)", stacklevel=2,
                )
        self.decision_log = DecisionLog(self._log_path())
        self.runlog: RunLog | None = None
        if self.output_dir is not None:
            self.runlog = RunLog(self.output_dir, self.run_id, self._manifest_metadata())
        self.vocabulary: list[str] | None = None
        self._token_ids: Tensor | None = None
        self._token_generation = 0
        self._token_used = [0] * len(self.layers)
        self.surgery: OptimizerSurgery | None = None
        self._surgery_state: Mapping[str, Any] | None = None  # loaded before an optimiser was attached
        self.losses: list[tuple[int, float]] = []  # what step(loss=...) was given, with the step
        self.audits: dict[int, Audit] = {}  # per layer, the executed edit under audit
        self.audit_log: list[AuditRecord] = []
        self.barred: dict[tuple[int, str], int] = {}  # (layer, edit kind) -> training step until which it waits
        self.pressure: dict[int, float] = {}  # the mid clock's last pressure per layer
        self._handles: list[RemovableHandle] = [
            a.add_observer(self._make_observer(i)) for i, a in enumerate(self.adapters)
        ]

    def _resume_run_dir(self) -> None:
        """After a checkpoint was loaded: write to the saved run's directory, taking back its records if this
        system set them aside when it was built (and has written nothing of its own since)."""
        assert self.output_dir is not None
        run_dir = self.output_dir / self.run_id
        if self._set_aside is not None:
            fresh, moved = self._set_aside
            if fresh == run_dir and holds_no_records(run_dir) and moved.is_dir():
                shutil.rmtree(run_dir)
                moved.rename(run_dir)
            self._set_aside = None
        if self.runlog is None or self.runlog.run_dir != run_dir:
            self.runlog = RunLog(self.output_dir, self.run_id, self._manifest_metadata())
        if self.decision_log.path != self._log_path():
            self.decision_log = DecisionLog(self._log_path())

    def _log_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / self.run_id / LIFECYCLE_DECISIONS_FILE

    def _manifest_metadata(self) -> dict[str, Any]:
        layers = [
            {"layer_id": i, "name": name, "num_slots": banks.num_slots, "top_k": self.top_k[i],
             "hidden_size": obs.coherence.hidden_size}
            for i, (name, banks, obs) in enumerate(zip(self.layer_names, self.banks, self.observers, strict=True))
        ]
        return {"library": "chronomoe-v3", "version": __version__, "model": type(self.model).__name__,
                "config": self.config.to_dict(), "layers": layers}

    # ------------------------------------------------------------------ fast clock (per forward, no host sync)
    def _make_observer(self, i: int) -> Any:
        device = self.banks[i].active_mask.device  # where layer i's observer state lives

        def _observe(trace: MoETrace) -> None:
            if trace.expert_out.device != device:  # tensor metadata: no host sync
                raise RuntimeError(
                    f"MoE layer {self.layer_names[i]!r} now runs on {trace.expert_out.device}, but this ChronoSystem "
                    f"keeps its state for it on {device}: move the model before building the system on it"
                )
            # The detector's random draw stays outside the (possibly compiled) observer: torch.compile cannot
            # trace a torch.Generator, and a tensor argument keeps the graph whole and the draw the same.
            if self._dp is not None:
                self._measure_shard(i, trace, self._dp)
            else:
                self._observe(i, trace, draw_permutation(trace, self.generator))
            self._count_tokens(i, trace)
            self.layer_steps[i] += 1  # Python bookkeeping stays outside the (possibly compiled) observer

        return _observe

    @torch.no_grad()
    def _observe(self, i: int, trace: MoETrace, perm: Tensor) -> None:
        counts = self._run_observer("_observe_compiled", self.observers[i], trace, self.banks[i].active_mask, perm)
        self._add_counts(i, counts)

    def _run_observer(self, name: str, *args: Any) -> Any:
        """Call the (possibly compiled) observer function `name`; a compile failure switches both to eager and
        calls it again (the compiler fails before the observer runs, so nothing was folded twice)."""
        try:
            return getattr(self, name)(*args)
        except Exception as err:
            if not (self.compile_observers and _compile_failure(err)):
                raise
            self._compile_failed(err)
            return getattr(self, name)(*args)

    def _compile_failed(self, err: BaseException) -> None:
        """The compiler failed before the observer ran (nothing was folded): observe eagerly from now on."""
        warnings.warn(
            f"ChronoSystem could not compile its observers ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "it observes eagerly instead (the same readings, at a higher per-step cost). Pass "
            "compile_observers=False or set CHRONOMOE_COMPILE_OBSERVERS=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.compile_observers = False
        self._observe_compiled = _observe_layer
        self._fold_compiled = _fold_layer

    def _add_counts(self, i: int, counts: Tensor) -> None:
        if counts.shape[0] < self.num_slots:
            counts = torch.cat([counts, counts.new_zeros(self.num_slots - counts.shape[0])])
        self.counter.add(i, counts)

    @torch.no_grad()
    def _measure_shard(self, i: int, trace: MoETrace, dp: StatisticsReducer) -> None:
        """Data parallel: measure this rank's shard of layer i's forward and hand it to the reducer (which
        issues one all-reduce once every layer was measured); a layer measured again first settles the last."""
        if dp.has(i):
            self._settle()
        obs, mask = self.observers[i], self.banks[i].active_mask
        keys, perm = dp.draw_permutation(trace, self.generator)
        increment = torch.zeros(obs.num_experts, obs.num_experts, device=mask.device)
        measured = obs.measure(trace, mask, perm=perm, coactivation=increment)
        samples = self.config.bimodality.samples_per_expert
        dp.add(i, measured, dp.sample_keys(trace, samples, keys, perm), keys.numel())
        if len(dp.pending) == len(self.layers):
            dp.start()

    @torch.no_grad()
    def _settle(self) -> None:
        """Data parallel: wait for the pending reduction and fold every layer's global readings."""
        if self._dp is None:
            return
        for i, measured in self._dp.finish(self.config.bimodality.samples_per_expert):
            self._run_observer("_fold_compiled", self.observers[i], measured, self.banks[i].active_mask)
            self._add_counts(i, measured.stats.counts)

    def _sync_ranks(self, loss: float | None) -> float | None:
        """Data parallel, at `step()`: fold the last forward, check that the ranks' forwards agreed, sum the
        token basins of the window, and return the ranks' mean loss (every rank records the same)."""
        dp = self._dp
        if dp is None:
            return loss
        self._settle()
        if bool(dp.mismatch):
            raise ValueError(
                "data-parallel ranks forwarded different numbers of tokens through the MoE layers: every rank "
                "must forward batches of the same shape (drop or pad the last batch), or the shared sampler "
                "and the statistics no longer describe one global batch"
            )
        pending = {}
        for i, obs in enumerate(self.observers):
            if obs.tokens is not None:
                pending[i] = self._dp_tokens.get(i) or TokenBasins(
                    obs.num_experts, self.config.basins.vocab_limit, device=obs.device
                )
        dp.reduce_token_basins(pending)
        for i, table in pending.items():
            tokens = self.observers[i].tokens
            assert tokens is not None
            tokens.counts.add_(table.counts)
        self._dp_tokens = {}
        return dp.mean_loss(loss)

    # ------------------------------------------------------------------ token basins (optional)
    def observe_tokens(self, token_ids: Tensor) -> None:
        """Hand the system the token ids of the batch about to be forwarded (`[B, S]` or `[T]`, in the order
        the MoE layers see their tokens); each layer's next observed forward with as many tokens counts, per
        expert, the ids routed to it (`LayerObserver.tokens`, bounded at `config.basins.vocab_limit` ids).
        The run report shows each expert's most attracted tokens. Optional; no host sync."""
        if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(f"token_ids is {type(token_ids).__name__} "
                             f"{getattr(token_ids, 'dtype', '')}; expected an integer tensor")
        for obs in self.observers:
            obs.enable_tokens()
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
        if ids is None or self._token_used[i] == self._token_generation or ids.shape[0] != trace.num_tokens:
            return  # no ids, already counted, or this forward is not the batch the ids describe
        self._token_used[i] = self._token_generation
        if self._dp is not None:  # this rank's counts, summed over the ranks at step()
            obs = self.observers[i]
            table = self._dp_tokens.setdefault(
                i, TokenBasins(obs.num_experts, self.config.basins.vocab_limit, device=obs.device)
            )
            table.add(ids.to(trace.topk_index.device), trace.topk_index, trace.kept_slots())
            return
        self.observers[i].count_tokens(ids, trace)

    # ------------------------------------------------------------------ host side
    @property
    def global_step(self) -> int:
        """Observed forwards of the most observed layer."""
        return max(self.layer_steps)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> OptimizerSurgery:
        """Keep `optimizer`'s state in step with edits (fresh moments for new slots, masked slots held at 0).
        Masked slots are zeroed now (see `ops.surgery`)."""
        if self.surgery is not None:
            self.surgery.remove()
        self.surgery = OptimizerSurgery(optimizer, self.banks, seed_steps=self.config.surgery.seed_steps)
        if self._surgery_state is not None:
            self.surgery.load_state_dict(self._surgery_state)
            self._surgery_state = None
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
        self._settle()
        out: dict[int, dict[str, Tensor]] = {}
        for i, obs in enumerate(self.observers):
            clocks = obs.coherence.phi_clocks.detach().cpu()
            bias = self.biases[i]
            out[i] = {
                "phi_fast": clocks[0], "phi_mid": clocks[1], "phi_slow": clocks[2],
                "share_slow": obs.coherence.share_clocks[2].detach().cpu(),
                "beta": bias.beta.detach().cpu().clone() if bias is not None else torch.zeros(clocks.shape[1]),
                "bimodality": obs.bimodality.bimodality.detach().cpu(),
                "active": self.banks[i].active_mask.detach().cpu().clone(),
            }
        return out

    def layer_view(self, i: int, snapshot: SystemSnapshot | None = None) -> LayerView:
        """What the slow objective reads for layer i (on the host), with the alerts `snapshot` raised on it and
        the mid clock's last pressure on it."""
        e = self.banks[i].num_slots
        cooling = self._cooling(i)
        records = [self.registry.expert_at(i, s) for s in range(e)]
        age = torch.tensor([0 if r is None else max(self.global_step - r.born_step, 0) for r in records])
        alerts = [a.kind for a in snapshot.alerts_for(i)] if snapshot is not None else []
        view = self.observers[i].view(
            i, self.banks[i].active_mask, cooling, alerts, self.pressure.get(i, 0.0), age=age
        )
        lens = self.lenses.get(i)
        if lens is not None:
            view = replace(view, offset=lens.offset.detach().cpu().clone())
        shadow = self.shadows[i]
        if shadow is None or i not in self._jumps:
            return view
        jumped, drift = self._jumps[i]
        return replace(view, jumped=jumped & (shadow.taken >= 0), drift=drift, shadow_step=shadow.taken.clone())

    def _cooling(self, i: int) -> Tensor:
        """[E] bool on the host: layer i's slots holding a newborn expert not yet judged."""
        slots = range(self.banks[i].num_slots)
        return torch.tensor([self.registry.slot_state(i, s) == "cooling" for s in slots], dtype=torch.bool)

    def emergency_flags(self, snapshot: SystemSnapshot | None) -> dict[int, str]:
        """Layers with an emergency and why: degrading experts (`CoherenceState.degrading`) or COLLAPSE_CONFIRMED."""
        alerts = set()
        if snapshot is not None:
            alerts = {int(a.layer_id) for a in snapshot.alerts if a.kind == COLLAPSE_CONFIRMED}
        out: dict[int, str] = {}
        for i, obs in enumerate(self.observers):
            why = []
            degrading = obs.coherence.degrading(self.banks[i].active_mask).detach().cpu()
            if bool(degrading.any()):
                why.append(f"degrading experts {degrading.nonzero().flatten().tolist()}")
            if i in self._jumps and bool(self._jumps[i][0].any()):
                why.append(f"weights jumped in slots {self._jumps[i][0].nonzero().flatten().tolist()}")
            if i in alerts:
                why.append("COLLAPSE_CONFIRMED alert")
            if why:
                out[i] = " and ".join(why)
        return out

    def step(
        self, snapshot: SystemSnapshot | None = None, lenses: Any = None, loss: float | None = None
    ) -> StepResult:
        """Run the mid clock, and the slow clock when due (or an emergency review); see the module docstring.
        `loss` (e.g. the evaluation loss) is recorded in the run directory's readings. Transactional: if anything
        raises (the controller included, or returns None: TypeError), the step counter, the window's token
        counts and alert counters, and the clocks' state are restored before the exception propagates
        (docs/reliability.md)."""
        if self.global_step == 0:
            raise RuntimeError(
                "ChronoSystem.step() was called before any observed training forward: run at least one forward "
                "of the model in training mode (model.train()) first"
            )
        if loss is not None and not (isinstance(loss, (int, float)) and not isinstance(loss, bool)):
            raise ValueError(f"loss={loss!r} is invalid: expected a number or None")
        # Transactional: on any exception the scheduling and counting state is restored (the window's token
        # counts, alert counters, step counter, losses, the mid clock's state and lens offsets, beta, observer
        # windows), so the next successful step() sees this window. Edits an exception interrupts after they
        # were applied stay applied and logged (each edit is itself validated first and atomic: ops/). The savepoint
        # is taken after the data-parallel fold, so a restored window is never folded twice.
        loss = self._sync_ranks(loss)  # data parallel: fold the last forward, the ranks' mean loss
        savepoint = self._savepoint()
        try:
            return self._step(snapshot, lenses, loss)
        except BaseException:
            self._restore(savepoint)
            raise

    def _savepoint(self) -> dict[str, Any]:
        """What `_restore` puts back after a failed step() (host copies and device clones; step() may sync)."""
        controller_state = None
        if self.controller is not None and callable(getattr(self.controller, "state_dict", None)) and callable(
            getattr(self.controller, "load_state_dict", None)
        ):
            controller_state = copy.deepcopy(self.controller.state_dict())
        return {
            "counts": self.counter.counts.clone(),
            "alerts": dict(self.alert_history.counts),
            "step_calls": self.step_calls,
            "losses": list(self.losses),
            "pressure": dict(self.pressure),
            "controller": controller_state,
            "lenses": {i: {k: v.clone() for k, v in lens.state_dict().items()} for i, lens in self.lenses.items()},
            "lens_masks": {i: lens.active_mask.clone() if isinstance(getattr(lens, "active_mask", None), Tensor)
                           else None for i, lens in self.lenses.items()},
            "betas": [None if b is None else b.beta.detach().clone() for b in self.biases],
            "observers": [{k: v.clone() for k, v in obs.state_dict().items()} for obs in self.observers],
        }

    def _restore(self, saved: Mapping[str, Any]) -> None:
        self.counter.counts.copy_(saved["counts"])
        self.alert_history.counts.clear()
        self.alert_history.counts.update(saved["alerts"])
        self.step_calls = saved["step_calls"]
        self.losses = list(saved["losses"])
        self.pressure = dict(saved["pressure"])
        if saved["controller"] is not None:
            self.controller.load_state_dict(saved["controller"])
        for i, lens in self.lenses.items():
            lens.load_state_dict(saved["lenses"][i])
            mask = saved["lens_masks"][i]
            if mask is not None:
                lens.set_active_mask(mask)
        with torch.no_grad():
            for bias, beta in zip(self.biases, saved["betas"], strict=True):
                if bias is not None and beta is not None:
                    bias.beta.copy_(beta)
        for obs, state in zip(self.observers, saved["observers"], strict=True):
            obs.load_state_dict(state)

    def _step(self, snapshot: SystemSnapshot | None, lenses: Any, loss: float | None) -> StepResult:
        if loss is not None and math.isfinite(loss):
            self.losses.append((self.global_step, float(loss)))
            del self.losses[:-LOSS_HISTORY]
        events: list[RoutingEvent] = []
        if snapshot is None:
            snapshot, events = self._snapshot()
        window_masks = [b.active_mask.detach().cpu().clone() for b in self.banks]
        for i, lens in self.lenses.items():
            lens.set_active_mask(window_masks[i])  # the shares of the snapshot are at this width
        if lenses is None and self.lenses:
            lenses = self.lenses
        control: list[Any] = []
        if self.controller is not None:
            out = self.controller.update(snapshot, lenses)
            if out is None or isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__iter__"):
                raise TypeError(
                    f"controller {type(self.controller).__name__}.update(snapshot, lenses) returned "
                    f"{type(out).__name__}; expected a list of decisions (possibly empty). The step was not taken: "
                    "the window's token counts and the step counter are as they were"
                )
            control = list(out)
        for decision in control:  # the v2 ControlDecision reports each layer's pressure
            computed = getattr(decision, "computed", None)
            if isinstance(computed, Mapping) and "pressure" in computed:
                self.pressure[int(decision.layer_id)] = float(computed["pressure"])
        self.step_calls += 1
        review_due = self.step_calls % self.config.lifecycle.eval_interval == 0
        step = self.global_step
        if review_due:
            for i, obs in enumerate(self.observers):
                bias = self.biases[i]
                if bias is not None:
                    bias.update(obs.coherence.phi_slow, self.banks[i].active_mask)
            self.registry.advance(step)
        actions = self._close_audits(step)
        self._check_jumps()
        emergency = self.emergency_flags(snapshot)
        decisions: list[LayerDecision] = []
        if review_due or emergency:
            edits, decisions = self._review(step, review_due, emergency, snapshot)
            actions += edits
        if review_due:
            for i, obs in enumerate(self.observers):
                share = torch.nan_to_num(obs.coherence.share_clocks[2], nan=0.0).clamp_min(0.0)
                self.registry.record_basin(i, share, obs.coherence.phi_slow)
                obs.start_window()
        self._refresh_shadows(step)
        readings = self.readings()
        layers = [self._layer_record(i, readings[i], snapshot, window_masks[i]) for i in range(len(self.layers))]
        metrics: dict[str, float] = {"chronomoe/step": float(step), "chronomoe/edits": float(len(actions))}
        for layer in layers:
            metrics.update(layer_metrics(layer))
        for obs in self.observers:
            if obs.tokens is not None:
                obs.tokens.decay(self.config.basins.token_decay)
        if self.runlog is not None:
            record = reading_record(step, self.step_calls, None if loss is None else float(loss), layers, metrics)
            self.runlog.write_step(record, snapshot, events, control)
            self.runlog.write_lineage(step, (r.to_dict() for r in self.registry.experts()))
            if any(obs.tokens is not None for obs in self.observers):
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
        if snapshot is not None and layer is not None:
            slots = window_mask.nonzero().flatten().tolist()
            if len(slots) == len(layer.utilization_shares):
                for slot, s in zip(slots, layer.utilization_shares, strict=True):
                    share[slot] = float(s)
            neff, top2, dead = float(layer.n_effective), float(layer.top2_share), int(layer.dead_expert_count)
            alerts = [a.kind for a in snapshot.alerts_for(i)]
        coh = self.observers[i].coherence
        identity = coh.identity_clocks.detach().cpu()
        logit_lens = self.lenses.get(i)
        scale = logit_lens.scale if logit_lens is not None else getattr(self.adapters[i].lens(), "scale", None)
        offset = logit_lens.offset.detach().cpu() if logit_lens is not None else torch.zeros(e)

        def row(t: Tensor) -> list[float | None]:
            return [finite_or_none(v) for v in t.tolist()]

        return {
            "layer_id": i,
            "expert_ids": [None if (r := self.registry.expert_at(i, s)) is None else r.expert_id for s in range(e)],
            "active": [bool(a) for a in reading["active"].tolist()],
            "phi_fast": row(reading["phi_fast"]), "phi_mid": row(reading["phi_mid"]),
            "phi_slow": row(reading["phi_slow"]), "beta": row(reading["beta"]), "offset": row(offset), "share": share,
            "share_slow": row(reading["share_slow"]), "bimodality": row(reading["bimodality"]),
            "degrading": [bool(d) for d in coh.degrading(self.banks[i].active_mask).detach().cpu().tolist()],
            "identity_fast": row(identity[0]), "identity_slow": row(identity[1]),
            "neff": neff, "top2": top2, "dead": dead,
            "psi_slow": finite_or_none(float(coh.layer_psi(2))), "alerts": alerts,
            "lens_scale": float(scale) if isinstance(scale, Tensor) else 0.0,
            "pressure": self.pressure.get(i, 0.0), "starvation": self.observers[i].starvation_level(),
        }

    def _basins(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for i, obs in enumerate(self.observers):
            if obs.tokens is None:
                continue
            for slot, (total, pairs) in enumerate(obs.tokens.top(BASIN_TOP_TOKENS)):
                record = self.registry.expert_at(i, slot)
                if record is not None and total > 0:
                    out[record.expert_id] = {
                        "layer": i, "slot": slot, "total": total, "tokens": [[t, c] for t, c in pairs],
                    }
        return out

    def _parts(self, i: int) -> LayerParts:
        return LayerParts(self.banks[i], self.observers[i], self.biases[i], self._selection_biases(i), self.shadows[i])

    def _check_jumps(self) -> None:
        """Per layer, the experts whose weights jumped away from their shadow copy (ops/shadow.py)."""
        sc = self.config.shadow
        self._jumps = {}
        self._live = {}
        for i, shadow in enumerate(self.shadows):
            if shadow is None:
                continue
            live = shadow.live_sketch()
            self._live[i] = live
            drift = shadow.drift(live)
            jumped = shadow.jumped(drift, self.banks[i].active_mask, threshold=sc.jump_threshold,
                                   ratio=sc.jump_ratio, step=self.global_step).cpu()
            # a newborn (cooling) expert moves fast while it learns its tokens: not a jump
            self._jumps[i] = (jumped & ~self._cooling(i), drift.cpu())

    def _refresh_shadows(self, step: int) -> None:
        """Every `shadow.refresh_every` step() calls: copy the active experts' weights, except those that jumped
        (they keep their pre-jump copy until restored, or until the jump is `accept_steps` old)."""
        sc = self.config.shadow
        if self.step_calls % sc.refresh_every != 0:
            return
        for i, shadow in enumerate(self.shadows):
            if shadow is None:
                continue
            keep = self.banks[i].active_mask.detach().cpu().clone()
            if i in self._jumps:
                jumped = self._jumps[i][0] & (shadow.taken >= 0)  # a slot an edit rewrote since is no jump
                stale = step - shadow.taken > sc.accept_steps
                keep &= ~jumped | stale
            shadow.refresh(keep, step, self._live.get(i))

    def close(self) -> list[AuditRecord]:
        """End of training: judge the edits still under audit on the window they had (verdict `partial`, logged
        to `audits.jsonl` like the others; nothing is rolled back, the run is over) and return those records.
        Call it once after the last `step()`; the system can still be saved afterwards."""
        self._settle()
        closed = []
        step = self.global_step
        for i in sorted(self.audits):
            audit = self.audits.pop(i)
            view = self.layer_view(i).to_host()
            after = slot_readings(torch.nan_to_num(view.share_slow, nan=0.0), view.phi_slow, audit.slots)
            losses = [(s, v) for s, v in self.losses if s > audit.edit_step]
            harmful, verdict = judge(audit, free_energy(view, self.config), after, losses, self.config, step)
            seen = step - audit.edit_step
            verdict = replace(verdict, verdict="partial", reason=(
                f"run closed {seen} of {self.config.lifecycle.audit_steps} audit steps after the edit; "
                f"{'would be harmful' if harmful else 'would be kept'}: {verdict.reason}"
            ))
            self.audit_log.append(verdict)
            del self.audit_log[:-AUDIT_HISTORY]
            if self.runlog is not None:
                self.runlog.write_audit(verdict.to_dict())
            closed.append(verdict)
        return closed

    def _close_audits(self, step: int) -> list[LifecycleAction]:
        """Judge the edits whose audit window has passed; roll back the harmful ones (lifecycle/audit.py)."""
        actions: list[LifecycleAction] = []
        for i in sorted(self.audits):
            audit = self.audits[i]
            if step < audit.due_step:
                continue
            view = self.layer_view(i).to_host()
            after = slot_readings(torch.nan_to_num(view.share_slow, nan=0.0), view.phi_slow, audit.slots)
            losses = [(s, v) for s, v in self.losses if s > audit.edit_step]
            F_now = free_energy(view, self.config)
            harmful, verdict = judge(audit, F_now, after, losses, self.config, step)
            del self.audits[i]
            self.audit_log.append(verdict)
            del self.audit_log[:-AUDIT_HISTORY]
            if self.runlog is not None:
                self.runlog.write_audit(verdict.to_dict())
            if not harmful:
                continue
            record = roll_back(audit, self._parts(i), self.registry, step=step, surgery=self.surgery)
            self.last_edit_step[i] = step
            self.barred[(i, audit.action)] = step + self.config.lifecycle.rollback_penalty_steps
            rec = rollback_record(audit, verdict, run_id=self.run_id, F_now=F_now.total)
            self.decision_log.append(rec)
            actions.append(LifecycleAction(
                step=step, layer_id=i, action="rollback", expert_id=audit.expert_id, child_id=audit.child_id,
                reason=verdict.reason, trigger=rec.trigger, delta_F=0.0, record=record,
            ))
        return actions

    def _review(
        self, step: int, review_due: bool, emergency: Mapping[int, str], snapshot: SystemSnapshot | None = None
    ) -> tuple[list[LifecycleAction], list[LayerDecision]]:
        views = {i: self.layer_view(i, snapshot) for i in range(len(self.layers))}
        cooldown = self.config.lifecycle.cooldown_steps
        cooldown_ok = {
            i: (last is None or step - last >= cooldown) and i not in self.audits
            for i, last in enumerate(self.last_edit_step)
        }
        flags = {i: i in emergency for i in views}
        barred: dict[int, list[str]] = {}
        for (layer, action), until in self.barred.items():
            if step < until:
                barred.setdefault(layer, []).append(action)
        decisions = review(views, self.config, cooldown_ok=cooldown_ok, emergency=flags, review_due=review_due,
                           barred=barred)
        actions: list[LifecycleAction] = []
        for d in decisions:
            i = d.layer_id
            if not review_due and not flags[i]:
                continue
            trigger = (
                f"scheduled review (every {self.config.lifecycle.eval_interval} step() calls)" if review_due
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
                                      readings=expert_readings(views[i], self.observers[i].coherence, None, None))
                if rec is not None:
                    self.decision_log.append(rec)
                continue
            readings = expert_readings(views[i], self.observers[i].coherence, self.biases[i], edit.expert_id)
            parts = self._parts(i)
            touched = slots_touched(edit, self.registry)
            before = snapshot_slots(self.registry, self.banks[i], i, touched)
            router_before = router_state(parts, touched)
            record = apply_edit(edit, parts, self.registry, views[i], step=step, generator=self.generator,
                                surgery=self.surgery)
            self._live.pop(i, None)  # its weights changed: the refresh sketches them anew
            self.last_edit_step[i] = step
            if edit.action in REMOVING_ACTIONS:  # no regrowth on readings taken before the removal
                for kind in GROWING_ACTIONS:
                    until = step + self.config.lifecycle.regrow_hold_steps
                    self.barred[(i, kind)] = max(self.barred.get((i, kind), 0), until)
            rec = decision_record(d, step=step, run_id=self.run_id, trigger=trigger, slot_ids=slot_ids,
                                  readings=readings, record=record)
            assert rec is not None
            self.decision_log.append(rec)
            self.audits[i] = open_audit(
                edit, record, parts, before, router_before, views[i], step=step, child_id=rec.child_id,
                expert_id=rec.expert_id, losses=self.losses,
            )
            actions.append(LifecycleAction(
                step=step, layer_id=i, action=edit.action, expert_id=rec.expert_id, child_id=rec.child_id,
                reason=rec.reason or "", trigger=trigger, delta_F=edit.delta_F, record=record,
            ))
        return actions, decisions

    def _selection_biases(self, i: int) -> tuple[Tensor, ...]:
        """Layer i's per-slot selection biases that edits must carry: a balancer's, the mid clock's offset."""
        out = []
        balancer = self.adapters[i].selection_bias()
        if balancer is not None:
            out.append(balancer)
        lens = self.lenses.get(i)
        if lens is not None:
            out.append(lens.offset)
        return tuple(out)

    @property
    def decisions(self) -> list[DecisionRecord]:
        return list(self.decision_log.records)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, composed of the parts' own state; plain containers and tensors
        (`torch.load(weights_only=True)`). What lives on the layers (weights, active masks, beta) is the model's
        state: save and load that too (the model's before the system's)."""
        if self._dp is not None:  # data parallel: often called on rank 0 alone, so it issues no collective
            if self._dp.pending and self._dp.work is None:
                raise RuntimeError(
                    "state_dict() was called while a forward's statistics are not yet reduced across ranks: "
                    "call it after step() (every rank then holds the same state; save it on rank 0)"
                )
            self._settle()
        controller_state = None
        if self.controller is not None and callable(getattr(self.controller, "state_dict", None)):
            controller_state = self.controller.state_dict()
        surgery = self.surgery.state_dict() if self.surgery is not None else self._surgery_state
        return {
            "format": STATE_FORMAT,
            "run_id": self.run_id,
            "config": self.config.to_dict(),
            "layer_names": list(self.layer_names),
            "layer_steps": list(self.layer_steps),
            "step_calls": self.step_calls,
            "last_edit_step": [-1 if s is None else s for s in self.last_edit_step],
            "observers": [{k: v.clone() for k, v in obs.state_dict().items()} for obs in self.observers],
            "registry": self.registry.state_dict(),
            "counter": self.counter.state_dict(),
            "alert_history": self.alert_history.to_dict(),
            "controller": controller_state,
            "rng": self.generator.get_state(),
            "decisions": [r.to_json() for r in self.decision_log.records],
            "surgery": None if surgery is None else copy.deepcopy(dict(surgery)),
            "vocabulary": None if self.vocabulary is None else list(self.vocabulary),
            "losses": [list(p) for p in self.losses],
            "audits": {str(i): a.state_dict() for i, a in self.audits.items()},
            "audit_log": [r.to_dict() for r in self.audit_log],
            "barred": [[layer, action, until] for (layer, action), until in self.barred.items()],
            "pressure": {str(i): p for i, p in self.pressure.items()},
            "shadows": [None if sh is None else sh.state_dict() for sh in self.shadows],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`. Everything is validated on copies first, values as well as shapes
        (`check_state_values`: finite clocks and state, counts and steps >= 0; the registry's live experts within
        the config's limits and equal to the layers' active masks): on error (ValueError naming the key, the
        value and what was expected) the system is unchanged. A checkpoint saved under another config raises,
        naming the fields that differ (build the system with `ChronoConfig.from_dict(state["config"])` to resume
        it). The model's state must be loaded first: the layers' active masks must agree with the saved
        registry."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"ChronoSystem state format {got!r} is unsupported: expected {STATE_FORMAT}")
        saved_config = ChronoConfig.from_dict(state["config"])
        differ = self.config.diff(saved_config)
        if differ:
            raise ValueError(
                f"the checkpoint was saved under another config: {differ} differ; build the system with the "
                "saved config (ChronoConfig.from_dict(state['config'])) to resume it"
            )
        names = list(state["layer_names"])
        if names != self.layer_names:
            raise ValueError(f"saved state has MoE layers {names}; this system has {self.layer_names}")
        saved_widths = [len(layer) for layer in state["registry"]["slots"]]
        widths = [b.num_slots for b in self.banks]
        if saved_widths != widths:
            raise ValueError(
                f"saved state has {saved_widths} expert slots per MoE layer; this system's model has {widths}: build "
                "the model at the saved width and load its state before the system's"
            )
        check_state_values(state, names)
        new_observers = []
        for i, (obs, saved) in enumerate(zip(self.observers, state["observers"], strict=True)):
            clone = copy.deepcopy(obs)
            if any(k.startswith("tokens.") for k in saved):
                clone.enable_tokens()
            mine = clone.state_dict()
            for key, value in saved.items():
                if key in mine and tuple(mine[key].shape) != tuple(value.shape):
                    raise ValueError(
                        f"layer {i} ({names[i]}) state {key!r} has shape {tuple(value.shape)}; this system expects "
                        f"{tuple(mine[key].shape)} (a different number of expert slots or hidden width?)"
                    )
            try:
                clone.load_state_dict(saved, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"layer {i} ({names[i]}) state does not match: {exc}") from None
            new_observers.append(clone)
        registry = copy.deepcopy(self.registry)
        registry.load_state_dict(state["registry"])
        for i, banks in enumerate(self.banks):
            expected, got = registry.active_mask(i), banks.active_mask.detach().cpu()
            if not torch.equal(expected, got):
                raise ValueError(
                    f"layer {i} ({names[i]}) routes to slots {got.nonzero().flatten().tolist()} but the saved registry "
                    f"has live experts in {expected.nonzero().flatten().tolist()}: load the model's state_dict "
                    "(which holds the active masks) before the system's"
                )
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
        surgery_state = state["surgery"]
        if surgery_state is not None and self.surgery is not None:
            probe = copy.copy(self.surgery)
            probe.load_state_dict(surgery_state)  # validates before anything below changes
        shadow_states = state.get("shadows")  # absent in checkpoints from before the shadow copies
        if shadow_states is not None:
            if len(shadow_states) != len(self.shadows):
                raise ValueError(f"saved state has {len(shadow_states)} shadow banks; expected {len(self.shadows)}")
            for sh, saved_sh in zip(self.shadows, shadow_states, strict=True):
                if sh is not None and saved_sh is not None:
                    sh.check_state_dict(saved_sh)  # validates before anything changes
        # ---- commit (nothing below can fail on a validated state)
        for obs, new in zip(self.observers, new_observers, strict=True):
            if new.tokens is not None:
                obs.enable_tokens()
            obs.load_state_dict(new.state_dict())
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
        self.losses = [(int(s), float(v)) for s, v in state["losses"]]
        self.audits = {int(i): Audit.from_state_dict(a) for i, a in state["audits"].items()}
        self.audit_log = [AuditRecord(**r) for r in state["audit_log"]][-AUDIT_HISTORY:]
        self.barred = {(int(layer), str(action)): int(until) for layer, action, until in state["barred"]}
        self.pressure = {int(i): float(p) for i, p in state["pressure"].items()}
        vocabulary = state.get("vocabulary")
        self.vocabulary = None if vocabulary is None else [str(w) for w in vocabulary]
        if self.output_dir is not None:
            self._resume_run_dir()
        self.decision_log.records = records[-self.decision_log.max_records :]
        if self.surgery is not None and surgery_state is not None:
            self.surgery.load_state_dict(surgery_state)
        else:
            self._surgery_state = surgery_state
        if shadow_states is not None:
            for sh, saved_sh in zip(self.shadows, shadow_states, strict=True):
                if sh is not None and saved_sh is not None:
                    sh.load_state_dict(saved_sh)
