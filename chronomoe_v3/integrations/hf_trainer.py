"""A Hugging Face `Trainer` callback that runs a `ChronoSystem` inside `Trainer.train()` (transformers 5.x).

    system = ChronoSystem(model, output_dir="runs/")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    ChronoCallback.attach(trainer, system)            # or Trainer(..., callbacks=[ChronoCallback(system)])
    trainer.train()

Per Trainer event:
- `on_train_begin`: checks that the system observes the Trainer's model (the model itself or one of its submodules;
  ValueError otherwise) and attaches the Trainer's optimizer (`system.attach_optimizer`), unwrapping accelerate's
  `AcceleratedOptimizer`, so that the optimiser surgery hooks the optimizer whose `step` runs. The Trainer creates
  its optimizer before this event; a missing one is a RuntimeError.
- `on_evaluate` (`every_eval=True`): one `system.step(loss=...)` per evaluation.
- `every_steps=N`: one `system.step(loss=...)` every N optimizer steps (`state.global_step`), run once the Trainer
  has logged that step: `on_step_end` marks it due and the next `on_step_begin` (or `on_train_end`, after the last
  step) runs it, before the next forward, so the loss the Trainer logs at that step is included.
  At most one `step()` runs per training step (an evaluation of several eval sets, or an evaluation on an
  `every_steps` step, calls it once); evaluations outside `train()` (before the first observed forward, after
  `on_train_end`) call nothing.
- `on_train_end`: `system.close()` (judges the edits still under audit); its records are kept in `closed`.
- `observe_tokens=True`: a forward pre-hook on the system's model, for the time of `train()`, hands each training
  forward's `input_ids` to `system.observe_tokens` (the run report's token basins); forwards without `input_ids`
  (embeddings passed instead) are left alone.

**The loss handed to `step()`** (`loss=`): `"train"` (default) is the mean training loss over the steps the Trainer
logged (`state.log_history` entries with a `loss`, each weighted by the steps it covers) since the previous
`step()` call, or None when it logged none since (a warning says so once: set `TrainingArguments.logging_steps`
no larger than the interval between `step()` calls); `"eval"` is the evaluation's `eval_loss` (None for
`every_steps` calls); None passes nothing. One source per run, never a fallback from one to the other: the audits
compare the losses before and after an edit, and a training loss is not comparable with an evaluation loss. The
outcome benchmark passes the mean training loss, as `"train"` does.

**How the metrics reach the Trainer's loggers** (`log_metrics=True`). The Trainer hands its callbacks no
reference to itself (so no `Trainer.log`), and `on_log` hands every callback the same `logs` dict in the order of
`trainer.callback_handler.callbacks`, where transformers 5.23 puts the `report_to` integrations (TensorBoard, W&B,
...) *before* the callbacks a user passes: merging into `logs` there reaches only the callbacks after this one,
never those reporters. So:
- bound to the trainer (`ChronoCallback.attach(trainer, system)`, or `callback.bind(trainer)`): each `step()`'s
  `metrics` go through `trainer.log(...)`, the Trainer's own logging path: every reporter, the progress printer
  and `state.log_history` receive them as one log event at that global step (`control.should_log` is kept as the
  Trainer had it);
- unbound (only passed in `callbacks=[...]`): the metrics wait for the Trainer's next log event (the callback asks
  for one at the next step end through `control.should_log`) and are merged into its `logs` and its
  `state.log_history` entry; reporters placed before this callback do not see them, and a warning says so at
  `on_train_begin` when `args.report_to` names any. Metrics of a `step()` after the Trainer's last log event
  (at `on_train_end`) only reach `state.log_history`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from transformers import Trainer  # importing the Trainer needs accelerate: only at training time

LOSS_SOURCES = ("train", "eval")


class SystemLike(Protocol):
    """What the callback uses of a `chronomoe_v3.ChronoSystem` (duck-typed: integrations sit below the system)."""

    model: nn.Module

    @property
    def global_step(self) -> int: ...

    def step(self, snapshot: Any = None, lenses: Any = None, loss: float | None = None) -> Any: ...

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def close(self) -> list[Any]: ...

    def observe_tokens(self, token_ids: torch.Tensor) -> None: ...


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that keep it as `.optimizer` (accelerate's `AcceleratedOptimizer`)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"the Trainer's optimizer is a {type(optimizer).__name__}; expected a torch.optim.Optimizer")
    return inner


def _reporters(args: TrainingArguments) -> list[str]:
    report_to = getattr(args, "report_to", None)
    if report_to is None or report_to == "none":
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n != "none"]


class ChronoCallback(TrainerCallback):
    """Runs `system` (a `ChronoSystem` of the Trainer's model) inside `Trainer.train()` (module docstring).

    `every_eval`: one `step()` per evaluation. `every_steps`: one `step()` every that many optimizer steps (None:
    none). `loss`: `"train"`, `"eval"` or None, the loss handed to `step()`. `log_metrics`: send each `step()`'s
    `metrics` to the Trainer's loggers. `close_at_end`: call `system.close()` at `on_train_end`. `observe_tokens`:
    hand each training forward's `input_ids` to the system (token basins). `results` keeps every `StepResult`,
    `closed` the audit records `close()` returned.
    """

    def __init__(
        self,
        system: SystemLike,
        *,
        every_eval: bool = True,
        every_steps: int | None = None,
        loss: str | None = "train",
        log_metrics: bool = True,
        close_at_end: bool = True,
        observe_tokens: bool = True,
    ) -> None:
        missing = [n for n in ("model", "step", "attach_optimizer", "close", "global_step") if not hasattr(system, n)]
        if missing:
            raise TypeError(
                f"system is a {type(system).__name__} without {missing}; expected a chronomoe_v3.ChronoSystem"
            )
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)
                                        or every_steps < 1):
            raise ValueError(f"every_steps={every_steps!r} is invalid: expected an integer >= 1 or None")
        if not every_eval and every_steps is None:
            raise ValueError("every_eval=False and every_steps=None: the system would never step; enable one")
        if loss is not None and loss not in LOSS_SOURCES:
            raise ValueError(f"loss={loss!r} is invalid: expected one of {list(LOSS_SOURCES)} or None")
        self.system = system
        self.every_eval = bool(every_eval)
        self.every_steps = every_steps
        self.loss = loss
        self.log_metrics = bool(log_metrics)
        self.close_at_end = bool(close_at_end)
        self.observe_tokens = bool(observe_tokens) and callable(getattr(system, "observe_tokens", None))
        self._token_hook: RemovableHandle | None = None
        self.trainer: Trainer | None = None
        self.results: list[Any] = []
        self.closed: list[Any] | None = None
        self._training = False
        self._last_step: int | None = None  # the global step of the last system.step()
        self._due = False  # every_steps: a step() is due before the next forward
        self._history_seen = 0  # entries of state.log_history already read for training losses
        self._loss_step = 0  # the global step of the last training-loss log read
        self._pending: dict[str, float] = {}  # unbound: metrics waiting for the Trainer's next log event
        self._warned_loss = False

    # ------------------------------------------------------------------ binding
    @classmethod
    def attach(cls, trainer: Trainer, system: SystemLike, **options: Any) -> ChronoCallback:
        """A callback for `system`, bound to `trainer` (metrics through `trainer.log`) and added to it."""
        callback = cls(system, **options)
        callback.bind(trainer)
        trainer.add_callback(callback)
        return callback

    def bind(self, trainer: Trainer) -> None:
        """Log through `trainer.log` (every reporter sees the metrics); checks the model at once."""
        if not callable(getattr(trainer, "log", None)) or not isinstance(getattr(trainer, "model", None), nn.Module):
            raise TypeError(f"trainer is a {type(trainer).__name__}; expected a transformers Trainer")
        self._check_model(trainer.model)
        self.trainer = trainer

    def _check_model(self, model: Any) -> None:
        observed = self.system.model
        if not isinstance(model, nn.Module) or not any(m is observed for m in model.modules()):
            raise ValueError(
                f"the ChronoSystem observes a {type(observed).__name__} that is neither the Trainer's model (a "
                f"{type(model).__name__}) nor one of its submodules: build the system on the model you give the "
                "Trainer (ChronoSystem(model), then Trainer(model=model, ...))"
            )

    # ------------------------------------------------------------------ events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._check_model(kwargs.get("model"))
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("the Trainer gave on_train_begin no optimizer: ChronoCallback needs transformers>=5.23")
        self.system.attach_optimizer(unwrap_optimizer(optimizer))
        if self.observe_tokens and self._token_hook is None:
            self._token_hook = self.system.model.register_forward_pre_hook(self._hand_tokens, with_kwargs=True)
        self._training = True
        self._due = False
        self._history_seen = len(state.log_history)
        self._loss_step = state.global_step
        self.closed = None
        reporters = _reporters(args)
        if self.trainer is None and self.log_metrics and reporters:
            warnings.warn(
                f"ChronoCallback is not bound to the Trainer: the report_to integrations {reporters} run before it "
                "and will not see chronomoe's metrics; use ChronoCallback.attach(trainer, system) instead",
                stacklevel=2,
            )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._due:  # the previous step's logs (its training loss) are in state.log_history now
            self._due = False
            self._step(state, control, eval_metrics=None)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.every_steps is not None and state.global_step % self.every_steps == 0:
            self._due = True
        if self._pending:
            control.should_log = True  # unbound: have the Trainer log this step, so that on_log carries them

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.every_eval:
            metrics = kwargs.get("metrics")
            self._step(state, control, eval_metrics=metrics if isinstance(metrics, Mapping) else None)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        logs = kwargs.get("logs")
        if not self._pending or not isinstance(logs, dict):
            return
        logs.update(self._pending)
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(self._pending)  # the Trainer stored a copy of `logs` before on_log
        self._pending = {}

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._due:
            self._due = False
            self._step(state, control, eval_metrics=None)
        if self._pending:  # unbound, after the Trainer's last log event: kept in the history only
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending = {}
        self._training = False
        if self._token_hook is not None:
            self._token_hook.remove()
            self._token_hook = None
        if self.close_at_end:
            self.closed = self.system.close()

    def _hand_tokens(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self.system.observe_tokens(ids)

    # ------------------------------------------------------------------ one step of the system
    def _step(self, state: TrainerState, control: TrainerControl, eval_metrics: Mapping[str, Any] | None) -> None:
        if not self._training or self.system.global_step == 0 or self._last_step == state.global_step:
            return  # outside train(), before any observed forward, or already stepped at this training step
        result = self.system.step(loss=self._loss(state, eval_metrics))
        self._last_step = state.global_step
        self.results.append(result)
        metrics = dict(getattr(result, "metrics", {}) or {})
        if not self.log_metrics or not metrics:
            return
        if self.trainer is not None:
            keep = control.should_log
            self.trainer.log(metrics)  # the Trainer's own path: reporters, printer, log_history
            control.should_log = keep  # CallbackHandler.on_log cleared it; the Trainer's own log may be due
        else:
            self._pending.update(metrics)

    def _loss(self, state: TrainerState, eval_metrics: Mapping[str, Any] | None) -> float | None:
        history = state.log_history
        new = history[self._history_seen:]
        self._history_seen = len(history)
        if self.loss == "eval":
            value = None if eval_metrics is None else eval_metrics.get("eval_loss")
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        if self.loss is None:
            return None
        total = steps = 0.0
        for entry in new:  # each logged loss is the mean over the steps since the Trainer's previous log
            value, step = entry.get("loss"), entry.get("step")
            if not isinstance(value, (int, float)) or not isinstance(step, int) or not math.isfinite(value):
                continue
            span = max(step - self._loss_step, 1)
            self._loss_step = step
            total += float(value) * span
            steps += span
        if steps:
            return total / steps
        if not self._warned_loss:
            self._warned_loss = True
            warnings.warn(
                f"ChronoCallback: the Trainer logged no training loss since the previous chronomoe step (training "
                f"step {state.global_step}), so system.step() gets no loss and the audits judge edits without it; set "
                "TrainingArguments(logging_steps=...) no larger than the interval between chronomoe steps",
                stacklevel=2,
            )
        return None
