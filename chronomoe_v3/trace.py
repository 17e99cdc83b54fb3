"""MoETrace: what one MoE layer's forward yields, in one tensor-first form, and its constructors.

A trace holds, for T tokens routed top-K over E expert slots of width H:
`topk_index [T,K]`, `topk_weight [T,K]`, `expert_out [T,K,H]` (each slot's output *before* gate
weighting), `slot_mask [T,K]` (False where capacity dropped the slot), `token_mask [T]` (False for
padding), and optionally the layer's `mixture [T,H]`, router logits and `router_input [T,H_r]` (what the
router read: the bimodality detector keeps per-role means of it, so that a split can separate the roles).
Three constructors turn the common MoE implementations into it: a Mixtral-style per-expert loop, a
Switch-style `[E,C,H]` capacity dispatch, and a fused per-slot output (transformers 5.x experts, and ChronoMoELayer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .routing import BridgeReport


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensors(**tensors: object) -> None:
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} is a {type(value).__name__}; expected a torch.Tensor")


def _check_index(name: str, idx: Tensor) -> None:
    if idx.dim() != 2:
        raise ValueError(f"{name} has shape {_shape(idx)}; expected [T, K]")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} has dtype {idx.dtype}; expected an integer dtype")


@dataclass
class Dispatch:
    """A layer's expert-sorted layout of one forward, as a grouped-matmul MoE computes it anyway (optional in a
    trace; `ChronoMoELayer` supplies it). N = T*K token-slots:

    `order [N]` int64: the token-slot indices `t*K + k` sorted by expert (slots of no expert last);
    `offsets [E]` int32: the cumulative group ends (expert e's rows are `[offsets[e-1], offsets[e])`);
    `rows [N, H]`: the unweighted expert outputs in that order (rows past `offsets[-1]` are never read).

    With it, the per-expert sums are one grouped product over each expert's own rows
    (`observe.stats.compute_expert_stats`), instead of a one-hot product over every row for every expert.
    """

    order: Tensor
    offsets: Tensor
    rows: Tensor


@dataclass
class MoETrace:
    """One layer's routing and unweighted expert outputs for one forward pass."""

    topk_index: Tensor
    topk_weight: Tensor
    expert_out: Tensor
    num_experts: int
    slot_mask: Tensor | None = None
    token_mask: Tensor | None = None
    mixture: Tensor | None = None
    router_logits_clean: Tensor | None = None
    router_logits_biased: Tensor | None = None
    layer_id: int | None = None
    bridge: BridgeReport | None = None  # overlap safety of the slow bias, when the layer routes with one
    router_input: Tensor | None = None  # [T, H_r] what the router read for each token (optional)
    dispatch: Dispatch | None = None  # the layer's expert-sorted layout (optional; faster statistics)

    @property
    def num_tokens(self) -> int:
        return int(self.topk_index.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_index.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.expert_out.shape[-1])

    def kept_slots(self) -> Tensor:
        """[T,K] bool: slots whose output was computed and whose token is not padding.

        Skip rule: a slot whose expert id is outside [0, num_experts) (possible only in a trace built without
        value checks) is not kept, so no statistic ever indexes out of range (no host sync)."""
        idx = self.topk_index
        keep = (idx >= 0) & (idx < self.num_experts)
        if self.slot_mask is not None:
            keep = keep & self.slot_mask
        if self.token_mask is not None:
            keep = keep & self.token_mask.unsqueeze(1)
        return keep

    def validate(self, check_values: bool = True) -> MoETrace:
        """Check shapes and dtypes (free); with `check_values`, also index ranges and empty / all-padding
        batches, which reads device values (a host sync: done by the public constructors, not in the
        per-step observe path, where an all-padding batch simply measures nothing)."""
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r} is invalid: expected an integer >= 1")
        _check_tensors(topk_index=self.topk_index, topk_weight=self.topk_weight, expert_out=self.expert_out)
        for name in ("slot_mask", "token_mask", "mixture", "router_logits_clean", "router_logits_biased",
                     "router_input"):
            value = getattr(self, name)
            if value is not None:
                _check_tensors(**{name: value})
        idx, w, y = self.topk_index, self.topk_weight, self.expert_out
        _check_index("topk_index", idx)
        t, k = idx.shape
        if t == 0:
            raise ValueError("empty batch: the trace has T=0 tokens; expected at least one token")
        if k == 0:
            raise ValueError("topk_index has K=0 slots per token; expected K >= 1")
        if _shape(w) != (t, k):
            raise ValueError(f"topk_weight has shape {_shape(w)}; expected {(t, k)} to match topk_index")
        if not w.is_floating_point():
            raise ValueError(f"topk_weight has dtype {w.dtype}; expected a floating dtype")
        if y.dim() != 3 or _shape(y)[:2] != (t, k):
            raise ValueError(f"expert_out has shape {_shape(y)}; expected [T, K, H] = [{t}, {k}, H]")
        if not y.is_floating_point():
            raise ValueError(f"expert_out has dtype {y.dtype}; expected a floating dtype")
        h = y.shape[2]
        for name, dev in (("topk_weight", w.device), ("expert_out", y.device)):
            if dev != idx.device:
                raise ValueError(f"{name} is on {dev}; expected the device of topk_index ({idx.device})")
        if self.slot_mask is not None and (_shape(self.slot_mask) != (t, k) or self.slot_mask.dtype != torch.bool):
            raise ValueError(
                f"slot_mask has shape {_shape(self.slot_mask)} and dtype {self.slot_mask.dtype}; "
                f"expected {(t, k)} bool"
            )
        if self.token_mask is not None and (
            _shape(self.token_mask) != (t,) or self.token_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"token_mask has shape {_shape(self.token_mask)} and dtype {self.token_mask.dtype}; "
                f"expected ({t},) bool (True = real token, False = padding)"
            )
        if self.mixture is not None and _shape(self.mixture) != (t, h):
            raise ValueError(f"mixture has shape {_shape(self.mixture)}; expected {(t, h)}")
        for name in ("router_logits_clean", "router_logits_biased"):
            z = getattr(self, name)
            if z is not None and _shape(z) != (t, self.num_experts):
                raise ValueError(f"{name} has shape {_shape(z)}; expected {(t, self.num_experts)}")
        if self.router_input is not None and (self.router_input.dim() != 2 or self.router_input.shape[0] != t):
            raise ValueError(f"router_input has shape {_shape(self.router_input)}; expected [{t}, H_r]")
        for name in ("mixture", "router_logits_clean", "router_logits_biased", "router_input"):
            value = getattr(self, name)
            if value is None:
                continue
            if not value.is_floating_point():
                raise ValueError(f"{name} has dtype {value.dtype}; expected a floating dtype")
            if value.device != idx.device:
                raise ValueError(f"{name} is on {value.device}; expected the device of topk_index ({idx.device})")
        for name in ("slot_mask", "token_mask"):
            value = getattr(self, name)
            if value is not None and value.device != idx.device:
                raise ValueError(f"{name} is on {value.device}; expected the device of topk_index ({idx.device})")
        if self.dispatch is not None:
            self._check_dispatch(self.dispatch, t * k, h, idx.device)
        if check_values:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_experts:
                raise ValueError(
                    f"topk_index holds expert ids in [{lo}, {hi}]; expected ids in [0, {self.num_experts - 1}]"
                )
            if self.token_mask is not None and not bool(self.token_mask.any()):
                raise ValueError(f"all-padding batch: token_mask marks none of the {t} tokens as real")
        return self

    def _check_dispatch(self, d: Dispatch, n: int, h: int, device: torch.device) -> None:
        if not isinstance(d, Dispatch):
            raise ValueError(f"dispatch is a {type(d).__name__}; expected a Dispatch or None")
        _check_tensors(order=d.order, offsets=d.offsets, rows=d.rows)
        if _shape(d.order) != (n,) or d.order.dtype != torch.int64:
            raise ValueError(
                f"dispatch.order has shape {_shape(d.order)} and dtype {d.order.dtype}; expected ({n},) int64"
            )
        if _shape(d.offsets) != (self.num_experts,) or d.offsets.dtype != torch.int32:
            raise ValueError(
                f"dispatch.offsets has shape {_shape(d.offsets)} and dtype {d.offsets.dtype}; "
                f"expected ({self.num_experts},) int32"
            )
        if _shape(d.rows) != (n, h) or d.rows.dtype != self.expert_out.dtype:
            raise ValueError(
                f"dispatch.rows has shape {_shape(d.rows)} and dtype {d.rows.dtype}; expected {(n, h)} "
                f"{self.expert_out.dtype} (expert_out's dtype)"
            )
        for name, value in (("order", d.order), ("offsets", d.offsets), ("rows", d.rows)):
            if value.device != device:
                raise ValueError(f"dispatch.{name} is on {value.device}; expected the device of topk_index ({device})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_fused(
        cls,
        topk_index: Tensor,
        topk_weight: Tensor,
        expert_out: Tensor,
        num_experts: int,
        *,
        slot_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
        mixture: Tensor | None = None,
        router_logits_clean: Tensor | None = None,
        router_logits_biased: Tensor | None = None,
        layer_id: int | None = None,
        check_values: bool = True,
    ) -> MoETrace:
        """From per-slot unweighted outputs: `expert_out [T,K,H]` or `[T*K,H]` (one row per token and slot,
        slot-major within a token, as a transformers 5.x fused-experts call returns after the
        repeat-interleave pre-hook)."""
        _check_tensors(topk_index=topk_index, topk_weight=topk_weight, expert_out=expert_out)
        if expert_out.dim() == 2 and topk_index.dim() == 2:
            t, k = topk_index.shape
            if expert_out.shape[0] != t * k:
                raise ValueError(
                    f"expert_out has shape {_shape(expert_out)}; expected [T*K, H] with T*K={t * k}"
                )
            expert_out = expert_out.reshape(t, k, expert_out.shape[-1])
        return cls(
            topk_index=topk_index,
            topk_weight=topk_weight,
            expert_out=expert_out,
            num_experts=num_experts,
            slot_mask=slot_mask,
            token_mask=token_mask,
            mixture=mixture,
            router_logits_clean=router_logits_clean,
            router_logits_biased=router_logits_biased,
            layer_id=layer_id,
        ).validate(check_values)

    @classmethod
    def from_expert_loop(
        cls,
        topk_index: Tensor,
        topk_weight: Tensor,
        token_indices: Sequence[Tensor],
        outputs: Sequence[Tensor],
        *,
        token_mask: Tensor | None = None,
        mixture: Tensor | None = None,
        layer_id: int | None = None,
        check_values: bool = True,
    ) -> MoETrace:
        """From a Mixtral-style loop: expert `e` saw rows `token_indices[e]` ([n_e] token ids) and produced
        `outputs[e]` ([n_e, H], unweighted). Slots of a token that no expert reports are treated as dropped.

        The per-expert lists are concatenated once; slot positions are recovered with tensor ops.
        """
        _check_tensors(topk_index=topk_index, topk_weight=topk_weight)
        if len(token_indices) != len(outputs):
            raise ValueError(
                f"token_indices has {len(token_indices)} entries and outputs {len(outputs)}; expected one "
                "entry per expert in each"
            )
        num_experts = len(outputs)
        if num_experts == 0:
            raise ValueError("from_expert_loop got no experts; expected one (token_indices, outputs) per expert")
        _check_index("topk_index", topk_index)
        for e, (ti, out) in enumerate(zip(token_indices, outputs, strict=True)):
            if not isinstance(ti, Tensor) or not isinstance(out, Tensor):
                raise ValueError(
                    f"expert {e}: token_indices and outputs are {type(ti).__name__} and {type(out).__name__}; "
                    "expected tensors"
                )
            if ti.dim() != 1 or out.dim() != 2 or out.shape[0] != ti.shape[0]:
                raise ValueError(
                    f"expert {e}: token_indices has shape {_shape(ti)} and outputs {_shape(out)}; expected "
                    "[n_e] and [n_e, H]"
                )
            if ti.is_floating_point() or ti.is_complex() or ti.dtype == torch.bool:
                raise ValueError(f"expert {e}: token_indices has dtype {ti.dtype}; expected an integer dtype")
            if not out.is_floating_point():
                raise ValueError(f"expert {e}: outputs has dtype {out.dtype}; expected a floating dtype")
        t, k = topk_index.shape
        if t == 0:
            raise ValueError("empty batch: topk_index has T=0 tokens; expected at least one token")
        h = outputs[0].shape[1]
        for e, out in enumerate(outputs):
            if out.shape[1] != h:
                raise ValueError(f"expert {e}: outputs has width {out.shape[1]}; expected H={h} (expert 0's width)")
            if out.dtype != outputs[0].dtype:
                raise ValueError(f"expert {e}: outputs has dtype {out.dtype}; expected {outputs[0].dtype} (expert 0's)")
            if out.device != topk_index.device:
                raise ValueError(
                    f"expert {e}: outputs is on {out.device}; expected the device of topk_index ({topk_index.device})"
                )
        device = topk_index.device
        tok = torch.cat([ti.to(device=device, dtype=torch.long) for ti in token_indices])
        rows = torch.cat(list(outputs))
        lengths = torch.tensor([ti.shape[0] for ti in token_indices], device=device)
        eid = torch.repeat_interleave(torch.arange(num_experts, device=device), lengths)
        if check_values and tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= t):
            raise ValueError(f"token_indices hold ids in [{int(tok.min())}, {int(tok.max())}]; expected [0, {t - 1}]")
        match = topk_index.to(torch.long)[tok] == eid.unsqueeze(1)  # [R, K]
        if check_values and tok.numel() and not bool(match.any(1).all()):
            raise ValueError("from_expert_loop: some expert saw a token that did not select it in topk_index")
        slot = match.to(torch.int8).argmax(1)
        expert_out = rows.new_zeros(t, k, h)
        expert_out[tok, slot] = rows
        slot_mask = torch.zeros(t, k, dtype=torch.bool, device=device)
        slot_mask[tok, slot] = True
        return cls(
            topk_index=topk_index,
            topk_weight=topk_weight,
            expert_out=expert_out,
            num_experts=num_experts,
            slot_mask=slot_mask,
            token_mask=token_mask,
            mixture=mixture,
            layer_id=layer_id,
        ).validate(check_values)

    @classmethod
    def from_capacity_dispatch(
        cls,
        topk_index: Tensor,
        topk_weight: Tensor,
        dispatch_mask: Tensor,
        expert_out: Tensor,
        *,
        token_mask: Tensor | None = None,
        mixture: Tensor | None = None,
        layer_id: int | None = None,
        check_values: bool = True,
    ) -> MoETrace:
        """From a Switch/GShard-style dispatch: `dispatch_mask [T,E,C]` (token t sits in buffer slot c of
        expert e) and `expert_out [E,C,H]` (unweighted). A chosen (token, expert) pair absent from the
        dispatch was dropped by capacity. Gather-only: no host sync (with `check_values=False`, a pair whose
        expert id is out of range is treated as dropped instead of being checked)."""
        _check_tensors(topk_index=topk_index, topk_weight=topk_weight, dispatch_mask=dispatch_mask,
                       expert_out=expert_out)
        if dispatch_mask.dim() != 3 or expert_out.dim() != 3:
            raise ValueError(
                f"dispatch_mask has shape {_shape(dispatch_mask)} and expert_out {_shape(expert_out)}; "
                "expected [T, E, C] and [E, C, H]"
            )
        t, e, c = dispatch_mask.shape
        if _shape(expert_out)[:2] != (e, c):
            raise ValueError(f"expert_out has shape {_shape(expert_out)}; expected [{e}, {c}, H]")
        _check_index("topk_index", topk_index)
        if topk_index.shape[0] != t:
            raise ValueError(f"topk_index has shape {_shape(topk_index)}; expected [{t}, K] (T of dispatch_mask)")
        if t == 0 or topk_index.shape[1] == 0 or e == 0 or c == 0:
            raise ValueError(
                f"dispatch_mask has shape {_shape(dispatch_mask)} and topk_index {_shape(topk_index)}; expected "
                "T >= 1 tokens, K >= 1 slots, E >= 1 experts and C >= 1 buffer slots"
            )
        if dispatch_mask.is_complex():
            raise ValueError(f"dispatch_mask has dtype {dispatch_mask.dtype}; expected a bool (or 0/1) mask")
        for name, value in (("topk_index", topk_index), ("dispatch_mask", dispatch_mask)):
            if value.device != expert_out.device:
                raise ValueError(
                    f"{name} is on {value.device}; expected the device of expert_out ({expert_out.device})"
                )
        idx = topk_index.to(torch.long)
        if check_values and (int(idx.min()) < 0 or int(idx.max()) >= e):
            raise ValueError(f"topk_index holds ids in [{int(idx.min())}, {int(idx.max())}]; expected [0, {e - 1}]")
        in_range = (idx >= 0) & (idx < e)
        safe = torch.where(in_range, idx, torch.zeros_like(idx))  # gathers stay in bounds; dropped below
        k = idx.shape[1]
        tok = torch.arange(t, device=idx.device).unsqueeze(1).expand(t, k)
        rows = dispatch_mask.bool()[tok, safe]  # [T, K, C]
        kept = rows.any(-1) & in_range
        pos = rows.to(torch.int8).argmax(-1)
        out = expert_out[safe, pos]  # [T, K, H]
        out = torch.where(kept.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return cls(
            topk_index=topk_index,
            topk_weight=topk_weight,
            expert_out=out,
            num_experts=e,
            slot_mask=kept,
            token_mask=token_mask,
            mixture=mixture,
            layer_id=layer_id,
        ).validate(check_values)
