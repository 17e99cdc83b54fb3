"""Optimiser surgery: fresh slices, untouched neighbours, no drift of masked slots, a bounded first update."""

import pytest
import torch
from helpers import lifecycle_config
from torch import nn

from chronomoe_v3.adapters import LayerBanks, ModuleListBank, RouterBank, banks_for
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.ops import (
    OptimizerSurgery,
    adam_first_step_seed,
    merge,
    prune,
    reset_slot_state,
    restore,
    spawn,
    split,
)
from chronomoe_v3.ops.registry import ExpertRegistry

E, LIVE = 6, 4

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


class Rig:
    """A ChronoMoELayer trained on a synthetic loss (fast: no forward); masked slots get zero gradient
    unless `stray` adds a loss term that touches every slot."""

    def __init__(self, make_opt, freeze_masked: bool = True, surgery: bool = True) -> None:
        torch.manual_seed(0)
        self.layer = ChronoMoELayer(4, 4, E, 2, router_bias=True)
        self.layer.active_mask[LIVE:] = False
        self.banks = banks_for(self.layer)
        self.registry = ExpertRegistry([self.layer.active_mask], lifecycle_config(max_experts_per_layer=E))
        self.opt = make_opt(self.layer.parameters())
        self.surgery = OptimizerSurgery(self.opt, [self.banks], freeze_masked=freeze_masked) if surgery else None
        self.targets = {n: torch.randn_like(p) for n, p in self.layer.named_parameters()}
        self.ptrs = [p.data_ptr() for p in self.layer.parameters()]

    def step(self, n: int = 1, stray: bool = False) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            mask = self.layer.active_mask.float()
            loss = torch.zeros(())
            for name, p in self.layer.named_parameters():
                m = mask.view(-1, *([1] * (p.dim() - 1)))
                loss = loss + (p * self.targets[name] * m).sum() + (p * m).square().sum()
                if stray:
                    loss = loss + 1e-3 * p.sum()
            loss.backward()
            self.opt.step()

    def params(self):
        return dict(self.layer.named_parameters())

    def state_snapshot(self):
        return {
            name: {k: v.clone() for k, v in self.opt.state[p].items() if torch.is_tensor(v)}
            for name, p in self.params().items()
        }


def _edit(rig: Rig, kind: str):
    reg, banks, surgery = rig.registry, rig.banks, rig.surgery
    gen = torch.Generator().manual_seed(1)
    if kind == "spawn":
        return spawn(reg, banks, 0, step=5, parent=0, scale=0.1, generator=gen, optimizer=surgery)
    if kind == "split":
        return split(reg, banks, 0, 1, step=5, scale=0.1, generator=gen, optimizer=surgery)
    if kind == "merge":
        return merge(reg, banks, 0, 0, 1, step=5, usage=(0.6, 0.4), optimizer=surgery)
    return prune(reg, banks, 0, 2, step=5, optimizer=surgery)


KINDS = ["spawn", "split", "merge", "prune", "restore"]
CASES = [(o, k) for o in OPTIMIZERS for k in KINDS if "fused" not in o or k in ("split", "merge")]  # fused: slow on CPU


@pytest.mark.parametrize(("opt_name", "kind"), CASES)
def test_edit_gives_fresh_state_to_edited_slices_and_touches_nothing_else(opt_name, kind):
    rig = Rig(OPTIMIZERS[opt_name])
    rig.step(3)
    if kind == "restore":  # prune first, then snapshot just before the restore
        assert prune(rig.registry, rig.banks, 0, 2, step=4, optimizer=rig.surgery).parked_slots == (2,)
        rig.step(2)
    before = rig.state_snapshot()
    if kind == "restore":
        record = restore(rig.registry, rig.banks, "L0_E2", step=5, optimizer=rig.surgery)
    else:
        record = _edit(rig, kind)
    reset = set(record.fresh_slots) | set(record.parked_slots)
    assert reset
    after = rig.state_snapshot()
    for name, state in after.items():
        for key, tensor in state.items():
            if tensor.shape != rig.params()[name].shape:
                assert torch.equal(tensor, before[name][key]), (name, key)  # step counts untouched
                continue
            for slot in range(E):
                expected = torch.zeros_like(tensor[slot]) if slot in reset else before[name][key][slot]
                assert torch.equal(tensor[slot], expected), (name, key, slot)
    assert [p.data_ptr() for p in rig.layer.parameters()] == rig.ptrs
    rig.step(2)  # the optimiser keeps working on the same state objects
    assert [p.data_ptr() for p in rig.layer.parameters()] == rig.ptrs


@pytest.mark.parametrize(("opt_name", "steps"), [("adamw_amsgrad", 100), ("sgd", 100), ("adamw_fused", 10)])
def test_masked_slices_do_not_drift_under_weight_decay_or_momentum(opt_name, steps):
    rig = Rig(OPTIMIZERS[opt_name])
    rig.step(5)
    original = rig.banks.experts.read(2), rig.banks.router.read(2)
    prune(rig.registry, rig.banks, 0, 2, step=5, optimizer=rig.surgery)
    parked = {n: p.detach()[2].clone() for n, p in rig.params().items()}
    live_before = rig.params()["w_up"].detach()[0].clone()
    rig.step(steps)
    for name, p in rig.params().items():
        assert torch.equal(p.detach()[2], parked[name]), name
    assert not torch.equal(rig.params()["w_up"].detach()[0], live_before)  # training did happen
    restore(rig.registry, rig.banks, "L0_E2", step=105, optimizer=rig.surgery)
    for name, w in original[0].items():
        assert torch.equal(rig.banks.experts.read(2)[name], w)  # archive restore is bit-exact
    for name, w in original[1].items():
        assert torch.equal(rig.banks.router.read(2)[name], w)


@pytest.mark.parametrize("freeze", [True, False])
def test_guard_holds_masked_slices_even_with_stray_gradients(freeze):
    rig = Rig(OPTIMIZERS["adamw_amsgrad"], freeze_masked=freeze)
    rig.step(3)
    prune(rig.registry, rig.banks, 0, 2, step=3, optimizer=rig.surgery)
    rig.step(100, stray=True)  # a loss term with gradient on every slot, masked or not
    drift = max(float(p.detach()[2].abs().max()) for p in rig.params().values())
    if freeze:
        assert drift == 0.0
        assert all(float(v[2].abs().max()) == 0.0 for s in rig.state_snapshot().values() for k, v in s.items()
                   if v.dim() > 0)
    else:
        assert drift > 0.0  # without the guard the masked slot moves: the guard is what holds it


def _first_update(opt_name: str, with_surgery: bool) -> float:
    rig = Rig(OPTIMIZERS[opt_name], surgery=with_surgery)
    rig.step(3)
    for state in rig.opt.state.values():
        state["step"].fill_(10_000.0)  # a long run: bias corrections ~ 1
    rig.step(2)
    record = spawn(rig.registry, rig.banks, 0, step=10_002, parent=0, scale=0.05,
                   generator=torch.Generator().manual_seed(0), optimizer=rig.surgery)
    if not with_surgery:
        reset_slot_state(rig.opt, rig.banks.param_slots(), record.fresh_slots)
    slot = record.fresh_slots[0]
    before = {n: p.detach()[slot].clone() for n, p in rig.params().items()}
    rig.step(1)
    lr = rig.opt.param_groups[0]["lr"]
    return max(float((p.detach()[slot] - before[n]).abs().max()) for n, p in rig.params().items()) / lr


@pytest.mark.parametrize("opt_name", ["adam", "adam_foreach", "adam_fused", "adamw_amsgrad", "adamw_fused"])
def test_first_update_of_a_fresh_slot_is_bounded_at_a_large_step_count(opt_name):
    assert _first_update(opt_name, with_surgery=True) <= 1.5
    assert _first_update(opt_name, with_surgery=False) > 2.5  # the step-count trap the surgery disarms


def test_adam_seed_makes_bias_corrected_moments_equal_the_first_gradient():
    g = torch.tensor([0.3, -2.0, 1e-4])
    beta1, beta2, t = 0.9, 0.999, 10_000
    m, v = adam_first_step_seed(g, torch.tensor(float(t - 1)), beta1, beta2)
    m_t, v_t = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
    torch.testing.assert_close(m_t / (1 - beta1**t), g)
    torch.testing.assert_close(v_t / (1 - beta2**t), g * g)


def test_per_expert_modules_get_a_fresh_state_entry():
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(E))
    gate = nn.Linear(4, E)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[:LIVE] = True
    banks = LayerBanks(ModuleListBank(experts), RouterBank.from_linear(gate), mask)
    registry = ExpertRegistry([mask], lifecycle_config(max_experts_per_layer=E))
    opt = torch.optim.AdamW([*experts.parameters(), *gate.parameters()], lr=1e-3)
    surgery = OptimizerSurgery(opt, [banks])
    x = torch.randn(8, 4)

    def step():
        opt.zero_grad()
        loss = sum((experts[s](x).square().sum() for s in range(E) if mask[s]), torch.zeros(()))
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    for state in opt.state.values():
        state["step"].fill_(10_000.0)
    record = spawn(registry, banks, 0, step=1, parent=1, scale=0.05, optimizer=surgery)
    slot = record.fresh_slots[0]
    assert all(p not in opt.state for p in experts[slot].parameters())
    before = [p.detach().clone() for p in experts[slot].parameters()]
    kept = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in experts[0].parameters()}
    step()
    for p, b in zip(experts[slot].parameters(), before, strict=True):
        assert float((p.detach() - b).abs().max()) <= 1.5e-3
        assert float(opt.state[p]["step"]) == 1.0
    assert all(float(opt.state[p]["step"]) == 10_001.0 for p in kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
@pytest.mark.parametrize("fused", [False, True])
def test_surgery_hooks_add_no_host_sync_per_step(fused):
    torch.manual_seed(0)
    layer = ChronoMoELayer(16, 16, E, 2, router_bias=True, device="cuda")
    layer.active_mask[LIVE:] = False
    banks = banks_for(layer)
    registry = ExpertRegistry([layer.active_mask], lifecycle_config(max_experts_per_layer=E))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, fused=fused)
    surgery = OptimizerSurgery(opt, [banks])
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    spawn(registry, banks, 0, step=1, parent=0, optimizer=surgery)  # pending seeding + a new masked set
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # what the step pre-hook runs
            surgery.drop_masked_grads()
            surgery.seed_fresh()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.step()
