"""route_topk and route_with_bias: masking, the two bias modes, fp32 add, input errors."""

import pytest
import torch

from chronomoe_v3.config import BiasConfig, ChronoConfig
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.routing import route_topk, route_with_bias


def _logits(t=16, e=6, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed))


def test_no_bias_biased_equals_clean_and_weights_are_renormalised_probs():
    z = _logits()
    r = route_topk(z, 2)
    assert torch.equal(r.logits_clean, r.logits_biased) and torch.equal(r.probs_clean, r.probs_biased)
    expected = torch.softmax(z, -1).gather(1, r.topk_index)
    assert torch.allclose(r.topk_weight, expected / expected.sum(-1, keepdim=True))
    assert r.bridge is None


@pytest.mark.parametrize("mode", ["logits", "selection"])
def test_masked_experts_never_selected_whatever_their_bias(mode):
    z = _logits(e=6)
    active = torch.tensor([True, False, True, True, False, True])
    bias = torch.tensor([0.0, 1e4, 0.0, 0.0, 1e4, 0.0])
    for r in (route_topk(z, 3, active, bias, mode), route_with_bias(z, 3, active, bias, mode=mode)):
        assert not torch.isin(r.topk_index, torch.tensor([1, 4])).any()
        assert torch.isfinite(r.topk_weight).all()


def test_masked_expert_with_huge_slow_bias_gets_no_tokens_in_the_layer():
    torch.manual_seed(0)
    layer = ChronoMoELayer(8, 16, 4, 1)
    layer.active_mask[2] = False
    bias = layer.attach_slow_bias(ChronoConfig(bias=BiasConfig(beta_max=1e4, beta_min=-1e4)))
    bias.set_beta(torch.tensor([0.0, 0.0, 1e4, 0.0]))
    seen = []
    layer.add_observer(seen.append)
    layer(torch.randn(64, 8))
    assert not (seen[-1].topk_index == 2).any()


def test_selection_mode_gate_weights_are_the_clean_ones_renormalised_over_the_selected_set():
    z = _logits(t=32, e=8, seed=1)
    bias = torch.tensor([3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    r = route_topk(z, 2, bias=bias, mode="selection")
    clean = route_topk(z, 2)
    assert not torch.equal(r.topk_index, clean.topk_index)  # the bias did move the selection
    p = torch.softmax(z, -1).gather(1, r.topk_index)
    assert torch.allclose(r.topk_weight, p / p.sum(-1, keepdim=True), atol=1e-7)
    assert torch.equal(r.topk_index, torch.topk(z + bias, 2).indices)


def test_logits_mode_gate_weights_come_from_the_biased_softmax():
    z = _logits(t=32, e=8, seed=2)
    bias = torch.linspace(-1, 1, 8)
    r = route_topk(z, 2, bias=bias, mode="logits")
    p = torch.softmax(z + bias, -1).gather(1, r.topk_index)
    assert torch.allclose(r.topk_weight, p / p.sum(-1, keepdim=True), atol=1e-6)


def test_common_shift_of_the_bias_changes_nothing():
    z = _logits(t=32, e=8, seed=3)
    bias = torch.linspace(-0.5, 0.5, 8)
    a = route_topk(z, 2, bias=bias)
    b = route_topk(z, 2, bias=bias + 0.7)
    assert torch.equal(a.topk_index, b.topk_index)
    assert torch.allclose(a.topk_weight, b.topk_weight, atol=1e-6)
    assert torch.allclose(a.probs_biased, b.probs_biased, atol=1e-6)


def test_bias_is_added_in_fp32_to_low_precision_logits():
    z = torch.tensor([[1.0 + 2**-7, 1.0]], dtype=torch.bfloat16)  # bf16 spacing at 1 is 2**-7
    bias = torch.tensor([0.0, 2**-7 + 2**-10])  # fp32 add: expert 1 wins by 2**-10; a bf16 add would tie
    r = route_topk(z, 1, bias=bias)
    assert r.logits_biased.dtype == torch.float32 and r.topk_weight.dtype == torch.float32
    assert r.logits_biased[0, 1] > r.logits_biased[0, 0]
    assert r.topk_index.item() == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bias=torch.zeros(5)), "bias"),
        (dict(active_mask=torch.ones(5, dtype=torch.bool)), "active_mask"),
        (dict(mode="soft"), "mode"),
        (dict(top_k=7), "top_k"),
    ],
)
def test_bad_shapes_and_options_raise_naming_the_field(kwargs, match):
    args = dict(logits=_logits(e=6), top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        route_topk(**args)


def test_non_finite_logits_or_bias_raise_when_values_are_checked():
    z = _logits(e=4)
    bad = z.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        route_topk(bad, 2, check_values=True)
    with pytest.raises(ValueError, match="bias"):
        route_topk(z, 2, bias=torch.tensor([0.0, float("inf"), 0.0, 0.0]), check_values=True)
    with pytest.raises(ValueError, match="bias"):
        route_with_bias(z, 2, None, torch.tensor([0.0, float("nan"), 0.0, 0.0]), check_values=True)
    with pytest.raises(ValueError, match="bias"):
        route_with_bias(z, 2, None, torch.zeros(3))
    route_topk(z, 2, check_values=True)  # finite input passes
