"""Edits on real weights leave the layer's function as promised (ChronoMoELayer and a ModuleList MoE)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import lifecycle_config
from torch import nn

from chronomoe_v3 import compute_expert_stats
from chronomoe_v3.adapters import LayerBanks, ModuleListBank, RouterBank, banks_for, register_adapter
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.ops import merge, prune, restore, spawn, split
from chronomoe_v3.ops.registry import ExpertRegistry

D, F_FF, E = 8, 16, 8


class ListMoE(nn.Module):
    """Per-expert modules (Mixtral 4.x / Switch style) with GPT-OSS routing: top-k logits -> softmax over k."""

    def __init__(self, top_k: int, live: int, bias: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(D, E, bias=bias, dtype=torch.float64)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, F_FF, dtype=torch.float64), nn.SiLU(), nn.Linear(F_FF, D, dtype=torch.float64))
            for _ in range(E)
        )
        mask = torch.zeros(E, dtype=torch.bool)
        mask[:live] = True
        self.register_buffer("active_mask", mask)
        self.counts = torch.zeros(E, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x).masked_fill(~self.active_mask, float("-inf"))
        top, index = logits.topk(self.top_k, dim=-1)
        weight = F.softmax(top, dim=-1)
        keep = self.active_mask[index]
        out = torch.zeros_like(x)
        counts = torch.zeros(E, dtype=torch.long)
        for e, expert in enumerate(self.experts):
            rows, pos = ((index == e) & keep).nonzero(as_tuple=True)
            counts[e] = rows.numel()
            if rows.numel():
                out.index_add_(0, rows, weight[rows, pos, None] * expert(x[rows]))
        self.counts = counts
        return out


class ListAdapter:
    """The banks of the adapter protocol (what the edit operations need)."""

    def __init__(self, module: ListMoE) -> None:
        self.module = module

    def banks(self) -> LayerBanks:
        m = self.module
        return LayerBanks(ModuleListBank(m.experts), RouterBank.from_linear(m.gate), m.active_mask)


register_adapter(ListMoE, ListAdapter)  # type: ignore[arg-type]


class Setup:
    """A layer, its banks and a registry; `f(x)` is the output, `counts()` tokens per slot of the last call."""

    def __init__(self, kind: str, top_k: int, live: int, bias: bool = True) -> None:
        torch.manual_seed(0)
        if kind == "chrono":
            self.layer: nn.Module = ChronoMoELayer(D, F_FF, E, top_k, router_bias=bias, dtype=torch.float64)
            self.layer.active_mask[live:] = False
            self._counts = torch.zeros(E)
            self.layer.add_observer(lambda tr: setattr(self, "_counts", compute_expert_stats(tr).counts))
        else:
            self.layer = ListMoE(top_k, live, bias)
        self.kind = kind
        self.banks = banks_for(self.layer)
        config = lifecycle_config(min_experts_per_layer=2, max_experts_per_layer=E, perturbation_scale=0.0)
        self.registry = ExpertRegistry([self.layer.active_mask], config)
        self.x = torch.randn(64, D, dtype=torch.float64)
        self.ptrs = [p.data_ptr() for p in self.layer.parameters()]

    def f(self, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if self.kind == "chrono":
                return self.layer(self.x, router_bias=logit_bias)
            assert logit_bias is None
            return self.layer(self.x)

    def assert_close(self, y: torch.Tensor, y0: torch.Tensor) -> None:
        # ChronoMoELayer routes in fp32 (gate weights); the ModuleList MoE is fp64 throughout
        tol = 1e-6 if self.kind == "chrono" else 1e-12
        torch.testing.assert_close(y, y0, rtol=tol, atol=tol)

    def counts(self) -> torch.Tensor:
        return self._counts if self.kind == "chrono" else self.layer.counts

    def check_structure(self) -> None:
        self.layer.train()
        self.f()
        assert torch.all(self.counts()[~self.layer.active_mask] == 0)
        assert torch.equal(self.layer.active_mask, self.registry.active_mask(0))
        assert [p.data_ptr() for p in self.layer.parameters()] == self.ptrs


def _shift_vector(record) -> torch.Tensor:
    shift = torch.zeros(E, dtype=torch.float64)
    for slot, value in record.logit_shift.items():
        shift[slot] = value
    return shift


@pytest.mark.parametrize("kind", ["chrono", "list"])
def test_pruning_an_expert_that_gets_no_tokens_is_bit_identical(kind):
    s = Setup(kind, top_k=2, live=5)
    with torch.no_grad():
        s.banks.router.bias[3] = -1.0e4  # never selected; its softmax mass underflows to exactly 0
    y0 = s.f()
    assert s.counts()[3] == 0
    prune(s.registry, s.banks, 0, 3, step=1)
    assert torch.equal(s.f(), y0)
    s.check_structure()


def test_pruning_an_unselected_expert_with_softmax_mass_is_exact_up_to_rounding():
    # softmax -> top-k -> renormalise: an unselected expert still holds softmax mass; renormalisation cancels it
    s = Setup("chrono", top_k=1, live=5)
    with torch.no_grad():
        s.banks.router.bias[3] = -8.0
    y0 = s.f()
    assert s.counts()[3] == 0
    prune(s.registry, s.banks, 0, 3, step=1)
    s.assert_close(s.f(), y0)


@pytest.mark.parametrize(("kind", "bias"), [("chrono", True), ("chrono", False), ("list", True)])
def test_split_without_perturbation_preserves_the_output(kind, bias):
    # dense routing (top_k = all slots): the children together hold exactly the parent's softmax mass
    s = Setup(kind, top_k=E, live=4, bias=bias)
    y0 = s.f()
    record = split(s.registry, s.banks, 0, 1, step=3, scale=0.0)
    assert record.fresh_slots == (4,) and record.kept_slots == (1,)
    assert record.logit_shift == {1: -math.log(2.0), 4: -math.log(2.0)}
    assert record.logit_shift_applied is bias
    y1 = s.f(None if bias else _shift_vector(record))
    s.assert_close(y1, y0)
    if not bias:  # without applying the shift the children would hold too much mass
        assert (s.f() - y0).abs().max() > 1e-4
    s.check_structure()
    assert s.counts()[4] > 0


def _split_change(scale: float, antithetic: bool) -> float:
    s = Setup("chrono", top_k=E, live=4)
    y0 = s.f()
    split(s.registry, s.banks, 0, 2, step=1, scale=scale, antithetic=antithetic,
          generator=torch.Generator().manual_seed(7))
    return float((s.f() - y0).norm() / y0.norm())


def test_split_perturbation_moves_the_output_in_proportion_to_scale():
    scales = [1e-3, 2e-3, 4e-3]
    independent = [_split_change(s, antithetic=False) for s in scales]
    for small, big in zip(independent, independent[1:], strict=False):
        assert 1.8 < big / small < 2.2  # O(s)
    antithetic = [_split_change(s, antithetic=True) for s in scales]
    for small, big in zip(antithetic, antithetic[1:], strict=False):
        assert 3.5 < big / small < 4.5  # mirrored children: the first-order terms cancel, O(s^2)
    assert all(a < i / 20 for a, i in zip(antithetic, independent, strict=True))


@pytest.mark.parametrize("kind", ["chrono", "list"])
def test_merging_two_identical_experts_preserves_the_output(kind):
    s = Setup(kind, top_k=E, live=5)
    s.banks.experts.copy(1, 3)
    s.banks.router.copy(1, 3)
    y0 = s.f()
    record = merge(s.registry, s.banks, 0, 1, 3, step=2, usage=(0.3, 0.7))
    assert record.parked_slots == (3,) and record.kept_slots == (1,)
    s.assert_close(s.f(), y0)
    s.check_structure()


def test_merge_without_router_bias_returns_the_mass_shift():
    s = Setup("chrono", top_k=E, live=5, bias=False)
    s.banks.experts.copy(1, 3)
    s.banks.router.copy(1, 3)
    y0 = s.f()
    record = merge(s.registry, s.banks, 0, 1, 3, step=2)
    assert not record.logit_shift_applied and record.logit_shift[1] == pytest.approx(math.log(2.0))
    s.assert_close(s.f(_shift_vector(record)), y0)


def test_split_then_merge_returns_to_the_parent_function():
    s = Setup("chrono", top_k=E, live=4)
    y0 = s.f()
    record = split(s.registry, s.banks, 0, 0, step=1, scale=0.0)
    merge(s.registry, s.banks, 0, 0, record.fresh_slots[0], step=2, usage=(1.0, 1.0))
    s.assert_close(s.f(), y0)


@pytest.mark.parametrize("kind", ["chrono", "list"])
def test_masked_slots_receive_zero_tokens_after_every_op(kind):
    s = Setup(kind, top_k=2, live=4)
    gen = torch.Generator().manual_seed(3)
    s.check_structure()
    ops = [
        lambda: spawn(s.registry, s.banks, 0, step=1, parent=0, scale=0.05, generator=gen),
        lambda: spawn(s.registry, s.banks, 0, step=2, strategy="random", generator=gen),
        lambda: split(s.registry, s.banks, 0, 2, step=3, scale=0.05, generator=gen),
        lambda: prune(s.registry, s.banks, 0, 1, step=4),
        lambda: merge(s.registry, s.banks, 0, 0, 3, step=5, usage=(2.0, 1.0)),
        lambda: restore(s.registry, s.banks, "L0_E1", step=6),
        lambda: prune(s.registry, s.banks, 0, 0, step=7),
    ]
    for op in ops:
        op()
        s.check_structure()
    with torch.no_grad():  # make the masked slots the most attractive: still no tokens
        s.banks.router.bias[~s.layer.active_mask] = 1.0e3
    s.check_structure()


def test_random_spawn_matches_the_live_experts_scale():
    s = Setup("chrono", top_k=2, live=4)
    record = spawn(s.registry, s.banks, 0, step=1, strategy="random", generator=torch.Generator().manual_seed(0))
    slot = record.fresh_slots[0]
    live = [0, 1, 2, 3]
    for name, rms in s.banks.experts.weight_rms(live).items():
        new = s.banks.experts.weight_rms([slot])[name]
        assert 0.8 < float(new / rms) < 1.25, name
    assert s.registry.expert(record.born_ids[0]).origin == "spawn"


@pytest.mark.parametrize("bias", [True, False])
def test_split_with_router_margin_separates_the_roles_and_preserves_the_output_at_the_anchors(bias):
    from chronomoe_v3.ops.common import split_logit_shift

    margin = 2.0
    # dense routing: at the anchors the children together hold exactly the parent's softmax mass
    s = Setup("chrono", top_k=E, live=4, bias=bias)
    anchors = torch.randn(2, D, dtype=torch.float64)
    s.x = anchors
    y0 = s.f()
    z0 = s.layer.router(anchors).detach()
    record = split(s.registry, s.banks, 0, 1, step=3, scale=0.0, router_margin=margin,
                   router_anchors=(anchors[0], anchors[1]))
    shift = split_logit_shift(margin)
    assert record.logit_shift == {1: shift, 4: shift} and shift == pytest.approx(-math.log1p(math.exp(-4.0)))
    s.assert_close(s.f(None if bias else _shift_vector(record)), y0)
    z1 = s.layer.router(anchors).detach() + (0.0 if bias else _shift_vector(record))
    # each child keeps the parent's logit (plus the shift) at its own anchor and sits 2m lower at the other's
    torch.testing.assert_close(z1[0, 1], z0[0, 1] + shift)
    torch.testing.assert_close(z1[1, 4], z0[1, 1] + shift)
    torch.testing.assert_close(z1[1, 1], z0[1, 1] + shift - 2 * margin)
    torch.testing.assert_close(z1[0, 4], z0[0, 1] + shift - 2 * margin)
    # top-1: a token at each anchor goes to the child of its role
    t = Setup("chrono", top_k=1, live=4, bias=bias)
    with torch.no_grad():
        t.layer.router.weight[1] = 10 * (anchors[0] + anchors[1])  # the parent wins both anchors
    t.x = anchors
    split(t.registry, t.banks, 0, 1, step=3, scale=0.0, router_margin=margin, router_anchors=(anchors[0], anchors[1]))
    assert t.layer.route(anchors).topk_index[:, 0].tolist() == [1, 4]


def test_split_router_margin_needs_separable_anchors():
    from chronomoe_v3.ops.registry import EditError

    s = Setup("chrono", top_k=2, live=4)
    a = torch.randn(D, dtype=torch.float64)
    with pytest.raises(EditError, match="needs router_anchors"):
        split(s.registry, s.banks, 0, 1, step=3, router_margin=1.0)
    with pytest.raises(EditError, match="collinear"):
        split(s.registry, s.banks, 0, 1, step=3, router_margin=1.0, router_anchors=(a, 2 * a))
    assert s.registry.num_live(0) == 4  # nothing changed
