"""BimodalityState and sample_expert_outputs: formulas, seeding, detection on synthetic traces."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from chronomoe_v3.config import BimodalityConfig, ChronoConfig
from chronomoe_v3.observe.bimodality import BimodalityState, sample_expert_outputs
from chronomoe_v3.trace import MoETrace

ALPHA = ChronoConfig().bimodality.centroid.retention


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add wake-up latency (100x on a busy 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _feed(state: BimodalityState, vectors: list[torch.Tensor | None]) -> None:
    """One S=1 step: vectors[e] is expert e's unit output, or None (unmeasured)."""
    h = state.hidden_size
    x = torch.stack([torch.zeros(h) if v is None else v for v in vectors])
    state.update(x, torch.tensor([v is not None for v in vectors]))


def test_seeding_ema_and_counts_match_formulas() -> None:
    st = BimodalityState(2, 3)
    u, v = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    w = _unit(torch.tensor([1.0, 0.1, 0.0]))
    _feed(st, [u, None])  # first observation seeds c1; c2 unseeded -> bimodality 0
    assert torch.allclose(st.c1[0], u) and st.seeded[:, 0].tolist() == [True, False]
    assert st.n1[0].item() == pytest.approx(1.0) and st.n2[0].item() == 0.0
    assert st.bimodality[0].item() == 0.0 and not st.seeded[:, 1].any()
    _feed(st, [v, None])  # cos(v, c1) = 0 < 0.9: v seeds c2 and wins
    assert torch.allclose(st.c2[0], v)
    assert st.n1[0].item() == pytest.approx(ALPHA) and st.n2[0].item() == pytest.approx(1.0)
    _feed(st, [w, None])  # closer to c1: c1 <- normalise(alpha c1 + (1 - alpha) w); both counts decay
    expected_c1 = _unit(ALPHA * u + (1 - ALPHA) * w)
    assert torch.allclose(st.c1[0], expected_c1, atol=1e-6) and torch.allclose(st.c2[0], v)
    n1, n2 = ALPHA * ALPHA + 1.0, ALPHA
    assert st.n1[0].item() == pytest.approx(n1) and st.n2[0].item() == pytest.approx(n2)
    separation = 1.0 - float(expected_c1 @ v)
    assert st.separation[0].item() == pytest.approx(separation, abs=1e-6)
    assert st.balance[0].item() == pytest.approx(n2 / n1)
    assert st.bimodality[0].item() == pytest.approx(separation * n2 / n1, abs=1e-6)
    assert st.bimodality[1].item() == 0.0


def test_close_observation_does_not_seed_second_centroid() -> None:
    st = BimodalityState(1, 3)
    u = torch.tensor([1.0, 0.0, 0.0])
    near = _unit(torch.tensor([1.0, 0.3, 0.0]))  # cos ~ 0.958 > seed_cosine 0.9
    for x in (u, near, u, near):
        _feed(st, [x])
    assert not st.seeded[1, 0] and st.bimodality[0].item() == 0.0 and st.n2[0].item() == 0.0


def test_dead_second_centroid_is_reseeded_by_a_new_role() -> None:
    st = BimodalityState(1, 3)
    u, v, w = torch.eye(3)
    _feed(st, [u])
    _feed(st, [v])  # c2 = v, a one-off
    for _ in range(80):
        _feed(st, [u])  # c2 wins nothing; n2 decays below reseed_balance * n1
    assert st.n2[0].item() < 0.05 * st.n1[0].item()
    _feed(st, [w])  # far from c1 (ties to c1 in the provisional assignment) -> c2 re-seeded at w
    assert torch.allclose(st.c2[0], w) and st.n2[0].item() == pytest.approx(1.0)


def _two_role_trace(
    gen: torch.Generator, t: int, h: int, dirs: torch.Tensor, noise: float
) -> MoETrace:
    """3 active experts of 4 (top-1): E0 serves two roles (u w.p. 2/3, v w.p. 1/3), E1 one role, E2 u+v."""
    idx = torch.randint(0, 3, (t,), generator=gen)
    role = (torch.rand(t, generator=gen) >= 2 / 3).long()
    out = torch.where(
        (idx == 0).unsqueeze(1), dirs[role], torch.where((idx == 1).unsqueeze(1), dirs[2], dirs[0] + dirs[1])
    )
    out = out + noise * torch.randn(t, h, generator=gen)
    return MoETrace(idx.unsqueeze(1), torch.ones(t, 1), out.unsqueeze(1), 4)


def test_detects_one_expert_serving_two_roles_in_mixed_batches() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    h = 16
    dirs = torch.eye(h)[:3]
    st = BimodalityState(4, h)
    history = []
    for step in range(250):
        samples, valid = sample_expert_outputs(_two_role_trace(gen, 192, h, dirs, 0.1), 16, gen)
        st.update(samples, valid)
        if step >= 100:
            history.append(st.bimodality.clone())
    mean = torch.stack(history).mean(0)
    # E0: orthogonal roles (separation ~1) at 2:1 (balance ~0.5) -> bimodality ~0.5.
    assert mean[0].item() == pytest.approx(0.5, abs=0.1)
    assert st.separation[0].item() == pytest.approx(1.0, abs=0.1)
    assert {tuple(r) for r in st.centroids(0).round().tolist()} == {tuple(dirs[0].tolist()), tuple(dirs[1].tolist())}
    # One role plus noise: the detector does not invent bimodality.
    assert mean[1].item() < 0.05 and mean[2].item() < 0.05
    assert mean[3].item() == 0.0 and not st.seeded[:, 3].any()


def test_per_batch_means_average_the_roles_away() -> None:
    """Why the detector is fed per-token samples: per-step means of mixed batches show one role."""
    gen = torch.Generator().manual_seed(1)
    h = 16
    dirs = torch.eye(h)[:3]
    st = BimodalityState(4, h)
    for _ in range(100):
        tr = _two_role_trace(gen, 192, h, dirs, 0.1)
        idx = tr.topk_index[:, 0]
        onehot = (idx.unsqueeze(1) == torch.arange(4)).float()
        means = onehot.T @ tr.expert_out[:, 0]
        st.update(means, onehot.sum(0) > 0)
    assert st.bimodality[0].item() < 0.05


def test_sample_expert_outputs_fixed_shape_and_membership() -> None:
    gen = torch.Generator().manual_seed(2)
    t, k, e, h, s = 20, 2, 5, 3, 4
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    idx[:, 0] = torch.where(idx[:, 0] == 4, 3, idx[:, 0])
    idx[:, 1] = torch.where(idx[:, 1] == 4, torch.where(idx[:, 0] == 3, 2, 3), idx[:, 1])  # expert 4 never routed
    # Each row encodes (token, slot, expert) so membership can be checked exactly.
    tok = torch.arange(t).view(t, 1).expand(t, k).float()
    slot = torch.arange(k).view(1, k).expand(t, k).float()
    out = torch.stack([tok + 1, slot, idx.float()], -1)
    slot_mask = torch.ones(t, k, dtype=torch.bool)
    slot_mask[0, :] = False
    token_mask = torch.ones(t, dtype=torch.bool)
    token_mask[1] = False
    tr = MoETrace(idx, torch.ones(t, k), out, e, slot_mask=slot_mask, token_mask=token_mask)
    samples, valid = sample_expert_outputs(tr, s, gen)
    assert samples.shape == (e, s, h) and valid.shape == (e, s)
    kept = tr.kept_slots()
    for ex in range(e):
        n_e = int(((idx == ex) & kept).sum())
        assert int(valid[ex].sum()) == min(n_e, s)
        rows = samples[ex][valid[ex]]
        assert torch.all(rows[:, 2] == ex)
        tokens = rows[:, 0].long() - 1
        assert len(set(zip(tokens.tolist(), rows[:, 1].tolist(), strict=True))) == rows.shape[0]  # no repeats
        assert not bool(((tokens == 0) | (tokens == 1)).any())  # dropped / padded never sampled
        assert torch.all(samples[ex][~valid[ex]] == 0)
    assert not valid[4].any()


def test_centroid_phi_split_reset_copy_and_state_dict() -> None:
    st = BimodalityState(4, 3)
    u, v, _ = torch.eye(3)
    ref = _unit(torch.tensor([1.0, 0.0, 1.0])).expand(4, 3)
    for x in (u, v, u, v):
        st.update(torch.stack([x, x, x, x]), torch.tensor([True, True, True, False]), reference=ref)
    assert torch.allclose(st.centroid_phi[:, 0], torch.tensor([1 / math.sqrt(2), 0.0]), atol=1e-6)
    assert torch.isnan(st.centroid_phi[:, 3]).all()
    assert torch.allclose(st.centroid_weights[:, 0], st.count[:, 0] / st.count[:, 0].sum())
    c = st.centroids(0).clone()
    st.split_expert(0, 0, 3)  # child A reuses the parent's slot, child B takes slot 3
    assert torch.allclose(st.c1[0], c[0]) and torch.allclose(st.c1[3], c[1])
    assert not st.seeded[1, 0] and not st.seeded[1, 3] and st.bimodality[[0, 3]].eq(0).all()
    assert st.centroid_phi[0, 3].item() == pytest.approx(0.0, abs=1e-6)
    st.copy_expert(1, 2)
    assert torch.equal(st.centroid[:, 2], st.centroid[:, 1]) and torch.equal(st.count[:, 2], st.count[:, 1])
    other = BimodalityState(4, 3)
    other.load_state_dict(st.state_dict())
    assert torch.equal(other.centroid, st.centroid) and torch.equal(other.seeded, st.seeded)
    st.reset_experts(torch.tensor([False, True, False, False]))
    assert not st.seeded[:, 1].any() and st.count[:, 1].eq(0).all() and st.centroid[:, 1].eq(0).all()
    assert torch.isnan(st.centroid_phi[:, 1]).all() and st.seeded[:, 2].any()


def test_active_mask_and_validation() -> None:
    st = BimodalityState(2, 3)
    x = torch.eye(3)[:2]
    st.update(x, torch.tensor([True, True]), active_mask=torch.tensor([True, False]))
    assert st.seeded[0].tolist() == [True, False]
    with pytest.raises(ValueError, match="samples have shape"):
        st.update(torch.zeros(3, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid has shape"):
        st.update(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="seed_cosine"):
        BimodalityState(2, 3, ChronoConfig(bimodality=BimodalityConfig(seed_cosine=1.0)))
    with pytest.raises(ValueError, match="samples_per_expert"):
        trace = MoETrace(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.ones(2, 1, 3), 2)
        sample_expert_outputs(trace, 0)


def test_router_mean_per_role_and_split_hand_over() -> None:
    # one expert, two roles (outputs u and v) whose tokens came from router inputs a and b
    st = BimodalityState(2, 3, router_size=2)
    u, v, _ = torch.eye(3)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    samples = torch.stack([torch.stack([u, v, u, v]), torch.zeros(4, 3)])
    valid = torch.tensor([[True] * 4, [False] * 4])
    inputs = torch.stack([torch.stack([a, b, a, b]), torch.zeros(4, 2)])
    for _ in range(5):
        st.update(samples, valid, router_input=inputs)
    assert st.seeded[:, 0].all()
    role_of_u = int((st.centroid[:, 0] @ u).argmax())
    assert torch.allclose(st.router_mean[role_of_u, 0], a) and torch.allclose(st.router_mean[1 - role_of_u, 0], b)
    assert torch.isnan(st.router_mean[:, 1]).all()  # never measured
    expected = st.router_mean[:, 0].clone()
    st.split_expert(0, 0, 1)
    assert torch.allclose(st.router_mean[0, 0], expected[0]) and torch.allclose(st.router_mean[0, 1], expected[1])
    assert torch.isnan(st.router_mean[1, [0, 1]]).all()
    with pytest.raises(ValueError, match="router_input has shape"):
        st.update(samples, valid, router_input=torch.zeros(2, 4, 3))


def test_centroid_phi_includes_the_siblings_contribution() -> None:
    # Parent with roles u (gate 1) and v; the rest of the mixture is w. Child u's reference after a split is
    # w + (v's part of the mixture): load 1 token per token, half the samples each -> 0.5 * v.
    st = BimodalityState(1, 3)
    u, v, w = torch.eye(3)
    samples = torch.stack([u, v, u, v]).unsqueeze(0)
    valid = torch.ones(1, 4, dtype=torch.bool)
    for _ in range(3):
        st.update(samples, valid, reference=w.unsqueeze(0), gate=torch.ones(1, 4), load=torch.ones(1))
    for j in range(2):
        role = st.centroid[j, 0]
        sibling = torch.eye(3)[1] if torch.allclose(role, u) else torch.eye(3)[0]
        expected = float(role @ _unit(w + 0.5 * sibling))
        assert st.centroid_phi[j, 0].item() == pytest.approx(expected, abs=1e-5)
    plain = BimodalityState(1, 3)
    for _ in range(3):
        plain.update(samples, valid, reference=w.unsqueeze(0))
    assert torch.allclose(plain.centroid_phi[:, 0], torch.zeros(2), atol=1e-6)  # u, v orthogonal to w


def test_sample_expert_outputs_details() -> None:
    t, k, h = 6, 2, 3
    idx = torch.tensor([[0, 1]] * t)
    out = torch.randn(t, k, h)
    weight = torch.rand(t, k)
    router_input = torch.randn(t, 5)
    trace = MoETrace(topk_index=idx, topk_weight=weight, expert_out=out, num_experts=2, router_input=router_input)
    g = torch.Generator().manual_seed(0)
    samples, valid, inputs, gate = sample_expert_outputs(trace, 4, generator=g, details=True)
    g = torch.Generator().manual_seed(0)
    plain, plain_valid = sample_expert_outputs(trace, 4, generator=g)
    assert torch.equal(samples, plain) and torch.equal(valid, plain_valid)  # same draw
    assert inputs.shape == (2, 4, 5) and gate.shape == (2, 4)
    for e in range(2):
        for s in range(4):
            token = int((out[:, e] == samples[e, s]).all(-1).nonzero()[0])
            assert torch.equal(inputs[e, s], router_input[token]) and gate[e, s] == weight[token, e]
