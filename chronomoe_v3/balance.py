"""The load balancers MoE users already run, so that chronomoe can be attached beside them (or compared with).

Two standard ways to keep a router from collapsing onto a few experts:

- **Auxiliary load-balancing loss** (Switch Transformer / GShard form), added to the training loss:
  `L_aux = n * sum_e f_e * P_e` over the n active experts, with `f_e` the fraction of dispatched (token,
  slot) pairs that went to e (a count, no gradient) and `P_e` the mean router probability of e over the
  tokens (differentiable). It is 1 when routing is uniform and grows to n when one expert takes everything;
  its gradient pushes probability away from over-used experts. (transformers' `load_balancing_loss_func`
  counts top-k dispatches without dividing by k, so its value is `k` times this one.)
- **Auxiliary-loss-free balancing** (DeepSeek-V3; Wang et al. 2024): a per-expert bias `b_e` added to the
  router scores that choose the top-k, and to nothing else (gate weights come from the unbiased scores).
  After each optimiser step, `b_e <- b_e + u * sign(mean_load - load_e)` over the active experts, with
  `load_e` the tokens e received since the previous update and `u` the rate (1e-3 by default): under-used
  experts are favoured a little more, over-used ones a little less. No gradient is involved.

With `ChronoMoELayer` / `TinyMoELM` both work without wrappers:

    model = TinyMoELM(vocab, aux_loss_coef=0.01)          # model.loss() adds coef * mean layer L_aux
    balancer = AuxLossFreeBalancer(model, optimizer=opt)   # bias updated after every opt.step()

Both compose with `ChronoSystem`: the aux loss is taken over the active (unmasked) experts, the balancer's
bias only moves selection (beta keeps its own mode and its bridge detector), and structural edits give a
new expert the mean bias of the layer's live experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

DEFAULT_RATE = 1e-3


def load_balancing_loss(
    router_probs: Tensor,
    topk_index: Tensor,
    active_mask: Tensor | None = None,
    *,
    slot_mask: Tensor | None = None,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Switch/GShard load-balancing loss `n * sum_e f_e * P_e` (a scalar, differentiable through `router_probs`).

    `router_probs [T, E]`: the router softmax over the active experts (rows sum to 1; inactive slots 0).
    `topk_index [T, K]`: the selected experts. `active_mask [E]` bool: the n experts in play (default all).
    `slot_mask [T, K]` bool: dispatched slots (False where capacity dropped one); `token_mask [T]` bool:
    real tokens (padding excluded from both f and P). `f_e` = share of the counted (token, slot) pairs that
    went to e; `P_e` = mean of `router_probs[:, e]` over real tokens. Uniform routing gives 1; everything
    on one expert gives n. With no real token the loss is 0.
    """
    if router_probs.dim() != 2:
        raise ValueError(f"router_probs has shape {tuple(router_probs.shape)}; expected [T, E]")
    t, e = router_probs.shape
    if topk_index.dim() != 2 or topk_index.shape[0] != t:
        raise ValueError(f"topk_index has shape {tuple(topk_index.shape)}; expected [{t}, K]")
    if active_mask is not None and (tuple(active_mask.shape) != (e,) or active_mask.dtype != torch.bool):
        raise ValueError(
            f"active_mask has shape {tuple(active_mask.shape)} and dtype {active_mask.dtype}; expected ({e},) bool"
        )
    if slot_mask is not None and (slot_mask.shape != topk_index.shape or slot_mask.dtype != torch.bool):
        raise ValueError(
            f"slot_mask has shape {tuple(slot_mask.shape)} and dtype {slot_mask.dtype}; expected "
            f"{tuple(topk_index.shape)} bool"
        )
    if token_mask is not None and (tuple(token_mask.shape) != (t,) or token_mask.dtype != torch.bool):
        raise ValueError(
            f"token_mask has shape {tuple(token_mask.shape)} and dtype {token_mask.dtype}; expected ({t},) bool"
        )
    probs = router_probs.float()
    keep = torch.ones_like(topk_index, dtype=torch.bool) if slot_mask is None else slot_mask
    real = torch.ones(t, dtype=torch.bool, device=probs.device) if token_mask is None else token_mask
    keep = keep & real.unsqueeze(1)
    index = topk_index.to(torch.long)
    counts = torch.zeros(e + 1, device=probs.device).index_add_(
        0, torch.where(keep, index, torch.full_like(index, e)).reshape(-1), keep.reshape(-1).float()
    )[:e]
    f = counts / counts.sum().clamp_min(1.0)
    weights = real.float()
    p = (probs * weights.unsqueeze(1)).sum(0) / weights.sum().clamp_min(1.0)
    if active_mask is None:
        n = torch.tensor(float(e), device=probs.device)
    else:
        n = active_mask.to(probs.device).sum().float()
        p = p * active_mask.to(probs.device)
    return n * (f.detach() * p).sum()


def aux_free_bias_update(bias: Tensor, load: Tensor, active_mask: Tensor | None = None, *, rate: float) -> Tensor:
    """One aux-loss-free step: `b_e + rate * sign(mean_load - load_e)` for active experts (a new fp32 `[E]`).

    `bias [E]`, `load [E]` (tokens each expert received since the last update; any numeric dtype),
    `active_mask [E]` bool (inactive slots keep their bias; the mean is over active ones). An expert exactly
    at the mean, or a window with no tokens, leaves the bias unchanged. Tensor ops only (no host sync).

    Skip rule: an expert whose load is non-finite (or negative: not a count) is left out of the mean and
    keeps its bias; an entry whose new bias would be non-finite keeps its old value, so the bias stays finite.
    """
    if bias.dim() != 1:
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected [E]")
    e = bias.shape[0]
    if tuple(load.shape) != (e,):
        raise ValueError(f"load has shape {tuple(load.shape)}; expected ({e},)")
    if active_mask is not None and (tuple(active_mask.shape) != (e,) or active_mask.dtype != torch.bool):
        raise ValueError(
            f"active_mask has shape {tuple(active_mask.shape)} and dtype {active_mask.dtype}; expected ({e},) bool"
        )
    check_rate(rate)
    active = torch.ones(e, dtype=torch.bool, device=bias.device) if active_mask is None else active_mask.to(bias.device)
    # fp64 for the comparison with the mean: exact for integer counts up to 2**53, and no fp32 overflow.
    lf = load.to(device=bias.device, dtype=torch.float64)
    usable = active & torch.isfinite(lf) & (lf >= 0)
    lu = torch.where(usable, lf, torch.zeros_like(lf))
    mean = lu.sum() / usable.sum().clamp_min(1).to(torch.float64)
    step = rate * torch.sign(mean - lu).to(torch.float32)
    b = bias.float()
    new = b + step
    return torch.where(usable & torch.isfinite(new), new, b)


def check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate={rate!r} is invalid: expected a finite number > 0")
    return float(rate)


def moe_layers_with(model: nn.Module, attribute: str) -> list[nn.Module]:
    """The submodules of `model` (itself included) that have `attribute` (e.g. `enable_expert_bias`)."""
    return [m for m in model.modules() if callable(getattr(m, attribute, None))]


def aux_loss(model: nn.Module) -> Tensor:
    """The mean of the aux losses of `model`'s MoE layers from their last training forward (0 when none
    computed one: eval mode, or layers built without `compute_aux_loss`)."""
    losses: list[Tensor] = []
    for m in model.modules():
        value = getattr(m, "aux_loss", None)
        if isinstance(value, Tensor):
            losses.append(value)
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack([loss.float() for loss in losses]).mean()


@torch.no_grad()
def reset_expert_bias(
    bias: Tensor,
    active_mask: Tensor,
    fresh_slots: Sequence[int],
    parked_slots: Sequence[int],
    inherit_from: int | None = None,
) -> None:
    """After a structural edit, in place on an aux-loss-free bias `[E]`: slots that start a new expert take
    the bias of slot `inherit_from` (a split sibling, which shares the parent's routing) or else the mean
    bias of the layer's other live experts (neither favoured nor held back); masked slots return to 0."""
    active = active_mask.to(bias.device).clone()
    fresh = torch.zeros_like(active)
    fresh[list(fresh_slots)] = True
    others = active & ~fresh
    if inherit_from is not None:
        start = bias[inherit_from].clone()
    else:
        start = torch.where(others, bias, torch.zeros_like(bias)).sum() / others.sum().clamp_min(1).float()
    bias.copy_(torch.where(fresh, start, bias))
    if parked_slots:
        bias[list(parked_slots)] = 0.0


class AuxLossFreeBalancer:
    """Aux-loss-free balancing for every MoE layer of a model (modules with `enable_expert_bias`, such as
    `ChronoMoELayer`).

    Each layer gets a persistent fp32 buffer `expert_bias [E]` (saved with the model's `state_dict`; zeros
    at first) that its router adds to the top-k scores only, and counts the tokens each expert receives in
    training forwards (`tokens_per_expert`, not saved). `step()` applies the sign rule and clears the counts;
    call it after each optimiser step, or pass `optimizer=` to have it run after every `optimizer.step()`.
    """

    def __init__(
        self, model: nn.Module, rate: float = DEFAULT_RATE, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        self.rate = check_rate(rate)
        self.layers: list[Any] = list(moe_layers_with(model, "enable_expert_bias"))
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no MoE layer with enable_expert_bias(); expected a model built from "
                "ChronoMoELayer"
            )
        for layer in self.layers:
            layer.enable_expert_bias()
        self._hook: RemovableHandle | None = None
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(lambda *_: self.step())

    @torch.no_grad()
    def step(self) -> None:
        """Apply the sign rule to every layer's bias from the tokens counted since the last call (the counts of
        slots an edit changed in between may be stale for one update; the sign rule tolerates it)."""
        for layer in self.layers:
            layer.expert_bias.copy_(
                aux_free_bias_update(layer.expert_bias, layer.tokens_per_expert, layer.active_mask, rate=self.rate)
            )
            layer.tokens_per_expert.zero_()

    def remove(self) -> None:
        """Stop updating after optimiser steps (the layers keep their biases)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
