"""SlowBias and the update rule: hand-computed steps, NaN safety, clipping, centring, persistence, dtype."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chronomoe_v3.bias import SlowBias, center_beta, slow_bias_update
from chronomoe_v3.config import BiasConfig, ChronoConfig
from chronomoe_v3.layers import ChronoMoELayer

NAN = float("nan")
ALL4 = torch.ones(4, dtype=torch.bool)


def _update(beta, phi, active=None, center=False, lo=-1.0, hi=1.0):
    return slow_bias_update(
        torch.tensor(beta), torch.tensor(phi), active, eta=0.1, tau=0.5, beta_min=lo, beta_max=hi, center=center
    )


def test_hand_computed_update_before_centring():
    new = _update([0.0, 0.0, 0.2, -0.1], [0.8, 0.3, 0.5, 0.5])
    assert torch.allclose(new, torch.tensor([0.03, -0.02, 0.2, -0.1]), atol=1e-7)
    # the module does the same with its config
    bias = SlowBias(4, ChronoConfig(bias=BiasConfig(eta=0.1, tau=0.5, center=False)))
    bias.update(torch.tensor([0.8, 0.3, 0.5, 0.5]))
    assert torch.allclose(bias.beta, torch.tensor([0.03, -0.02, 0.0, 0.0]), atol=1e-7)


def test_nan_phi_never_reaches_beta_and_inactive_experts_are_not_updated():
    active = torch.tensor([True, True, True, False])
    new = _update([0.1, 0.2, 0.3, 0.4], [NAN, float("inf"), 0.8, 0.8], active)
    assert torch.isfinite(new).all()
    assert torch.allclose(new, torch.tensor([0.1, 0.2, 0.33, 0.4]), atol=1e-7)
    centred = _update([0.1, 0.2, 0.3, 0.4], [NAN, NAN, NAN, NAN], active, center=True)
    assert torch.isfinite(centred).all()


def test_clipping_at_the_bounds():
    new = _update([0.99, -0.99, 0.5, 0.0], [0.8, 0.3, 1.0, 0.5], hi=0.52, lo=-1.0)
    assert torch.allclose(new, torch.tensor([0.52, -1.0, 0.52, 0.0]), atol=1e-7)


def test_centring_keeps_the_active_mean_at_zero_and_leaves_inactive_slots_alone():
    active = torch.tensor([True, True, False, True])
    new = _update([0.2, -0.4, 0.7, 0.1], [0.9, 0.1, 0.9, 0.6], active, center=True)
    assert abs(float(new[active].mean())) < 1e-7
    assert new[2] == pytest.approx(0.7)
    raw = _update([0.2, -0.4, 0.7, 0.1], [0.9, 0.1, 0.9, 0.6], active, center=False)
    assert torch.allclose(new[active], raw[active] - raw[active].mean(), atol=1e-7)  # plain mean: no bound binds


def test_centring_is_a_common_shift_so_the_biased_softmax_is_unchanged():
    raw = _update([0.3, -0.1, 0.05, 0.2], [0.9, 0.2, 0.7, 0.4])
    centred = _update([0.3, -0.1, 0.05, 0.2], [0.9, 0.2, 0.7, 0.4], center=True)
    z = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.softmax(z + raw, -1), torch.softmax(z + centred, -1), atol=1e-6)


def test_centring_respects_the_bounds_when_they_bind():
    out = center_beta(torch.tensor([1.0, 1.0, 1.0, -1.0]), ALL4, -1.0, 1.0)
    assert float(out.max()) <= 1.0 and float(out.min()) >= -1.0
    assert abs(float(out.mean())) < 1e-6
    assert torch.allclose(out, torch.tensor([1 / 3, 1 / 3, 1 / 3, -1.0]), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=12),
    active_bits=st.lists(st.booleans(), min_size=12, max_size=12),
    lo=st.floats(-2.0, 0.0),
    hi=st.floats(0.0, 2.0),
)
def test_centring_property_mean_zero_and_within_bounds(values, active_bits, lo, hi):
    if not lo < hi:
        return
    beta = torch.tensor(values).clamp(lo, hi)
    active = torch.tensor(active_bits[: len(values)])
    out = center_beta(beta, active, lo, hi)
    assert torch.equal(out[~active], beta[~active])
    if active.any():
        assert abs(float(out[active].mean())) < 1e-5
        assert float(out[active].min()) >= lo - 1e-6 and float(out[active].max()) <= hi + 1e-6


def test_repeated_updates_stay_bounded_and_centred():
    bias = SlowBias(8, ChronoConfig(bias=BiasConfig(eta=0.05)))
    gen = torch.Generator().manual_seed(0)
    target = torch.linspace(-1, 1, 8)
    for _ in range(300):
        bias.update((target + 0.1 * torch.randn(8, generator=gen)).clamp(-1, 1))
    assert float(bias.beta.max()) <= 1.0 and float(bias.beta.min()) >= -1.0
    assert abs(float(bias.beta.mean())) < 1e-5
    assert torch.equal(torch.argsort(bias.beta), torch.argsort(target))


def test_state_dict_round_trip():
    bias = SlowBias(5)
    bias.set_beta(torch.tensor([0.1, -0.2, 0.3, 0.123456789, -0.333]))
    buf = io.BytesIO()
    torch.save(bias.state_dict(), buf)
    buf.seek(0)
    other = SlowBias(5)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.beta, bias.beta) and other.beta.dtype == torch.float32
    assert "beta" in bias.state_dict()


def test_layer_state_dict_carries_beta():
    layer = ChronoMoELayer(8, 16, 4, 2)
    layer.attach_slow_bias().set_beta(torch.tensor([0.5, -0.5, 0.25, -0.25]))
    other = ChronoMoELayer(8, 16, 4, 2)
    other.attach_slow_bias()
    other.load_state_dict(layer.state_dict())
    assert other.slow_bias is not None and torch.equal(other.slow_bias.beta, layer.slow_bias.beta)


@pytest.mark.parametrize("cast", ["bf16", "half", "double"])
def test_model_cast_keeps_beta_fp32_and_exact(cast):
    layer = ChronoMoELayer(8, 16, 4, 2)
    bias = layer.attach_slow_bias()
    values = torch.tensor([0.123456789, -0.987654321, 0.5, 0.000123])
    bias.set_beta(values)
    model = torch.nn.Sequential(layer)
    if cast == "bf16":
        model.to(torch.bfloat16)
    elif cast == "half":
        model.half()
    else:
        model.double()
    assert layer.w_gate.dtype != torch.float32
    assert layer.slow_bias is bias and bias.beta.dtype == torch.float32
    assert torch.equal(bias.beta, values)
    if cast == "bf16":
        layer(torch.randn(5, 8, dtype=torch.bfloat16))  # still routes


@pytest.mark.parametrize(
    "values, match",
    [
        (torch.tensor([0.0, NAN, 0.0]), "non-finite"),
        (torch.tensor([0.0, float("inf"), 0.0]), "non-finite"),
        (torch.tensor([0.0, 2.0, 0.0]), "beta_max"),
        (torch.zeros(4), r"beta has shape \(4,\)"),
    ],
)
def test_bad_beta_raises_naming_the_field(values, match):
    bias = SlowBias(3)
    with pytest.raises(ValueError, match=match):
        bias.set_beta(values)
    with pytest.raises(ValueError, match="beta"):
        bias.load_state_dict({"beta": values})
    assert torch.equal(bias.beta, torch.zeros(3))


def test_set_beta_on_selected_slots():
    bias = SlowBias(4)
    bias.set_beta(0.25, experts=torch.tensor([False, True, False, True]))
    assert bias.beta.tolist() == [0.0, 0.25, 0.0, 0.25]
    with pytest.raises(ValueError, match="experts"):
        bias.set_beta(0.25, experts=torch.tensor([0, 1, 0, 1]))


def test_update_input_errors_name_the_field():
    bias = SlowBias(4)
    with pytest.raises(ValueError, match="phi_slow"):
        bias.update(torch.zeros(3))
    with pytest.raises(ValueError, match="active_mask"):
        bias.update(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="active_mask"):
        bias.update(torch.zeros(4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta holds non-finite"):
        _update([0.0, NAN], [0.5, 0.5])
    with pytest.raises(ValueError, match="num_experts"):
        SlowBias(0)


def test_zero_beta_changes_nothing_in_the_layer():
    torch.manual_seed(0)
    plain = ChronoMoELayer(8, 16, 6, 2, num_active=5)
    biased = ChronoMoELayer(8, 16, 6, 2, num_active=5)
    biased.load_state_dict(plain.state_dict())
    biased.attach_slow_bias()
    x = torch.randn(3, 7, 8)
    assert torch.equal(plain(x), biased(x))


def test_beta_decides_a_forced_choice_and_is_latent_under_plenty():
    """Top-1: a beta of 0.3 moves the choice of near-tied tokens; top-4 of 4: nothing changes."""
    z = torch.tensor([[1.0, 0.9, -1.0, -1.0], [0.0, 0.1, 0.0, -2.0], [2.0, -2.0, 0.0, 0.0]])
    beta = torch.tensor([-0.15, 0.15, 0.0, 0.0])
    from chronomoe_v3.routing import route_topk

    top1 = route_topk(z, 1, bias=beta).topk_index[:, 0].tolist()
    assert top1 == [1, 1, 0] and route_topk(z, 1).topk_index[:, 0].tolist() == [0, 1, 0]
    a, b = route_topk(z, 4, bias=beta), route_topk(z, 4)
    assert torch.equal(torch.sort(a.topk_index).values, torch.sort(b.topk_index).values)
    assert math.isclose(float(a.topk_weight.sum()), 3.0, rel_tol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
def test_update_and_biased_routing_do_not_sync_the_host():
    from chronomoe_v3.routing import route_with_bias

    bias = SlowBias(8, device="cuda")
    active = torch.ones(8, dtype=torch.bool, device="cuda")
    logits = torch.randn(64, 8, device="cuda", requires_grad=True)
    phi = torch.rand(8, device="cuda")
    token_mask = torch.ones(64, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bias.update(phi, active)
        r = route_with_bias(logits, 2, active, bias.beta, token_mask=token_mask)
        (r.topk_weight.sum() + r.bridge.relevance).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
