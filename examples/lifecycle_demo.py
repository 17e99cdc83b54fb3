"""The slow clock at work: a TinyMoELM on Shakespeare whose experts are pruned, split, merged or spawned.

Short clocks make the slow clock act within a few hundred steps on 2 CPU cores (the defaults are for long
runs): a review every 10 step() calls, cooldown 40 steps, cooling period 40 steps, 50 observations before
an expert is judged. Prints each edit with its logged reason and a timeline at the end.

    python examples/lifecycle_demo.py [--steps 120] [--out runs/]

With `--out`, the run directory (readings, decision log, lineage, token basins) is written to
`<out>/lifecycle-demo/`; `chronomoe-v3 report <out>/lifecycle-demo` draws it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from chronomoe_v3.config import BasinConfig, ChronoConfig, DegradeConfig, LifecycleConfig, ObjectiveConfig
from chronomoe_v3.system import ChronoSystem
from chronomoe_v3.toy.datasets import load_shakespeare
from chronomoe_v3.toy.models import TinyMoELM


def main(steps: int = 120, seq: int = 64, batch: int = 8, out: Path | None = None) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    text = load_shakespeare(max_chars=200_000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    model = TinyMoELM(len(chars), d_model=32, n_layers=2, n_heads=4, d_ff=32, max_experts=8, top_k=2, num_active=6)
    config = ChronoConfig(
        lifecycle=LifecycleConfig(eval_interval=10, cooldown_steps=40, cooling_period=40),
        degrade=DegradeConfig(min_observations=50),
        objective=ObjectiveConfig(min_observations_to_judge=50),
        basins=BasinConfig(history=30),
    )
    system = ChronoSystem(model, config=config, run_id="lifecycle-demo", output_dir=out)
    system.set_vocabulary(chars)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    system.attach_optimizer(opt)
    g = torch.Generator().manual_seed(0)
    bar = tqdm(range(steps), desc="training")
    for _ in bar:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq + 1] for s in starts])
        system.observe_tokens(x[:, :-1])
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        result = system.step(loss=float(loss.detach()))
        bar.set_postfix(loss=f"{loss.item():.3f}", live=[int(m.sum()) for m in (b.active_mask for b in system.banks)])
        for a in result.lifecycle_actions:
            tqdm.write(f"step {a.step}: {a.action} L{a.layer_id} {a.expert_id or ''} -> {a.child_id or ''}: {a.reason}")
    print("\ntimeline of edits")
    for r in system.decisions:
        if r.action != "do_nothing":
            print(f"  step {r.step:4d}  {r.action:6s} layer {r.layer_id}  {r.expert_id or '-':10s} "
                  f"child {r.child_id or '-':10s} delta_F={r.free_energy.delta_F:+.4f}")


    if out is not None:
        print(f"\nrun directory: {out / system.run_id}  (draw it: chronomoe-v3 report {out / system.run_id})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    parser.add_argument("--out", type=Path, default=None, help="write the run directory under this folder")
    args = parser.parse_args()
    main(steps=args.steps, out=args.out)
