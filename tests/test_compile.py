"""torch.compile of a model built from ChronoMoELayer with observers attached: no graph break caused by
our code, and the same outputs and statistics as eager."""

import pytest
import torch
from torch import nn

from chronomoe_v3 import ChronoMoELayer, CoherenceState, attach_coherence
from chronomoe_v3.config import LifecycleConfig


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.moe1 = ChronoMoELayer(16, 32, 6, 2, num_active=5, layer_id=0)
        self.moe2 = ChronoMoELayer(16, 32, 6, 2, capacity_factor=1.0, layer_id=1)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        return h + self.moe2(h)


def _make():
    torch.manual_seed(0)
    model = TinyMoE()
    states = [CoherenceState(6, 16), CoherenceState(6, 16)]
    attach_coherence(model.moe1, states[0])
    attach_coherence(model.moe2, states[1])
    return model, states


@pytest.mark.slow
def test_compile_has_no_graph_breaks_and_matches_eager():
    x = torch.randn(4, 12, 16)
    model, _ = _make()
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()

    eager, eager_states = _make()
    compiled_model, compiled_states = _make()
    compiled = torch.compile(compiled_model)
    for step in range(3):
        xs = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(step))
        ye = eager(xs)
        yc = compiled(xs)
        assert torch.allclose(ye, yc, atol=1e-5)
    for se, sc in zip(eager_states, compiled_states, strict=True):
        for (name, be), (_, bc) in zip(se.state_dict().items(), sc.state_dict().items(), strict=True):
            assert torch.allclose(be.float(), bc.float(), atol=1e-5, equal_nan=True), name
        assert int(sc.step) == 3


@pytest.mark.slow
def test_compiled_observer_matches_eager_observer():
    torch.manual_seed(1)
    layer = ChronoMoELayer(16, 32, 6, 2, num_active=5)
    eager, compiled = CoherenceState(6, 16), CoherenceState(6, 16)
    attach_coherence(layer, eager, compile=False)
    attach_coherence(layer, compiled, compile=True)
    for step in range(3):
        layer(torch.randn(40 + step, 16))  # varying token counts: recompiles or dynamic shapes, no error
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, equal_nan=True), name


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


@pytest.mark.slow
def test_chronosystem_compiled_observers_match_eager():
    from chronomoe_v3 import ChronoConfig, ChronoSystem
    from chronomoe_v3.toy.models import TinyMoELM

    def run(compiled):
        torch.manual_seed(0)
        model = TinyMoELM(40, d_model=32, n_layers=2, d_ff=64, max_experts=8, top_k=2, num_active=6)
        config = ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=8))
        system = ChronoSystem(model, config=config, compile_observers=compiled)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        system.attach_optimizer(opt)
        g = torch.Generator().manual_seed(0)
        for step in range(4):
            x = torch.randint(0, 40, (4, 16 + step), generator=g)
            loss = model.loss(x, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        system.step()
        return dict(_flatten(system.state_dict()))

    eager, compiled = run(False), run(True)
    assert eager.keys() == compiled.keys()
    for key, a in eager.items():
        b = compiled[key]
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-4, equal_nan=True), key
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key


def test_system_observer_has_no_graph_breaks():
    """The system's per-forward observer (statistics, clocks, bimodality sampling and update, co-routing,
    starvation, evidence, token counter) compiles as one graph: the detector's random draw is made outside
    it (`draw_permutation`) and handed in as a tensor."""
    from chronomoe_v3 import ChronoConfig, ChronoSystem
    from chronomoe_v3.observe.bimodality import draw_permutation
    from chronomoe_v3.toy.models import TinyMoELM

    torch.manual_seed(0)
    model = TinyMoELM(40, d_model=32, n_layers=2, d_ff=64, max_experts=8, top_k=2, num_active=6)
    system = ChronoSystem(model, config=ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=8)),
                          compile_observers=False)
    traces = []
    model.moe_layers[1].add_observer(traces.append)
    x = torch.randint(0, 40, (2, 16))
    model.loss(x, x)
    trace = traces[0]
    torch._dynamo.reset()
    try:
        explain = torch._dynamo.explain(system._observe)(1, trace, draw_permutation(trace, system.generator))
    finally:
        torch._dynamo.reset()
    assert explain.graph_break_count == 0, [str(r.reason) for r in explain.break_reasons]
    assert explain.graph_count == 1


def test_permutation_drawn_outside_gives_the_same_samples():
    """Handing `sample_expert_outputs` a permutation drawn with the generator is the same draw as letting it
    draw one itself: eager and compiled systems sample the same token-slots."""
    from chronomoe_v3.observe.bimodality import draw_permutation, sample_expert_outputs

    torch.manual_seed(2)
    layer = ChronoMoELayer(16, 32, 6, 2, num_active=5)
    traces = []
    layer.add_observer(traces.append)
    layer(torch.randn(50, 16))
    trace = traces[0]
    inside = sample_expert_outputs(trace, 4, torch.Generator().manual_seed(7), details=True)
    perm = draw_permutation(trace, torch.Generator().manual_seed(7))
    outside = sample_expert_outputs(trace, 4, details=True, perm=perm)
    for a, b in zip(inside, outside, strict=True):
        assert torch.equal(a, b)
