"""chronomoe on a Hugging Face model, trained by the Hugging Face Trainer: a tiny Mixtral on Shakespeare.

The model is a `MixtralForCausalLM` (2 layers, d_model 64, 4 heads, intermediate 128) built at a fixed width of 8
expert slots per layer with 6 active (`build_fixed_width`), so the slow clock has free slots to spawn or split
into. `ChronoCallback.attach(trainer, system)` runs the system inside `Trainer.train()`: the Trainer's optimizer
is attached when training begins, `system.step(loss=...)` runs every 10 training steps with the mean training loss
the Trainer logged, the metrics go through the Trainer's own logging, and `system.close()` runs at the end.
Short clocks (as in lifecycle_demo.py) let the slow clock act within a few hundred steps. At the end the run
report is rendered.

    python examples/hf_mixtral_lifecycle.py [--steps 500] [--out runs/]     # under a minute on one CPU core

The run directory is `<out>/hf-mixtral-lifecycle/`, its report `<out>/hf-mixtral-lifecycle/report/index.html`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from chronomoe_v3 import ChronoSystem
from chronomoe_v3.config import BasinConfig, ChronoConfig, DegradeConfig, LifecycleConfig, ObjectiveConfig
from chronomoe_v3.integrations.hf import build_fixed_width
from chronomoe_v3.integrations.hf_trainer import ChronoCallback
from chronomoe_v3.report import render_report
from chronomoe_v3.toy.datasets import CharCorpus, load_shakespeare

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None

RUN_ID = "hf-mixtral-lifecycle"
SLOTS, ACTIVE = 8, 6
STEP_EVERY = 10  # system.step() cadence, in training steps


class Windows(Dataset):
    """Fixed random windows of a character corpus, as causal-LM examples (the model shifts the labels)."""

    def __init__(self, corpus: CharCorpus, count: int, seq: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, corpus.data.numel() - seq, (count,), generator=g)
        self.rows = corpus.data[starts.unsqueeze(1) + torch.arange(seq)]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Progress(TrainerCallback):
    """A one-line progress bar (the Trainer's own printer would print every chronomoe metric) and the edits."""

    def __init__(self, chrono: ChronoCallback, total: int) -> None:
        self.chrono = chrono
        self.bar = tqdm(total=total, desc="training", unit="step") if tqdm is not None else None
        self.loss = self.eval_loss = float("nan")
        self.shown = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        self.eval_loss = logs.get("eval_loss", self.eval_loss)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        system = self.chrono.system
        live = [int(b.active_mask.sum()) for b in system.banks]  # type: ignore[attr-defined]
        for result in self.chrono.results[self.shown:]:
            for a in result.lifecycle_actions:
                line = f"step {a.step}: {a.action} L{a.layer_id} {a.expert_id or ''} -> {a.child_id or ''}: {a.reason}"
                if tqdm is not None:
                    tqdm.write(line)
                else:
                    print(line)
        self.shown = len(self.chrono.results)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss:.3f}", eval=f"{self.eval_loss:.3f}", live=live)
        elif state.global_step % 50 == 0:
            print(f"step {state.global_step}: loss {self.loss:.3f} eval {self.eval_loss:.3f} live {live}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def build(vocab: int, seq: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=seq, num_local_experts=SLOTS, num_experts_per_tok=2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    model = build_fixed_width(MixtralForCausalLM, config, num_slots=SLOTS, num_active=ACTIVE)
    assert isinstance(model, MixtralForCausalLM)
    return model


def eval_every(steps: int) -> int:
    """About three evaluations per run, on multiples of STEP_EVERY (a step() at an evaluation counts once)."""
    return max(STEP_EVERY, steps // 3 // STEP_EVERY * STEP_EVERY)


def short_clocks() -> ChronoConfig:
    """Clocks short enough for a few hundred steps (the defaults are for long runs)."""
    return ChronoConfig(
        lifecycle=LifecycleConfig(eval_interval=2, cooldown_steps=40, cooling_period=40, max_experts_per_layer=SLOTS),
        degrade=DegradeConfig(min_observations=50),
        objective=ObjectiveConfig(min_observations_to_judge=50),
        basins=BasinConfig(history=30),
    )


def main(
    steps: int = 500, out: Path = Path("runs"), seq: int = 128, batch: int = 16, quiet: bool = False, threads: int = 1
) -> Path:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    text = load_shakespeare(max_chars=300_000)
    corpus = CharCorpus.from_text(text)
    cut = int(0.9 * corpus.data.numel())
    train = CharCorpus(corpus.chars, corpus.data[:cut])
    val = CharCorpus(corpus.chars, corpus.data[cut:])
    model = build(corpus.vocab_size, seq)
    system = ChronoSystem(model, config=short_clocks(), run_id=RUN_ID, output_dir=out)
    system.set_vocabulary(corpus.chars)
    args = TrainingArguments(
        output_dir=str(out / f"{RUN_ID}-trainer"), max_steps=steps, per_device_train_batch_size=batch,
        per_device_eval_batch_size=32, learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=STEP_EVERY, eval_strategy="steps", eval_steps=eval_every(steps), save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Windows(train, steps * batch, seq, seed=1),
                      eval_dataset=Windows(val, 64, seq, seed=2))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    chrono = ChronoCallback.attach(trainer, system, every_steps=STEP_EVERY)
    if not quiet:
        trainer.add_callback(Progress(chrono, steps))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    print(f"\n{steps} steps in {seconds:.1f} s; {len(chrono.results)} chronomoe steps; "
          f"final eval loss {trainer.evaluate()['eval_loss']:.3f} nats/char")
    print("timeline of edits")
    for r in system.decisions:
        if r.action != "do_nothing":
            print(f"  step {r.step:4d}  {r.action:6s} layer {r.layer_id}  {r.expert_id or '-':10s} "
                  f"child {r.child_id or '-':10s} delta_F={r.free_energy.delta_F:+.4f}")
    print("live experts per layer:", [int(b.active_mask.sum()) for b in system.banks])
    run_dir = out / RUN_ID
    report = render_report(run_dir)
    print(f"run directory: {run_dir}\nreport: {report.index}")
    return run_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder of the run directory (default runs/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the matmuls are tiny, and extra threads stall on a busy CPU)")
    cli = parser.parse_args()
    if cli.steps < 1:
        parser.error(f"--steps={cli.steps} must be >= 1")
    main(steps=cli.steps, out=cli.out, quiet=cli.quiet, threads=cli.threads)
