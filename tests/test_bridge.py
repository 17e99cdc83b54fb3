"""The bridge detector (SPEC 5): veto, overlap, relevance, Jaccard; and its wiring into ChronoMoELayer."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from chronomoe_v3 import CoherenceState, compute_expert_stats
from chronomoe_v3.config import BiasConfig, BridgeConfig, ChronoConfig
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.routing import apply_veto, bridge_report, route_topk, route_with_bias

DOG, SUPERMAN = 0, 1


def _slot(index, expert):
    """Column of `expert` in a one-token top-k index row (fails if it was not selected)."""
    hits = (index[0] == expert).nonzero()
    assert hits.numel() == 1, f"expert {expert} not selected: {index.tolist()}"
    return int(hits[0, 0])


@pytest.mark.parametrize("mode", ["logits", "selection"])
def test_dog_then_superman_the_veto_closes_a_gate_opened_only_by_beta(mode):
    # The input is about a dog: clean routing sends it to DOG; SUPERMAN has almost no clean support.
    z = torch.tensor([[3.0, -2.0, 0.0, 0.0]])
    beta = torch.tensor([0.0, 6.0, 0.0, 0.0])  # Superman earned a large slow bias elsewhere
    assert route_topk(z, 1).topk_index.item() == DOG
    plain = route_topk(z, 1, bias=beta, mode=mode)
    vetoed = route_with_bias(z, 1, None, beta, mode=mode)
    assert vetoed.topk_index.item() == SUPERMAN  # beta drags Superman into the top-1
    p_clean, p_biased = vetoed.probs_clean[0], vetoed.probs_biased[0]
    assert plain.topk_weight.item() == pytest.approx(1.0)
    # the veto shrinks Superman's gate to its clean support: g * p_clean / p_biased
    expected = float(p_clean[SUPERMAN] / p_biased[SUPERMAN])
    assert vetoed.topk_weight.item() == pytest.approx(expected, rel=1e-5)
    assert vetoed.topk_weight.item() < 0.02
    # top-2: both chosen; Superman's gate is closed, the dog keeps its own
    plain2 = route_topk(z, 2, bias=beta, mode=mode)
    vetoed2 = route_with_bias(z, 2, None, beta, mode=mode)
    s, d = _slot(vetoed2.topk_index, SUPERMAN), _slot(vetoed2.topk_index, DOG)
    assert vetoed2.topk_weight[0, d] == plain2.topk_weight[0, d]
    assert vetoed2.topk_weight[0, s] < 0.02 * plain2.topk_weight[0, s]
    assert vetoed2.bridge is not None and vetoed2.bridge.gate_support[0, d] == 1.0


def test_supermans_dog_an_input_that_supports_both_keeps_both_gates():
    # "Superman's dog": the input genuinely supports both experts.
    z = torch.tensor([[3.0, 3.0, 0.0, 0.0]])
    beta = torch.tensor([0.0, 1.0, 0.0, 0.0])  # at the default clip
    clean = route_topk(z, 2)
    plain = route_topk(z, 2, bias=beta)
    vetoed = route_with_bias(z, 2, None, beta)
    assert set(vetoed.topk_index[0].tolist()) == {DOG, SUPERMAN} == set(clean.topk_index[0].tolist())
    s, d = _slot(vetoed.topk_index, SUPERMAN), _slot(vetoed.topk_index, DOG)
    cs = _slot(clean.topk_index, SUPERMAN)
    report = vetoed.bridge
    assert report is not None
    assert report.gate_support[0, d] == 1.0 and report.gate_support[0, s] > 0.6  # neither gate is closed
    assert vetoed.topk_weight[0, d] == plain.topk_weight[0, d]  # the veto leaves the dog's gate alone
    assert vetoed.topk_weight[0, s] == pytest.approx(float(clean.topk_weight[0, cs]), rel=0.05)  # ~clean gate
    # and the contrast with the bridge case: relevance is much higher when the input supports the expert
    bridged = route_with_bias(torch.tensor([[3.0, -2.0, 0.0, 0.0]]), 2, None, torch.tensor([0.0, 6.0, 0.0, 0.0]))
    assert bridged.bridge is not None and bridged.bridge.relevance < 0.5 < report.relevance


def test_zero_beta_relevance_is_exactly_one_and_nothing_is_vetoed():
    z = 50.0 * torch.randn(32, 8, generator=torch.Generator().manual_seed(0))  # peaked: tiny probabilities
    active = torch.tensor([True, True, False, True, True, True, False, True])
    r = route_with_bias(z, 2, active, torch.zeros(8))
    plain = route_topk(z, 2, active)
    report = r.bridge
    assert report is not None
    assert report.relevance.item() == 1.0
    assert torch.equal(report.support, torch.ones_like(report.support))
    assert torch.equal(report.overlap_only, torch.zeros_like(report.overlap_only))
    assert torch.equal(report.jaccard, torch.ones(32)) and report.jaccard_mean.item() == 1.0
    assert torch.equal(r.topk_weight, plain.topk_weight) and torch.equal(r.topk_index, plain.topk_index)


def test_relevance_is_one_minus_mean_overlap_and_ignores_padding():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(20, 6, generator=gen)
    beta = torch.tensor([0.8, -0.3, 0.0, 0.5, -0.5, -0.5])
    routing = route_topk(z, 2, bias=beta)
    report = bridge_report(routing)
    p_c, p_b = routing.probs_clean, routing.probs_biased
    assert torch.allclose(report.overlap_only, (p_b - p_c).clamp_min(0))
    assert torch.allclose(report.support, (p_c / p_b).clamp(0, 1), atol=1e-6)
    per_token = torch.minimum(p_c, p_b).sum(-1)
    assert report.relevance.item() == pytest.approx(float(per_token.mean()), abs=1e-6)
    assert report.relevance.item() == pytest.approx(1 - float(report.overlap_only.sum(-1).mean()), abs=1e-6)
    assert 0.0 < report.relevance.item() < 1.0
    # padding: the report over a mask equals the report over the real tokens alone
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:7] = True
    sub = bridge_report(route_topk(z[:7], 2, bias=beta))
    masked = bridge_report(routing, mask)
    assert masked.relevance.item() == pytest.approx(sub.relevance.item(), abs=1e-6)
    assert masked.jaccard_mean.item() == pytest.approx(sub.jaccard_mean.item(), abs=1e-6)
    none = bridge_report(routing, torch.zeros(20, dtype=torch.bool))
    assert none.relevance.item() == 1.0 and none.jaccard_mean.item() == 1.0
    with pytest.raises(ValueError, match="token_mask"):
        bridge_report(routing, torch.ones(19, dtype=torch.bool))


def test_jaccard_of_clean_and_biased_topk_sets():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    beta = torch.tensor([0.0, 0.0, 1.5, 0.0])  # token sets: clean {0,1}, biased {0,2}
    report = bridge_report(route_topk(z, 2, bias=beta))
    assert report.topk_index_clean.sort(-1).values.tolist() == [[0, 1], [0, 1]]
    assert report.jaccard.tolist() == pytest.approx([1 / 3, 1 / 3])
    assert report.jaccard_mean.item() == pytest.approx(1 / 3)
    # k = 1: a changed choice is Jaccard 0
    assert bridge_report(route_topk(z, 1, bias=torch.tensor([0.0, 1.5, 0.0, 0.0]))).jaccard.tolist() == [0.0, 0.0]


def test_veto_renormalisation_is_optional():
    w = torch.tensor([[0.6, 0.4]])
    support = torch.tensor([[1.0, 0.25]])
    assert apply_veto(w, support)[0].tolist() == pytest.approx([0.6, 0.1])
    assert apply_veto(w, support, renormalize=True)[0].tolist() == pytest.approx([6 / 7, 1 / 7])


def test_layer_trace_carries_the_bridge_and_relevance_feeds_the_clocks():
    torch.manual_seed(0)
    layer = ChronoMoELayer(8, 16, 6, 2, num_active=5)
    bias = layer.attach_slow_bias()
    bias.set_beta(torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0]))
    state = CoherenceState(6, 8)
    seen = []

    def observe(trace):
        seen.append(trace)
        state.observe(compute_expert_stats(trace), layer.active_mask, relevance=trace.bridge.relevance)

    layer.add_observer(observe)
    x = torch.randn(4, 9, 8, requires_grad=True)
    token_mask = torch.ones(4, 9, dtype=torch.bool)
    token_mask[:, -2:] = False
    layer(x, token_mask=token_mask).square().sum().backward()
    trace = seen[-1]
    report = trace.bridge
    assert report is not None and report.relevance.dim() == 0 and not report.relevance.requires_grad
    assert report.support.shape == (36, 6) and report.jaccard.shape == (36,)
    assert 0.0 < report.relevance.item() < 1.0
    # the gate weights the layer used are the biased ones times the veto factor
    hidden = x.detach().reshape(-1, 8)
    plain = route_topk(layer.router(hidden).detach(), 2, layer.active_mask, bias=bias.beta)
    assert torch.allclose(trace.topk_weight, plain.topk_weight * report.gate_support, atol=1e-6)
    # gradients stay finite with a masked slot and a nonzero beta
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert int(state.step) == 1


def test_veto_off_leaves_the_biased_gates_and_still_reports():
    torch.manual_seed(1)
    layer = ChronoMoELayer(8, 16, 4, 1)
    bias = layer.attach_slow_bias(ChronoConfig(bridge=BridgeConfig(veto=False), bias=BiasConfig(mode="selection")))
    assert layer.bias_mode == "selection"
    bias.set_beta(torch.tensor([1.0, -1.0, 0.0, 0.0]))
    seen = []
    layer.add_observer(seen.append)
    layer(torch.randn(30, 8))
    trace = seen[-1]
    assert trace.bridge is not None and torch.equal(trace.topk_weight, torch.ones(30, 1))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    e=st.integers(2, 12),
    scale=st.sampled_from([0.1, 1.0, 10.0, 60.0]),
    beta_scale=st.sampled_from([0.0, 0.01, 0.5, 3.0]),
)
def test_support_equals_the_ratio_of_the_two_softmaxes(seed, e, scale, beta_scale):
    """The cheap form `log(Z_b / Z_c) - delta_e` agrees with `log_softmax(z_clean) - log_softmax(z_biased)`,
    also for slots whose probabilities underflow (peaked logits), with masked slots reading 1."""
    gen = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(40, e, generator=gen)
    beta = beta_scale * torch.randn(e, generator=gen)
    active = torch.rand(e, generator=gen) < 0.8
    active[0] = True
    k = min(2, int(active.sum()))
    routing = route_topk(z, k, active, bias=beta)
    report = bridge_report(routing)
    ref = torch.log_softmax(routing.logits_clean.double(), -1) - torch.log_softmax(routing.logits_biased.double(), -1)
    expected = torch.where(active, ref.clamp_max(0.0).exp(), torch.ones_like(ref)).float()
    assert torch.allclose(report.support, expected, atol=1e-5, rtol=1e-4)
    # the biased probabilities, from p_clean and the shift, are the softmax of the biased logits
    assert torch.allclose(routing.probs_biased, torch.softmax(routing.logits_biased, -1), atol=1e-6, rtol=1e-4)
    assert torch.equal(report.gate_support, report.support.gather(1, routing.topk_index))
    assert torch.isfinite(report.relevance) and 0.0 <= report.relevance.item() <= 1.0


def test_a_training_forward_computes_only_the_veto_factor():
    """The per-forward cost: the veto needs `gate_support`; nothing [T,E]-sized or top-k is built until read."""
    z = torch.randn(16, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    routing = route_with_bias(z, 2, None, torch.tensor([0.5, -0.5, 0.0, 0.2, 0.0, 0.0]))
    report = routing.bridge
    assert report is not None and "computed=['gate_support']" in repr(report)
    trace_copy = report.detach()
    assert not trace_copy.gate_support.requires_grad and report.gate_support.requires_grad
    assert 0.0 < trace_copy.relevance.item() <= 1.0 and "'support'" in repr(trace_copy)
    assert "topk_index_clean" not in repr(trace_copy)
    routing.topk_weight.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_a_huge_router_bias_neither_overflows_nor_breaks_the_support():
    """A user's `router_bias` may hold +200 (e^200 overflows fp32) or -1e9 (a disabled expert): the biased
    probabilities stay the softmax of the biased logits and the support stays in [0, 1]."""
    z = torch.randn(12, 5, generator=torch.Generator().manual_seed(7))
    bias = torch.tensor([200.0, 0.0, -1e9, 1.0, 0.0])
    routing = route_with_bias(z, 2, None, bias)
    ref = torch.softmax(routing.logits_biased.double(), -1).float()
    assert torch.isfinite(routing.probs_biased).all()
    assert torch.allclose(routing.probs_biased, ref, atol=1e-6)
    report = routing.bridge
    assert report is not None and ((report.support >= 0) & (report.support <= 1)).all()
    # expert 0 takes all the biased mass: its support is its clean probability; the others' is 1
    assert torch.allclose(report.support[:, 0], routing.probs_clean[:, 0], rtol=1e-5)
    assert torch.equal(report.support[:, 1:], torch.ones(12, 4))
    assert torch.equal(report.gate_support, report.support.gather(1, routing.topk_index))
