import pytest
import torch

import chronomoe_v3.grouped as grouped
from chronomoe_v3.grouped import grouped_mm, grouped_weight_grad


def test_grouped_mm_forward_backward_match_per_group_products():
    torch.manual_seed(0)
    x = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([3, 3, 11, 17], dtype=torch.int32)  # group 1 empty, rows 17.. dropped
    out = grouped_mm(x, w, offsets)
    bounds = [0, 3, 3, 11, 17]
    ref = torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(4)] + [torch.zeros(3, 5, dtype=x.dtype)])
    assert torch.allclose(out, ref)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offsets), (x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_match_groups_and_bf16_does_not_sync(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 32, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(4, 32, 16, device="cuda", dtype=dtype, requires_grad=True)
    offsets = torch.tensor([16, 16, 40, 56], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    # bf16 runs torch._grouped_mm, fp32 (a small layer) the dense product: neither syncs the host
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_mm(x, w, offsets)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    bounds = [0, 16, 16, 40, 56]
    ref = torch.cat([x[bounds[e]:bounds[e + 1]].float() @ w[e].float() for e in range(4)]
                    + [torch.zeros(8, 16, device="cuda")])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item())


def test_dense_form_matches_the_per_group_products():
    """The small-layer CUDA form (every row times every expert, each row's own expert picked), checked on the
    CPU in float64 against the per-group loop, forward and weight gradient."""
    torch.manual_seed(1)
    x = torch.randn(20, 6, dtype=torch.float64)
    w = torch.randn(4, 6, 5, dtype=torch.float64)
    g = torch.randn(20, 5, dtype=torch.float64)
    offsets = torch.tensor([3, 3, 11, 17], dtype=torch.int32)
    assert torch.allclose(grouped._dense_mm(x, w, offsets), grouped._loop_mm(x, w, offsets))
    assert torch.allclose(grouped._dense_weight_grad(x, g, offsets), grouped._loop_weight_grad(x, g, offsets))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_layers_past_the_dense_bound_take_the_per_group_path(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(64, 32, device="cuda")
    w = torch.randn(4, 32, 16, device="cuda")
    offsets = torch.tensor([16, 16, 40, 56], dtype=torch.int32, device="cuda")
    dense = grouped_mm(x, w, offsets)
    wg = grouped_weight_grad(x, torch.ones(64, 16, device="cuda"), offsets)
    monkeypatch.setattr(grouped, "DENSE_LIMIT", 0)
    assert torch.allclose(grouped_mm(x, w, offsets), dense, atol=1e-4)
    assert torch.allclose(grouped_weight_grad(x, torch.ones(64, 16, device="cuda"), offsets), wg, atol=1e-4)
