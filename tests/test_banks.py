import pytest
import torch
from torch import nn

from chronomoe_v3.adapters import (
    ExpertBank,
    LayerBanks,
    ModuleListBank,
    RouterBank,
    StackedBank,
    banks_for,
    register_adapter,
)
from chronomoe_v3.layers import ChronoMoELayer


def _mixtral_like(e=4, h=6, i=5):
    torch.manual_seed(0)
    gate_up = nn.Parameter(torch.randn(e, 2 * i, h))
    down = nn.Parameter(torch.randn(e, h, i))
    return StackedBank({"gate_up_proj": (gate_up, 0), "down_proj": (down, 0)}), gate_up, down


def _gpt_oss_like(e=4, h=6, i=5):
    torch.manual_seed(1)
    params = {
        "gate_up_proj": (nn.Parameter(torch.randn(e, h, 2 * i)), 0),
        "gate_up_proj_bias": (nn.Parameter(torch.randn(e, 2 * i)), 0),
        "down_proj": (nn.Parameter(torch.randn(e, i, h)), 0),
        "down_proj_bias": (nn.Parameter(torch.randn(e, h)), 0),
    }
    return StackedBank(params), params


def _module_list(e=4):
    torch.manual_seed(2)
    return nn.ModuleList(nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 6)) for _ in range(e))


def _banks_of(bank):
    return [r.param for r in bank.param_slots()]


@pytest.mark.parametrize("make", ["mixtral", "gpt_oss", "module_list", "module_dict", "router"])
def test_read_write_copy_zero_touch_only_their_slot(make):
    if make == "mixtral":
        bank = _mixtral_like()[0]
    elif make == "gpt_oss":
        bank = _gpt_oss_like()[0]
    elif make == "module_list":
        bank = ModuleListBank(_module_list())
    elif make == "module_dict":
        bank = ModuleListBank(nn.ModuleDict({f"expert_{i}": m for i, m in enumerate(_module_list())}))
    else:
        bank = RouterBank.from_linear(nn.Linear(6, 4))
    assert isinstance(bank, ExpertBank)
    assert bank.num_slots == 4
    ptrs = [p.data_ptr() for p in _banks_of(bank)]
    before = [bank.read(s) for s in range(4)]
    # read returns clones
    w1 = bank.read(1)
    for t in w1.values():
        t.add_(1.0)
    assert all(torch.equal(bank.read(1)[n], before[1][n]) for n in w1)

    bank.copy(0, 2)
    after = [bank.read(s) for s in range(4)]
    for n in after[2]:
        assert torch.equal(after[2][n], before[0][n])
        for s in (0, 1, 3):
            assert torch.equal(after[s][n], before[s][n])

    bank.write(3, {n: torch.full_like(t, 7.0) for n, t in before[3].items()})
    bank.zero(1)
    after = [bank.read(s) for s in range(4)]
    for n in after[3]:
        assert torch.all(after[3][n] == 7.0)
        assert torch.all(after[1][n] == 0.0)
        assert torch.equal(after[0][n], before[0][n])
    assert [p.data_ptr() for p in _banks_of(bank)] == ptrs


def test_stacked_views_select_the_expert_dimension():
    bank, gate_up, down = _mixtral_like()
    w = bank.read(2)
    assert torch.equal(w["gate_up_proj"], gate_up[2]) and torch.equal(w["down_proj"], down[2])
    # expert dimension other than 0 (e.g. a transposed layout)
    p = nn.Parameter(torch.randn(3, 4, 5))
    t = StackedBank({"w": (p, 1)})
    assert t.num_slots == 4
    assert torch.equal(t.read(2)["w"], p[:, 2])
    t.zero(2)
    assert torch.all(p[:, 2] == 0) and torch.all(p[:, 1] != 0)


def test_weight_rms_is_over_the_given_slots():
    bank, gate_up, down = _mixtral_like()
    rms = bank.weight_rms([0, 2])
    assert torch.allclose(rms["gate_up_proj"], gate_up[[0, 2]].square().mean().sqrt())
    ml = _module_list()
    rms = ModuleListBank(ml).weight_rms([1, 3])
    expected = torch.stack([ml[1][0].weight.square().mean(), ml[3][0].weight.square().mean()]).mean().sqrt()
    assert torch.allclose(rms["0.weight"], expected)


def test_bad_inputs_name_the_offending_value():
    bank, _, _ = _mixtral_like()
    with pytest.raises(ValueError, match="slot=4"):
        bank.read(4)
    with pytest.raises(ValueError, match="names"):
        bank.write(0, {"gate_up_proj": torch.zeros(10, 6)})
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        bank.write(0, {"gate_up_proj": torch.zeros(3, 3), "down_proj": torch.zeros(6, 5)})
    with pytest.raises(ValueError, match="expert sizes"):
        StackedBank({"a": (nn.Parameter(torch.zeros(3, 2)), 0), "b": (nn.Parameter(torch.zeros(4, 2)), 0)})
    with pytest.raises(ValueError, match="router weight"):
        RouterBank(nn.Parameter(torch.zeros(3)))
    router = RouterBank.from_linear(nn.Linear(6, 5))
    with pytest.raises(ValueError, match="router has 5 rows"):
        LayerBanks(bank, router, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="active_mask"):
        LayerBanks(bank, RouterBank.from_linear(nn.Linear(6, 4)), torch.ones(4))


def test_banks_for_chrono_layer_uses_the_layer_tensors():
    layer = ChronoMoELayer(8, 16, 6, 2, router_bias=True)
    banks = banks_for(layer)
    assert banks.num_slots == 6 and banks.active_mask is layer.active_mask
    assert banks.router.has_bias
    params = {id(r.param) for r in banks.param_slots()}
    assert params == {id(p) for p in layer.parameters()}
    assert torch.equal(banks.experts.read(3)["w_down"], layer.w_down[3])


class _ListMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(6, 4, bias=False)
        self.experts = _module_list()
        self.register_buffer("active_mask", torch.ones(4, dtype=torch.bool))


class _SubListMoE(_ListMoE):
    pass


class _ListAdapter:
    """Only the banks of the adapter protocol: enough for the edit operations."""

    def __init__(self, module):
        self.module = module

    def banks(self):
        m = self.module
        return LayerBanks(ModuleListBank(m.experts), RouterBank.from_linear(m.gate), m.active_mask)


def test_banks_for_is_extensible_by_registration():
    with pytest.raises(ValueError, match="no adapter for _ListMoE"):
        banks_for(_ListMoE())
    register_adapter(_ListMoE, _ListAdapter)
    banks = banks_for(_SubListMoE())  # subclasses inherit the registration
    assert banks.num_slots == 4 and not banks.router.has_bias
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_adapter(int, _ListAdapter)
