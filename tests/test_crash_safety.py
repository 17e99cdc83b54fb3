"""Crash safety: a training run is SIGKILLed at a random step, in the middle of a decision-log append and at
three points of a checkpoint save, and resumed from its last checkpoint in a fresh process each time
(docs/reliability.md). After every kill: everything the run reported as logged is still readable, the
checkpoint is the previous one or the new one (never torn), and the next process resumes from it.

The child reports on stdout what it completed: `READING s` once `system.step()` returned (its readings line is
written), `DECISION <json>` once a decision record was appended, `SAVING s` / `CKPT s` around a checkpoint
save, `PAUSED <where>` when a kill hook stopped it mid-write (the parent then kills it)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from chronomoe_v3 import load_checkpoint, load_decisions
from chronomoe_v3.jsonl import load_jsonl
from chronomoe_v3.report import render_report

ROOT = Path(__file__).resolve().parents[1]
N_STEPS = 24
CHECKPOINT_EVERY = 2

CHILD = r'''
import hashlib, json, os, sys, time, warnings
from dataclasses import replace
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import chronomoe_v3.checkpoint
from chronomoe_v3 import ChronoConfig, ChronoSystem, load_checkpoint, save_checkpoint
from chronomoe_v3.config import BasinConfig, DegradeConfig, LifecycleConfig, ObjectiveConfig
from chronomoe_v3.lifecycle.decisions import DecisionLog
from chronomoe_v3.toy.models import TinyMoELM

out_dir, ckpt, mode, hook, n_steps, every = sys.argv[1:7]
n_steps, every = int(n_steps), int(every)

def say(*parts):
    print(*parts, flush=True)

def pause(where):
    say("PAUSED", where)
    time.sleep(600)

# kill hooks: stop in the middle of a write until the parent's SIGKILL
real_write, real_fsync, real_replace, real_save = os.write, os.fsync, os.replace, torch.save
if hook == "decision":  # half of the first decision line of this process is on disk
    def write(fd, data):
        data = bytes(data)
        if b'"free_energy"' in data:
            real_write(fd, data[: len(data) // 2])
            pause("decision")
        return real_write(fd, data)
    os.write = write
elif hook == "ckpt_write":  # half of the first checkpoint of this process is in its temporary file
    class Half:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            if self.n > 100_000:
                self.f.write(bytes(b)[: len(b) // 2])
                self.f.flush()
                pause("ckpt_write")
            return self.f.write(b)
        def flush(self):
            return self.f.flush()
    torch.save = lambda obj, f, **kw: real_save(obj, Half(f), **kw)
elif hook == "ckpt_fsync":  # the temporary file is complete, not yet renamed
    def fsync(fd):
        real_fsync(fd)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".ckpt.pt.") and name.endswith(".tmp"):
            pause("ckpt_fsync")
    os.fsync = fsync
elif hook == "ckpt_replaced":  # renamed, the directory not yet fsynced
    def replace_(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".pt"):
            pause("ckpt_replaced")
    os.replace = replace_

real_append = DecisionLog.append
def append(self, record):
    real_append(self, record)
    say("DECISION", record.to_json())
DecisionLog.append = append

FAST = ChronoConfig(
    lifecycle=LifecycleConfig(eval_interval=3, cooldown_steps=6, cooling_period=6, audit_steps=6),
    degrade=DegradeConfig(min_observations=5),
    objective=ObjectiveConfig(min_observations_to_judge=5, min_evidence_tokens=50),
    basins=BasinConfig(history=8),
)
CONFIG = replace(FAST, objective=replace(FAST.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                         prune_min_absorbable=0.0))
torch.manual_seed(0)
model = TinyMoELM(24, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=4)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
system = ChronoSystem(model, config=CONFIG, run_id="run", output_dir=out_dir)
system.attach_optimizer(opt)
start = 0
if mode == "resume":
    states = load_checkpoint(ckpt)
    model.load_state_dict(states["model"])
    opt.load_state_dict(states["optimizer"])
    system.load_state_dict(states["system"])
    start = states["step"]
    say("RESUMED", start, len(system.decisions))
for step in range(start, n_steps):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 24, (4, 13), generator=g)
    loss = model.loss(x[:, :-1], x[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    system.step(loss=float(loss.detach()))
    say("READING", step + 1)
    if (step + 1) % every == 0:
        say("SAVING", step + 1)
        save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(), system=system.state_dict(),
                        step=step + 1)
        with open(ckpt, "rb") as f:
            say("CKPT", step + 1, hashlib.sha256(f.read()).hexdigest())
say("DONE")
'''


@dataclass
class Child:
    """What one child process reported before it ended."""

    lines: list[str] = field(default_factory=list)
    killed: bool = False

    def values(self, tag: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.lines if line.split(" ", 1)[0] == tag]

    @property
    def decisions(self) -> list[str]:
        return self.values("DECISION")

    @property
    def readings(self) -> list[int]:
        return [int(s) for s in self.values("READING")]

    @property
    def checkpoints(self) -> list[tuple[int, str]]:
        return [(int(s.split()[0]), s.split()[1]) for s in self.values("CKPT")]

    @property
    def saving(self) -> list[int]:
        return [int(s) for s in self.values("SAVING")]


def run_child(tmp: Path, mode: str, hook: str, kill_after: str | None = None, delay: float = 0.0) -> Child:
    """Run the child; SIGKILL it as soon as it prints a line starting with `kill_after` (after `delay` s) or
    pauses in a hook. A watchdog kills it after 120 s."""
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, str(script), str(tmp / "out"), str(tmp / "ckpt.pt"), mode, hook, str(N_STEPS),
            str(CHECKPOINT_EVERY)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    watchdog = threading.Timer(600, proc.kill)  # a hang guard only (timings are not asserted)
    watchdog.start()
    child = Child()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            child.lines.append(line)
            if line.startswith("PAUSED") or (kill_after is not None and line == kill_after):
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                child.killed = True
                break
        proc.wait(timeout=60)
        child.lines += proc.stdout.read().splitlines()  # what it printed between that line and its death
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr is not None else ""
    if not child.killed:
        assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{stderr[-3000:]}"
    else:
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    return child


def is_subsequence(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


def check_after_kill(tmp: Path, history: list[Child], child: Child) -> tuple[int, list[str]]:
    """Everything reported so far is on disk and readable; the checkpoint is the previous or the new one.
    Returns the checkpoint's step and the notes of skipped lines."""
    run_dir = tmp / "out" / "run"
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_disk = [r.to_json() for r in load_decisions(run_dir / "lifecycle_decisions.jsonl", skipped=skipped)]
        readings = [r["step"] for r in load_jsonl(run_dir / "readings.jsonl", dict, skipped=skipped)]
    reported = [d for c in history for d in c.decisions]
    assert is_subsequence(reported, on_disk), "a decision record reported as logged is missing"
    assert is_subsequence([s for c in history for s in c.readings], readings), "a readings line is missing"
    # the checkpoint: the last completed save, or the save that was under way when the process died
    done = child.checkpoints or [c for h in history for c in h.checkpoints][-1:]
    digest = hashlib.sha256((tmp / "ckpt.pt").read_bytes()).hexdigest()
    step = int(load_checkpoint(tmp / "ckpt.pt")["step"])  # never torn: it always loads
    in_flight = [s for s in child.saving if s not in {c[0] for c in child.checkpoints}]
    if done and digest == done[-1][1]:
        assert step == done[-1][0]
    else:
        assert in_flight and step == in_flight[-1], (step, done, in_flight)
    return step, skipped


def test_kill_anywhere_and_resume(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    history: list[Child] = []

    def resume_check(child: Child, expected_step: int) -> None:
        resumed = child.values("RESUMED")
        assert resumed and int(resumed[0].split()[0]) == expected_step, (seed, resumed, expected_step)
        assert child.readings and child.readings[0] == expected_step + 1, "training did not go on from the checkpoint"

    # 1. a random step (and a random moment after it)
    k = rng.randint(3, 6)
    first = run_child(tmp_path, "fresh", "none", kill_after=f"READING {k}", delay=rng.uniform(0.0, 0.05))
    history.append(first)
    step, _ = check_after_kill(tmp_path, history, first)

    # 2. in the middle of a decision-log append: half a line on disk
    second = run_child(tmp_path, "resume", "decision")
    resume_check(second, step)
    assert second.lines[-1] == "PAUSED decision", (seed, second.lines[-3:])
    history.append(second)
    step, skipped = check_after_kill(tmp_path, history, second)
    assert any("torn last line" in n for n in skipped), skipped  # the half line is there, and skipped

    # 3.-5. a checkpoint save: half written, complete but not renamed, renamed but the directory not synced
    expected = {"ckpt_write": "old", "ckpt_fsync": "old", "ckpt_replaced": "new"}
    for hook, which in expected.items():
        child = run_child(tmp_path, "resume", hook)
        resume_check(child, step)
        assert child.lines[-1] == f"PAUSED {hook}", (seed, hook, child.lines[-3:])
        history.append(child)
        before = step
        step, _ = check_after_kill(tmp_path, history, child)
        assert step == (before if which == "old" else child.saving[-1]), (seed, hook, before, step)
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        assert all(name.startswith(".ckpt.pt.") for name in leftovers)

    # 6. the last process runs to the end
    last = run_child(tmp_path, "resume", "none")
    resume_check(last, step)
    assert last.lines[-1] == "DONE" and last.readings[-1] == N_STEPS
    history.append(last)
    run_dir = tmp_path / "out" / "run"
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_disk = [r.to_json() for r in load_decisions(run_dir / "lifecycle_decisions.jsonl", skipped=skipped)]
    assert is_subsequence([d for c in history for d in c.decisions], on_disk)
    assert any(json.loads(d)["action"] != "do_nothing" for d in on_disk), "the run should have made an edit"
    assert int(load_checkpoint(tmp_path / "ckpt.pt")["step"]) == N_STEPS
    result = render_report(run_dir, tmp_path / "report")
    torn = [n for n in result.skipped if n.startswith("lifecycle_decisions.jsonl line")]
    assert result.index.exists() and len(torn) == 1 and "not valid JSON" in torn[0], result.skipped  # the half line
