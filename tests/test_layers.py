import pytest
import torch
import torch.nn.functional as F

from chronomoe_v3 import ChronoMoELayer, CoherenceState, compute_expert_stats


def _reference_forward(layer, x):
    """Per-token loop straight from the definition y = sum_k g_k * SwiGLU_e(x)."""
    h = x.reshape(-1, layer.d_model)
    r = layer.route(h)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(layer.top_k):
            e = int(r.topk_index[t, j])
            v = h[t]
            y = (F.silu(v @ layer.w_gate[e]) * (v @ layer.w_up[e])) @ layer.w_down[e]
            out[t] += r.topk_weight[t, j] * y
    return out.view_as(x)


def test_forward_matches_per_token_reference():
    torch.manual_seed(0)
    layer = ChronoMoELayer(12, 24, 6, 2, num_active=5)
    x = torch.randn(3, 7, 12)
    assert torch.allclose(layer(x), _reference_forward(layer, x), atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_masked_slots_receive_exactly_zero_tokens(capacity_factor):
    torch.manual_seed(1)
    layer = ChronoMoELayer(8, 16, 8, 2, capacity_factor=capacity_factor)
    layer.active_mask[[1, 4, 6]] = False
    with torch.no_grad():
        layer.router.weight[[1, 4, 6]] *= 100.0  # masked experts would win every token if they could
    seen = []
    layer.add_observer(lambda tr: seen.append(compute_expert_stats(tr).counts))
    x = torch.randn(64, 8, requires_grad=True)
    layer(x).square().sum().backward()
    counts = seen[-1]
    assert counts[[1, 4, 6]].tolist() == [0.0, 0.0, 0.0]
    assert counts.sum() > 0
    for p in (layer.w_gate, layer.w_up, layer.w_down):
        assert torch.count_nonzero(p.grad[[1, 4, 6]]) == 0


def test_capacity_drops_respect_limit_and_priority():
    torch.manual_seed(2)
    layer = ChronoMoELayer(8, 16, 4, 2, capacity_factor=0.5)
    seen = []
    layer.add_observer(seen.append)
    layer(torch.randn(40, 8))
    tr = seen[-1]
    stats = compute_expert_stats(tr)
    cap = int(torch.ceil(torch.tensor(0.5 * 40 * 2 / 4)))
    assert stats.counts.max() <= cap
    assert (~tr.slot_mask).any()
    # dropped slots contribute nothing to the mixture
    dropped_out = tr.expert_out[~tr.slot_mask]
    assert torch.count_nonzero(dropped_out) == 0


def test_slots_of_masked_experts_have_zero_rows_and_no_gradient_without_a_masking_pass():
    """Fewer active experts than top_k: each token's second slot names a masked expert; the grouped product
    writes its row as 0 (the forward masks nothing itself) and no gradient reaches the input through it."""
    torch.manual_seed(4)
    layer = ChronoMoELayer(8, 16, 4, 2)
    layer.active_mask[1:] = False  # (an edit can leave fewer active experts than top_k)
    seen = []
    layer.add_observer(seen.append)
    x = torch.randn(10, 8, requires_grad=True)
    out = layer(x)
    tr = seen[-1]
    assert (~tr.slot_mask).sum() == 10 and torch.count_nonzero(tr.expert_out[~tr.slot_mask]) == 0
    only = F.silu(x @ layer.w_gate[0]) * (x @ layer.w_up[0]) @ layer.w_down[0]
    assert torch.allclose(out, tr.topk_weight[:, :1] * only, atol=1e-5)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the batched gate product)")
def test_cuda_mixture_matches_the_elementwise_form():
    torch.manual_seed(0)
    layer = ChronoMoELayer(64, 32, 8, 2, capacity_factor=0.8).cuda()
    seen = []
    layer.add_observer(seen.append)
    x = torch.randn(300, 64, device="cuda")
    out = layer(x)
    tr = seen[-1]
    gate = torch.where(tr.slot_mask, tr.topk_weight, torch.zeros_like(tr.topk_weight))
    assert torch.allclose(out, (tr.expert_out * gate.unsqueeze(-1)).sum(1), atol=1e-5)


def test_router_bias_input_shifts_selection():
    torch.manual_seed(3)
    layer = ChronoMoELayer(8, 16, 4, 1)
    seen = []
    layer.add_observer(seen.append)
    x = torch.randn(50, 8)
    layer(x, router_bias=torch.tensor([0.0, 0.0, 50.0, 0.0]))
    assert (seen[-1].topk_index == 2).all()


def test_observers_only_in_training_and_removable():
    layer = ChronoMoELayer(8, 16, 4, 2)
    seen = []
    handle = layer.add_observer(seen.append)
    layer.eval()
    layer(torch.randn(5, 8))
    assert not seen
    layer.observe_eval = True
    layer(torch.randn(5, 8))
    assert len(seen) == 1
    handle.remove()
    layer.train()
    layer(torch.randn(5, 8))
    assert len(seen) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=0, d_ff=4, max_experts=4, top_k=1), "d_model"),
        (dict(d_model=4, d_ff=4, max_experts=4, top_k=5), "top_k"),
        (dict(d_model=4, d_ff=4, max_experts=4, top_k=2, num_active=1), "num_active"),
        (dict(d_model=4, d_ff=4, max_experts=4, top_k=2, capacity_factor=0.0), "capacity_factor"),
        (dict(d_model=4, d_ff=4, max_experts=4, top_k=2, bias_mode="x"), "bias_mode"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChronoMoELayer(**kwargs)


def test_forward_input_errors():
    layer = ChronoMoELayer(8, 16, 4, 2)
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 8))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, 8), token_mask=torch.ones(2, 4, dtype=torch.bool))


def test_all_padding_batch_measures_nothing_in_the_hot_path():
    layer = ChronoMoELayer(8, 16, 4, 2)
    state = CoherenceState(4, 8)
    layer.add_observer(lambda tr: state.observe(compute_expert_stats(tr), layer.active_mask))
    layer(torch.randn(2, 3, 8), token_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert state.observations.sum() == 0 and state.share.count.sum() == 0
