"""Hugging Face transformers 5.x MoE blocks as chronomoe layers: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

The layout these families share (transformers 5.x): the MoE block (`model.model.layers[i].mlp`) has a router
`block.gate` (`weight [E, H]`, `top_k`) that returns `(router_logits [T,E], top_k_weights [T,K],
top_k_index [T,K])`, and fused experts `block.experts` (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`)
called as `experts(hidden [T,H], top_k_index, top_k_weights)`, which return the weighted mixture `[T,H]`.
Qwen2-MoE's `shared_expert` (and its gate) is left alone: it is not lifecycle-managed.

**Registration and discovery.** `register_hf_adapters()` registers one adapter class per routing rule for
the block classes of the four families (idempotent; importing this module runs it). `ChronoSystem` runs it
itself when a model's modules come from transformers (`chronomoe_v3.integrations.register_adapters_for`),
so `ChronoSystem(model)` needs no extra import; transformers is imported only then, never by the core.
Discovery refuses, with a ValueError naming the block, an MoE block of transformers that has no adapter
(DeepSeek-V3, GPT-OSS, Granite-MoE, Jamba, SwitchTransformers, ...), and Llama4's `Llama4TextMoe`, whose
router scales the expert *input*, so that an expert's output before gating does not exist to be observed.

**What an adapter does to a block (no model edit).** The first adapter built for a block attaches an
`HFMoEState` as `block.chrono`: the block's chronomoe state, saved with the model's `state_dict`
(`active_mask`, the slow bias's `beta`, a balancer's `expert_bias`, the mid clock's offsets), and four hooks:
- on the router, a forward hook (prepended, so that transformers' router-logit recorder, hence its aux loss,
  sees the result) that re-routes from the router's logits with the family's rule through
  `routing.route_topk` / `route_with_bias`: beta added in fp32 (moving gate weights too in `logits` mode),
  inactive slots -inf, the mid clock's offset and a balancer's bias added to the selection scores only, then
  softmax -> top-k -> renormalise (Mixtral; Qwen2/Qwen3/OLMoE only when `config.norm_topk_prob`, which OLMoE
  leaves off). It returns the masked (biased) logits, the gate weights and the indices;
- on the router, a forward pre-hook that applies a lens (`set_lens`) to the router input, when one is set;
- on the experts, in training mode with observers attached, a pre-hook that calls them on one row per
  (token, slot) with unit weights, `(x.repeat_interleave(K), index.reshape(T*K, 1), ones)` (the rows the
  experts compute anyway: no extra expert FLOPs), and a forward hook that weights and sums the unweighted
  `[T,K,H]` outputs back into the block's mixture and hands an `MoETrace` of them to the observers. The rows
  are token-major for `grouped_mm` and slot-major (`x.repeat(K, 1)`, `index.t()`) for the `eager` loop: each
  matmul then gets the rows it gets without the hook, in the same order (measured on transformers 5.23: with
  the other layout a GEMM's rows can differ in the last bit).

**Exactness.** With beta 0, no lens, no selection offset and all slots active, the block's output is bitwise
the unhooked one (fp32, top-2, `grouped_mm` and `eager` experts: tests/test_hf_families.py; bf16 too, measured,
except Mixtral under `eager`). Two limits: the top-k is taken on the scores (logits) rather than on the
softmax, the same choice except where softmax rounding ties two distinct logits; and under `eager` experts
with K > 2, or in bf16 with Mixtral's fp32 gate weights, transformers adds the weighted slots in expert order
in the hidden dtype where the hook adds them in slot order in the product's dtype (as `grouped_mm` does):
equal up to rounding.

**Counting** follows `ChronoMoELayer` (the one guard, `layers.in_backward_recompute`): observers see each
training forward once, never an eval forward, never the forward that activation checkpointing re-runs inside
the backward pass (reentrant or not; the recompute takes the same per-slot path, so checkpointing's checks
of the recomputed tensors hold).

**Fixed width.** Lifecycle edits need free slots: `build_fixed_width(model_cls, config, num_slots,
num_active)` builds a model with `num_slots` experts per MoE layer of which the first `num_active` are
active (`fixed_width_config` is the config part). The spare slots keep their initial weights until an edit
writes them (`ChronoSystem.attach_optimizer` zeroes masked slots).

**Persistence.** `block.chrono`'s buffers are model state (`model.layers.<i>.mlp.chrono.active_mask`, ...): to
load such a state dict, give the new model its blocks' state first (`build_fixed_width`, or a `ChronoSystem`
built the same way); `save_pretrained` writes those keys too, which plain transformers reports as unexpected.
`balance.AuxLossFreeBalancer(model)` finds the blocks' states (`enable_expert_bias`) once they exist.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters import LayerBanks, RouterBank, StackedBank, adapter_for, register_adapter
from ..bias import SlowBias
from ..config import ChronoConfig
from ..layers import in_backward_recompute
from ..routing import Routing, route_topk, route_with_bias
from ..trace import MoETrace

STATE_NAME = "chrono"  # the attribute of a block that holds its HFMoEState
EXPERT_INPUTS = ("hidden_states", "top_k_index", "top_k_weights")
Observer = Callable[[MoETrace], Any]


class HFMoEState(nn.Module):
    """chronomoe's state on one transformers MoE block (`block.chrono`) and the hooks that apply it.

    `active_mask` bool `[E]` (saved): inactive slots get router logit -inf, hence zero tokens. `slow_bias`
    (a `SlowBias`, saved), `lens` (applied to the router input), `logit_lens` (the mid clock's selection
    offset, saved) and `expert_bias` (an aux-loss-free balancer's, fp32, saved) are None until attached.
    `renormalise` and `weights_in_logits_dtype` are the family's routing rule.
    """

    active_mask: Tensor
    expert_bias: Tensor | None
    tokens_per_expert: Tensor | None

    def __init__(
        self,
        num_slots: int,
        top_k: int,
        *,
        renormalise: bool,
        weights_in_logits_dtype: bool,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalise = renormalise
        self.weights_in_logits_dtype = weights_in_logits_dtype
        self.register_buffer("active_mask", torch.ones(num_slots, dtype=torch.bool, device=device))
        # Written by balance.AuxLossFreeBalancer.step() (outside forward); learned state, so saved.
        self.register_buffer("expert_bias", None)
        # Scratch token counts of training forwards, read and cleared by the balancer; not saved.
        self.register_buffer("tokens_per_expert", None, persistent=False)
        self.slow_bias: SlowBias | None = None
        self.bias_mode = "logits"
        self.lens: nn.Module | None = None
        self.logit_lens: nn.Module | None = None
        self.observers: OrderedDict[int, Observer] = OrderedDict()
        self._routed: tuple[Routing, Tensor] | None = None  # router hook -> experts hook: routing, router input
        self._capture: tuple[Tensor, Tensor, bool] | None = None  # experts pre-hook -> hook: index, weights, layout

    @property
    def num_slots(self) -> int:
        return int(self.active_mask.shape[0])

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, top_k={self.top_k}, renormalise={self.renormalise}"

    def enable_expert_bias(self) -> Tensor:
        """Give the router an aux-loss-free selection bias (zeros, fp32) and count tokens per expert of training
        forwards (what `balance.AuxLossFreeBalancer` drives); returns the bias. Idempotent."""
        if self.expert_bias is None:
            device = self.active_mask.device
            self.expert_bias = torch.zeros(self.num_slots, dtype=torch.float32, device=device)
            self.tokens_per_expert = torch.zeros(self.num_slots, dtype=torch.float32, device=device)
        return self.expert_bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> HFMoEState:
        # A model-wide cast must not round the balancer's bias or counts: keep them fp32, follow the device.
        keep = {name: getattr(self, name) for name in ("expert_bias", "tokens_per_expert")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new is not None and new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return self

    def _counting(self) -> bool:
        """A training forward seen for the first time (not checkpointing's recompute inside backward)."""
        return self.training and not in_backward_recompute()

    # ------------------------------------------------------------------ hooks
    def lens_hook(self, gate: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Router pre-hook: the router reads `lens(hidden)` when a lens is set."""
        if self.lens is None:
            return None
        return (self.lens(args[0]), *args[1:])

    def route_hook(self, gate: nn.Module, args: tuple[Any, ...], output: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Router forward hook: re-route from the router's logits with beta, the mask and the selection offsets."""
        logits: Tensor = output[0]
        selection = self.expert_bias
        offset = getattr(self.logit_lens, "offset", None)
        if isinstance(offset, Tensor):
            selection = offset if selection is None else selection + offset
        if self.slow_bias is None:
            routing = route_topk(
                logits, self.top_k, self.active_mask, mode=self.bias_mode, normalize=self.renormalise,
                selection_bias=selection,
            )
        else:
            routing = route_with_bias(
                logits, self.top_k, self.active_mask, self.slow_bias.beta, mode=self.bias_mode,
                normalize=self.renormalise, veto=self.slow_bias.config.bridge.veto, selection_bias=selection,
            )
        index = routing.topk_index
        weights = routing.topk_weight.to(logits.dtype) if self.weights_in_logits_dtype else routing.topk_weight
        router_input: Tensor = args[0]
        self._routed = (routing, router_input.reshape(-1, router_input.shape[-1]))
        if self.tokens_per_expert is not None and self._counting():
            kept = self.active_mask[index].reshape(-1).to(self.tokens_per_expert.dtype)
            self.tokens_per_expert.scatter_add_(0, index.reshape(-1), kept)
        scores = routing.logits_biased if self.bias_mode == "logits" else routing.logits_clean
        return scores.to(logits.dtype), weights, index

    def experts_pre_hook(
        self, experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Experts pre-hook (training mode with observers): one row per (token, slot), unit weights."""
        self._capture = None  # a recompute stopped early by checkpointing may have left one behind
        if not (self.training and self.observers):
            return None
        hidden, index, weights = expert_inputs(args, kwargs)
        t, k = index.shape
        slot_major = loops_over_experts(experts)
        self._capture = (index, weights, slot_major)
        ones = torch.ones(t * k, 1, dtype=weights.dtype, device=weights.device)
        if slot_major:  # rows k*T + t: each expert's rows come in the order its own loop would gather them
            return (hidden.repeat(k, 1), index.t().reshape(t * k, 1), ones), {}
        return (hidden.repeat_interleave(k, dim=0), index.reshape(t * k, 1), ones), {}

    def experts_hook(
        self, experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> Tensor | None:
        """Experts forward hook: the per-slot outputs `[T,K,H]` back into the weighted mixture, and the trace."""
        capture, self._capture = self._capture, None
        routed, self._routed = self._routed, None
        if capture is None:
            return None
        index, weights, slot_major = capture
        t, k = index.shape
        h = output.shape[-1]
        per_slot = output.view(k, t, h).transpose(0, 1) if slot_major else output.view(t, k, h)
        mixture = (per_slot * weights.unsqueeze(-1)).sum(1).to(output.dtype)
        if routed is not None and self._counting():
            routing, router_input = routed
            trace = MoETrace(
                topk_index=index,
                topk_weight=weights.detach(),
                expert_out=per_slot.detach(),
                num_experts=self.num_slots,
                slot_mask=self.active_mask[index],
                mixture=mixture.detach(),
                router_logits_clean=routing.logits_clean.detach(),
                router_logits_biased=routing.logits_biased.detach(),
                bridge=routing.bridge.detach() if routing.bridge is not None else None,
                router_input=router_input.detach(),
            )
            for fn in self.observers.values():
                fn(trace)
        return mixture


def loops_over_experts(experts: nn.Module) -> bool:
    """Whether fused experts run transformers' `eager` per-expert loop (rather than `grouped_mm` or another
    kernel): the per-slot rows are then laid out slot-major, else token-major, so that every matmul sees the
    rows it sees without the hook, in the same order (bitwise the same output)."""
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    return implementation in (None, "eager")


def expert_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """`(hidden [T,H], top_k_index [T,K], top_k_weights [T,K])` of a fused-experts call, positional or named."""
    values = list(args[:3]) + [kwargs.get(name) for name in EXPERT_INPUTS[len(args[:3]):]]
    if not all(isinstance(v, Tensor) for v in values):
        raise TypeError(
            f"the experts were called with {len(args)} positional and {sorted(kwargs)} named arguments; expected "
            f"tensors {list(EXPERT_INPUTS)}"
        )
    hidden, index, weights = values
    assert isinstance(hidden, Tensor) and isinstance(index, Tensor) and isinstance(weights, Tensor)
    return hidden, index, weights


class BlockParts(NamedTuple):
    """The parts of a transformers 5.x MoE block chronomoe works on."""

    gate: nn.Module  # the router
    experts: nn.Module  # the fused experts
    router_weight: Tensor  # [E, H]
    gate_up_proj: Tensor  # [E, 2I, H]
    down_proj: Tensor  # [E, H, I]
    top_k: int


def block_parts(module: nn.Module) -> BlockParts:
    """The `BlockParts` of a transformers 5.x MoE block, checked (TypeError when `module` is not one,
    ValueError when the shapes disagree)."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    found = [getattr(m, n, None) for m, n in ((gate, "weight"), (experts, "gate_up_proj"), (experts, "down_proj"))]
    router, gate_up, down = found
    top_k = getattr(gate, "top_k", None)
    if (
        not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module)
        or isinstance(top_k, bool) or not isinstance(top_k, int)
        or not isinstance(router, Tensor) or not isinstance(gate_up, Tensor) or not isinstance(down, Tensor)
        or (router.dim(), gate_up.dim(), down.dim()) != (2, 3, 3)
    ):
        raise TypeError(
            f"{type(module).__name__} is not a transformers 5.x MoE block: expected a `gate` router with `weight "
            "[E, H]` and `top_k`, and fused `experts` with `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`"
        )
    e, h = router.shape
    i = down.shape[2]
    if tuple(gate_up.shape) != (e, 2 * i, h) or tuple(down.shape) != (e, h, i):
        raise ValueError(
            f"{type(module).__name__} has router weight {tuple(router.shape)}, gate_up_proj {tuple(gate_up.shape)} "
            f"and down_proj {tuple(down.shape)}; expected [E, H], [E, 2I, H] and [E, H, I]"
        )
    return BlockParts(gate, experts, router, gate_up, down, top_k)


class HFMoEAdapter:
    """`MoELayerAdapter` of a transformers 5.x MoE block (`gate` router, fused `experts`); a subclass per
    routing rule says whether the top-k weights are renormalised and in which dtype they reach the experts.
    Building one attaches the block's `HFMoEState` and hooks, once (module docstring)."""

    weights_in_logits_dtype = False

    def __init__(self, module: nn.Module) -> None:
        parts = block_parts(module)
        gate, experts = parts.gate, parts.experts
        self._block = module
        state = getattr(module, STATE_NAME, None)
        if not isinstance(state, HFMoEState):
            state = HFMoEState(
                int(parts.router_weight.shape[0]), parts.top_k, renormalise=self.renormalise(gate),
                weights_in_logits_dtype=self.weights_in_logits_dtype, device=parts.router_weight.device,
            )
            state.train(module.training)
            module.add_module(STATE_NAME, state)
            gate.register_forward_pre_hook(state.lens_hook)
            gate.register_forward_hook(state.route_hook, prepend=True)
            experts.register_forward_pre_hook(state.experts_pre_hook, with_kwargs=True)
            experts.register_forward_hook(state.experts_hook, with_kwargs=True)
        self.state: HFMoEState = state

    def renormalise(self, gate: nn.Module) -> bool:
        """Whether the family's rule renormalises the top-k weights to sum to 1."""
        raise NotImplementedError

    @property
    def module(self) -> nn.Module:
        return self._block

    @property
    def active_mask(self) -> Tensor:
        return self.state.active_mask

    @property
    def top_k(self) -> int:
        return self.state.top_k

    @property
    def hidden_size(self) -> int:
        return int(block_parts(self._block).down_proj.shape[1])

    @property
    def router_input_size(self) -> int:
        return int(block_parts(self._block).router_weight.shape[1])

    def banks(self) -> LayerBanks:
        parts = block_parts(self._block)
        bias = getattr(parts.gate, "bias", None)
        return LayerBanks(
            StackedBank({"gate_up_proj": (parts.gate_up_proj, 0), "down_proj": (parts.down_proj, 0)}),
            RouterBank(parts.router_weight, bias if isinstance(bias, Tensor) else None),
            self.state.active_mask,
        )

    def add_observer(self, fn: Observer) -> RemovableHandle:
        handle = RemovableHandle(self.state.observers)
        self.state.observers[handle.id] = fn
        return handle

    def slow_bias(self, config: ChronoConfig) -> SlowBias | None:
        state = self.state
        if state.slow_bias is None:
            state.slow_bias = SlowBias(state.num_slots, config, device=state.active_mask.device)
            state.bias_mode = state.slow_bias.config.bias.mode
        return state.slow_bias

    def selection_bias(self) -> Tensor | None:
        return self.state.expert_bias

    def lens(self) -> nn.Module | None:
        return self.state.lens

    def set_lens(self, lens: nn.Module | None) -> None:
        self.state.lens = lens

    def logit_lens(self) -> nn.Module | None:
        return self.state.logit_lens

    def set_logit_lens(self, lens: nn.Module | None) -> None:
        self.state.logit_lens = lens


class RenormalisedSoftmaxAdapter(HFMoEAdapter):
    """softmax -> top-k -> renormalise, gate weights in fp32 (Mixtral)."""

    def renormalise(self, gate: nn.Module) -> bool:
        return True


class ConfigNormSoftmaxAdapter(HFMoEAdapter):
    """softmax -> top-k -> renormalise only when the router's `norm_topk_prob` (from the config) is set, gate
    weights in the logits' dtype (Qwen2-MoE, Qwen3-MoE, OLMoE; OLMoE's default is no renormalisation)."""

    weights_in_logits_dtype = True

    def renormalise(self, gate: nn.Module) -> bool:
        return bool(getattr(gate, "norm_topk_prob", False))


# transformers model type, its MoE block class, the config field holding the expert count, the routing rule
FAMILIES: tuple[tuple[str, str, str, type[HFMoEAdapter]], ...] = (
    ("mixtral", "MixtralSparseMoeBlock", "num_local_experts", RenormalisedSoftmaxAdapter),
    ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "num_experts", ConfigNormSoftmaxAdapter),
    ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "num_experts", ConfigNormSoftmaxAdapter),
    ("olmoe", "OlmoeSparseMoeBlock", "num_experts", ConfigNormSoftmaxAdapter),
)
LLAMA4_REASON = (
    "Llama4's MoE block (Llama4TextMoe) is not supported: its router scales the expert *input* by the gate score "
    "(experts(x * g)), so an expert's output before gating does not exist and cannot be observed honestly"
)
_registered: list[type] = []  # the supported block classes, once registered
_refused: dict[type, str] = {}  # MoE block classes refused for a reason of their own


def _modeling(model_type: str) -> Any:
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def register_hf_adapters() -> list[type]:
    """Register the adapters of the supported transformers MoE blocks; returns their classes. Idempotent.
    ImportError when transformers is not installed."""
    if _registered:
        return list(_registered)
    try:
        importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(
            "chronomoe_v3.integrations.hf needs transformers>=5.23: pip install 'chronomoe-v3[hf]'"
        ) from exc
    classes = []
    for model_type, block, _, adapter in FAMILIES:
        cls = getattr(_modeling(model_type), block)
        register_adapter(cls, adapter)
        classes.append(cls)
    try:
        _refused[_modeling("llama4").Llama4TextMoe] = LLAMA4_REASON
    except (ImportError, AttributeError):
        pass  # a transformers without Llama4: nothing to refuse
    _registered.extend(classes)
    return list(classes)


def is_moe_block(module: nn.Module) -> bool:
    """The shape of a transformers MoE block: an `experts` submodule beside a `gate` or `router` submodule."""
    router = getattr(module, "gate", None)
    if not isinstance(router, nn.Module):
        router = getattr(module, "router", None)
    return isinstance(getattr(module, "experts", None), nn.Module) and isinstance(router, nn.Module)


def check_supported(model: nn.Module) -> None:
    """ValueError naming the first transformers MoE block of `model` that no registered adapter supports (with
    the reason, for Llama4's)."""
    for name, module in model.named_modules():
        if not type(module).__module__.startswith("transformers.") or not is_moe_block(module):
            continue
        if adapter_for(module) is None:
            reason = _refused.get(type(module))
            if reason is not None:
                raise ValueError(f"module {name!r}: {reason}")
            parts = type(module).__module__.split(".")
            family = parts[2] if len(parts) > 2 and parts[1] == "models" else type(module).__module__
            supported = [block for _, block, _, _ in FAMILIES]
            raise ValueError(
                f"module {name!r} is a {type(module).__name__} (transformers model type {family!r}), an "
                f"MoE block chronomoe_v3 has no adapter for; supported: {supported} (add one with "
                "chronomoe_v3.adapters.register_adapter)"
            )


# ---------------------------------------------------------------------- fixed width
def _family_field(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    for family, _, field, _ in FAMILIES:
        if family == model_type:
            return field
    raise ValueError(
        f"config {type(config).__name__} has model_type {model_type!r}; expected one of "
        f"{[f for f, _, _, _ in FAMILIES]}"
    )


def _check_count(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value!r} is invalid: expected an integer {bounds}")


def fixed_width_config(config: Any, num_slots: int) -> Any:
    """A copy of a supported family's transformers config with `num_slots` expert slots per MoE layer (at least
    the config's `num_experts_per_tok`)."""
    field = _family_field(config)
    _check_count("num_slots", num_slots, int(config.num_experts_per_tok))
    out = copy.deepcopy(config)
    setattr(out, field, num_slots)
    return out


def build_fixed_width(model_cls: Callable[[Any], nn.Module], config: Any, num_slots: int, num_active: int) -> nn.Module:
    """`model_cls(fixed_width_config(config, num_slots))` with only the first `num_active` slots of every MoE
    layer active (`num_experts_per_tok <= num_active <= num_slots`): the others are free for spawn and split."""
    field = _family_field(config)
    _check_count("num_slots", num_slots, int(config.num_experts_per_tok))
    _check_count("num_active", num_active, int(config.num_experts_per_tok), num_slots)
    register_hf_adapters()
    model = model_cls(fixed_width_config(config, num_slots))
    adapters = [a for m in model.modules() if (a := adapter_for(m)) is not None]
    if not adapters:
        raise ValueError(f"{type(model).__name__} built from {field}={num_slots} has no supported MoE block")
    for adapter in adapters:
        adapter.active_mask[num_active:] = False
    return model


register_hf_adapters()
