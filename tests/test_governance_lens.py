import math

import pytest
import torch
from torch import nn

from chronomoe_v3.governance import ChronoLens, IdentityLens, SteeringMode, steering_weights

D, E = 16, 8
SHARES = [0.45, 0.4, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0]


def bound_lens(seed=0, **kw):
    torch.manual_seed(seed)
    router = nn.Linear(D, E)
    lens = ChronoLens(D, rank=4, layer_id=0, **kw)
    lens.bind_router(router)
    return lens, router


def unit(v):
    return v / v.norm()


def test_anti_dominance_direction_matches_formula():
    lens, router = bound_lens()
    lens.update_steering(SHARES)
    s = torch.tensor(SHARES)
    expected = unit(((1 / E - s)[:, None] * router.weight.detach()).sum(0))
    torch.testing.assert_close(lens.direction(), expected)


def test_lift_tail_uses_positive_part_only():
    lens, router = bound_lens()
    lens.set_steering_mode("LIFT_TAIL")
    lens.update_steering(SHARES)
    c = (1 / E - torch.tensor(SHARES)).clamp_min(0)
    assert (lens.steering[:2] == 0).all()
    torch.testing.assert_close(lens.direction(), unit(c @ router.weight.detach()))


def test_entropy_max_differs_from_anti_dominance():
    s = torch.tensor(SHARES)
    mask = torch.ones(E, dtype=torch.bool)
    anti = steering_weights(s, mask, SteeringMode.ANTI_DOMINANCE)
    ent = steering_weights(s, mask, SteeringMode.ENTROPY_MAX)
    torch.testing.assert_close(ent, -(s * E).clamp_min(0.01).log())
    assert torch.equal(torch.sign(ent), torch.sign(anti))
    assert torch.cosine_similarity(anti, ent, dim=0) < 0.95
    assert ent[-1] == pytest.approx(math.log(100)) and ent[-1] > ent[2] > 0 > ent[1] > ent[0]
    lens, _ = bound_lens()
    lens.update_steering(SHARES)
    d_anti = lens.direction()
    lens.set_steering_mode("ENTROPY_MAX")
    lens.update_steering(SHARES)
    assert torch.dot(lens.direction(), d_anti) < 0.99


def test_balanced_shares_give_no_push():
    lens, _ = bound_lens()
    lens.update_steering([1 / E] * E)
    lens.set_scale(0.5)
    x = torch.randn(5, D)
    torch.testing.assert_close(lens(x), x)


def test_lens_follows_updated_router_weights():
    lens, router = bound_lens()
    lens.update_steering(SHARES)
    before = lens.direction().clone()
    with torch.no_grad():  # an optimiser step updates the weight in place
        router.weight.add_(torch.randn_like(router.weight))
    after = lens.direction()
    c = lens.steering
    torch.testing.assert_close(after, unit(c @ router.weight.detach()))
    assert not torch.allclose(before, after)
    router.weight = nn.Parameter(torch.randn(E, D))  # a replaced parameter is followed too
    torch.testing.assert_close(lens.direction(), unit(c @ router.weight.detach()))


def test_lens_follows_active_set_changes():
    lens, router = bound_lens()
    mask = torch.tensor([True, True, True, False, True, True, False, True])
    lens.update_steering([0.5, 0.3, 0.1, 0.05, 0.05, 0.0], active_mask=mask)  # active-width shares
    assert lens.steering[3] == 0 and lens.steering[6] == 0
    assert lens.steering[7] == pytest.approx(1 / 6)
    lens.set_active_mask(torch.ones(E, dtype=torch.bool))
    lens.update_steering(SHARES)
    assert lens.steering[3] == pytest.approx(1 / E - SHARES[3])
    with pytest.raises(ValueError, match="must have 8 .active. or 8 .all slots. entries, got 3"):
        lens.update_steering([0.5, 0.3, 0.2])


def test_push_is_relative_to_token_norm():
    lens, _ = bound_lens()
    lens.update_steering(SHARES)
    lens.set_scale(0.25)
    x = torch.randn(7, D)
    out = lens(x)
    expected = x + 0.25 * x.norm(dim=-1, keepdim=True) * lens.direction()
    torch.testing.assert_close(out, expected)


def test_reading_scale_does_not_mutate_state():
    lens, _ = bound_lens()
    lens.update_steering(SHARES)
    lens.set_scale(0.3)
    before = {k: v.clone() for k, v in lens.state_dict().items() if isinstance(v, torch.Tensor)}
    assert lens.s == pytest.approx(0.3)
    assert lens.s == pytest.approx(0.3)
    lens.get_norms()
    after = lens.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forward_does_not_sync_host(monkeypatch):
    lens, router = bound_lens(use_warp=True)
    lens.update_steering(SHARES)
    lens.set_scale(0.2)
    x = torch.randn(4, D)

    def forbidden(*a, **k):
        raise AssertionError("host sync in forward")

    for name in ("item", "tolist", "__bool__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = lens(x)
    monkeypatch.undo()
    assert out.shape == x.shape
    assert isinstance(lens.scale, torch.Tensor)


def test_warp_is_off_by_default_and_low_rank_when_on():
    lens, _ = bound_lens()
    assert lens.rank == 4 and not lens.use_warp
    lens.set_scale(0.5)
    with torch.no_grad():
        lens.U.normal_()
    x = torch.randn(3, D)
    torch.testing.assert_close(lens(x), x)  # no steering set, warp off
    lens.use_warp = True
    torch.testing.assert_close(lens(x), x + 0.5 * (x @ lens.V) @ lens.U)


def test_bind_as_hook_applies_lens_to_router_input():
    lens, router = bound_lens()
    lens.update_steering(SHARES)
    lens.set_scale(0.4)
    x = torch.randn(6, D)
    expected = nn.functional.linear(lens(x), router.weight, router.bias)
    lens.bind_router(router, apply_as_hook=True)
    torch.testing.assert_close(router(x), expected)
    lens.unbind_router()
    torch.testing.assert_close(router(x), nn.functional.linear(x, router.weight, router.bias))
    assert "router" not in dict(lens.named_modules()) and len(list(lens.parameters())) == 2


def test_state_dict_round_trip_keeps_mode_and_steering():
    lens, router = bound_lens()
    lens.set_steering_mode("ENTROPY_MAX")
    lens.update_steering(SHARES)
    lens.set_scale(0.125)
    fresh = ChronoLens(D, rank=4)
    fresh.load_state_dict(lens.state_dict())
    fresh.bind_router(router)
    assert fresh.mode is SteeringMode.ENTROPY_MAX and fresh.s == 0.125
    torch.testing.assert_close(fresh.direction(), lens.direction())


def test_bad_input():
    lens, _ = bound_lens()
    with pytest.raises(ValueError, match="steering mode must be one of"):
        lens.set_steering_mode("MAXIMUM_CHAOS")
    with pytest.raises(ValueError, match="scale must be a finite float >= 0"):
        lens.set_scale(math.nan)
    with pytest.raises(ValueError, match="scale must be a finite float >= 0"):
        lens.set_scale(-0.1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        lens.update_steering([float("nan")] * E)
    with pytest.raises(ValueError, match="d_model=16"):
        lens.bind_router(nn.Linear(5, E))
    with pytest.raises(ValueError, match="bind_router"):
        ChronoLens(D, 2).update_steering(SHARES)


def test_identity_lens_is_identity():
    lens = IdentityLens(layer_id=3)
    lens.set_scale(0.4)
    lens.set_steering_mode("LIFT_TAIL")
    lens.update_steering(SHARES)
    x = torch.randn(2, D)
    assert lens(x) is x and lens.s == 0.4 and lens.rank == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
def test_forward_has_no_cuda_sync():
    router = nn.Linear(D, E).cuda()
    lens = ChronoLens(D, rank=4, use_warp=True).cuda()
    lens.bind_router(router, apply_as_hook=True)
    lens.update_steering(SHARES)
    lens.set_scale(0.3)
    x = torch.randn(64, D, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        router(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and lens.s == pytest.approx(0.3)
