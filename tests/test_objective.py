"""The slow objective: hand-computed F and predictions, selection rules, invariants."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from helpers import lifecycle_config
from hypothesis import given, settings
from hypothesis import strategies as st

from chronomoe_v3.config import ChronoConfig, ObjectiveConfig
from chronomoe_v3.lifecycle.objective import (
    ADDITIVE_ACTIONS,
    EditCandidate,
    FreeEnergy,
    free_energy,
    propose_edits,
    redundancy_matrix,
)
from chronomoe_v3.lifecycle.select import select_edit, select_edits
from chronomoe_v3.observe.stats import starvation_fraction
from chronomoe_v3.view import LayerView

CFG = ChronoConfig()
NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_view(**overrides: object) -> LayerView:
    """E=5 slots, 4 in play; E0 and E2 partly redundant; E3 never measured; slot 4 free."""
    e = 5
    role = torch.zeros(e, 4)
    role[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    role[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    role[2] = torch.tensor([0.6, 0.8, 0.0, 0.0])
    role[3] = NAN
    role[4] = NAN
    coact = torch.zeros(e, e)
    coact[0, 0], coact[1, 1], coact[2, 2] = 0.4, 0.2, 0.4
    coact[0, 2] = coact[2, 0] = 0.1
    fields: dict[str, object] = dict(
        layer_id=1,
        active=torch.tensor([True, True, True, True, False]),
        cooling=torch.zeros(e, dtype=torch.bool),
        phi_slow=torch.tensor([0.9, 0.5, 0.8, NAN, NAN]),
        share_slow=torch.tensor([0.4, 0.2, 0.4, 0.0, 0.0]),
        fired=torch.tensor([True, True, True, True, False]),
        role=role,
        bimodality=torch.tensor([0.5, 0.1, 0.0, 0.0, 0.0]),
        coactivation=coact,
        starvation=0.0,
        observations=torch.tensor([100, 100, 100, 0, 0]),
    )
    fields.update(overrides)
    return LayerView(**fields)  # type: ignore[arg-type]


# Hand computation for make_view():
PSI = 0.4 * 0.9 + 0.2 * 0.5 + 0.4 * 0.8  # 0.78
R02 = (0.6 * (1 - abs(0.9 - 0.8) / 2)) ** 4 * (0.1 / 0.4)  # role cos 0.6, phi similarity 0.95, overlap 0.25
I0 = 0.5 - 0.2  # bimodality above the 0.2 threshold


def test_free_energy_hand_computed() -> None:
    f = free_energy(make_view(), CFG)
    assert f.misfit == pytest.approx(1 - PSI)
    assert f.complexity == pytest.approx(CFG.objective.lambda_complexity * 4)
    assert f.redundancy == pytest.approx(CFG.objective.rho_redundancy * R02)
    assert f.instability == pytest.approx(CFG.objective.kappa_instability * I0)
    assert f.total == pytest.approx(1 - PSI + 0.04 + 0.1 * R02 + 0.1 * I0)
    r = redundancy_matrix(make_view())
    assert r[0, 2].item() == pytest.approx(R02) and r[2, 0].item() == pytest.approx(R02)
    assert r.sum().item() == pytest.approx(2 * R02)


def test_free_energy_counts_cooling_experts_and_handles_no_measurement() -> None:
    cooling = torch.tensor([False, False, False, False, True])
    f = free_energy(make_view(cooling=cooling), CFG)
    assert f.complexity == pytest.approx(CFG.objective.lambda_complexity * 5)
    f0 = free_energy(make_view(phi_slow=torch.full((5,), NAN)), CFG)
    assert f0.misfit == 1.0 and f0.redundancy == 0.0


def _parts(f: FreeEnergy) -> tuple[float, float, float, float]:
    return (f.misfit, f.complexity, f.redundancy, f.instability)


def _by_action(cands: list[EditCandidate]) -> dict[str, list[EditCandidate]]:
    out: dict[str, list[EditCandidate]] = {}
    for c in cands:
        out.setdefault(c.action, []).append(c)
    return out


def test_prune_prediction_matches_formula() -> None:
    # E1 persistently decoherent (phi < floor 0) and 80% of its traffic absorbable by E0 (O_10 = 0.16 / 0.2).
    coact = make_view().coactivation.clone()
    coact[1, 0] = 0.16
    view = make_view(fired=torch.ones(5, dtype=torch.bool), phi_slow=torch.tensor([0.9, -0.3, 0.8, NAN, NAN]),
                     coactivation=coact)
    (prune,) = _by_action(propose_edits(view, CFG))["prune"]
    assert prune.expert_id == 1 and not prune.fallback and "persistently decoherent" in prune.reason
    assert "80% of its traffic absorbable by E0" in prune.reason
    # Absorbed traffic takes E0's coherence; the rest keeps min(phi_e, 0): no credit for stranding it.
    misfit = 0.2 * (-0.3 - (0.8 * 0.9 + 0.2 * min(-0.3, 0.0)))
    assert prune.delta.misfit == pytest.approx(misfit)
    assert prune.delta.complexity == pytest.approx(-CFG.objective.lambda_complexity)
    assert prune.delta.redundancy == 0.0 and prune.delta.instability == 0.0
    assert prune.F_before == pytest.approx(free_energy(view, CFG).total)


def test_no_coherence_prune_without_evidence() -> None:
    # Below the layer average but above the floor: not a reason (the old rule pruned E1 here).
    view = make_view(fired=torch.ones(5, dtype=torch.bool))
    assert "prune" not in _by_action(propose_edits(view, CFG))
    # Decoherent but unique (nothing can absorb its traffic): kept.
    unique = make_view(fired=torch.ones(5, dtype=torch.bool), phi_slow=torch.tensor([0.9, -0.3, 0.8, NAN, NAN]))
    assert "prune" not in _by_action(propose_edits(unique, CFG))
    # Decoherent and absorbable, but not yet observed long enough: not judged.
    coact = make_view().coactivation.clone()
    coact[1, 0] = 0.16
    young = make_view(fired=torch.ones(5, dtype=torch.bool), phi_slow=torch.tensor([0.9, -0.3, 0.8, NAN, NAN]),
                      coactivation=coact, observations=torch.tensor([100, 99, 100, 0, 0]))
    assert "prune" not in _by_action(propose_edits(young, CFG))


def test_never_firing_expert_is_pruned_through_the_fallback() -> None:
    view = make_view(fired=torch.tensor([True, True, True, False, False]))
    prunes = _by_action(propose_edits(view, CFG))["prune"]
    fallback = [c for c in prunes if c.fallback]
    assert len(fallback) == 1
    (c,) = fallback
    assert c.expert_id == 3 and "never fired" in c.reason and "utilisation fallback" in c.reason
    assert _parts(c.delta) == (0.0, -CFG.objective.lambda_complexity, 0.0, 0.0)
    # delta_F = -lambda == -min_improvement does not beat the threshold, yet the fallback is selected.
    assert not c.delta_F < -CFG.objective.min_improvement
    decision = select_edit([c], CFG)
    assert decision.edit is c and "fallback" in decision.reason
    # A better edit in the same layer goes first.
    better = replace(c, action="merge", expert_id=0, partner_id=2, fallback=False,
                     delta=FreeEnergy(-0.5, 0.0, 0.0, 0.0), reason="better")
    assert select_edit([c, better], CFG).edit is better


def test_merge_prediction() -> None:
    # make_view's E0/E2 pair is weakly redundant (r = R02 < merge_min_redundancy): no merge.
    assert "merge" not in _by_action(propose_edits(make_view(), CFG))
    # Duplicates: same role and coherence, and the router finds them interchangeable on all their tokens.
    role = make_view().role.clone()
    role[2] = role[0]
    coact = make_view().coactivation.clone()
    coact[0, 2] = coact[2, 0] = 0.4
    view = make_view(role=role, coactivation=coact, phi_slow=torch.tensor([0.9, 0.5, 0.9, NAN, NAN]))
    assert redundancy_matrix(view)[0, 2].item() == pytest.approx(1.0)
    (merge,) = _by_action(propose_edits(view, CFG))["merge"]
    # Equal shares: the lower slot survives, E2 is absorbed; all its traffic is absorbable at the same phi.
    assert (merge.expert_id, merge.partner_id) == (2, 0)
    o = CFG.objective
    assert _parts(merge.delta) == pytest.approx((0.0, -o.lambda_complexity, -o.rho_redundancy * 1.0, 0.0))
    assert "most redundant pair" in merge.reason


def test_split_prediction_uses_centroid_coherence() -> None:
    view = make_view(
        centroid_phi=torch.tensor([[0.7, NAN, NAN, NAN, NAN], [0.6, NAN, NAN, NAN, NAN]]),
        centroid_weights=torch.tensor([[0.75, 0, 0, 0, 0], [0.25, 0, 0, 0, 0]]),
    )
    (split,) = _by_action(propose_edits(view, CFG))["split"]
    assert split.expert_id == 0 and "most bimodal" in split.reason
    children = 0.75 * 0.7 + 0.25 * 0.6
    assert split.delta.misfit == pytest.approx(0.4 * (0.9 - children))
    assert split.delta.complexity == pytest.approx(CFG.objective.lambda_complexity)
    assert split.delta.instability == pytest.approx(-CFG.objective.kappa_instability * I0)
    assert split.delta.redundancy == 0.0
    # Without centroid coherence the misfit is predicted unchanged.
    (plain,) = _by_action(propose_edits(make_view(), CFG))["split"]
    assert plain.delta.misfit == 0.0 and "unknown" in plain.reason


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
    incoherent = make_view(starvation=0.3, phi_slow=torch.tensor([-0.1, -0.2, 0.3, NAN, NAN]))
    assert "spawn" not in _by_action(propose_edits(incoherent, CFG))  # median phi < floor: not starvation
    young = make_view(starvation=0.3, observations=torch.tensor([10, 10, 10, 0, 0]))
    assert "spawn" not in _by_action(propose_edits(young, CFG))  # no judged expert: no persistent evidence


def test_bounds_and_free_slots() -> None:
    view = make_view(starvation=0.3, fired=torch.tensor([True, True, True, False, False]))
    at_min = propose_edits(view, lifecycle_config(min_experts_per_layer=4))
    assert not {"prune", "merge"} & {c.action for c in at_min}
    at_max = propose_edits(view, lifecycle_config(max_experts_per_layer=4))
    assert not set(ADDITIVE_ACTIONS) & {c.action for c in at_max}
    full = make_view(starvation=0.3, active=torch.ones(5, dtype=torch.bool))
    assert not set(ADDITIVE_ACTIONS) & {c.action for c in propose_edits(full, CFG)}  # no free slot


def test_cooling_experts_are_never_proposed() -> None:
    cooling = torch.tensor([True, True, False, True, False])
    view = make_view(cooling=cooling, fired=torch.tensor([True, True, True, False, False]))
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
    view = LayerView(
        layer_id=0, active=active, cooling=cooling, phi_slow=phi, share_slow=share,
        fired=torch.tensor(data.draw(bools)),
        role=torch.tensor(data.draw(st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=e,
                                             max_size=e))),
        bimodality=torch.tensor(data.draw(st.lists(st.floats(0, 2), min_size=e, max_size=e))),
        coactivation=(coact + coact.T) / 2, starvation=data.draw(unit),
        observations=torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=e, max_size=e))),
    )
    lo = data.draw(st.integers(1, e))
    cfg = lifecycle_config(min_experts_per_layer=lo, max_experts_per_layer=data.draw(st.integers(lo, e + 1)))
    n = int(active.sum())
    f = free_energy(view, cfg)
    assert math.isfinite(f.total)
    for c in propose_edits(view, cfg):
        assert math.isfinite(c.delta_F) and c.F_before == pytest.approx(f.total)
        for slot in (c.expert_id, c.partner_id):
            assert slot is None or (bool(active[slot]) and not bool(cooling[slot]))
        if c.action in ADDITIVE_ACTIONS:
            assert n + 1 <= cfg.lifecycle.max_experts_per_layer and n < e
        else:
            assert n - 1 >= cfg.lifecycle.min_experts_per_layer
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


def test_select_edits_emergency_allows_only_additive_edits_early() -> None:
    per_layer = {0: [_cand(0, "prune", -0.5), _cand(0, "split", -0.1)], 1: [_cand(1, "merge", -0.4)]}
    cfg = lifecycle_config(max_edits_per_cycle=5)
    early = select_edits(per_layer, cfg, cooldown_ok=[True, True], emergency=[True, True], review_due=False)
    assert early[0].edit is not None and early[0].edit.action == "split" and "emergency" in early[0].reason
    assert early[1].do_nothing  # merge waits for the regular review
    quiet = select_edits(per_layer, cfg, cooldown_ok=[True, True], emergency=[False, False], review_due=False)
    assert all(d.do_nothing and "no review due" in d.reason for d in quiet)
    due = select_edits(per_layer, cfg, cooldown_ok=[True, True], emergency=[False, True], review_due=True)
    assert [d.edit.action if d.edit else None for d in due] == ["prune", "merge"]
    cooling = select_edits(per_layer, cfg, cooldown_ok={0: False, 1: True}, emergency={0: True, 1: False},
                           review_due=True)
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
    with pytest.raises(ValueError, match="starvation"):
        free_energy(make_view(starvation=1.5), CFG)
    with pytest.raises(ValueError, match="bimodality_threshold"):
        ObjectiveConfig(bimodality_threshold=-0.1)
    for name, bad in (("prune_coherence_floor", 1.5), ("merge_min_redundancy", -0.1), ("starvation_floor", 1.0),
                      ("prune_min_absorbable", 2.0)):
        with pytest.raises(ValueError, match=name):
            ObjectiveConfig(**{name: bad})


def test_select_edits_requires_a_flag_per_layer() -> None:
    with pytest.raises(ValueError, match="cooldown_ok has no entry for layer 1"):
        select_edits({0: [], 1: []}, CFG, cooldown_ok=[True], emergency=[False, False], review_due=True)
