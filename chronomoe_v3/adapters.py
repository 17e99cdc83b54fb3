"""One adapter interface over expert weights ("banks"), so lifecycle edits are written once.

A bank exposes a fixed number of expert **slots**. Each slot's weights are a set of named tensors that
live either as one slice of a stacked parameter (`[E, ...]` along an expert dimension: `ChronoMoELayer`,
transformers 5.x fused experts) or as whole parameters of one per-expert module (`nn.ModuleList` /
`nn.ModuleDict` experts). Both are described by `ParamSlots` rows, and one implementation (`ParamBank`)
serves them all: `StackedBank`, `ModuleListBank` and `RouterBank` differ only in how they are built.

`LayerBanks` bundles a layer's expert bank, its router bank and its active-mask tensor. Everything else a
system needs from a layer (observer hook, top-k, widths, slow-bias, balancer-bias and lens slots) is the
`MoELayerAdapter` protocol; adapters are registered per module class in one table (`register_adapter`), and
`adapter_for(module)` / `banks_for(module)` look them up, so no code branches on model types.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .bias import SlowBias
from .config import ChronoConfig
from .layers import ChronoMoELayer


@dataclass(frozen=True)
class ParamSlots:
    """Where the slots of one named weight live inside one parameter.

    `expert_dim` set: the parameter is stacked and slot `s` is `param.select(expert_dim, s)`.
    `expert_dim` None: the whole parameter belongs to slot `slot` (per-expert modules).
    """

    name: str
    param: Tensor
    expert_dim: int | None = None
    slot: int | None = None

    def view(self, tensor: Tensor, slot: int) -> Tensor | None:
        """The part of `tensor` (the parameter or a tensor shaped like it) that belongs to `slot`, or None."""
        if self.expert_dim is not None:
            return tensor.select(self.expert_dim, slot)
        return tensor if self.slot == slot else None


@runtime_checkable
class ExpertBank(Protocol):
    """What lifecycle operations need from a set of expert (or router) slots.

    Implement it to manage experts stored some other way; `ParamBank` covers parameters.
    All methods work under `torch.no_grad()` and never reallocate a parameter.
    """

    @property
    def num_slots(self) -> int: ...

    def read(self, slot: int) -> dict[str, Tensor]:
        """A clone of slot `slot`'s weights, keyed by name."""
        ...

    def write(self, slot: int, weights: Mapping[str, Tensor]) -> None:
        """Copy `weights` (same names and shapes as `read`) into slot `slot`."""
        ...

    def copy(self, src: int, dst: int) -> None: ...

    def zero(self, slot: int) -> None: ...

    def weight_rms(self, slots: Sequence[int]) -> dict[str, Tensor]:
        """Root-mean-square of each named weight over `slots` (0-dim tensors): the init statistics."""
        ...

    def param_slots(self) -> list[ParamSlots]:
        """The parameters and their expert layout, for optimiser surgery."""
        ...


class ParamBank:
    """An `ExpertBank` over parameters described by `ParamSlots` rows (stacked or per-slot)."""

    def __init__(self, rows: Sequence[ParamSlots], num_slots: int | None = None) -> None:
        if not rows:
            raise ValueError("a bank needs at least one parameter; got none")
        sizes = {r.param.shape[r.expert_dim] for r in rows if r.expert_dim is not None}
        if any(r.expert_dim is None and r.slot is None for r in rows):
            raise ValueError("a per-slot parameter (expert_dim=None) needs its slot index; got slot=None")
        if num_slots is None:
            if len(sizes) != 1 or any(r.expert_dim is None for r in rows):
                raise ValueError(f"cannot infer the slot count from expert sizes {sorted(sizes)}; pass num_slots")
            num_slots = sizes.pop()
        if any(s != num_slots for s in sizes):
            raise ValueError(f"stacked parameters have expert sizes {sorted(sizes)}; expected {num_slots}")
        for r in rows:
            if r.slot is not None and not 0 <= r.slot < num_slots:
                raise ValueError(f"{r.name!r} belongs to slot {r.slot}; expected a slot in [0, {num_slots})")
        self._rows = list(rows)
        self._num_slots = int(num_slots)
        self._by_slot: dict[int, list[ParamSlots]] = {}
        for s in range(self._num_slots):
            views = [r for r in self._rows if r.expert_dim is not None or r.slot == s]
            names = [r.name for r in views]
            if len(set(names)) != len(names):
                raise ValueError(f"slot {s} has duplicate weight names {names}; expected unique names")
            self._by_slot[s] = views
        first = sorted(r.name for r in self._by_slot[0])
        for s, views in self._by_slot.items():
            if sorted(r.name for r in views) != first:
                raise ValueError(f"slot {s} holds weights {sorted(r.name for r in views)}; expected {first}")

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._by_slot[0]]

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self._num_slots:
            raise ValueError(f"slot={slot!r} is out of range: expected an integer in [0, {self._num_slots})")

    def _views(self, slot: int) -> dict[str, Tensor]:
        self._check_slot(slot)
        out: dict[str, Tensor] = {}
        for r in self._by_slot[slot]:
            view = r.view(r.param, slot)
            assert view is not None
            out[r.name] = view
        return out

    def read(self, slot: int) -> dict[str, Tensor]:
        return {name: v.detach().clone() for name, v in self._views(slot).items()}

    @torch.no_grad()
    def write(self, slot: int, weights: Mapping[str, Tensor]) -> None:
        views = self._views(slot)
        if set(weights) != set(views):
            raise ValueError(f"weights have names {sorted(weights)}; expected {sorted(views)}")
        for name, v in views.items():
            if tuple(weights[name].shape) != tuple(v.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(weights[name].shape)}; expected {tuple(v.shape)}"
                )
        for name, v in views.items():
            v.copy_(weights[name])

    @torch.no_grad()
    def copy(self, src: int, dst: int) -> None:
        src_views, dst_views = self._views(src), self._views(dst)
        for name, v in dst_views.items():
            v.copy_(src_views[name])

    @torch.no_grad()
    def zero(self, slot: int) -> None:
        for v in self._views(slot).values():
            v.zero_()

    @torch.no_grad()
    def weight_rms(self, slots: Sequence[int]) -> dict[str, Tensor]:
        if not slots:
            raise ValueError("weight_rms needs at least one slot; got none")
        for s in slots:
            self._check_slot(s)
        out: dict[str, Tensor] = {}
        for r in self._by_slot[slots[0]]:
            if r.expert_dim is not None:
                idx = torch.as_tensor(list(slots), device=r.param.device)
                out[r.name] = r.param.index_select(r.expert_dim, idx).float().square().mean().sqrt()
        for name in self.names:
            if name not in out:
                views = [self._views(s)[name].float() for s in slots]
                out[name] = torch.stack([v.square().mean() for v in views]).mean().sqrt()
        return out

    def param_slots(self) -> list[ParamSlots]:
        return list(self._rows)


class StackedBank(ParamBank):
    """Slots as slices of stacked parameters: `{name: (parameter, expert_dim)}`.

    E.g. `ChronoMoELayer` (`w_gate [E,H,I]`, ...), Mixtral 5.x (`gate_up_proj [E,2I,H]`, `down_proj [E,H,I]`),
    GPT-OSS (with `gate_up_proj_bias [E,2I]`, `down_proj_bias [E,H]`).
    """

    def __init__(self, params: Mapping[str, tuple[Tensor, int]]) -> None:
        rows = []
        for name, (param, dim) in params.items():
            if not -param.dim() <= dim < param.dim():
                raise ValueError(f"expert_dim={dim} of {name!r} is out of range for shape {tuple(param.shape)}")
            rows.append(ParamSlots(name, param, expert_dim=dim % param.dim()))
        super().__init__(rows)


class ModuleListBank(ParamBank):
    """Slots as per-expert modules of an `nn.ModuleList` (slot = index) or `nn.ModuleDict` (slot = order)."""

    def __init__(self, experts: nn.ModuleList | nn.ModuleDict) -> None:
        modules = list(experts.values()) if isinstance(experts, nn.ModuleDict) else list(experts)
        if not modules:
            raise ValueError("the expert container is empty; expected at least one expert module")
        rows = [
            ParamSlots(name, param, expert_dim=None, slot=s)
            for s, module in enumerate(modules)
            for name, param in module.named_parameters()
        ]
        super().__init__(rows, num_slots=len(modules))


class RouterBank(ParamBank):
    """Router rows: `weight [E, H]` row and, where the router has one, `bias [E]` entry."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"router weight has shape {tuple(weight.shape)}; expected [E, H]")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"router bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
        rows = [ParamSlots("weight", weight, expert_dim=0)]
        if bias is not None:
            rows.append(ParamSlots("bias", bias, expert_dim=0))
        super().__init__(rows)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> RouterBank:
        return cls(linear.weight, linear.bias)

    @property
    def has_bias(self) -> bool:
        return self.bias is not None


@dataclass
class LayerBanks:
    """Everything an edit touches in one MoE layer: expert weights, router rows, and the active mask."""

    experts: ExpertBank
    router: RouterBank
    active_mask: Tensor  # bool [E], edited in place (the layer's own buffer)

    def __post_init__(self) -> None:
        e = self.experts.num_slots
        if self.router.num_slots != e:
            raise ValueError(f"router has {self.router.num_slots} rows; expected {e} to match the expert slots")
        if tuple(self.active_mask.shape) != (e,) or self.active_mask.dtype != torch.bool:
            raise ValueError(
                f"active_mask has shape {tuple(self.active_mask.shape)} and dtype {self.active_mask.dtype}; "
                f"expected ({e},) bool"
            )

    @property
    def num_slots(self) -> int:
        return self.experts.num_slots

    def param_slots(self) -> list[ParamSlots]:
        """Expert and router parameters with their slot layout (what optimiser surgery edits)."""
        return self.experts.param_slots() + self.router.param_slots()


# ---------------------------------------------------------------------- layer adapters
class MoELayerAdapter(Protocol):
    """What `ChronoSystem` needs from one MoE layer besides its weights. One adapter class per layer class,
    registered with `register_adapter`; discovery (`adapter_for`) and the banks (`banks()`) go through it,
    so no code branches on model types.

    `active_mask`: bool `[E]`, the layer's own buffer (edited in place). `top_k`: experts per token.
    `hidden_size`: width of the expert outputs; `router_input_size`: width of what the router reads.
    `add_observer(fn)`: call `fn(trace)` once per training forward (`MoETrace`); returns a removable handle.
    `slow_bias(config)`: the layer's `SlowBias`, attached on first call, or None if the layer cannot route
    with one. `selection_bias()`: an aux-loss-free balancer's per-expert bias `[E]` (edited in place on an
    edit), or None. `lens()` / `set_lens(lens)`: the module applied to the router input, or None.
    `logit_lens()` / `set_logit_lens(lens)`: the mid clock's selection offset (`governance.LogitLens`), or None.
    """

    @property
    def module(self) -> nn.Module: ...

    @property
    def active_mask(self) -> Tensor: ...

    @property
    def top_k(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def router_input_size(self) -> int: ...

    def banks(self) -> LayerBanks: ...

    def add_observer(self, fn: Callable[[Any], Any]) -> RemovableHandle: ...

    def slow_bias(self, config: ChronoConfig) -> SlowBias | None: ...

    def selection_bias(self) -> Tensor | None: ...

    def lens(self) -> nn.Module | None: ...

    def set_lens(self, lens: nn.Module | None) -> None: ...

    def logit_lens(self) -> nn.Module | None: ...

    def set_logit_lens(self, lens: nn.Module | None) -> None: ...


AdapterFactory = Callable[[nn.Module], MoELayerAdapter]
_ADAPTERS: dict[type, AdapterFactory] = {}


def register_adapter(cls: type, factory: AdapterFactory) -> None:
    """Teach chronomoe a MoE layer class: `factory(module)` returns its `MoELayerAdapter` (subclasses inherit
    the registration unless registered themselves)."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"cls={cls!r} is invalid: expected an nn.Module subclass")
    if not callable(factory):
        raise ValueError(f"factory={factory!r} is invalid: expected a callable module -> MoELayerAdapter")
    _ADAPTERS[cls] = factory


def adapter_for(module: nn.Module) -> MoELayerAdapter | None:
    """The adapter of `module` from the factory registered for its class (or nearest base), or None."""
    for cls in type(module).__mro__:
        factory = _ADAPTERS.get(cls)
        if factory is not None:
            return factory(module)
    return None


def registered_classes() -> list[str]:
    return sorted(c.__name__ for c in _ADAPTERS)


def banks_for(module: nn.Module) -> LayerBanks:
    """The `LayerBanks` of an MoE layer, through its registered adapter."""
    adapter = adapter_for(module)
    if adapter is None:
        raise ValueError(
            f"no adapter for {type(module).__name__}; expected one of {registered_classes()} or a class registered "
            "with register_adapter"
        )
    return adapter.banks()


class ChronoLayerAdapter:
    """`MoELayerAdapter` of the library's own `ChronoMoELayer`."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, ChronoMoELayer):
            raise ValueError(f"ChronoLayerAdapter got a {type(module).__name__}; expected a ChronoMoELayer")
        self._layer = module

    @property
    def module(self) -> nn.Module:
        return self._layer

    @property
    def active_mask(self) -> Tensor:
        return self._layer.active_mask

    @property
    def top_k(self) -> int:
        return self._layer.top_k

    @property
    def hidden_size(self) -> int:
        return self._layer.d_model

    @property
    def router_input_size(self) -> int:
        return self._layer.d_model

    def banks(self) -> LayerBanks:
        layer = self._layer
        experts = StackedBank({"w_gate": (layer.w_gate, 0), "w_up": (layer.w_up, 0), "w_down": (layer.w_down, 0)})
        return LayerBanks(experts, RouterBank.from_linear(layer.router), layer.active_mask)

    def add_observer(self, fn: Callable[[Any], Any]) -> RemovableHandle:
        return self._layer.add_observer(fn)

    def slow_bias(self, config: ChronoConfig) -> SlowBias | None:
        if self._layer.slow_bias is None:
            self._layer.attach_slow_bias(config)
        return self._layer.slow_bias

    def selection_bias(self) -> Tensor | None:
        return self._layer.expert_bias

    def lens(self) -> nn.Module | None:
        return self._layer.lens

    def set_lens(self, lens: nn.Module | None) -> None:
        self._layer.lens = lens

    def logit_lens(self) -> nn.Module | None:
        return self._layer.logit_lens

    def set_logit_lens(self, lens: nn.Module | None) -> None:
        self._layer.logit_lens = lens


register_adapter(ChronoMoELayer, ChronoLayerAdapter)
