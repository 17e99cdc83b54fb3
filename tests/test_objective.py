"""The slow objective: hand-computed F and predictions, the judgement rules, selection, invariants."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from helpers import lifecycle_config
from hypothesis import given, settings
from hypothesis import strategies as st

from chronomoe_v3.config import ChronoConfig, ObjectiveConfig
from chronomoe_v3.lifecycle.objective import (
    ACTIONS,
    EARLY_ACTIONS,
    EditCandidate,
    FreeEnergy,
    concentration,
    free_energy,
    propose_edits,
    redundancy_matrix,
)
from chronomoe_v3.lifecycle.select import select_edit, select_edits
from chronomoe_v3.observe.stats import starvation_fraction
from chronomoe_v3.view import LayerView

CFG = ChronoConfig()
NAN = float("nan")
ADDING = ("spawn", "split")
REMOVING = ("prune", "merge")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_view(**overrides: object) -> LayerView:
    """E=5 slots, 4 in play and measured with plenty of evidence; E0 and E2 partly redundant; slot 4 free."""
    e = 5
    role = torch.zeros(e, 4)
    role[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    role[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    role[2] = torch.tensor([0.6, 0.8, 0.0, 0.0])
    role[3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    role[4] = NAN
    coact = torch.zeros(e, e)
    coact[0, 0], coact[1, 1], coact[2, 2], coact[3, 3] = 0.3, 0.1, 0.3, 0.3
    coact[0, 2] = coact[2, 0] = 0.075
    fields: dict[str, object] = dict(
        layer_id=1,
        active=torch.tensor([True, True, True, True, False]),
        cooling=torch.zeros(e, dtype=torch.bool),
        phi_slow=torch.tensor([0.9, 0.5, 0.8, 0.6, NAN]),
        share_slow=torch.tensor([0.3, 0.1, 0.3, 0.3, 0.0]),
        role=role,
        bimodality=torch.tensor([0.5, 0.1, 0.0, 0.0, 0.0]),
        coactivation=coact,
        starvation=0.0,
        observations=torch.tensor([100, 100, 100, 100, 0]),
        evidence=torch.tensor([1e5, 1e5, 1e5, 1e5, 0.0]),
    )
    fields.update(overrides)
    return LayerView(**fields)  # type: ignore[arg-type]


# Hand computation for make_view():
PSI = 0.3 * 0.9 + 0.1 * 0.5 + 0.3 * 0.8 + 0.3 * 0.6  # 0.74
R02 = (0.6 * (1 - abs(0.9 - 0.8) / 2)) ** 4 * (0.075 / 0.3)  # role cos 0.6, phi similarity 0.95, overlap 0.25
I0 = 0.5 - 0.2  # bimodality above the 0.2 threshold


def _by_action(cands: list[EditCandidate]) -> dict[str, list[EditCandidate]]:
    out: dict[str, list[EditCandidate]] = {}
    for c in cands:
        out.setdefault(c.action, []).append(c)
    return out


def _parts(f: FreeEnergy) -> tuple[float, float, float, float]:
    return (f.misfit, f.complexity, f.redundancy, f.instability)


def test_free_energy_hand_computed() -> None:
    f = free_energy(make_view(), CFG)
    o = CFG.objective
    assert f.misfit == pytest.approx(1 - PSI)
    assert f.complexity == pytest.approx(o.lambda_complexity * 4)
    assert f.redundancy == pytest.approx(o.rho_redundancy * R02)
    assert f.instability == pytest.approx(o.kappa_instability * I0)
    r = redundancy_matrix(make_view())
    assert torch.allclose(r, r.T) and r.diagonal().abs().sum() == 0
    assert r.sum().item() == pytest.approx(2 * R02)


def test_free_energy_counts_cooling_experts_and_handles_no_measurement() -> None:
    cooling = torch.tensor([False, False, False, False, True])
    f = free_energy(make_view(cooling=cooling), CFG)
    assert f.complexity == pytest.approx(CFG.objective.lambda_complexity * 5)
    f0 = free_energy(make_view(phi_slow=torch.full((5,), NAN)), CFG)
    assert f0.misfit == 1.0 and f0.redundancy == 0.0


def test_concentration_is_the_collapse_condition_on_slow_shares_or_an_alert() -> None:
    assert concentration(make_view(), CFG) == ""  # Neff 3.72 >= 2.4, top-2 0.6 <= 0.75
    top2 = make_view(share_slow=torch.tensor([0.45, 0.05, 0.4, 0.1, 0.0]))
    assert "top-2 share 0.85" in concentration(top2, CFG)
    neff = make_view(share_slow=torch.tensor([0.7, 0.1, 0.1, 0.1, 0.0]))  # Neff 2.56 and top-2 0.8
    assert concentration(neff, CFG)
    assert "PRE_COLLAPSE" in concentration(make_view(alerts=("PRE_COLLAPSE",)), CFG)


def _decoherent_e1(**overrides: object) -> LayerView:
    # E1 persistently decoherent (phi < floor 0), light (share 0.1 < half of fair 0.25), 80% of its traffic
    # absorbable by E0 (O_10 = 0.08 / 0.1).
    coact = make_view().coactivation.clone()
    coact[1, 0] = 0.08
    fields: dict[str, object] = dict(phi_slow=torch.tensor([0.9, -0.3, 0.8, 0.6, NAN]), coactivation=coact)
    fields.update(overrides)
    return make_view(**fields)


def test_prune_prediction_matches_formula() -> None:
    view = _decoherent_e1()
    (prune,) = _by_action(propose_edits(view, CFG))["prune"]
    assert prune.expert_id == 1 and "persistently decoherent" in prune.reason
    assert "80% of its traffic absorbable by E0" in prune.reason and "tokens of evidence" in prune.reason
    # Absorbed traffic takes E0's coherence; the rest keeps min(phi_e, 0): no credit for stranding it.
    misfit = 0.1 * (-0.3 - (0.8 * 0.9 + 0.2 * min(-0.3, 0.0)))
    assert prune.delta.misfit == pytest.approx(misfit)
    assert prune.delta.complexity == pytest.approx(-CFG.objective.lambda_complexity)
    assert prune.delta.redundancy == 0.0 and prune.delta.instability == 0.0
    assert prune.F_before == pytest.approx(free_energy(view, CFG).total)


def test_no_prune_without_evidence_traffic_room_or_a_balanced_layer() -> None:
    # Below the layer average but above the floor: not a reason.
    assert "prune" not in _by_action(propose_edits(make_view(), CFG))
    # Decoherent but unique (nothing can absorb its traffic): kept.
    assert "prune" not in _by_action(propose_edits(make_view(phi_slow=torch.tensor([0.9, -0.3, 0.8, 0.6, NAN])), CFG))
    # Too little evidence (tokens, not forwards): not judged.
    few = _decoherent_e1(evidence=torch.tensor([1e5, 1000.0, 1e5, 1e5, 0.0]))
    assert "prune" not in _by_action(propose_edits(few, CFG))
    # Carrying at least half its fair share: kept (the old rule pruned busy experts).
    busy = _decoherent_e1(share_slow=torch.tensor([0.25, 0.15, 0.3, 0.3, 0.0]))
    assert "prune" not in _by_action(propose_edits(busy, CFG))
    # Starvation is not decoherence: nothing is removed from a concentrated layer.
    assert "prune" not in _by_action(propose_edits(_decoherent_e1(alerts=("PRE_COLLAPSE",)), CFG))
    skewed = _decoherent_e1(share_slow=torch.tensor([0.5, 0.05, 0.4, 0.05, 0.0]))
    assert concentration(skewed, CFG) and "prune" not in _by_action(propose_edits(skewed, CFG))


def _vestigial_e1(**overrides: object) -> LayerView:
    # E1 is coherent (phi 0.5) but nearly unused: share 0.02 of 0.92, below 1/8 of its fair share 1/4; 80% of
    # its traffic absorbable by E0.
    coact = make_view().coactivation.clone()
    coact[1, 0] = 0.08
    fields: dict[str, object] = dict(share_slow=torch.tensor([0.3, 0.02, 0.3, 0.3, 0.0]), coactivation=coact)
    fields.update(overrides)
    return make_view(**fields)


def test_a_vestigial_expert_is_pruned_unless_the_mid_clock_starves_it() -> None:
    """A coherent expert the router leaves nearly empty (below 1/8 of its fair share) while the mid clock is not
    moving tokens away from it is pruned, with the moved-traffic prediction; one the mid clock itself holds down
    (negative lens offset, as after a collapse) is not, nor one that still carries a real share."""
    view = _vestigial_e1(offset=torch.tensor([0.0, 0.3, 0.0, -0.3, 0.0]))
    (prune,) = _by_action(propose_edits(view, CFG))["prune"]
    assert prune.expert_id == 1 and "vestigial" in prune.reason and "lens offset +0.30" in prune.reason
    w = 0.02 / 0.92
    assert prune.delta.misfit == pytest.approx(w * (0.5 - 0.8 * 0.9))
    assert prune.delta_F < -CFG.objective.min_improvement
    # Without a mid clock (offset None) the router's verdict is all there is: pruned as well.
    assert [c.expert_id for c in _by_action(propose_edits(_vestigial_e1(), CFG))["prune"]] == [1]
    # The mid clock pushes tokens away from it: its emptiness is chronomoe's doing, not the router's.
    held = _vestigial_e1(offset=torch.tensor([0.1, -0.5, 0.1, 0.3, 0.0]))
    assert "prune" not in _by_action(propose_edits(held, CFG))
    # Light (below half its fair share) but not vestigial, and coherent: kept.
    light = _vestigial_e1(share_slow=torch.tensor([0.3, 0.08, 0.3, 0.3, 0.0]))
    assert "prune" not in _by_action(propose_edits(light, CFG))
    # Nothing to absorb its traffic, or a concentrated layer: kept.
    lone = _vestigial_e1(coactivation=make_view().coactivation)
    assert "prune" not in _by_action(propose_edits(lone, CFG))
    assert "prune" not in _by_action(propose_edits(_vestigial_e1(alerts=("PRE_COLLAPSE",)), CFG))


def test_of_several_prunable_experts_the_lowest_delta_f_is_proposed() -> None:
    """E1 decoherent with little traffic and E3 vestigial. Both absorbable by E0: E1's traffic is served far
    better by E0, so its removal has the lower delta_F and is proposed. When E1's traffic has nowhere to go,
    it no longer blocks E3's removal (the old rule looked only at the least coherent expert)."""
    def view(o10: float) -> LayerView:
        # All five slots in play (slot 4 gets a role of its own), so that the layer is not concentrated.
        coact = make_view().coactivation.clone()
        coact[4, 4] = 0.3
        coact[1, 0], coact[3, 0] = o10, 0.24
        role = make_view().role.clone()
        role[4] = torch.tensor([0.0, 1.0, 0.0, 0.0])
        return make_view(active=torch.ones(5, dtype=torch.bool), role=role, coactivation=coact,
                         phi_slow=torch.tensor([0.9, -0.05, 0.8, 0.6, 0.7]),
                         share_slow=torch.tensor([0.3, 0.06, 0.3, 0.02, 0.3]),
                         observations=torch.full((5,), 100), evidence=torch.full((5,), 1e5))

    assert not concentration(view(0.08), CFG)
    (both,) = _by_action(propose_edits(view(0.08), CFG))["prune"]
    assert both.expert_id == 1 and "persistently decoherent" in both.reason
    (only_e3,) = _by_action(propose_edits(view(0.0), CFG))["prune"]
    assert only_e3.expert_id == 3 and "vestigial" in only_e3.reason


def test_young_experts_are_not_removed() -> None:
    """A removal rests on the expert's own history: younger than `min_age_to_remove` steps (a split child that
    inherited its parent's clocks, a spawn), it is neither pruned nor merged away; old enough, it is."""
    young = _decoherent_e1(age=torch.tensor([5000, 400, 5000, 5000, 0]))
    assert "prune" not in _by_action(propose_edits(young, CFG))
    old = _decoherent_e1(age=torch.tensor([5000, CFG.objective.min_age_to_remove, 5000, 5000, 0]))
    (prune,) = _by_action(propose_edits(old, CFG))["prune"]
    assert prune.expert_id == 1
    role = make_view().role.clone()
    role[2] = role[0]
    coact = make_view().coactivation.clone()
    coact[0, 2] = coact[2, 0] = 0.3
    dup = dict(role=role, coactivation=coact, phi_slow=torch.tensor([0.9, 0.5, 0.9, 0.6, NAN]))
    assert "merge" in _by_action(propose_edits(make_view(**dup), CFG))
    assert "merge" not in _by_action(propose_edits(make_view(**dup, age=torch.tensor([5000, 5000, 10, 5000, 0])), CFG))


def test_a_never_firing_expert_is_not_pruned() -> None:
    # No utilisation fallback any more: E3 saw no token (no evidence, share 0): nothing to judge it on.
    view = make_view(share_slow=torch.tensor([0.35, 0.3, 0.35, 0.0, 0.0]),
                     phi_slow=torch.tensor([0.9, 0.5, 0.8, NAN, NAN]), evidence=torch.tensor([1e5, 1e5, 1e5, 0.0, 0.0]))
    assert "prune" not in _by_action(propose_edits(view, CFG))


def test_merge_prediction_and_no_merge_in_a_concentrated_layer() -> None:
    # make_view's E0/E2 pair is weakly redundant (r = R02 < merge_min_redundancy): no merge.
    assert "merge" not in _by_action(propose_edits(make_view(), CFG))
    # Duplicates: same role and coherence, and the router finds them interchangeable on all their tokens.
    role = make_view().role.clone()
    role[2] = role[0]
    coact = make_view().coactivation.clone()
    coact[0, 2] = coact[2, 0] = 0.3
    view = make_view(role=role, coactivation=coact, phi_slow=torch.tensor([0.9, 0.5, 0.9, 0.6, NAN]))
    assert redundancy_matrix(view)[0, 2].item() == pytest.approx(1.0)
    (merge,) = _by_action(propose_edits(view, CFG))["merge"]
    # Equal shares: the lower slot survives, E2 is absorbed; all its traffic is absorbable at the same phi.
    assert (merge.expert_id, merge.partner_id) == (2, 0)
    o = CFG.objective
    assert _parts(merge.delta) == pytest.approx((0.0, -o.lambda_complexity, -o.rho_redundancy * 1.0, 0.0))
    assert "most redundant pair" in merge.reason
    concentrated = make_view(role=role, coactivation=coact, phi_slow=torch.tensor([0.9, 0.5, 0.9, 0.6, NAN]),
                             alerts=("COLLAPSE_CONFIRMED",))
    assert "merge" not in _by_action(propose_edits(concentrated, CFG))


def test_split_prediction_charges_less_coherent_children() -> None:
    better = make_view(
        centroid_phi=torch.tensor([[0.95, NAN, NAN, NAN, NAN], [0.9, NAN, NAN, NAN, NAN]]),
        centroid_weights=torch.tensor([[0.75, 0, 0, 0, 0], [0.25, 0, 0, 0, 0]]),
    )
    (split,) = _by_action(propose_edits(better, CFG))["split"]
    assert split.expert_id == 0 and "most bimodal" in split.reason
    children = 0.75 * 0.95 + 0.25 * 0.9
    assert split.delta.misfit == pytest.approx(0.3 * (0.9 - children)) and split.delta.misfit < 0
    assert split.delta.complexity == pytest.approx(CFG.objective.lambda_complexity)
    assert split.delta.instability == pytest.approx(-CFG.objective.kappa_instability * I0)
    assert split.delta.redundancy == 0.0
    # Children predicted less coherent than the parent: the misfit delta is a penalty, so the split is proposed
    # with a worse delta_F, and only the instability it removes can pay for it.
    worse = make_view(
        centroid_phi=torch.tensor([[0.7, NAN, NAN, NAN, NAN], [0.6, NAN, NAN, NAN, NAN]]),
        centroid_weights=torch.tensor([[0.75, 0, 0, 0, 0], [0.25, 0, 0, 0, 0]]),
    )
    (charged,) = _by_action(propose_edits(worse, CFG))["split"]
    assert charged.delta.misfit == pytest.approx(0.3 * (0.9 - (0.75 * 0.7 + 0.25 * 0.6))) and charged.delta.misfit > 0
    assert charged.delta_F > split.delta_F
    assert "split" not in _by_action(propose_edits(make_view(), CFG))  # children's coherence unknown


def test_spawn_needs_starvation_and_coherent_experts() -> None:
    assert "spawn" not in _by_action(propose_edits(make_view(), CFG))
    assert "spawn" not in _by_action(propose_edits(make_view(starvation=0.1), CFG))  # below the floor 0.15
    view = make_view(starvation=0.3)
    # Starved tokens fit no expert: they enter the misfit with coherence 0.
    assert free_energy(view, CFG).misfit == pytest.approx(1 - 0.7 * PSI)
    (spawn,) = _by_action(propose_edits(view, CFG))["spawn"]
    assert spawn.expert_id is None and "fit no expert" in spawn.reason
    # A new expert takes at most its fair share 1/(N+1) = 0.2 of the traffic (< 0.3 starved), served at Psi.
    assert _parts(spawn.delta) == pytest.approx((-0.2 * PSI, CFG.objective.lambda_complexity, 0.0, 0.0))
    incoherent = make_view(starvation=0.3, phi_slow=torch.tensor([-0.1, -0.2, 0.3, -0.1, NAN]))
    assert "spawn" not in _by_action(propose_edits(incoherent, CFG))  # median phi < floor: not starvation
    young = make_view(starvation=0.3, observations=torch.tensor([10, 10, 10, 10, 0]))
    assert "spawn" not in _by_action(propose_edits(young, CFG))  # no judged expert: no persistent evidence
    # A concentrated layer may still grow: spawn answers starvation.
    assert "spawn" in _by_action(propose_edits(make_view(starvation=0.3, alerts=("PRE_COLLAPSE",)), CFG))


def _degrading_e3(**overrides: object) -> LayerView:
    coact = make_view().coactivation.clone()
    coact[3, 0], coact[3, 2] = 0.15, 0.06  # the router would give E3's tokens to E0 most readily
    fields: dict[str, object] = dict(
        coactivation=coact, degrading=torch.tensor([False, False, False, True, False]),
        phi_fast=torch.tensor([0.9, 0.5, 0.8, 0.05, NAN]),
    )
    fields.update(overrides)
    return make_view(**fields)


def test_a_degrading_expert_with_traffic_is_replaced_not_pruned() -> None:
    (rep,) = _by_action(propose_edits(_degrading_e3(), CFG))["replace"]
    assert (rep.expert_id, rep.partner_id) == (3, 0) and "degrading" in rep.reason
    # Its tokens are predicted served at the donor's slow coherence instead of its own fast one.
    assert _parts(rep.delta) == pytest.approx((0.3 * (0.05 - 0.9), 0.0, 0.0, 0.0))
    assert "prune" not in _by_action(propose_edits(_degrading_e3(phi_slow=torch.tensor([0.9, 0.5, 0.8, -0.4, NAN])),
                                                   CFG))
    assert "replace" not in _by_action(propose_edits(_degrading_e3(evidence=torch.tensor([1e5, 1e5, 1e5, 10.0, 0])),
                                                     CFG))
    assert "replace" not in _by_action(propose_edits(make_view(), CFG))


def test_bounds_and_free_slots() -> None:
    view = make_view(starvation=0.3)
    at_min = propose_edits(_decoherent_e1(starvation=0.3), lifecycle_config(min_experts_per_layer=4))
    assert not set(REMOVING) & {c.action for c in at_min}
    at_max = propose_edits(view, lifecycle_config(max_experts_per_layer=4))
    assert not set(ADDING) & {c.action for c in at_max}
    full = make_view(starvation=0.3, active=torch.ones(5, dtype=torch.bool))
    assert not set(ADDING) & {c.action for c in propose_edits(full, CFG)}  # no free slot


def test_cooling_experts_are_never_proposed() -> None:
    cooling = torch.tensor([True, True, False, True, False])
    view = _decoherent_e1(cooling=cooling, starvation=0.3)
    for c in propose_edits(view, CFG):
        assert c.expert_id not in (0, 1, 3) and c.partner_id not in (0, 1, 3)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_invariants_on_random_views(data: st.DataObject) -> None:
    e = data.draw(st.integers(2, 6))
    bools = st.lists(st.booleans(), min_size=e, max_size=e)
    active = torch.tensor(data.draw(bools))
    cooling = torch.tensor(data.draw(bools)) & active
    unit = st.floats(0.0, 1.0)
    phi = torch.tensor(data.draw(st.lists(st.one_of(st.floats(-1, 1), st.just(NAN)), min_size=e, max_size=e)))
    share = torch.tensor(data.draw(st.lists(unit, min_size=e, max_size=e)))
    coact = torch.tensor(data.draw(st.lists(st.lists(unit, min_size=e, max_size=e), min_size=e, max_size=e)))
    degrading = torch.tensor(data.draw(bools))
    offset = data.draw(st.one_of(st.none(), st.lists(st.floats(-1, 1), min_size=e, max_size=e)))
    identity = data.draw(st.one_of(st.none(), st.lists(
        st.lists(st.one_of(st.floats(-1, 1), st.just(NAN)), min_size=e, max_size=e), min_size=2, max_size=2)))
    jumped = torch.tensor(data.draw(bools))
    view = LayerView(
        layer_id=0, active=active, cooling=cooling, phi_slow=phi, share_slow=share,
        role=torch.tensor(data.draw(st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=e,
                                             max_size=e))),
        bimodality=torch.tensor(data.draw(st.lists(st.floats(0, 2), min_size=e, max_size=e))),
        coactivation=(coact + coact.T) / 2, starvation=data.draw(unit),
        observations=torch.tensor(data.draw(st.lists(st.integers(0, 200), min_size=e, max_size=e))),
        evidence=torch.tensor(data.draw(st.lists(st.floats(0, 1e5), min_size=e, max_size=e))),
        phi_fast=torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=e, max_size=e))),
        degrading=degrading,
        centroid_phi=torch.tensor(data.draw(st.lists(st.lists(st.floats(-1, 1), min_size=e, max_size=e),
                                                     min_size=2, max_size=2))),
        offset=None if offset is None else torch.tensor(offset),
        identity=None if identity is None else torch.tensor(identity),
        jumped=jumped, drift=torch.rand(e), shadow_step=torch.zeros(e, dtype=torch.int64),
    )
    lo = data.draw(st.integers(1, e))
    cfg = lifecycle_config(min_experts_per_layer=lo, max_experts_per_layer=data.draw(st.integers(lo, e + 1)))
    n = int(active.sum())
    f = free_energy(view, cfg)
    assert math.isfinite(f.total)
    fair = 1.0 / max(n, 1)
    for c in propose_edits(view, cfg):
        assert math.isfinite(c.delta_F) and c.F_before == pytest.approx(f.total)
        for slot in (c.expert_id, c.partner_id):
            assert slot is None or (bool(active[slot]) and not bool(cooling[slot]))
        if c.action in ADDING:
            assert n + 1 <= cfg.lifecycle.max_experts_per_layer and n < e
        if c.action in REMOVING:
            assert n - 1 >= cfg.lifecycle.min_experts_per_layer
            assert not concentration(view, cfg)
        if c.action == "prune":
            total = float(torch.where(torch.isfinite(phi) & (active | cooling), share, 0.0).sum())
            w = float(share[c.expert_id]) / max(total, 1e-12)
            assert w < 0.5 * fair + 1e-9
            assert not bool(degrading[c.expert_id])
            # Decoherent, or vestigial without the mid clock pushing tokens away from it.
            vestigial = w < cfg.objective.prune_vestigial_share * fair + 1e-9 and (
                offset is None or offset[c.expert_id] >= 0)
            assert float(phi[c.expert_id]) < cfg.objective.prune_coherence_floor or vestigial
        if c.action == "split":  # the misfit moves by at most what the children's predicted coherence
            phi_e = float(view.phi_slow[c.expert_id])  # differs from the parent's (a gain when both beat it)
            cp = [float(x) for x in view.centroid_phi[:, c.expert_id]]
            assert min(0.0, phi_e - max(cp)) - 1e-9 <= c.delta.misfit <= max(0.0, phi_e - min(cp)) + 1e-9
        if c.action == "replace" and c.partner_id == c.expert_id:  # a restore from its own copy
            assert bool(jumped[c.expert_id])
            # The identity discount can only make the restore look better than phi alone says, and never better
            # than treating the expert's tokens as unserved now (coherence 0, or its phi when negative).
            w = float(share[c.expert_id]) / max(float(torch.where(torch.isfinite(phi) & (active | cooling),
                                                                  share, 0.0).sum()), 1e-12)
            served, base = 1.0 - float(view.starvation), float(phi[c.expert_id])
            phi_e = float(view.phi_fast[c.expert_id])
            assert served * w * (min(phi_e, 0.0) - base) - 1e-6 <= c.delta.misfit <= served * w * (phi_e - base) + 1e-6
        elif c.action == "replace":
            assert bool(degrading[c.expert_id] | jumped[c.expert_id]) and not bool(degrading[c.partner_id])
        assert c.reason


def _cand(layer: int, action: str, delta_f: float, expert: int | None = 0) -> EditCandidate:
    return EditCandidate(action, layer, expert, 1.0, FreeEnergy(delta_f, 0.0, 0.0, 0.0), f"{action} L{layer}")


def test_select_edit_does_nothing_unless_min_improvement_is_beaten() -> None:
    cands = [_cand(0, "prune", -0.005), _cand(0, "split", 0.02)]
    d = select_edit(cands, CFG)
    assert d.do_nothing and "not below -min_improvement" in d.reason and d.candidates[0].action == "prune"
    assert select_edit([_cand(0, "prune", -0.01)], CFG).do_nothing  # strict inequality
    d = select_edit([*cands, _cand(0, "merge", -0.2), _cand(0, "spawn", -0.1, None)], CFG)
    assert d.edit is not None and d.edit.action == "merge"
    assert [c.delta_F for c in d.candidates] == sorted(c.delta_F for c in d.candidates)
    empty = select_edit([], CFG, layer_id=3)
    assert empty.do_nothing and empty.layer_id == 3 and "no candidate" in empty.reason
    with pytest.raises(ValueError, match="exactly one layer"):
        select_edit([_cand(0, "prune", -1), _cand(1, "prune", -1)], CFG)


def test_select_edits_emergency_allows_only_early_actions() -> None:
    assert set(EARLY_ACTIONS) == {"spawn", "split", "replace"} and set(EARLY_ACTIONS) < set(ACTIONS)
    per_layer = {0: [_cand(0, "prune", -0.5), _cand(0, "split", -0.1)], 1: [_cand(1, "merge", -0.4)],
                 2: [_cand(2, "replace", -0.3)]}
    cfg = lifecycle_config(max_edits_per_cycle=5)
    early = select_edits(per_layer, cfg, cooldown_ok=[True] * 3, emergency=[True] * 3, review_due=False)
    assert early[0].edit is not None and early[0].edit.action == "split" and "emergency" in early[0].reason
    assert early[1].do_nothing  # merge waits for the regular review
    assert early[2].edit is not None and early[2].edit.action == "replace"
    quiet = select_edits(per_layer, cfg, cooldown_ok=[True] * 3, emergency=[False] * 3, review_due=False)
    assert all(d.do_nothing and "no review due" in d.reason for d in quiet)
    due = select_edits(per_layer, cfg, cooldown_ok=[True] * 3, emergency=[False, True, False], review_due=True)
    assert [d.edit.action if d.edit else None for d in due] == ["prune", "merge", "replace"]
    cooling = select_edits(per_layer, cfg, cooldown_ok={0: False, 1: True, 2: True},
                           emergency={0: True, 1: False, 2: False}, review_due=True)
    assert cooling[0].do_nothing and "cooling down" in cooling[0].reason and cooling[1].edit is not None


def test_select_edits_respects_max_edits_per_cycle_across_layers() -> None:
    per_layer = {
        0: [_cand(0, "prune", -0.2)], 1: [_cand(1, "split", -0.5)], 2: [_cand(2, "spawn", -0.3, None)], 3: [],
    }
    flags = [True] * 4
    for budget, kept in ((0, []), (1, [1]), (2, [1, 2]), (3, [0, 1, 2]), (9, [0, 1, 2])):
        out = select_edits(per_layer, lifecycle_config(max_edits_per_cycle=budget), flags, [False] * 4, review_due=True)
        assert [d.layer_id for d in out] == [0, 1, 2, 3]
        assert [d.layer_id for d in out if d.edit is not None] == kept
        assert all("budget" in d.reason for d in out if d.edit is None and d.layer_id in (0, 1, 2))


def test_starvation_fraction() -> None:
    active = torch.tensor([True, True, True, True, False])
    z = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 9.0],  # uniform over active (inactive logit ignored): fit 0 -> starved
        [9.0, 0.0, 0.0, 0.0, 0.0],  # confident: fit ~1
        [1.0, 0.0, 0.0, 0.0, 0.0],  # p1 = e/(e+3) = 0.475; fit = (0.475 - 0.25)/0.75 = 0.30 -> not starved
        [0.5, 0.0, 0.0, 0.0, 0.0],  # p1 = 0.355; fit = 0.14 -> starved
    ])
    assert starvation_fraction(z, active, top_k=1).item() == pytest.approx(0.5)
    mask = torch.tensor([False, True, True, True])
    assert starvation_fraction(z, active, top_k=1, token_mask=mask).item() == pytest.approx(1 / 3)
    # top-2 mass of row 2: (e + 1)/(e + 3) = 0.65; fit = (0.65 - 0.5)/0.5 = 0.30 -> not starved
    assert starvation_fraction(z[2:3], active, top_k=2).item() == 0.0
    assert starvation_fraction(z, torch.tensor([True, False, False, False, False]), top_k=1).item() == 0.0


def test_validation() -> None:
    with pytest.raises(ValueError, match="phi_slow has shape"):
        free_energy(make_view(phi_slow=torch.zeros(4)), CFG)
    with pytest.raises(ValueError, match="evidence has shape"):
        free_energy(make_view(evidence=torch.zeros(4)), CFG)
    with pytest.raises(ValueError, match="starvation"):
        free_energy(make_view(starvation=1.5), CFG)
    with pytest.raises(ValueError, match="bimodality_threshold"):
        ObjectiveConfig(bimodality_threshold=-0.1)
    for name, bad in (("prune_coherence_floor", 1.5), ("merge_min_redundancy", -0.1), ("starvation_floor", 1.0),
                      ("prune_min_absorbable", 2.0), ("prune_max_share", 1.5), ("min_evidence_tokens", -1.0)):
        with pytest.raises(ValueError, match=name):
            ObjectiveConfig(**{name: bad})


def test_select_edits_requires_a_flag_per_layer() -> None:
    with pytest.raises(ValueError, match="cooldown_ok has no entry for layer 1"):
        select_edits({0: [], 1: []}, CFG, cooldown_ok=[True], emergency=[False, False], review_due=True)
