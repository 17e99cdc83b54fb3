"""The Hugging Face Trainer integration (`chronomoe_v3.integrations.hf_trainer.ChronoCallback`) with a real
`transformers.Trainer` on a tiny fixed-width Mixtral, the example built on it, and the bad inputs of HF models:
a dtype move after attaching, a state saved at one fixed width loaded at another."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from chronomoe_v3 import ChronoSystem  # noqa: E402
from chronomoe_v3.integrations.hf import build_fixed_width  # noqa: E402
from chronomoe_v3.integrations.hf_trainer import ChronoCallback, unwrap_optimizer  # noqa: E402
from chronomoe_v3.trace import MoETrace  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
V, SLOTS, ACTIVE = 64, 8, 6


def _config(**overrides: Any) -> Any:
    fields = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=SLOTS, num_experts_per_tok=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    fields.update(overrides)
    return transformers.MixtralConfig(**fields)


def _model(slots: int = SLOTS, seed: int = 0, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    return build_fixed_width(transformers.MixtralForCausalLM, _config(**overrides), slots, ACTIVE)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randint(3, V, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Reporter(TrainerCallback):
    """Stands for a report_to integration (TensorBoard, W&B): it reads `logs` in on_log."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.seen.append(dict(logs))


class LateReporter(Reporter):
    """A reporter registered after the chronomoe callback."""


def _args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    fields: dict[str, Any] = dict(
        output_dir=str(tmp_path / "trainer"), max_steps=12, per_device_train_batch_size=4, logging_steps=2,
        eval_strategy="steps", eval_steps=4, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
        learning_rate=1e-3, seed=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def _trainer(model: Any, args: TrainingArguments, callbacks: list[Any] | None = None) -> Trainer:
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(8, 1),
                      callbacks=callbacks)
    trainer.remove_callback(transformers.PrinterCallback)  # keep the test output short
    return trainer


def _chrono_logs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if "chronomoe/step" in e]


# ---------------------------------------------------------------------- the callback with a real Trainer
def test_a_bound_callback_logs_through_trainer_log_so_every_reporter_sees_the_metrics(tmp_path: Path) -> None:
    model = _model()
    system = ChronoSystem(model, run_id="trainer-run", output_dir=tmp_path / "runs")
    reporter = Reporter()  # registered before the chronomoe callback, as report_to integrations are
    trainer = _trainer(model, _args(tmp_path, eval_on_start=True), callbacks=[reporter])
    callback = ChronoCallback.attach(trainer, system)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("Reporter") < names.index("ChronoCallback")
    trainer.train()

    # one step() per evaluation at steps 4, 8, 12 (the evaluation on start, before any forward, steps nothing)
    assert [r.metrics["chronomoe/step"] for r in callback.results] == [4.0, 8.0, 12.0]
    seen = _chrono_logs(reporter.seen)
    assert [e["chronomoe/step"] for e in seen] == [4.0, 8.0, 12.0]
    assert all(any(k.startswith("chronomoe/L1/E") for k in e) for e in seen)
    history = _chrono_logs(trainer.state.log_history)
    assert [e["step"] for e in history] == [4, 8, 12]
    # the Trainer's own training-loss logs were not suppressed by the extra log events
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4, 6, 8, 10, 12]
    # the loss handed to step(): the mean of the training losses logged since the previous step()
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert system.losses == [
        (4, pytest.approx((logged[2] + logged[4]) / 2)), (8, pytest.approx((logged[6] + logged[8]) / 2)),
        (12, pytest.approx((logged[10] + logged[12]) / 2)),
    ]
    # the Trainer's optimizer (unwrapped from accelerate's wrapper) is the one the edits keep in step
    assert system.surgery is not None and system.surgery.optimizer is unwrap_optimizer(trainer.optimizer)
    assert isinstance(system.surgery.optimizer, torch.optim.AdamW)
    assert callback.closed == [] and callback._token_hook is None
    run_dir = tmp_path / "runs" / "trainer-run"
    assert (run_dir / "readings.jsonl").read_text().count("\n") == 3
    assert (run_dir / "basins.json").exists()  # input_ids were handed to observe_tokens


def test_an_unbound_callback_merges_into_the_next_log_event(tmp_path: Path) -> None:
    model = _model()
    system = ChronoSystem(model)
    before, after = Reporter(), LateReporter()
    callback = ChronoCallback(system, every_eval=False, every_steps=3)
    trainer = _trainer(model, _args(tmp_path, eval_strategy="no", logging_steps=3),
                       callbacks=[before, callback, after])
    trainer.train()
    # step() every 3 optimizer steps, run after the Trainer logged that step (its loss included)
    assert [r.metrics["chronomoe/step"] for r in callback.results] == [3.0, 6.0, 9.0, 12.0]
    # the callback asked for a log at the step after each step() (4, 7, 10): the mean loss over the steps
    # since the previous step() weights each logged mean by the steps it covers
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == [3, 4, 6, 7, 9, 10, 12]
    expected = [logged[3], (logged[4] + 2 * logged[6]) / 3, (logged[7] + 2 * logged[9]) / 3,
                (logged[10] + 2 * logged[12]) / 3]
    assert [s for s, _ in system.losses] == [3, 6, 9, 12]
    assert [v for _, v in system.losses] == pytest.approx(expected)
    # merged into the Trainer's next log event: callbacks after it see them, the history keeps them
    assert _chrono_logs(before.seen) == []
    assert [e["chronomoe/step"] for e in _chrono_logs(after.seen)] == [3.0, 6.0, 9.0]
    assert [e["chronomoe/step"] for e in _chrono_logs(trainer.state.log_history)] == [3.0, 6.0, 9.0, 12.0]


def test_eval_loss_mode_and_the_warning_when_no_training_loss_was_logged(tmp_path: Path) -> None:
    model = _model()
    system = ChronoSystem(model)
    callback = ChronoCallback.attach(_trainer(model, _args(tmp_path, max_steps=8)), system, loss="eval")
    assert callback.trainer is not None
    callback.trainer.train()
    evals = [e["eval_loss"] for e in callback.trainer.state.log_history if "eval_loss" in e]
    assert [v for _, v in system.losses] == pytest.approx(evals)

    other = _model(seed=1)
    quiet = ChronoSystem(other)
    trainer = _trainer(other, _args(tmp_path, max_steps=8, logging_steps=100))
    ChronoCallback.attach(trainer, quiet)
    with pytest.warns(UserWarning, match="logged no training loss since the previous chronomoe step"):
        trainer.train()
    assert quiet.losses == [] and quiet.step_calls == 2


def test_an_unbound_callback_warns_when_report_to_names_integrations() -> None:
    model = _model()
    callback = ChronoCallback(ChronoSystem(model), observe_tokens=False)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.warns(UserWarning, match=r"report_to integrations \['wandb'\] run before it"):
        callback.on_train_begin(SimpleNamespace(report_to=["wandb"]), state, control, model=model, optimizer=optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_begin(SimpleNamespace(report_to="none"), state, control, model=model, optimizer=optimizer)


def test_misuse_is_named(tmp_path: Path) -> None:
    model, other = _model(), _model(seed=1)
    system = ChronoSystem(other)
    trainer = _trainer(model, _args(tmp_path))
    with pytest.raises(ValueError, match="observes a MixtralForCausalLM that is neither the Trainer's model"):
        ChronoCallback.attach(trainer, system)
    trainer.add_callback(ChronoCallback(system))
    with pytest.raises(ValueError, match="neither the Trainer's model"):
        trainer.train()
    # a system of a submodule of the Trainer's model is fine
    ChronoCallback(ChronoSystem(model.model)).bind(trainer)
    with pytest.raises(TypeError, match="expected a chronomoe_v3.ChronoSystem"):
        ChronoCallback(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_steps=0 is invalid"):
        ChronoCallback(system, every_steps=0)
    with pytest.raises(ValueError, match="the system would never step"):
        ChronoCallback(system, every_eval=False)
    with pytest.raises(ValueError, match="loss='val' is invalid"):
        ChronoCallback(system, loss="val")
    with pytest.raises(TypeError, match="expected a transformers Trainer"):
        ChronoCallback(system).bind(object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- bad input: dtype, device, width
def test_a_dtype_move_after_attaching_keeps_working_and_keeps_chronomoe_state_fp32() -> None:
    model = _model()
    system = ChronoSystem(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    system.attach_optimizer(opt)
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    system.step(loss=4.0)
    system.lenses[0].offset.fill_(1.0 / 3.0)
    model.to(torch.bfloat16)  # grouped_mm experts run in bf16 (not in fp64 on CPU)
    block = model.model.layers[0].mlp.chrono
    assert block.active_mask.dtype == torch.bool
    assert block.slow_bias.beta.dtype == torch.float32
    for name in ("offset", "steering", "scale"):
        assert getattr(block.logit_lens, name).dtype == torch.float32, name
    assert float(block.logit_lens.offset[0]) == pytest.approx(1.0 / 3.0, abs=1e-7)  # not rounded to bf16
    assert system.lenses[0] is block.logit_lens
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
    result = system.step(loss=4.0)
    assert result.metrics["chronomoe/step"] == 3.0 and all(torch.isfinite(o.coherence.phi_clocks[0][:ACTIVE]).all()
                                                           for o in system.observers)

    eager = _model(seed=1)  # fp64 with the eager experts (torch's grouped_mm has no fp64 kernel)
    eager.config._experts_implementation = "eager"
    for layer in eager.model.layers:
        layer.mlp.experts.config._experts_implementation = "eager"
    wide = ChronoSystem(eager)
    eager.double()
    eager(ids, labels=ids).loss.backward()
    assert wide.step().metrics["chronomoe/step"] == 1.0


def test_a_forward_on_another_device_than_the_system_is_named() -> None:
    model = _model()
    system = ChronoSystem(model)
    block = model.model.layers[1].mlp.chrono
    observe = next(iter(block.observers.values()))
    index = torch.zeros(4, 2, dtype=torch.long, device="meta")
    trace = MoETrace(index, torch.ones(4, 2, device="meta"), torch.ones(4, 2, 32, device="meta"), SLOTS)
    with pytest.raises(RuntimeError, match=r"'model.layers.1.mlp' now runs on meta, but this ChronoSystem keeps its "
                                           r"state for it on cpu: move the model before building the system"):
        observe(trace)
    assert system.layer_steps == [0, 0]


def test_a_state_saved_at_one_fixed_width_refuses_a_model_of_another_width() -> None:
    model = _model(slots=8)
    system = ChronoSystem(model)
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    system.step()
    model_state, system_state = model.state_dict(), system.state_dict()
    wider = _model(slots=12)
    wider_system = ChronoSystem(wider)
    with pytest.raises(ValueError, match=r"MoE block 'model.layers.0.mlp': the state has 8 expert slots, this model "
                                         r"12; build the model at the saved width \(build_fixed_width\(model_cls, "
                                         r"config, num_slots=8"):
        wider.load_state_dict(model_state)
    with pytest.raises(ValueError, match=r"saved state has \[8, 8\] expert slots per MoE layer; this system's model "
                                         r"has \[12, 12\]"):
        wider_system.load_state_dict(system_state)
    same = _model(slots=8, seed=3)  # the same width loads, model first, then the system
    same_system = ChronoSystem(same)
    same.load_state_dict(model_state)
    same_system.load_state_dict(system_state)
    assert same_system.layer_steps == system.layer_steps


# ---------------------------------------------------------------------- the example
def test_the_hf_mixtral_example_runs_and_renders_its_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_mixtral_lifecycle.py"), "--steps", "20", "--out",
         str(tmp_path), "--quiet", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "20 steps in" in proc.stdout and "report:" in proc.stdout
    run_dir = tmp_path / "hf-mixtral-lifecycle"
    assert (run_dir / "readings.jsonl").read_text().count("\n") == 2  # step() at 10 and 20
    assert (run_dir / "report" / "index.html").stat().st_size > 1000
