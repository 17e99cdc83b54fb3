"""Random edit sequences never break the registry's invariants."""

import torch
from helpers import lifecycle_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronomoe_v3.adapters import banks_for
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.ops import OptimizerSurgery, merge, prune, restore, spawn, split
from chronomoe_v3.ops.registry import EditError, ExpertRegistry

E, MIN, MAX = 6, 2, 5

OPS = st.tuples(
    st.sampled_from(["spawn_clone", "spawn_random", "prune", "split", "merge", "restore", "train", "advance"]),
    st.integers(-1, E),  # a slot (sometimes out of range)
    st.integers(-1, E),
    st.floats(0.0, 2.0),
)


def _weights(banks, slot):
    return banks.experts.read(slot), banks.router.read(slot)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_invariants(registry, banks, layer):
    mask = registry.active_mask(0)
    assert torch.equal(layer.active_mask, mask)
    assert MIN <= int(mask.sum()) <= MAX
    records = {r.expert_id: r for r in registry.experts()}
    live = [registry.expert_at(0, s) for s in range(E)]
    occupants = [r.expert_id for r in live if r is not None]
    assert len(occupants) == len(set(occupants))
    for slot, r in enumerate(live):
        if r is not None:
            assert r.is_live and r.slot == slot and r.layer == 0
    for r in records.values():
        assert r.is_live == (r.expert_id in occupants)
        if r.parent_id is not None:
            parent = records[r.parent_id]
            assert parent.born_step <= r.born_step
            if r.origin in ("split", "restore"):
                assert parent.state == "archived"
        if r.state == "archived":
            assert r.ended_step is not None and r.ended_step >= r.born_step and r.ended_by is not None
        if r.successor_id is not None:
            assert r.ended_by == "merge" and r.expert_id in records[r.successor_id].absorbed_ids
        for absorbed in r.absorbed_ids:
            assert records[absorbed].successor_id == r.expert_id
    for slot in range(E):  # masked slots hold zeros
        if not mask[slot]:
            experts, router = _weights(banks, slot)
            assert all(float(t.abs().max()) == 0.0 for t in [*experts.values(), *router.values()])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=14), st.integers(0, 2**16))
def test_random_edit_sequences_keep_the_invariants(ops, seed):
    torch.manual_seed(seed)
    layer = ChronoMoELayer(4, 4, E, 2, router_bias=seed % 2 == 0)
    layer.active_mask[3:] = False
    banks = banks_for(layer)
    config = lifecycle_config(min_experts_per_layer=MIN, max_experts_per_layer=MAX, cooling_period=3)
    registry = ExpertRegistry([layer.active_mask], config)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    surgery = OptimizerSurgery(opt, [banks])
    gen = torch.Generator().manual_seed(seed)
    parked: dict[str, tuple[dict, dict]] = {}  # id -> weights at the moment it was archived
    _check_invariants(registry, banks, layer)  # the surgery zeroed the slots that start masked
    for step, (kind, a, b, u) in enumerate(ops, start=1):
        before = {s: _weights(banks, s) for s in range(E)}
        owners = {s: registry.expert_at(0, s) for s in range(E)}
        archived_before = set(registry.archived_ids())
        snapshot = (registry.state_dict(), [p.detach().clone() for p in layer.parameters()], opt.state_dict())
        try:
            if kind == "spawn_clone":
                spawn(registry, banks, 0, step=step, parent=a, scale=0.1, generator=gen, optimizer=surgery)
            elif kind == "spawn_random":
                spawn(registry, banks, 0, step=step, strategy="random", slot=b if b >= 0 else None,
                      generator=gen, optimizer=surgery)
            elif kind == "prune":
                prune(registry, banks, 0, a, step=step, optimizer=surgery)
            elif kind == "split":
                split(registry, banks, 0, a, step=step, scale=0.1, generator=gen, optimizer=surgery)
            elif kind == "merge":
                merge(registry, banks, 0, a, b, step=step, usage=(u, 1.0), optimizer=surgery)
            elif kind == "restore":
                ids = registry.archived_ids()
                target = ids[a % len(ids)] if ids else "L0_E9"
                record = restore(registry, banks, target, step=step, optimizer=surgery)
                experts, router = _weights(banks, record.fresh_slots[0])
                assert _same(experts, parked[target][0]) and _same(router, parked[target][1])  # bit-exact
            elif kind == "train":
                opt.zero_grad()
                mask = layer.active_mask.float()
                loss = sum((p * mask.view(-1, *[1] * (p.dim() - 1))).square().sum() for p in layer.parameters())
                (loss + 1e-3 * sum(p.sum() for p in layer.parameters())).backward()
                opt.step()
            else:
                registry.advance(step)
        except EditError:
            state, params, opt_state = snapshot
            assert registry.state_dict().keys() == state.keys()
            assert registry.state_dict()["slots"] == state["slots"]
            assert [r["state"] for r in registry.state_dict()["experts"]] == [r["state"] for r in state["experts"]]
            assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), params, strict=True))
            assert all(
                torch.equal(v, opt_state["state"][i][k])
                for i, s in opt.state_dict()["state"].items() for k, v in s.items()
            )
            continue
        for eid in set(registry.archived_ids()) - archived_before:
            slot = registry.expert(eid).slot
            assert owners[slot] is not None and owners[slot].expert_id == eid
            parked[eid] = before[slot]
            stored = registry.archived_weights(eid)
            assert _same(stored["experts"], before[slot][0]) and _same(stored["router"], before[slot][1])
        _check_invariants(registry, banks, layer)
