"""ChronoMoELayer: the reference fixed-width MoE layer (SwiGLU experts on stacked parameters)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .balance import load_balancing_loss
from .bias import SlowBias
from .config import BIAS_MODES, ChronoConfig
from .grouped import grouped_mm
from .routing import Routing, route_topk, route_with_bias
from .trace import Dispatch, MoETrace

Observer = Callable[[MoETrace], Any]


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass: a forward seen now is activation checkpointing's recompute
    (reentrant or not), which must not be counted or observed a second time. Inside a `torch.compile`d
    forward it is False: a compiled backward replays tensor math only, never the observers' side effects."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._current_graph_task_id() != -1)


def _grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows of `x` grouped by expert (group e ends at offsets[e]) times `weight[e]`."""
    out: Tensor = grouped_mm(x, weight, offsets)
    return out


def keep_fp32(module: nn.Module, names: tuple[str, ...], apply: Callable[[], object]) -> None:
    """Run `apply` (a module's `nn.Module._apply`, e.g. from `.to(bfloat16)`) so that the tensors `names` of
    `module` follow the device but stay fp32: a model-wide cast must not round a balancer's bias or counts."""
    keep = {name: getattr(module, name) for name in names}
    apply()
    for name, old in keep.items():
        new = getattr(module, name)
        if new is not None and new.dtype != torch.float32:
            setattr(module, name, old.to(device=new.device, dtype=torch.float32))


class ChronoMoELayer(nn.Module):
    """A top-k MoE layer with `max_experts` fixed slots and an active mask.

    Parameters (stacked, one slice per slot, so structural edits never reallocate):
    `w_gate [E,H,I]`, `w_up [E,H,I]`, `w_down [E,I,H]`, and `router` (`nn.Linear(H, E)`).
    Inactive slots get router logit -inf and exactly zero tokens. With `capacity_factor` each expert
    takes at most `ceil(capacity_factor * T * K / n_active)` slots per forward, in priority order (all first
    choices before any second choice); dropped slots contribute nothing (the residual carries the token).
    Observers added with `add_observer` receive an `MoETrace` of every training forward (and of eval
    forwards when `observe_eval` is set), built from tensors the forward computes anyway.
    Router-side slots: `lens` transforms the router input (v2 `ChronoLens`); `logit_lens` (the mid clock's
    `LogitLens`) adds its `offset [E]` to the scores that choose the top-k, as the balancer's `expert_bias`
    does; neither moves gate weights beyond what the router input itself changes.
    With a `slow_bias` attached (`attach_slow_bias`), its beta is added to the router logits, the bridge
    detector runs on every forward (`trace.bridge`) and, when the config's `bridge_veto` is on, the veto
    scales the gate weights.

    Balancers (`chronomoe_v3.balance`): with `compute_aux_loss` every training forward leaves the Switch
    load-balancing loss of its routing in `aux_loss` (differentiable; None after an eval forward).
    `enable_expert_bias()` adds an aux-loss-free selection bias `expert_bias [E]` (fp32, saved) that only
    moves the top-k choice, and counts each expert's tokens of training forwards in `tokens_per_expert`.

    Counting (observers, `tokens_per_expert`) happens once per training forward: never in eval mode (unless
    `observe_eval`) and never in a forward that activation checkpointing re-runs inside the backward pass.
    """

    active_mask: Tensor
    expert_bias: Tensor | None
    tokens_per_expert: Tensor | None

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        max_experts: int,
        top_k: int,
        *,
        num_active: int | None = None,
        capacity_factor: float | None = None,
        router_bias: bool = False,
        normalize_topk: bool = True,
        bias_mode: str = "logits",
        compute_aux_loss: bool = False,
        layer_id: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("d_model", d_model, 1), ("d_ff", d_ff, 1), ("max_experts", max_experts, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {low}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= max_experts:
            raise ValueError(f"top_k={top_k!r} is invalid: expected an integer in [1, max_experts={max_experts}]")
        n_active = max_experts if num_active is None else num_active
        if isinstance(n_active, bool) or not isinstance(n_active, int) or not top_k <= n_active <= max_experts:
            raise ValueError(
                f"num_active={num_active!r} is invalid: expected an integer in [top_k={top_k}, "
                f"max_experts={max_experts}]"
            )
        if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: expected None or a number > 0")
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode={bias_mode!r} is invalid: expected one of {list(BIAS_MODES)}")
        self.d_model = d_model
        self.d_ff = d_ff
        self.max_experts = max_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.normalize_topk = normalize_topk
        self.bias_mode = bias_mode
        self.layer_id = layer_id
        self.observe_eval = False
        self.compute_aux_loss = bool(compute_aux_loss)
        self.aux_loss: Tensor | None = None
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d_model, max_experts, bias=router_bias, **factory)
        self.w_gate = nn.Parameter(torch.empty(max_experts, d_model, d_ff, **factory))
        self.w_up = nn.Parameter(torch.empty(max_experts, d_model, d_ff, **factory))
        self.w_down = nn.Parameter(torch.empty(max_experts, d_ff, d_model, **factory))
        active = torch.zeros(max_experts, dtype=torch.bool, device=device)
        active[:n_active] = True
        self.register_buffer("active_mask", active)
        # Written by balance.AuxLossFreeBalancer.step() (outside forward); learned state, so saved.
        self.register_buffer("expert_bias", None)
        # Scratch token counts of training forwards, read and cleared by the balancer; not saved.
        self.register_buffer("tokens_per_expert", None, persistent=False)
        self.lens: nn.Module | None = None
        self.logit_lens: nn.Module | None = None
        self.slow_bias: SlowBias | None = None
        self._observers: OrderedDict[int, Observer] = OrderedDict()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound_in = 1.0 / math.sqrt(self.d_model)
        bound_ff = 1.0 / math.sqrt(self.d_ff)
        with torch.no_grad():
            self.w_gate.uniform_(-bound_in, bound_in)
            self.w_up.uniform_(-bound_in, bound_in)
            self.w_down.uniform_(-bound_ff, bound_ff)
            self.router.reset_parameters()
            if self.router.bias is not None:
                self.router.bias.zero_()  # no expert is favoured before training

    # ------------------------------------------------------------------ observers
    def add_observer(self, fn: Observer) -> RemovableHandle:
        """Call `fn(trace)` after each observed forward; returns a handle whose `remove()` detaches it."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def attach_slow_bias(self, config: ChronoConfig | None = None) -> SlowBias:
        """Give the layer a slow routing bias (beta 0 for every slot) and route with `config.bias.mode`.
        Returns it; advance it with `slow_bias.update(phi_slow, layer.active_mask)`."""
        bias = SlowBias(self.max_experts, config, device=self.active_mask.device)
        self.slow_bias = bias
        self.bias_mode = bias.config.bias.mode
        return bias

    def enable_expert_bias(self) -> Tensor:
        """Give the router an aux-loss-free selection bias (zeros, fp32) and start counting tokens per expert;
        returns the bias. Idempotent."""
        if self.expert_bias is None:
            device = self.active_mask.device
            self.expert_bias = torch.zeros(self.max_experts, dtype=torch.float32, device=device)
            self.tokens_per_expert = torch.zeros(self.max_experts, dtype=torch.float32, device=device)
        return self.expert_bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ChronoMoELayer:
        keep_fp32(self, ("expert_bias", "tokens_per_expert"), lambda: super(ChronoMoELayer, self)._apply(fn, recurse))
        return self

    @property
    def num_active(self) -> int:
        """Active slot count (reads the mask: a host sync; not for the per-step path)."""
        return int(self.active_mask.sum())

    # ------------------------------------------------------------------ forward
    def expert_forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        """SwiGLU of rows grouped by expert slot (`offsets` are the int32 cumulative group ends)."""
        gate = _grouped_matmul(x, self.w_gate, offsets)
        up = _grouped_matmul(x, self.w_up, offsets)
        return _grouped_matmul(F.silu(gate) * up, self.w_down, offsets)

    def route(
        self, hidden: Tensor, router_bias: Tensor | None = None, token_mask: Tensor | None = None
    ) -> Routing:
        """Routing of `hidden [T,H]`. With a slow bias attached, `beta` (plus `router_bias`, if given) is the
        bias, `routing.bridge` holds the bridge report (`token_mask [T]` excludes padding from its means)
        and the gate weights are vetoed when the config says so."""
        router_in = self.lens(hidden) if self.lens is not None else hidden
        logits = self.router(router_in)
        selection = self.expert_bias
        offset = getattr(self.logit_lens, "offset", None)
        if isinstance(offset, Tensor):
            selection = offset if selection is None else selection + offset
        if self.slow_bias is None:
            return route_topk(
                logits, self.top_k, self.active_mask, bias=router_bias, mode=self.bias_mode,
                normalize=self.normalize_topk, selection_bias=selection,
            )
        beta = self.slow_bias.beta
        bias = beta if router_bias is None else beta + router_bias.to(beta.dtype)
        return route_with_bias(
            logits, self.top_k, self.active_mask, bias, mode=self.bias_mode, normalize=self.normalize_topk,
            veto=self.slow_bias.config.bridge.veto, token_mask=token_mask, selection_bias=selection,
        )

    def _capacity_keep(self, topk_index: Tensor) -> Tensor:
        """[T,K] bool: slots within their expert's capacity (priority: slot 0 of every token first)."""
        t, k = topk_index.shape
        e = self.max_experts
        assert self.capacity_factor is not None
        n_active = self.active_mask.sum().clamp_min(1)
        capacity = torch.ceil(self.capacity_factor * t * k / n_active.float())
        flat = topk_index.t().reshape(-1)  # priority order: k-major
        order = torch.argsort(flat.to(torch.int32), stable=True)  # int32 keys: half the radix passes on CUDA
        counts = torch.zeros(e, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        starts = torch.cumsum(counts, 0) - counts
        rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        position = torch.empty_like(flat).scatter_(0, order, rank_sorted)
        return (position.float() < capacity).view(k, t).t()

    def _check_input(self, x: Tensor, token_mask: Tensor | None, router_bias: Tensor | None) -> None:
        """Metadata checks of a forward's arguments (free: no device value is read), so that a malformed call
        fails here, naming the argument, not deep inside torch."""
        if not isinstance(x, Tensor):
            raise ValueError(f"input is a {type(x).__name__}; expected a torch.Tensor [..., d_model]")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected [..., d_model={self.d_model}]")
        if not x.is_floating_point():
            raise ValueError(f"input has dtype {x.dtype}; expected a floating dtype")
        weight = self.router.weight
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device}; expected the layer's device ({weight.device})")
        if (
            x.dtype != weight.dtype
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise ValueError(
                f"input has dtype {x.dtype}; expected the layer's dtype {weight.dtype} (or run under torch.autocast)"
            )
        if token_mask is not None and not isinstance(token_mask, Tensor):
            raise ValueError(f"token_mask is a {type(token_mask).__name__}; expected a bool tensor or None")
        if router_bias is not None:
            if not isinstance(router_bias, Tensor) or not router_bias.is_floating_point():
                got = router_bias.dtype if isinstance(router_bias, Tensor) else type(router_bias).__name__
                raise ValueError(f"router_bias is {got}; expected a floating tensor ({self.max_experts},) or None")
            if router_bias.device != weight.device:
                raise ValueError(
                    f"router_bias is on {router_bias.device}; expected the layer's device ({weight.device})"
                )

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        router_bias: Tensor | None = None,
    ) -> Tensor:
        """`x [..., H]` -> same shape. `token_mask [...]` (True = real token) excludes padding from the
        statistics (padding is still routed, as in most MoE models). `router_bias [E]` is added to the
        router logits in fp32 (`bias_mode` decides whether it moves gate weights too)."""
        self._check_input(x, token_mask, router_bias)
        lead = x.shape[:-1]
        hidden = x.reshape(-1, self.d_model)
        t = hidden.shape[0]
        if t == 0:
            raise ValueError("empty batch: the input holds no tokens")
        mask = None
        if token_mask is not None:
            if tuple(token_mask.shape) != tuple(lead):
                raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}; expected {tuple(lead)}")
            mask = token_mask.reshape(t).to(torch.bool)
        routing = self.route(hidden, router_bias, mask)
        index, weight = routing.topk_index, routing.topk_weight
        keep = self.active_mask[index]  # guards the case of fewer active experts than top_k
        if self.capacity_factor is not None:
            keep = keep & self._capacity_keep(index)
        k, e = self.top_k, self.max_experts
        flat = torch.where(keep, index, torch.full_like(index, e)).reshape(-1)
        order = torch.argsort(flat.to(torch.int32), stable=True)  # int32 keys: half the radix passes on CUDA
        counts = torch.zeros(e + 1, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        offsets = torch.cumsum(counts[:e], 0).to(torch.int32)
        rows = hidden.index_select(0, order // k)
        out_sorted = self.expert_forward(rows, offsets)
        # Dropped slots sort past the last offset, where the grouped product writes zeros: their rows of
        # `expert_out` are already 0 (and their gradients are never read), so no masking pass is needed.
        expert_out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted).view(t, k, self.d_model)
        gate = torch.where(keep, weight, torch.zeros_like(weight)).to(expert_out.dtype)
        if expert_out.is_cuda and k >= 4:  # one batched product: no [T, K, H] temporary, forward or backward
            mixture = torch.bmm(gate.unsqueeze(1), expert_out).squeeze(1)
        else:  # (the CPU keeps the elementwise form, whose rounding the outcome benchmark's runs were made with)
            mixture = (expert_out * gate.unsqueeze(-1)).sum(1)
        counting = self.training and not in_backward_recompute()
        if counting and self.tokens_per_expert is not None:
            self.tokens_per_expert.add_(counts[:e].to(self.tokens_per_expert.dtype))
        if self.compute_aux_loss and counting:
            self.aux_loss = load_balancing_loss(
                routing.probs_clean, index, self.active_mask, slot_mask=keep, token_mask=mask
            )
        elif not self.training:
            self.aux_loss = None
        if self._observers and (counting or (self.observe_eval and not self.training)):
            if self.lens is None:
                router_input = hidden.detach()
            else:
                with torch.no_grad():
                    router_input = self.lens(hidden)
            trace = MoETrace(
                topk_index=index,
                topk_weight=weight.detach(),
                expert_out=expert_out.detach(),
                num_experts=e,
                slot_mask=keep,
                token_mask=mask,
                mixture=mixture.detach(),
                router_logits_clean=routing.logits_clean.detach(),
                router_logits_biased=routing.logits_biased.detach(),
                layer_id=self.layer_id,
                bridge=routing.bridge.detach() if routing.bridge is not None else None,
                router_input=router_input,
                dispatch=Dispatch(order, offsets, out_sorted.detach()),
            )
            for fn in self._observers.values():
                fn(trace)
        return mixture.view(*lead, self.d_model)
