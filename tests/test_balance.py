"""Balancers (aux load-balancing loss, aux-loss-free selection bias) against their formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chronomoe_v3 import ChronoConfig, ChronoMoELayer, ChronoSystem
from chronomoe_v3.balance import (
    AuxLossFreeBalancer,
    aux_free_bias_update,
    aux_loss,
    load_balancing_loss,
    reset_expert_bias,
)
from chronomoe_v3.config import LifecycleConfig
from chronomoe_v3.routing import route_topk
from chronomoe_v3.telemetry import compute_n_effective
from chronomoe_v3.toy.models import TinyMoELM


def test_aux_loss_hand_example():
    # 4 tokens, 4 experts, top-1. Counts: e0 x2, e1 x1, e3 x1 -> f = (.5, .25, 0, .25)
    probs = torch.tensor([
        [0.7, 0.1, 0.1, 0.1],
        [0.6, 0.2, 0.1, 0.1],
        [0.1, 0.5, 0.2, 0.2],
        [0.1, 0.1, 0.2, 0.6],
    ])
    index = torch.tensor([[0], [0], [1], [3]])
    p = probs.mean(0)  # (.375, .225, .15, .25)
    expected = 4 * (0.5 * p[0] + 0.25 * p[1] + 0.0 * p[2] + 0.25 * p[3])
    got = load_balancing_loss(probs, index)
    assert math.isclose(float(got), float(expected), rel_tol=1e-6)
    assert math.isclose(float(expected), 4 * (0.1875 + 0.05625 + 0.0625), rel_tol=1e-6)


def test_aux_loss_uniform_is_one_and_collapse_is_n():
    t, e = 64, 8
    uniform = torch.full((t, e), 1.0 / e)
    index = torch.arange(t * 2).view(t, 2) % e  # every expert equally often
    assert math.isclose(float(load_balancing_loss(uniform, index)), 1.0, rel_tol=1e-6)
    onehot = torch.zeros(t, e)
    onehot[:, 0] = 1.0
    assert math.isclose(float(load_balancing_loss(onehot, torch.zeros(t, 1, dtype=torch.long))), e, rel_tol=1e-6)


def test_aux_loss_masks():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    index = torch.tensor([[0], [1]])
    active = torch.tensor([True, True, False])
    # n = 2 active experts; f = (.5, .5); P = (.7, .3) -> 2 * (.35 + .15) = 1
    assert math.isclose(float(load_balancing_loss(probs, index, active)), 1.0, rel_tol=1e-6)
    # the second token is padding: f = (1, 0), P = (.5, .5) -> 2 * .5 = 1
    tm = torch.tensor([True, False])
    assert math.isclose(float(load_balancing_loss(probs, index, active, token_mask=tm)), 1.0, rel_tol=1e-6)
    # a dropped slot is not counted in f
    sm = torch.tensor([[False], [True]])
    assert math.isclose(float(load_balancing_loss(probs, index, active, slot_mask=sm)), 2 * 0.3, rel_tol=1e-6)


def test_aux_loss_sends_gradient_to_the_router_away_from_the_overused_expert():
    torch.manual_seed(0)
    layer = ChronoMoELayer(16, 8, 4, 2, compute_aux_loss=True)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0  # expert 0 wins whenever feature 0 is positive
    x = torch.randn(256, 16).abs()
    layer(x)
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    layer.aux_loss.backward()
    g = layer.router.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    # gradient descent lowers the dominant expert's logit along its feature
    assert float(g[0, 0]) > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


def test_tiny_model_adds_the_aux_loss():
    torch.manual_seed(0)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=4, top_k=2, aux_loss_coef=0.5)
    x = torch.randint(0, 20, (2, 8))
    total = model.loss(x, x)
    layers = model.moe_layers
    mean_aux = torch.stack([m.aux_loss for m in layers]).mean()  # type: ignore[misc]
    assert torch.allclose(aux_loss(model), mean_aux)
    model.aux_loss_coef = 0.0
    plain = model.loss(x, x)  # same weights, same batch: differs by coef * aux
    assert math.isclose(float((total - plain).detach()), 0.5 * float(mean_aux.detach()), rel_tol=1e-5)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        TinyMoELM(20, d_model=16, n_heads=2, aux_loss_coef=-1.0)


@settings(max_examples=60, deadline=None)
@given(
    bias=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=12),
    seed=st.integers(0, 10_000),
    rate=st.floats(1e-5, 1e-1),
)
def test_aux_free_follows_the_sign_rule(bias, seed, rate):
    e = len(bias)
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 50, (e,), generator=g).float()
    active = torch.rand(e, generator=g) > 0.3
    b = torch.tensor(bias, dtype=torch.float32)
    new = aux_free_bias_update(b, load, active, rate=rate)
    mean = load[active].mean() if bool(active.any()) else torch.tensor(0.0)
    for i in range(e):
        if not bool(active[i]):
            assert float(new[i]) == float(b[i])
        elif float(load[i]) < float(mean):
            assert math.isclose(float(new[i] - b[i]), rate, rel_tol=1e-4, abs_tol=1e-6)
        elif float(load[i]) > float(mean):
            assert math.isclose(float(new[i] - b[i]), -rate, rel_tol=1e-4, abs_tol=1e-6)
        else:
            assert float(new[i]) == float(b[i])


def test_selection_bias_moves_only_the_choice():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = route_topk(logits, 2)
    biased = route_topk(logits, 2, selection_bias=torch.tensor([0.0, 0.0, 5.0, 0.0]))
    assert set(biased.topk_index[0].tolist()) == {0, 2}
    p = torch.softmax(logits, -1)[0]
    expected = torch.tensor([p[0], p[2]]) / (p[0] + p[2])
    assert torch.allclose(biased.topk_weight[0].sort().values, expected.sort().values)
    assert torch.equal(plain.probs_clean, biased.probs_clean)


def test_balancer_updates_after_the_optimiser_step_and_counts_training_forwards_only():
    torch.manual_seed(0)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=4, top_k=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    balancer = AuxLossFreeBalancer(model, rate=0.01, optimizer=opt)
    layer = model.moe_layers[0]
    assert layer.expert_bias is not None and layer.tokens_per_expert is not None
    x = torch.randint(0, 20, (2, 8))
    model.eval()
    model(x)
    assert float(layer.tokens_per_expert.sum()) == 0.0  # eval forwards are not counted
    model.train()
    loss = model.loss(x, x)
    counts = layer.tokens_per_expert.clone()
    assert float(counts.sum()) == 2 * 8 * 2
    opt.zero_grad()
    loss.backward()
    assert torch.equal(layer.expert_bias, torch.zeros(4))  # not before the optimiser step
    opt.step()
    expected = aux_free_bias_update(torch.zeros(4), counts, layer.active_mask, rate=0.01)
    assert torch.equal(layer.expert_bias, expected)
    assert float(layer.tokens_per_expert.sum()) == 0.0
    # saved with the model, kept fp32 through a cast
    assert "blocks.0.moe.expert_bias" in model.state_dict()
    assert "blocks.0.moe.tokens_per_expert" not in model.state_dict()
    model.to(torch.bfloat16)
    assert layer.expert_bias.dtype == torch.float32 and torch.equal(layer.expert_bias, expected)
    balancer.remove()


def test_balancer_counts_once_under_activation_checkpointing():
    torch.manual_seed(0)
    layer = ChronoMoELayer(16, 8, 4, 2)
    layer.enable_expert_bias()
    x = torch.randn(32, 16, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()
    assert layer.tokens_per_expert is not None
    assert float(layer.tokens_per_expert.sum()) == 32 * 2


def test_balancer_needs_moe_layers_and_a_valid_rate():
    with pytest.raises(ValueError, match="no MoE layer"):
        AuxLossFreeBalancer(torch.nn.Linear(3, 3))
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=4, top_k=2)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="rate"):
            AuxLossFreeBalancer(model, rate=bad)


def _collapsed(seed: int) -> TinyMoELM:
    torch.manual_seed(seed)
    model = TinyMoELM(30, d_model=32, n_heads=4, d_ff=32, max_experts=8, top_k=2, router_bias=True)
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.bias[:2] = 3.0
    return model


def _neff(model: TinyMoELM, x: torch.Tensor) -> list[float]:
    out = []
    for layer in model.moe_layers:
        counts = torch.zeros(8)
        handle = layer.add_observer(
            lambda tr, c=counts: c.add_(torch.bincount(tr.topk_index.flatten(), minlength=8).float())
        )
        model.train()
        with torch.no_grad():
            model(x)
        handle.remove()
        out.append(float(compute_n_effective(counts / counts.sum())))
    return out


@pytest.mark.parametrize("arm", ["plain", "aux", "auxfree"])
def test_each_balancer_alone_recovers_a_collapsed_start(arm):
    """Router bias +3 on two rows: plain top-2 stays collapsed (the control); each balancer brings every
    layer to Neff >= 6."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 30, (4096,), generator=g)
    data = (data * 7 + torch.arange(4096)) % 30  # some structure for the LM
    probe = data[:1024].view(16, 64)
    model = _collapsed(0)
    assert max(_neff(model, probe)) < 3.0
    if arm == "aux":
        model.aux_loss_coef = 0.01
        for layer in model.moe_layers:
            layer.compute_aux_loss = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if arm == "auxfree":
        AuxLossFreeBalancer(model, rate=1e-2, optimizer=opt)  # 10x the default rate: 300 steps, not 3000
    for _ in range(300):
        starts = torch.randint(0, 4096 - 33, (16,), generator=g)
        x = torch.stack([data[s : s + 33] for s in starts.tolist()])
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if arm == "plain":
        assert max(_neff(model, probe)) < 3.0
    else:
        assert min(_neff(model, probe)) >= 6.0


def test_composes_with_the_system_and_edits_reset_the_bias():
    torch.manual_seed(0)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=4,
                      aux_loss_coef=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    balancer = AuxLossFreeBalancer(model, optimizer=opt)
    system = ChronoSystem(model, config=ChronoConfig(lifecycle=LifecycleConfig(max_experts_per_layer=6)))
    system.attach_optimizer(opt)
    x = torch.randint(0, 20, (2, 8))
    for _ in range(3):
        loss = model.loss(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = model.moe_layers[0]
    assert layer.expert_bias is not None
    assert float(layer.expert_bias[:4].abs().sum()) > 0
    with torch.no_grad():
        layer.expert_bias[:4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # a new expert in slot 4 takes the mean of the others; pruned slot 1 returns to 0
    bias, mask = layer.expert_bias, layer.active_mask
    reset_expert_bias(bias, mask, fresh_slots=[], parked_slots=[])
    layer.active_mask[4] = True
    reset_expert_bias(bias, mask, fresh_slots=[4], parked_slots=[])
    assert math.isclose(float(layer.expert_bias[4]), 0.25, rel_tol=1e-6)
    layer.active_mask[1] = False
    reset_expert_bias(bias, mask, fresh_slots=[], parked_slots=[1])
    assert float(layer.expert_bias[1]) == 0.0
    layer.active_mask[5] = True
    reset_expert_bias(bias, mask, fresh_slots=[5], parked_slots=[], inherit_from=3)
    assert math.isclose(float(layer.expert_bias[5]), 0.4, rel_tol=1e-6)
    assert system.global_step == 3
    balancer.remove()
