"""Shadow copies of expert weights and the weight-jump detector (ops/shadow.py), and the restore they drive."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_objective import CFG as OBJ_CFG
from test_objective import make_view
from torch import nn

from chronomoe_v3 import ChronoConfig, ShadowConfig
from chronomoe_v3.adapters import ModuleListBank, StackedBank
from chronomoe_v3.lifecycle.objective import propose_edits
from chronomoe_v3.ops import ShadowBank

NAN = float("nan")


def _stacked(e: int = 6, a: int = 12, b: int = 10, seed: int = 0) -> tuple[StackedBank, nn.Parameter, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    w1 = nn.Parameter(torch.randn(e, a, b, generator=g))
    w2 = nn.Parameter(torch.randn(e, b, generator=g))  # a per-expert vector (a bias)
    return StackedBank({"w1": (w1, 0), "b": (w2, 0)}), w1, w2


def _true_drift(now: list[torch.Tensor], then: list[torch.Tensor]) -> torch.Tensor:
    num = sum((x - y).reshape(x.shape[0], -1).square().sum(1) for x, y in zip(now, then, strict=True))
    den = sum(y.reshape(y.shape[0], -1).square().sum(1) for y in then)
    return (num / den).sqrt()


def test_identical_weights_have_zero_drift_and_never_shadowed_slots_none() -> None:
    bank, w1, _ = _stacked()
    shadow = ShadowBank(bank, generator=torch.Generator().manual_seed(1))
    assert torch.isnan(shadow.drift()).all(), "no copy yet: no reading"
    keep = torch.tensor([True, True, True, False, True, True])
    shadow.refresh(keep, step=10)
    d = shadow.drift()
    assert torch.equal(d[keep], torch.zeros(5)) and torch.isnan(d[3])
    assert shadow.taken.tolist() == [10, 10, 10, -1, 10, 10]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 3.0))
def test_the_sketch_estimates_the_relative_frobenius_distance(seed: int, scale: float) -> None:
    bank, w1, w2 = _stacked(e=4, a=16, b=12, seed=seed)
    shadow = ShadowBank(bank, probes=256, generator=torch.Generator().manual_seed(seed + 1))
    shadow.refresh(torch.ones(4, dtype=torch.bool), step=0)
    then = [w1.detach().clone(), w2.detach().clone()]
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        w1.add_(scale * torch.randn(w1.shape, generator=g))
        w2.add_(scale * torch.randn(w2.shape, generator=g))
    est, true = shadow.drift(), _true_drift([w1.detach(), w2.detach()], then)
    # relative error of a 256-probe bilinear sketch: about sqrt(2 / 256) ~ 0.09 per slot; allow 4 sigma
    assert torch.allclose(est, true, rtol=0.4), (est, true)


def test_refresh_keeps_the_old_copy_of_slots_not_kept_and_weights_returns_it() -> None:
    bank, w1, w2 = _stacked()
    shadow = ShadowBank(bank, generator=torch.Generator().manual_seed(0))
    shadow.refresh(torch.ones(6, dtype=torch.bool), step=5)
    before = bank.read(2)
    with torch.no_grad():
        w1.add_(1.0)
        w2.add_(1.0)
    keep = torch.ones(6, dtype=torch.bool)
    keep[2] = False
    shadow.refresh(keep, step=9)
    copy = shadow.weights(2)
    assert set(copy) == {"w1", "b"} and all(torch.equal(copy[k], before[k]) for k in before)
    assert torch.equal(shadow.weights(0)["w1"], w1[0].detach())
    assert shadow.taken.tolist() == [9, 9, 5, 9, 9, 9]
    shadow.forget([2])
    with pytest.raises(ValueError, match="slot 2 has no shadow copy"):
        shadow.weights(2)


def test_per_expert_modules_are_shadowed_too() -> None:
    torch.manual_seed(0)
    experts = nn.ModuleList([nn.Linear(6, 5) for _ in range(4)])
    bank = ModuleListBank(experts)
    shadow = ShadowBank(bank, probes=64, generator=torch.Generator().manual_seed(0))
    shadow.refresh(torch.ones(4, dtype=torch.bool), step=1)
    then = bank.read(1)
    with torch.no_grad():
        for p in experts[1].parameters():
            noise = torch.randn_like(p)
            p.copy_(noise * p.norm() / noise.norm())
    d = shadow.drift()
    assert torch.equal(d[[0, 2, 3]], torch.zeros(3)) and 0.8 < float(d[1]) < 2.2
    assert all(torch.equal(shadow.weights(1)[k], then[k]) for k in then)


def test_jumped_flags_a_slot_far_beyond_its_peers_only() -> None:
    bank, *_ = _stacked()
    shadow = ShadowBank(bank)
    active = torch.ones(6, dtype=torch.bool)
    drift = torch.tensor([0.1, 0.12, 0.08, 1.4, 0.11, NAN])
    assert shadow.jumped(drift, active, threshold=0.5, ratio=4.0).tolist() == [False, False, False, True, False, False]
    # every expert moved a lot (early training, a learning-rate spike): no single jump
    assert not shadow.jumped(drift + 1.0, active, threshold=0.5, ratio=4.0).any()
    # below the absolute floor: not a jump however far beyond the median
    assert not shadow.jumped(drift * 0.3, active, threshold=0.5, ratio=4.0).any()
    # an inactive slot is never flagged; fewer than three readings: no peers, no flag
    assert not shadow.jumped(drift, active & (torch.arange(6) != 3), threshold=0.5, ratio=4.0).any()
    few = torch.tensor([NAN, NAN, NAN, 1.4, 0.1, NAN])
    assert not shadow.jumped(few, active, threshold=0.5, ratio=4.0).any()
    # rates: a copy 10x older than its peers' may sit 10x further away without a jump; a fresh one may not
    shadow.taken[:] = 100
    shadow.taken[3] = 10
    assert not shadow.jumped(torch.tensor([0.1, 0.12, 0.08, 0.9, 0.11, NAN]), active, threshold=0.5, ratio=4.0,
                             step=110).any()
    shadow.taken[3] = 100
    assert shadow.jumped(torch.tensor([0.1, 0.12, 0.08, 0.9, 0.11, NAN]), active, threshold=0.5, ratio=4.0,
                         step=110).tolist() == [False, False, False, True, False, False]


def test_shadow_state_round_trips_and_bad_state_is_refused_unchanged() -> None:
    bank, w1, _ = _stacked()
    a = ShadowBank(bank, generator=torch.Generator().manual_seed(3))
    a.refresh(torch.ones(6, dtype=torch.bool), step=4)
    b = ShadowBank(bank, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        w1.mul_(1.1)
    assert torch.equal(a.drift(), b.drift())
    bad = a.state_dict()
    bad["sketch"] = bad["sketch"][:3]
    before = b.state_dict()
    with pytest.raises(ValueError, match="shadow sketch"):
        b.load_state_dict(bad)
    assert all(torch.equal(x, y) for x, y in zip(before["copies"], b.state_dict()["copies"], strict=True))


def test_bad_arguments_name_the_value() -> None:
    bank, *_ = _stacked()
    with pytest.raises(ValueError, match="probes=0"):
        ShadowBank(bank, probes=0)
    with pytest.raises(ValueError, match="storage='gpu'"):
        ShadowBank(bank, storage="gpu")
    for field, value in (("probes", 0), ("refresh_every", 0), ("jump_threshold", -1.0), ("jump_ratio", 0.5),
                         ("storage", "disk"), ("enabled", 1), ("accept_steps", -1)):
        with pytest.raises(ValueError, match=f"shadow.{field}"):
            ShadowConfig(**{field: value})


# ---------------------------------------------------------------------- the objective's restore candidate
def _jumped_view(**overrides: object) -> object:
    fields: dict[str, object] = dict(
        jumped=torch.tensor([False, False, False, True, False]),
        drift=torch.tensor([0.1, 0.1, 0.1, 1.4, NAN]),
        shadow_step=torch.tensor([100, 100, 100, 100, -1]),
        phi_fast=torch.tensor([0.9, 0.5, 0.8, 0.1, NAN]),
    )
    fields.update(overrides)
    return make_view(**fields)


def test_a_jumped_expert_is_restored_from_its_own_copy() -> None:
    cands = [c for c in propose_edits(_jumped_view(), OBJ_CFG) if c.action == "replace"]
    (rep,) = cands
    assert rep.expert_id == 3 and rep.partner_id == 3 and "weights jumped" in rep.reason
    # its share (0.3) is predicted served again at its own slow coherence (0.6) instead of its fast one (0.1)
    assert rep.delta.misfit == pytest.approx(0.3 * (0.1 - 0.6))
    assert rep.delta_F == pytest.approx(rep.delta.misfit)
    # a jumped expert is never pruned, merged or split on its readings
    assert all(c.expert_id != 3 for c in propose_edits(_jumped_view(), OBJ_CFG) if c.action != "replace")
    # no copy (or an unjudged expert): no restore
    no_copy = _jumped_view(shadow_step=torch.tensor([100, 100, 100, -1, -1]))
    assert not any(c.partner_id == 3 and c.expert_id == 3 for c in propose_edits(no_copy, OBJ_CFG))
    thin = _jumped_view(evidence=torch.tensor([1e5, 1e5, 1e5, 10.0, 0.0]))
    assert not any(c.action == "replace" for c in propose_edits(thin, OBJ_CFG))


def test_a_restore_counts_the_identity_lost_when_phi_hardly_moves() -> None:
    # Measured on the damaged start (seed 1): weights replaced by noise, phi 0.54 against 0.58 before, but the
    # expert's mean output turned away from its own direction (identity 0.69 against 0.94). The prediction
    # discounts its fast phi by the identity kept, so the restore clears the bar; phi alone did not.
    phi = dict(phi_fast=torch.tensor([0.9, 0.5, 0.8, 0.56, NAN]), phi_slow=torch.tensor([0.9, 0.5, 0.8, 0.58, NAN]))
    (plain,) = [c for c in propose_edits(_jumped_view(**phi), OBJ_CFG) if c.action == "replace"]
    assert plain.delta.misfit == pytest.approx(0.3 * (0.56 - 0.58))
    assert plain.delta_F > -OBJ_CFG.objective.min_improvement
    identity = torch.tensor([[0.98, 0.98, 0.98, 0.69, NAN], [0.97, 0.97, 0.97, 0.94, NAN]])
    (rep,) = [c for c in propose_edits(_jumped_view(identity=identity, **phi), OBJ_CFG) if c.action == "replace"]
    kept = 0.69 / 0.94
    assert rep.delta.misfit == pytest.approx(0.3 * (0.56 * kept - 0.58))
    assert rep.delta_F < -OBJ_CFG.objective.min_improvement and "identity kept 0.734" in rep.reason
    # An identity that held (or rose) changes nothing; a negative phi is not made to look better.
    held = identity.clone()
    held[0, 3] = 0.99
    (same,) = [c for c in propose_edits(_jumped_view(identity=held, **phi), OBJ_CFG) if c.action == "replace"]
    assert same.delta.misfit == pytest.approx(plain.delta.misfit)
    (neg,) = [c for c in propose_edits(_jumped_view(identity=identity), OBJ_CFG) if c.action == "replace"]
    assert neg.delta.misfit == pytest.approx(0.3 * (0.1 * kept - 0.6))
    neg_phi = _jumped_view(identity=identity, phi_fast=torch.tensor([0.9, 0.5, 0.8, -0.2, NAN]))
    (n2,) = [c for c in propose_edits(neg_phi, OBJ_CFG) if c.action == "replace"]
    assert n2.delta.misfit == pytest.approx(0.3 * (-0.2 - 0.6))


def test_a_restore_runs_in_a_concentrated_layer() -> None:
    concentrated = _jumped_view(pressure=1.0)
    (rep,) = [c for c in propose_edits(concentrated, OBJ_CFG) if c.action == "replace"]
    assert rep.partner_id == rep.expert_id == 3


# ---------------------------------------------------------------------- the system
def test_the_system_restores_a_damaged_expert_bit_for_bit_from_its_copy() -> None:
    from test_lifecycle_scenarios import CFG, _edits, _regression_layer, _run

    from chronomoe_v3 import ChronoSystem

    layer, centres, targets = _regression_layer()
    system = ChronoSystem(layer, config=CFG, run_id="restore")
    opt = torch.optim.Adam(layer.parameters(), lr=2e-3)
    system.attach_optimizer(opt)
    _run(layer, system, opt, centres, targets, range(300))
    assert not _edits(system)
    shadow = system.shadows[0]
    assert shadow is not None and int(shadow.taken[2]) >= 0
    copy = shadow.weights(2)
    with torch.no_grad():
        for p in (layer.w_gate, layer.w_up, layer.w_down):
            noise = torch.randn_like(p[2])
            p[2].copy_(noise * p[2].norm() / noise.norm())
    after_restore: dict[str, torch.Tensor] = {}
    step = system.step

    def step_and_capture(**kwargs: object) -> object:
        out = step(**kwargs)  # type: ignore[arg-type]
        if _edits(system) and not after_restore:
            after_restore.update(system.banks[0].experts.read(2))
        return out

    system.step = step_and_capture  # type: ignore[method-assign]
    # the fast clock needs a few forwards to see the damage before the objective predicts a gain
    _run(layer, system, opt, centres, targets, range(300, 320))
    edits = _edits(system)
    assert edits and edits[0].action == "replace" and edits[0].expert_id == "L0_E2", [r.reason for r in edits]
    assert "weights jumped" in (edits[0].reason or "") and "weights jumped" in edits[0].trigger
    assert edits[0].step <= 310, "restored within 10 steps of the damage"
    new = system.registry.expert_at(0, 2)
    assert new is not None and new.origin == "replace" and new.parent_id == "L0_E2"
    assert all(torch.equal(after_restore[k], copy[k]) for k in copy), "the slot holds its own pre-damage weights"
    # the audit can still undo it: the damaged weights are in the archive
    assert "L0_E2" in system.registry.archived_ids()


def test_healthy_training_flags_no_jump_and_disabled_shadow_holds_nothing() -> None:
    from test_lifecycle_scenarios import CFG, _edits, _regression_layer, _run

    from chronomoe_v3 import ChronoSystem

    layer, centres, targets = _regression_layer()
    system = ChronoSystem(layer, config=CFG, run_id="healthy")
    opt = torch.optim.Adam(layer.parameters(), lr=2e-3)
    system.attach_optimizer(opt)
    _run(layer, system, opt, centres, targets, range(200))
    assert not _edits(system)
    assert all(not bool(j.any()) for j, _ in system._jumps.values())
    off = ChronoSystem(_regression_layer()[0], config=replace(CFG, shadow=ShadowConfig(enabled=False)), run_id="off")
    assert off.shadows == [None]
    state = system.state_dict()
    assert state["shadows"][0] is not None and not math.isnan(float(state["shadows"][0]["sketch"].sum()))


def test_config_round_trip_has_the_shadow_section() -> None:
    c = replace(ChronoConfig(), shadow=ShadowConfig(refresh_every=3, storage="device"))
    assert ChronoConfig.from_dict(c.to_dict()) == c and c.diff(ChronoConfig()) == ["shadow.refresh_every",
                                                                                   "shadow.storage"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host copies, non-blocking writes)")
def test_restore_on_cuda_with_pinned_host_copies() -> None:
    from test_lifecycle_scenarios import CFG, _edits, _regression_layer

    from chronomoe_v3 import ChronoSystem

    layer, centres, targets = _regression_layer()
    layer, centres, targets = layer.cuda(), centres.cuda(), targets.cuda()
    system = ChronoSystem(layer, config=CFG, run_id="restore-cuda", compile_observers=False)
    opt = torch.optim.Adam(layer.parameters(), lr=2e-3)
    system.attach_optimizer(opt)

    def run(steps: range) -> None:
        for step in steps:
            g = torch.Generator().manual_seed(step)
            idx = torch.randint(0, 4, (64,), generator=g)
            x = centres[idx] + 0.3 * torch.randn(len(idx), centres.shape[1], generator=g).cuda()
            loss = (layer(x) - targets[idx]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            system.step(loss=float(loss.detach()))

    run(range(300))
    shadow = system.shadows[0]
    assert shadow is not None and all(c.is_pinned() for c in shadow._copies)
    copy = shadow.weights(2)
    assert copy["w_gate"].device.type == "cuda"
    state = system.state_dict()  # waits for in-flight copies before reading them
    assert all(c.device.type == "cpu" for c in state["shadows"][0]["copies"])
    with torch.no_grad():
        for p in (layer.w_gate, layer.w_up, layer.w_down):
            noise = torch.randn_like(p[2])
            p[2].copy_(noise * p[2].norm() / noise.norm())
    run(range(300, 320))
    edits = _edits(system)
    assert edits and edits[0].expert_id == "L0_E2" and "weights jumped" in (edits[0].reason or "")
