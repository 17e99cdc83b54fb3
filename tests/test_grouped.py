import torch

from chronomoe_v3.grouped import grouped_mm


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
