"""Hugging Face transformers 5.x MoE blocks as chronomoe layers: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite-MoE,
Jamba, GPT-OSS, DeepSeek-V3 and SwitchTransformers.

**Layouts.** Every supported block has a router that returns its routing and experts that return the weighted
mixture. Fused experts (all but SwitchTransformers) hold stacked parameters and are called as
`experts(hidden [T,H], top_k_index [T,K], top_k_weights [T,K])`; the router (`weight [E, H]`, `top_k`) returns
`(router_logits [T,E], top_k_weights [T,K], top_k_index [T,K])`.

- Mixtral (`model.layers[i].mlp`, router `gate`): softmax -> top-k -> renormalise; gate weights fp32.
- Qwen2-MoE, Qwen3-MoE, OLMoE (`mlp`, `gate`): softmax -> top-k, renormalised only when `norm_topk_prob`
  (OLMoE's default: not); weights in the logits' dtype.
- Granite-MoE (`block_sparse_moe`, `router`): top-k on the logits -> softmax over the k; weights in the router
  input's dtype.
- Jamba (`feed_forward` of the MoE layers only, `router`): softmax -> top-k, no renormalisation; logits' dtype.
- GPT-OSS (`mlp`, `router` with a bias): top-k on the logits -> softmax over the k, in the logits' dtype.
- DeepSeek-V3 (`mlp` from layer `first_k_dense_replace` on, `gate`): sigmoid scores; group-limited top-k on
  scores + `e_score_correction_bias`; weights the un-biased scores of the chosen experts, divided by their sum
  (+1e-20) when `norm_topk_prob`, times `routed_scaling_factor`; fp32.
- SwitchTransformers (`encoder/decoder.block[i].layer[-1].mlp` of the sparse layers, `router.classifier`): top-1
  of the softmax, tokens past `expert_capacity` per sequence dropped; weight the chosen probability, input's dtype.

Expert banks, per slot: fused `gate_up_proj [2I,H]` and `down_proj [H,I]` (slices of the stacked `[E, ...]`
parameters); GPT-OSS transposed, gate and up interleaved, with biases: `gate_up_proj [H,2I]`, `gate_up_proj_bias
[2I]`, `down_proj [I,H]`, `down_proj_bias [H]`; SwitchTransformers the parameters of its `expert_{i}` module
(`wi.weight`, `wo.weight`, `ModuleListBank`). Router banks: `weight [E,H]` and, for GPT-OSS (and Switch with
`router_bias`), the logit bias `[E]`. Qwen2-MoE's `shared_expert` and DeepSeek-V3's `shared_experts` are left
alone: they are not lifecycle-managed.
GPT-OSS's experts are read as its 5.23 module computes them: `gate_up = x @ gate_up_proj + gate_up_proj_bias`,
`gate = gate_up[..., ::2]` clamped above at `swiglu_limit`, `up = gate_up[..., 1::2]` clamped to +-`swiglu_limit`,
`(up + 1) * gate * sigmoid(swiglu_alpha * gate) @ down_proj + down_proj_bias`; the banks take the four stacked
tensors whole per slot, biases included, so spawn, split, prune, merge, replace and rollback write and restore
them with the weights (the interleaving is within a slot's row and needs nothing of the edits).

**Registration and discovery.** `register_hf_adapters()` registers one adapter class per routing rule and layout
for the block classes of these families (idempotent; importing this module runs it). `ChronoSystem` runs it
itself when a model's modules come from transformers (`chronomoe_v3.integrations.register_adapters_for`),
so `ChronoSystem(model)` needs no extra import; transformers is imported only then, never by the core.
Discovery refuses, with a ValueError naming the block, an MoE block of transformers that has no adapter
(DeepSeek-V2, Granite-MoE-Shared/Hybrid, ...), and Llama4's `Llama4TextMoe`, whose router scales the expert
*input*, so that an expert's output before gating does not exist to be observed. A hub kernel that replaces a
block's whole forward (`use_kernels=True`, e.g. GPT-OSS's MegaBlocks MLP) would bypass the hooks: not supported.

**What an adapter does to a block (no model edit).** The first adapter built for a block attaches an
`HFMoEState` as `block.chrono`: the block's chronomoe state, saved with the model's `state_dict`
(`active_mask`, the slow bias's `beta`, a balancer's `expert_bias`, the mid clock's offsets), and four hooks:
- on the router, a forward hook (prepended, so that transformers' router-logit recorder, hence its aux loss,
  sees the result) that re-routes from the router's logits with the family's rule: beta added to the logits
  in fp32 (moving gate weights too in `logits` mode), inactive slots -inf, and the selection-only terms (the mid
  clock's offset, a balancer's bias) added to the scores that choose the experts: the logits for the softmax
  families (`routing.route_topk` / `route_with_bias`), the sigmoid scores for DeepSeek-V3, beside its own
  `e_score_correction_bias`. It returns the router's outputs with the masked (biased) logits, the new weights and
  indices (SwitchTransformers: the capacity-masked one-hot dispatch and the chosen probability);
- on the router, a forward pre-hook that applies a lens (`set_lens`) to the router input, when one is set;
- on the experts, in training mode with observers attached, a pre-hook that calls them on one row per
  (token, slot) with unit weights, `(x.repeat_interleave(K), index.reshape(T*K, 1), ones)` (the rows the
  experts compute anyway: no extra expert FLOPs), and a forward hook that weights and sums the unweighted
  `[T,K,H]` outputs back into the block's mixture and hands an `MoETrace` of them to the observers. The rows
  are token-major for `grouped_mm` and slot-major (`x.repeat(K, 1)`, `index.t()`) for the `eager` loop: each
  matmul then gets the rows it gets without the hook, in the same order (measured on transformers 5.23: with
  the other layout a GEMM's rows can differ in the last bit). SwitchTransformers' experts (an `nn.ModuleDict`
  looped over by the container) get the same dispatch with unit weights: each kept token's expert output, with
  dropped tokens' rows zero and marked dropped (`slot_mask`) in the trace and out of the balancer's counts.

**DeepSeek-V3.** Beta is added to the logits before the sigmoid; the mask sets an inactive slot's choice score to
-inf; a group scores as the sum of its top two choice scores, so a group with fewer than two active slots ranks
last, and a token whose chosen groups hold fewer than `top_k` active slots chooses among all groups (never a masked
slot). The router's `e_score_correction_bias` *is* the block's aux-loss-free selection bias (`expert_bias`,
`selection_bias()`): `balance.AuxLossFreeBalancer` drives it (DeepSeek-V3's own balancing) instead of adding a
second bias, and the lifecycle carries it through structural edits like a balancer's bias; it stays the router's
state (saved once, under the router). The bridge detector judges beta on the softmax of the router logits as for
every family; its clean choice and Jaccard index use the family's rule. Split's `log 2` logit shift halves a
child's gate exactly only under softmax: under a sigmoid it does so where the score is small, and with
`n_group > 1` a split child may land in another group; the split is then approximately function-preserving.

**Exactness.** With beta 0, no lens, no selection offset and all slots active, the block's output is bitwise
the unhooked one in fp32 for all nine families, in training (the per-slot capture) and eval, `grouped_mm` and
`eager` experts, top-2 (top-1 for Switch; with capacity drops too): tests/test_hf_families.py. Measured in bf16
too (8 x 64 tokens, 3 seeds, transformers 5.23): bitwise for all, except training-mode forwards of Mixtral and
DeepSeek-V3 under `eager` (max |difference| of the model's logits 0.002 and 0.017). Two limits: the top-k is
taken on the scores (logits) rather than on the softmax (Mixtral, Qwen, OLMoE, Jamba), the same choice except
where softmax rounding ties two distinct logits (SwitchTransformers compares the probabilities in the input's
dtype, as transformers does, so its ties break alike); and under `eager` experts with K > 2, or in bf16 with fp32
gate weights (Mixtral, DeepSeek-V3), transformers adds the weighted slots in expert order in the hidden dtype where
the hook adds them in slot order in the product's dtype (as `grouped_mm` does): equal up to rounding.

**Counting** follows `ChronoMoELayer` (the one guard, `layers.in_backward_recompute`): observers see each
training forward once, never an eval forward, never the forward that activation checkpointing re-runs inside
the backward pass (reentrant or not; the recompute takes the same per-slot path, so checkpointing's checks
of the recomputed tensors hold).

**Fixed width.** Lifecycle edits need free slots: `build_fixed_width(model_cls, config, num_slots,
num_active)` builds a model with `num_slots` experts per MoE layer of which the first `num_active` are
active (`fixed_width_config` is the config part; DeepSeek-V3 needs a multiple of `n_group`). The spare slots keep
their initial weights until an edit writes them (`ChronoSystem.attach_optimizer` zeroes masked slots).

**Persistence.** `block.chrono`'s buffers are model state (`model.layers.<i>.mlp.chrono.active_mask`, ...): to
load such a state dict, give the new model its blocks' state first (`build_fixed_width`, or a `ChronoSystem`
built the same way); `save_pretrained` writes those keys too, which plain transformers reports as unexpected.
A state saved at another fixed width raises a ValueError naming the block and both widths (`HFMoEState`).
A dtype cast of the model after attaching keeps `block.chrono`'s float state (beta, the balancer's bias, the mid
clock's offsets) in fp32; `ChronoCallback` (`integrations/hf_trainer.py`) runs a system inside the HF Trainer.
`balance.AuxLossFreeBalancer(model)` finds the blocks' states (`enable_expert_bias`) once they exist.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters import ExpertBank, LayerBanks, ModuleListBank, RouterBank, StackedBank, adapter_for, register_adapter
from ..bias import SlowBias
from ..config import ChronoConfig
from ..layers import in_backward_recompute, keep_fp32
from ..routing import Routing, apply_veto, route_topk, route_with_bias
from ..trace import MoETrace

STATE_NAME = "chrono"  # the attribute of a block that holds its HFMoEState
EXPERT_INPUTS = ("hidden_states", "top_k_index", "top_k_weights")  # the fused experts' argument names
WEIGHT_DTYPES = ("float32", "logits", "input")  # the dtype the gate weights reach the experts in
Observer = Callable[[MoETrace], Any]


class HFMoEState(nn.Module):
    """chronomoe's state on one transformers MoE block (`block.chrono`) and the hooks that apply it.

    `active_mask` bool `[E]` (saved): inactive slots get router logit -inf, hence zero tokens. `slow_bias`
    (a `SlowBias`, saved), `lens` (applied to the router input), `logit_lens` (the mid clock's selection
    offset, saved) and `expert_bias` (an aux-loss-free balancer's, fp32, saved) are None until attached.
    `renormalise` and `weights_dtype` (`float32`, the router `logits`' dtype or its `input`'s) belong to the
    family's routing rule; this class routes with softmax -> top-k (-> renormalise), subclasses with the
    other rules (`route`). `expert_inputs`: the names of the experts' three arguments.
    """

    active_mask: Tensor
    expert_bias: Tensor | None
    tokens_per_expert: Tensor | None
    owns_expert_bias: ClassVar[bool] = True  # False where the router has a selection bias of its own

    def __init__(
        self,
        router: nn.Module,
        num_slots: int,
        top_k: int,
        *,
        renormalise: bool,
        weights_dtype: str = "float32",
        expert_inputs: tuple[str, str, str] = EXPERT_INPUTS,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if weights_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weights_dtype={weights_dtype!r} is invalid: expected one of {list(WEIGHT_DTYPES)}")
        self._router = (router,)  # the hooked router, held outside the module tree (its state is the model's)
        self.top_k = top_k
        self.renormalise = renormalise
        self.weights_dtype = weights_dtype
        self.expert_inputs = expert_inputs
        self.register_buffer("active_mask", torch.ones(num_slots, dtype=torch.bool, device=device))
        if self.owns_expert_bias:
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
    def router(self) -> nn.Module:
        return self._router[0]

    @property
    def num_slots(self) -> int:
        return int(self.active_mask.shape[0])

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, top_k={self.top_k}, renormalise={self.renormalise}"

    def enable_expert_bias(self) -> Tensor:
        """Give the router an aux-loss-free selection bias (zeros, fp32) and count tokens per expert of training
        forwards (what `balance.AuxLossFreeBalancer` drives); returns the bias. Idempotent."""
        if self.expert_bias is None:
            self.expert_bias = torch.zeros(self.num_slots, dtype=torch.float32, device=self.active_mask.device)
        if self.tokens_per_expert is None:
            self.tokens_per_expert = torch.zeros(self.num_slots, dtype=torch.float32, device=self.active_mask.device)
        assert self.expert_bias is not None
        return self.expert_bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> HFMoEState:
        names = ("expert_bias", "tokens_per_expert") if self.owns_expert_bias else ("tokens_per_expert",)
        keep_fp32(self, names, lambda: super(HFMoEState, self)._apply(fn, recurse))
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        saved = state_dict.get(prefix + "active_mask")
        if isinstance(saved, Tensor) and tuple(saved.shape) != (self.num_slots,):
            block = prefix[: -len(STATE_NAME) - 2] if prefix.endswith(f"{STATE_NAME}.") else prefix
            width = saved.shape[0] if saved.dim() == 1 else tuple(saved.shape)
            raise ValueError(
                f"MoE block {block!r}: the state has {width} expert slots, this model {self.num_slots}; build the "
                f"model at the saved width (build_fixed_width(model_cls, config, num_slots={width}, ...))"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _counting(self) -> bool:
        """A training forward seen for the first time (not checkpointing's recompute inside backward)."""
        return self.training and not in_backward_recompute()

    # ------------------------------------------------------------------ routing
    def _offset(self) -> Tensor | None:
        """The mid clock's selection offset `[E]`, when one is attached."""
        offset = getattr(self.logit_lens, "offset", None)
        return offset if isinstance(offset, Tensor) else None

    def _selection(self) -> Tensor | None:
        """What the softmax families add to the logits that choose the experts: the balancer's bias and the
        mid clock's offset, or None."""
        selection, offset = self.expert_bias, self._offset()
        if offset is not None:
            selection = offset if selection is None else selection + offset
        return selection

    def _softmax_route(
        self, logits: Tensor, selection: Tensor | None, *, normalize: bool, veto: bool = True
    ) -> Routing:
        """`route_topk` / `route_with_bias` with the block's mask, beta, bias mode and `selection` offsets."""
        if self.slow_bias is None:
            return route_topk(
                logits, self.top_k, self.active_mask, mode=self.bias_mode, normalize=normalize,
                selection_bias=selection,
            )
        return route_with_bias(
            logits, self.top_k, self.active_mask, self.slow_bias.beta, mode=self.bias_mode, normalize=normalize,
            veto=veto and self.slow_bias.config.bridge.veto, selection_bias=selection,
        )

    def _veto(self, weight: Tensor, routing: Routing) -> Tensor:
        """The bridge veto on gate weights a subclass computed itself (`route_with_bias` applies it otherwise)."""
        if routing.bridge is None or self.slow_bias is None or not self.slow_bias.config.bridge.veto:
            return weight
        return apply_veto(weight, routing.bridge.gate_support)

    def route(self, logits: Tensor) -> Routing:
        """The family's rule on router logits `[T,E]`: here softmax -> top-k (-> renormalise), the balancer's
        bias and the mid clock's offset added to the logits that choose the top-k."""
        return self._softmax_route(logits, self._selection(), normalize=self.renormalise)

    def _gate_weights(self, routing: Routing, logits: Tensor, router_input: Tensor) -> Tensor:
        if self.weights_dtype == "logits":
            return routing.topk_weight.to(logits.dtype)
        if self.weights_dtype == "input":
            return routing.topk_weight.to(router_input.dtype)
        return routing.topk_weight

    def _scores(self, routing: Routing) -> Tensor:
        """The logits handed on as the router's (what transformers' aux loss reads): masked, biased in `logits` mode."""
        return routing.logits_biased if self.bias_mode == "logits" else routing.logits_clean

    def _count(self, index: Tensor, dispatched: Tensor | None = None) -> None:
        """Tokens per expert of a training forward, for the balancer (masked and dropped slots excluded)."""
        if self.tokens_per_expert is None or not self._counting():
            return
        kept = self.active_mask[index]
        if dispatched is not None:
            kept = kept & dispatched
        self.tokens_per_expert.scatter_add_(0, index.reshape(-1), kept.reshape(-1).to(self.tokens_per_expert.dtype))

    # ------------------------------------------------------------------ hooks
    def lens_hook(self, gate: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Router pre-hook: the router reads `lens(hidden)` when a lens is set."""
        if self.lens is None:
            return None
        return (self.lens(args[0]), *args[1:])

    def route_hook(self, gate: nn.Module, args: tuple[Any, ...], output: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Router forward hook: re-route from the router's logits with beta, the mask and the selection offsets."""
        logits: Tensor = output[0]
        router_input: Tensor = args[0]
        routing = self.route(logits.reshape(-1, logits.shape[-1]))
        index = routing.topk_index
        weights = self._gate_weights(routing, logits, router_input)
        self._routed = (routing, router_input.reshape(-1, router_input.shape[-1]))
        self._count(index)
        return self._scores(routing).to(logits.dtype), weights, index

    def experts_pre_hook(
        self, experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Experts pre-hook (training mode with observers): one row per (token, slot), unit weights."""
        self._capture = None  # a recompute stopped early by checkpointing may have left one behind
        if not (self.training and self.observers):
            return None
        hidden, index, weights = expert_inputs(args, kwargs, self.expert_inputs)
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
        self._observe(index, weights, per_slot, mixture, routed, self.active_mask[index])
        return mixture

    def _observe(
        self, index: Tensor, weights: Tensor, per_slot: Tensor, mixture: Tensor, routed: tuple[Routing, Tensor] | None,
        slot_mask: Tensor,
    ) -> None:
        """Hand the observers the trace of a counted training forward."""
        if routed is None or not self._counting():
            return
        routing, router_input = routed
        trace = MoETrace(
            topk_index=index,
            topk_weight=weights.detach(),
            expert_out=per_slot.detach(),
            num_experts=self.num_slots,
            slot_mask=slot_mask,
            mixture=mixture.detach(),
            router_logits_clean=routing.logits_clean.detach(),
            router_logits_biased=routing.logits_biased.detach(),
            bridge=routing.bridge.detach() if routing.bridge is not None else None,
            router_input=router_input.detach(),
        )
        for fn in self.observers.values():
            fn(trace)


class TopKSoftmaxState(HFMoEState):
    """Top-k on the logits, then softmax over the k chosen logits, in the logits' dtype (Granite-MoE, GPT-OSS).
    Equal to softmax -> top-k -> renormalise up to rounding; computed the family's way so that it is bitwise."""

    def route(self, logits: Tensor) -> Routing:
        routing = self._softmax_route(logits, self._selection(), normalize=False, veto=False)
        chosen = self._scores(routing).gather(1, routing.topk_index).to(logits.dtype)
        weight = torch.softmax(chosen, dim=-1).float()
        return replace(routing, topk_weight=self._veto(weight, routing))


class SigmoidGroupState(HFMoEState):
    """DeepSeek-V3's rule: scores `sigmoid(z)`; selection on `scores + e_score_correction_bias` (+ the mid clock's
    offset), group-limited (the `topk_group` groups of `n_group` with the largest sum of their top-2 choice
    scores, then top-k inside them); weights the un-biased scores of the chosen experts, divided by their sum
    (+1e-20) when `norm_topk_prob`, times `routed_scaling_factor`.

    Beta is added to the logits before the sigmoid (`logits` mode: selection and weights; `selection` mode:
    selection only). Inactive slots get choice score -inf; a group needs two active slots to score (a group
    with fewer ranks last), and a token whose chosen groups hold fewer than `top_k` active slots chooses among
    all groups. The router's own `e_score_correction_bias` *is* this block's aux-loss-free selection bias
    (`expert_bias`): DeepSeek-V3 balances with it, so `balance.AuxLossFreeBalancer` drives it (a second bias
    beside it would only fight it) and structural edits carry it like a balancer's bias. The bridge detector
    judges beta on the softmax of the router logits, as for every family (a normalised view of the same logits);
    its clean top-k and Jaccard index use this rule.
    """

    owns_expert_bias = False

    def __init__(self, router: nn.Module, num_slots: int, top_k: int, **kwargs: Any) -> None:
        super().__init__(router, num_slots, top_k, **kwargs)
        self.n_group = int(getattr(router, "num_group", 1) or 1)
        self.topk_group = int(getattr(router, "topk_group", 1) or 1)
        self.scaling = float(getattr(router, "routed_scaling_factor", 1.0))

    @property
    def expert_bias(self) -> Tensor | None:
        """The router's `e_score_correction_bias` (fp32 `[E]`, the model's state)."""
        bias = getattr(self.router, "e_score_correction_bias", None)
        return bias if isinstance(bias, Tensor) else None

    @expert_bias.setter
    def expert_bias(self, value: Tensor | None) -> None:
        bias = self.expert_bias
        if bias is None or value is None:
            raise AttributeError("a DeepSeek-V3 block's selection bias is its router's e_score_correction_bias")
        with torch.no_grad():
            bias.copy_(value)

    def enable_expert_bias(self) -> Tensor:
        bias = self.expert_bias
        if bias is None:
            raise ValueError(
                f"{type(self.router).__name__} has no e_score_correction_bias; expected DeepSeek-V3's router"
            )
        if self.tokens_per_expert is None:
            self.tokens_per_expert = torch.zeros(self.num_slots, dtype=torch.float32, device=self.active_mask.device)
        return bias

    def select(self, logits: Tensor, offset: Tensor | None) -> Tensor:
        """The top-k indices `[T,K]` of masked logits `[T,E]` by the group-limited rule (unsorted, as DeepSeek-V3)."""
        choice = torch.sigmoid(logits)
        bias = self.expert_bias
        if bias is not None:
            choice = choice + bias
        if offset is not None:
            choice = choice + offset
        choice = choice.masked_fill(~self.active_mask, float("-inf"))
        t, e = choice.shape
        g = self.n_group
        group_scores = choice.view(t, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
        grouped = choice.masked_fill(~score_mask.bool(), float("-inf"))
        enough = torch.isfinite(grouped).sum(-1, keepdim=True) >= self.top_k
        grouped = torch.where(enough, grouped, choice)
        return torch.topk(grouped, k=self.top_k, dim=-1, sorted=False)[1]

    def route(self, logits: Tensor) -> Routing:
        routing = self._softmax_route(logits, None, normalize=False, veto=False)
        offset = self._offset()
        index = self.select(routing.logits_biased, offset)
        weight = torch.sigmoid(self._scores(routing)).gather(1, index)
        if self.renormalise:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        weight = weight * self.scaling
        bridge = routing.bridge
        if bridge is not None:
            clean = self.select(routing.logits_clean, offset)
            inter = (clean.unsqueeze(2) == index.unsqueeze(1)).any(-1).sum(-1).float()
            jaccard = inter / (2 * self.top_k - inter)
            bridge = bridge.replace(
                topk_index_clean=clean, jaccard=jaccard, jaccard_mean=jaccard.mean(),
                gate_support=bridge.support.gather(1, index),
            )
        routing = replace(routing, topk_index=index, bridge=bridge)
        return replace(routing, topk_weight=self._veto(weight, routing))


class SwitchState(HFMoEState):
    """SwitchTransformers: top-1 by the argmax of the softmax probabilities cast to the router input's dtype (as
    transformers does, so that rounding ties break alike), dropped past the router's `expert_capacity` (per
    sequence, in token order), weight the chosen probability. The router returns `(dispatch one-hot [B,S,E],
    probability [B,S,1], logits [B,S,E])`; the `nn.ModuleDict` experts take `(hidden [T,H], dispatch [T,1,E],
    weights [T,1])` and compute a token only where its dispatch row is set. The capture passes unit weights (each
    kept token's expert output, unweighted; dropped tokens' rows are zero and masked out of the trace and the
    counts)."""

    def route_top1(self, logits: Tensor, dtype: torch.dtype) -> Routing:
        """Top-1 routing of logits `[T,E]` with probabilities compared in `dtype` (beta, mask, offsets as ever)."""
        selection = self._selection()

        def choose(z: Tensor) -> Tensor:
            scores = z if selection is None else z + selection
            return torch.softmax(scores, dim=-1).to(dtype).argmax(dim=-1, keepdim=True)

        routing = self._softmax_route(logits, selection, normalize=False, veto=False)
        index = choose(routing.logits_biased)
        source = routing.probs_biased if self.bias_mode == "logits" else routing.probs_clean
        bridge = routing.bridge
        if bridge is not None:
            clean = choose(routing.logits_clean)
            jaccard = (clean == index).float().squeeze(1)
            bridge = bridge.replace(
                topk_index_clean=clean, jaccard=jaccard, jaccard_mean=jaccard.mean(),
                gate_support=bridge.support.gather(1, index),
            )
        routing = replace(routing, topk_index=index, bridge=bridge)
        return replace(routing, topk_weight=self._veto(source.gather(1, index), routing))

    def route_hook(self, gate: nn.Module, args: tuple[Any, ...], output: Any) -> tuple[Tensor, Tensor, Tensor]:
        logits: Tensor = output[2]
        router_input: Tensor = args[0]
        shape, e = logits.shape[:-1], logits.shape[-1]
        routing = self.route_top1(logits.reshape(-1, e), router_input.dtype)
        index = routing.topk_index
        one_hot = F.one_hot(index.view(shape), num_classes=e)
        capacity: int = gate.expert_capacity  # type: ignore[assignment]  # an int attribute (switch_parts checks it)
        dispatch = one_hot * (torch.cumsum(one_hot, dim=-2) <= capacity)
        weights = routing.topk_weight.to(router_input.dtype).view(*shape, 1)
        self._routed = (routing, router_input.reshape(-1, router_input.shape[-1]))
        self._count(index, dispatch.reshape(-1, e).sum(-1, keepdim=True) > 0)
        return dispatch, weights, self._scores(routing).view(logits.shape).to(logits.dtype)

    def experts_pre_hook(
        self, experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._capture = None
        if not (self.training and self.observers):
            return None
        hidden, dispatch, weights = expert_inputs(args, kwargs, self.expert_inputs)
        self._capture = (dispatch, weights, False)
        return (hidden, dispatch, torch.ones_like(weights)), {}

    def experts_hook(
        self, experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> Tensor | None:
        capture, self._capture = self._capture, None
        routed, self._routed = self._routed, None
        if capture is None:
            return None
        dispatch, weights, _ = capture
        t, h = output.shape
        per_slot = output.view(t, 1, h)
        weights = weights.reshape(t, 1)
        mixture = (per_slot * weights.unsqueeze(-1)).sum(1).to(output.dtype)
        dispatched = dispatch.reshape(t, -1).sum(-1, keepdim=True) > 0
        index = routed[0].topk_index if routed is not None else dispatch.reshape(t, -1).argmax(-1, keepdim=True)
        self._observe(index, weights, per_slot, mixture, routed, self.active_mask[index] & dispatched)
        return mixture


def loops_over_experts(experts: nn.Module) -> bool:
    """Whether fused experts run transformers' `eager` per-expert loop (rather than `grouped_mm` or another
    kernel): the per-slot rows are then laid out slot-major, else token-major, so that every matmul sees the
    rows it sees without the hook, in the same order (bitwise the same output)."""
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    return implementation in (None, "eager")


def expert_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, str, str] = EXPERT_INPUTS
) -> tuple[Tensor, Tensor, Tensor]:
    """The three tensor arguments of an experts call, positional or named (`names`): `(hidden [T,H],
    top_k_index [T,K], top_k_weights [T,K])` for fused experts."""
    values = list(args[:3]) + [kwargs.get(name) for name in names[len(args[:3]):]]
    if not all(isinstance(v, Tensor) for v in values):
        raise TypeError(
            f"the experts were called with {len(args)} positional and {sorted(kwargs)} named arguments; expected "
            f"tensors {list(names)}"
        )
    hidden, index, weights = values
    assert isinstance(hidden, Tensor) and isinstance(index, Tensor) and isinstance(weights, Tensor)
    return hidden, index, weights


class BlockParts(NamedTuple):
    """The parts of a transformers 5.x MoE block chronomoe works on."""

    gate: nn.Module  # the router
    experts: nn.Module  # the fused experts, or the per-expert container
    router_weight: Tensor  # [E, H]
    router_bias: Tensor | None  # [E], added to the logits (GPT-OSS, SwitchTransformers with router_bias)
    expert_params: dict[str, Tensor]  # the stacked expert parameters [E, ...]; empty for per-expert modules
    hidden_size: int  # the width of the expert outputs
    top_k: int


def fused_parts(module: nn.Module, router_name: str = "gate", *, transposed: bool = False) -> BlockParts:
    """The `BlockParts` of a block with a `router_name` router and fused experts, checked (TypeError when
    `module` is not one, ValueError when the shapes disagree). Layout `gate_up_proj [E, 2I, H]`, `down_proj
    [E, H, I]`; `transposed` (GPT-OSS): `gate_up_proj [E, H, 2I]` (gate and up interleaved), `down_proj [E, I, H]`
    and the biases `gate_up_proj_bias [E, 2I]`, `down_proj_bias [E, H]`."""
    gate, experts = getattr(module, router_name, None), getattr(module, "experts", None)
    names = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if transposed else ())
    params = {n: getattr(experts, n, None) for n in names}
    router = getattr(gate, "weight", None)
    top_k = getattr(gate, "top_k", None)
    layout = (
        "`gate_up_proj [E, H, 2I]`, `gate_up_proj_bias [E, 2I]`, `down_proj [E, I, H]` and `down_proj_bias [E, H]`"
        if transposed else "`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`"
    )
    if (
        not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module)
        or isinstance(top_k, bool) or not isinstance(top_k, int)
        or not isinstance(router, Tensor) or router.dim() != 2
        or not all(isinstance(p, Tensor) for p in params.values())
    ):
        raise TypeError(
            f"{type(module).__name__} is not a transformers 5.x MoE block: expected a `{router_name}` router with "
            f"`weight [E, H]` and `top_k`, and fused `experts` with {layout}"
        )
    tensors = {n: p for n, p in params.items() if isinstance(p, Tensor)}
    e, h = router.shape
    down = tensors["down_proj"]
    i = int(down.shape[1] if transposed else down.shape[-1]) if down.dim() == 3 else -1
    expected = (
        {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h), "gate_up_proj_bias": (e, 2 * i),
         "down_proj_bias": (e, h)}
        if transposed else {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}
    )
    if any(tuple(tensors[n].shape) != shape for n, shape in expected.items()):
        got = ", ".join(f"{n} {tuple(p.shape)}" for n, p in tensors.items())
        raise ValueError(
            f"{type(module).__name__} has router weight {tuple(router.shape)}, {got}; expected [E, H] and {layout}"
        )
    bias = getattr(gate, "bias", None)
    return BlockParts(gate, experts, router, bias if isinstance(bias, Tensor) else None, tensors, int(h), top_k)


def switch_parts(module: nn.Module) -> BlockParts:
    """The `BlockParts` of a SwitchTransformers sparse MLP: a top-1 `router` with a `classifier` (`nn.Linear`) and
    an `expert_capacity`, and an `nn.ModuleDict` of one module per expert (TypeError / ValueError otherwise)."""
    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    classifier = getattr(router, "classifier", None)
    capacity = getattr(router, "expert_capacity", None)
    if (
        not isinstance(router, nn.Module) or not isinstance(classifier, nn.Linear)
        or not isinstance(experts, nn.ModuleDict) or len(experts) == 0
        or isinstance(capacity, bool) or not isinstance(capacity, int)
    ):
        raise TypeError(
            f"{type(module).__name__} is not a SwitchTransformers sparse MLP: expected a `router` with a `classifier` "
            "nn.Linear and an integer `expert_capacity`, and `experts`, an nn.ModuleDict of expert modules"
        )
    if classifier.out_features != len(experts):
        raise ValueError(
            f"{type(module).__name__} has a router over {classifier.out_features} experts and {len(experts)} expert "
            "modules; expected one router row per expert"
        )
    return BlockParts(router, experts, classifier.weight, classifier.bias, {}, int(classifier.in_features), 1)


class HFMoEAdapter:
    """`MoELayerAdapter` of a transformers 5.x MoE block (a `gate` router, fused `experts`); a subclass per
    routing rule and layout says where the router is, how the top-k weights are computed (`state_class`,
    `renormalise`) and in which dtype they reach the experts. Building one attaches the block's `HFMoEState`
    and hooks, once (module docstring)."""

    router_name = "gate"
    state_class: type[HFMoEState] = HFMoEState
    weights_dtype = "float32"
    expert_input_names: tuple[str, str, str] = EXPERT_INPUTS

    def __init__(self, module: nn.Module) -> None:
        parts = self.parts(module)
        self._block = module
        state = getattr(module, STATE_NAME, None)
        if not isinstance(state, HFMoEState):
            state = self.state_class(
                parts.gate, int(parts.router_weight.shape[0]), parts.top_k, renormalise=self.renormalise(parts.gate),
                weights_dtype=self.weights_dtype, expert_inputs=self.expert_input_names,
                device=parts.router_weight.device,
            )
            state.train(module.training)
            module.add_module(STATE_NAME, state)
            parts.gate.register_forward_pre_hook(state.lens_hook)
            parts.gate.register_forward_hook(state.route_hook, prepend=True)
            parts.experts.register_forward_pre_hook(state.experts_pre_hook, with_kwargs=True)
            parts.experts.register_forward_hook(state.experts_hook, with_kwargs=True)
        self.state: HFMoEState = state

    def parts(self, module: nn.Module) -> BlockParts:
        """The block's `BlockParts`, checked."""
        return fused_parts(module, self.router_name)

    def expert_bank(self, parts: BlockParts) -> ExpertBank:
        return StackedBank({name: (param, 0) for name, param in parts.expert_params.items()})

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
        return self.parts(self._block).hidden_size

    @property
    def router_input_size(self) -> int:
        return int(self.parts(self._block).router_weight.shape[1])

    def banks(self) -> LayerBanks:
        parts = self.parts(self._block)
        return LayerBanks(
            self.expert_bank(parts), RouterBank(parts.router_weight, parts.router_bias), self.state.active_mask
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

    weights_dtype = "logits"

    def renormalise(self, gate: nn.Module) -> bool:
        return bool(getattr(gate, "norm_topk_prob", False))


class UnnormalisedSoftmaxAdapter(HFMoEAdapter):
    """softmax -> top-k, no renormalisation, gate weights in the logits' dtype; router `block.router` (Jamba)."""

    router_name = "router"
    weights_dtype = "logits"

    def renormalise(self, gate: nn.Module) -> bool:
        return False


class TopKSoftmaxAdapter(HFMoEAdapter):
    """top-k on the logits -> softmax over the k, gate weights in the router input's dtype; router `block.router`
    (Granite-MoE)."""

    router_name = "router"
    state_class = TopKSoftmaxState
    weights_dtype = "input"

    def renormalise(self, gate: nn.Module) -> bool:
        return True  # the softmax over the k sums to 1


class GptOssAdapter(TopKSoftmaxAdapter):
    """GPT-OSS: top-k on the logits (the router has a bias) -> softmax over the k in the logits' dtype; fused
    experts transposed, gate and up interleaved, with biases: all four stacked tensors are the slot's weights."""

    weights_dtype = "logits"
    expert_input_names = ("hidden_states", "router_indices", "routing_weights")

    def parts(self, module: nn.Module) -> BlockParts:
        return fused_parts(module, self.router_name, transposed=True)


class SigmoidGroupAdapter(HFMoEAdapter):
    """DeepSeek-V3: sigmoid scores, group-limited top-k with the selection bias `e_score_correction_bias`,
    weights from the un-biased scores (renormalised when `norm_topk_prob`) times `routed_scaling_factor`, in
    fp32 (`SigmoidGroupState`). `shared_experts` are left alone."""

    state_class = SigmoidGroupState

    def renormalise(self, gate: nn.Module) -> bool:
        return bool(getattr(gate, "norm_topk_prob", False))


class SwitchAdapter(HFMoEAdapter):
    """SwitchTransformers: top-1 router `block.router` (`classifier`), capacity dropping, an `nn.ModuleDict` of
    expert modules (`SwitchState`); the banks are the experts' own parameters (`ModuleListBank`)."""

    router_name = "router"
    state_class = SwitchState
    weights_dtype = "input"
    expert_input_names = ("hidden_states", "selected_experts", "routing_weights")

    def parts(self, module: nn.Module) -> BlockParts:
        return switch_parts(module)

    def expert_bank(self, parts: BlockParts) -> ExpertBank:
        assert isinstance(parts.experts, nn.ModuleDict)
        return ModuleListBank(parts.experts)

    def renormalise(self, gate: nn.Module) -> bool:
        return False


# transformers model type, its MoE block class, the config field holding the expert count, the routing rule
FAMILIES: tuple[tuple[str, str, str, type[HFMoEAdapter]], ...] = (
    ("mixtral", "MixtralSparseMoeBlock", "num_local_experts", RenormalisedSoftmaxAdapter),
    ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "num_experts", ConfigNormSoftmaxAdapter),
    ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "num_experts", ConfigNormSoftmaxAdapter),
    ("olmoe", "OlmoeSparseMoeBlock", "num_experts", ConfigNormSoftmaxAdapter),
    ("granitemoe", "GraniteMoeMoE", "num_local_experts", TopKSoftmaxAdapter),
    ("jamba", "JambaSparseMoeBlock", "num_experts", UnnormalisedSoftmaxAdapter),
    ("gpt_oss", "GptOssMLP", "num_local_experts", GptOssAdapter),
    ("deepseek_v3", "DeepseekV3MoE", "n_routed_experts", SigmoidGroupAdapter),
    ("switch_transformers", "SwitchTransformersSparseMLP", "num_experts", SwitchAdapter),
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


def _top_k(config: Any) -> int:
    """The config's experts per token (SwitchTransformers routes top-1 and has no such field)."""
    return int(getattr(config, "num_experts_per_tok", 1))


def _check_slots(config: Any, num_slots: int) -> None:
    _check_count("num_slots", num_slots, _top_k(config))
    groups = getattr(config, "n_group", None) if getattr(config, "model_type", None) == "deepseek_v3" else None
    if groups and (num_slots % groups or num_slots // groups < 2):
        raise ValueError(
            f"num_slots={num_slots} is invalid for DeepSeek-V3 with n_group={groups}: expected a multiple of n_group "
            "with at least 2 slots per group"
        )


def fixed_width_config(config: Any, num_slots: int) -> Any:
    """A copy of a supported family's transformers config with `num_slots` expert slots per MoE layer (at least
    the config's `num_experts_per_tok`; for DeepSeek-V3 a multiple of `n_group`)."""
    field = _family_field(config)
    _check_slots(config, num_slots)
    out = copy.deepcopy(config)
    setattr(out, field, num_slots)
    return out


def build_fixed_width(model_cls: Callable[[Any], nn.Module], config: Any, num_slots: int, num_active: int) -> nn.Module:
    """`model_cls(fixed_width_config(config, num_slots))` with only the first `num_active` slots of every MoE
    layer active (`num_experts_per_tok <= num_active <= num_slots`): the others are free for spawn and split."""
    field = _family_field(config)
    _check_slots(config, num_slots)
    _check_count("num_active", num_active, _top_k(config), num_slots)
    register_hf_adapters()
    model = model_cls(fixed_width_config(config, num_slots))
    adapters = [a for m in model.modules() if (a := adapter_for(m)) is not None]
    if not adapters:
        raise ValueError(f"{type(model).__name__} built from {field}={num_slots} has no supported MoE block")
    for adapter in adapters:
        adapter.active_mask[num_active:] = False
    return model


register_hf_adapters()
