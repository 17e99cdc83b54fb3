"""One guard, in the layer: every observer (attach_coherence, ChronoSystem) and the balancer's token counts see
each training forward exactly once, under activation checkpointing (reentrant or not), and eval forwards not
at all."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from chronomoe_v3 import ChronoMoELayer, ChronoSystem, CoherenceState, attach_coherence
from chronomoe_v3.balance import AuxLossFreeBalancer


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = ChronoMoELayer(8, 8, 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(x)


@pytest.mark.parametrize("mode", ["plain", "reentrant", "non_reentrant", "non_reentrant_full_recompute"])
def test_each_training_forward_is_counted_once(mode):
    torch.manual_seed(0)
    model = Stack()
    state = CoherenceState(4, 8)
    handle = attach_coherence(model.moe, state)
    system = ChronoSystem(model)
    AuxLossFreeBalancer(model)
    x = torch.randn(10, 8, requires_grad=True)
    for n in range(1, 4):
        if mode == "plain":
            out = model(x)
            out.sum().backward()
        else:
            # non-reentrant checkpointing stops its recompute early by default (before the observers run);
            # with early stopping off it re-runs the whole forward, as reentrant checkpointing does
            with set_checkpoint_early_stop(mode != "non_reentrant_full_recompute"):
                out = checkpoint(model, x, use_reentrant=mode == "reentrant")
                out.sum().backward()
        assert int(state.step) == n
        assert system.global_step == n and int(system.observers[0].coherence.step) == n
        assert model.moe.tokens_per_expert is not None
        assert float(model.moe.tokens_per_expert.sum()) == n * 10 * 2
        assert int(system.counter.counts.sum()) == n * 10 * 2
    model.eval()
    with torch.no_grad():
        model(x)
    assert int(state.step) == 3 and system.global_step == 3
    assert float(model.moe.tokens_per_expert.sum()) == 3 * 10 * 2
    handle.remove()
