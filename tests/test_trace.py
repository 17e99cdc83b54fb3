import pytest
import torch

from chronomoe_v3 import MoETrace, compute_expert_stats


def _routing(t=30, k=2, e=6, h=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    x = torch.randn(t, h, generator=g)
    experts = torch.randn(e, h, h, generator=g)
    return idx, w, x, experts


def _assert_same_stats(a, b):
    sa, sb = compute_expert_stats(a), compute_expert_stats(b)
    for f in ("counts", "sum_out", "sum_weighted", "sum_mixture", "num_tokens"):
        assert torch.allclose(getattr(sa, f), getattr(sb, f), atol=1e-5), f


def test_constructors_agree_on_the_same_routing():
    idx, w, x, experts = _routing()
    t, k = idx.shape
    e, h = experts.shape[0], x.shape[1]
    capacity = 7
    # Switch-style dispatch with capacity: slot-priority order, later arrivals dropped.
    dispatch = torch.zeros(t, e, capacity, dtype=torch.bool)
    fill = [0] * e
    kept = torch.zeros(t, k, dtype=torch.bool)
    for j in range(k):
        for i in range(t):
            ex = int(idx[i, j])
            if fill[ex] < capacity:
                dispatch[i, ex, fill[ex]] = True
                fill[ex] += 1
                kept[i, j] = True
    buf_in = torch.einsum("tec,th->ech", dispatch.float(), x)
    buf_out = torch.einsum("ech,ehd->ecd", buf_in, experts)
    from_capacity = MoETrace.from_capacity_dispatch(idx, w, dispatch, buf_out)
    # Mixtral-style loop over experts, with the same drops.
    tok_lists, outs = [], []
    for ex in range(e):
        toks = ((idx == ex) & kept).any(1).nonzero().flatten()
        tok_lists.append(toks)
        outs.append(x[toks] @ experts[ex])
    from_loop = MoETrace.from_expert_loop(idx, w, tok_lists, outs)
    # Fused per-slot outputs ([T*K, H] rows, as the HF pre-hook yields).
    rows = torch.einsum("th,tkhd->tkd", x, experts[idx]).reshape(t * k, h)
    from_fused = MoETrace.from_fused(idx, w, rows, num_experts=e, slot_mask=kept)
    assert torch.equal(from_loop.slot_mask, kept) and torch.equal(from_capacity.slot_mask, kept)
    assert torch.allclose(from_loop.expert_out, from_capacity.expert_out, atol=1e-5)
    _assert_same_stats(from_fused, from_loop)
    _assert_same_stats(from_fused, from_capacity)
    assert 0 < kept.sum() < t * k  # capacity really dropped something


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(topk_index=d["topk_index"][:, :1]), "topk_weight has shape"),
        (lambda d: d.update(topk_weight=d["topk_weight"].long()), "floating"),
        (lambda d: d.update(expert_out=d["expert_out"][:, :, None]), "expert_out has shape"),
        (lambda d: d.update(topk_index=d["topk_index"].float()), "integer dtype"),
        (lambda d: d.update(topk_index=d["topk_index"] + 10), "expected ids in"),
        (lambda d: d.update(slot_mask=torch.ones(3, 2)), "slot_mask"),
        (lambda d: d.update(token_mask=torch.zeros(30, dtype=torch.bool)), "all-padding"),
        (lambda d: d.update(token_mask=torch.ones(31, dtype=torch.bool)), "token_mask has shape"),
        (lambda d: d.update(num_experts=0), "num_experts"),
        (lambda d: d.update(topk_index=d["topk_index"][:0], topk_weight=d["topk_weight"][:0],
                            expert_out=d["expert_out"][:0]), "empty batch"),
    ],
)
def test_bad_input_is_a_clear_value_error(mutate, match):
    idx, w, x, experts = _routing()
    d = dict(topk_index=idx, topk_weight=w, expert_out=torch.randn(30, 2, 5), num_experts=6)
    mutate(d)
    with pytest.raises(ValueError, match=match):
        MoETrace.from_fused(**d)


def test_loop_constructor_rejects_inconsistent_lists():
    idx, w, x, experts = _routing()
    with pytest.raises(ValueError, match="one entry per expert"):
        MoETrace.from_expert_loop(idx, w, [torch.arange(3)], [])
    with pytest.raises(ValueError, match="did not select it"):
        wrong = [torch.arange(30)] + [torch.zeros(0, dtype=torch.long)] * 5
        MoETrace.from_expert_loop(idx, w, wrong, [torch.randn(30, 5)] + [torch.randn(0, 5)] * 5)
