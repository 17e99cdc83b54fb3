"""Optimiser surgery: per-slot optimiser state that follows structural edits, without rebuilding anything.

`OptimizerSurgery(optimizer, banks)` is attached once; every operation given `optimizer=surgery` then
- zeroes every parameter-shaped state tensor (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`,
  `momentum_buffer`, ...) of the slots it unmasks or masks (per-expert modules: the whole state entry is
  dropped, so the optimiser starts that expert at its own step 1), and leaves every other slice untouched;
- for Adam/AdamW, disarms the **step-count trap**: a stacked parameter has one `step` for all its slots, so
  a fresh slice with zero moments at step t >> 1 would move by ~ lr (1-beta1)/sqrt(1-beta2) ~ 3.2 lr on its
  first update. A step pre-hook seeds, for every element of a fresh slice whose `exp_avg_sq` is still 0,
  `exp_avg = g (1 - beta1^(t-1))` and `exp_avg_sq = g^2 (1 - beta2^(t-1))` from its first gradient g, which
  makes the bias-corrected moments exactly g and g^2: the update is Adam's own first update,
  `lr * g / (|g| + eps)`, at most lr per element (an emulated per-slot step count). Elements with g = 0 stay
  unseeded and are seeded at their first nonzero gradient, for `seed_steps` optimiser steps after the edit;
- holds masked slots at zero: masked slots hold zero weights with zero optimiser state (prune and merge
  park the weights in the archive, zero the slot and its state; slots masked when the surgery is attached
  are zeroed then: park anything you want to keep first). A step pre-hook zero-fills the masked slices of
  the gradients (per-expert modules: drops their gradient). Zero weight, zero state and zero gradient is a
  fixed point of Adam, AdamW (decay multiplies 0), SGD with momentum/Nesterov/decay, fused or not, so the
  masked slots stay exactly zero whatever else produced gradients for them. The hook costs one
  `index_fill_` per stacked gradient over the masked slots only (a third of zeroing weights and moments
  after the step); the masked index is recomputed only when a mask tensor changes (its version counter),
  so the per-step path has no host synchronisation.
Parameters are never reallocated and the optimiser is never rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adapters import LayerBanks, ParamSlots
from ..config import SurgeryConfig
from .record import EditError, EditRecord


def state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> list[Tensor]:
    """The parameter-shaped tensors of `param`'s optimiser state (moments, momentum; not `step`)."""
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, Tensor) and v.shape == param.shape]


@torch.no_grad()
def reset_slot_state(optimizer: torch.optim.Optimizer, rows: Sequence[ParamSlots], slots: Sequence[int]) -> None:
    """Fresh optimiser state for `slots`: zero their slices of stacked parameters' state tensors; drop the
    state of per-slot parameters (the optimiser re-initialises it at its next step)."""
    for row in rows:
        if row.expert_dim is not None:
            for tensor in state_tensors(optimizer, row.param):
                for slot in slots:
                    tensor.select(row.expert_dim, slot).zero_()
        elif row.slot in slots:
            optimizer.state.pop(row.param, None)


def adam_first_step_seed(grad: Tensor, step: Tensor | float, beta1: Any, beta2: Any) -> tuple[Tensor, Tensor]:
    """`(exp_avg, exp_avg_sq)` that make Adam's next update (at step `step + 1`) equal its first update,
    `lr * g / (|g| + eps)`: the bias-corrected moments become exactly g and g^2."""
    return grad * (1 - beta1**step), grad.square() * (1 - beta2**step)


@dataclass
class _Pending:
    param: Tensor
    group: dict[str, Any]
    dim: int
    slot: int
    steps_left: int


class OptimizerSurgery:
    """Keeps `optimizer`'s state in step with edits on the layers of `banks` (see the module docstring).

    `seed_steps`: optimiser steps after an edit during which unseeded elements of a fresh slice are seeded
    (Adam/AdamW only). `freeze_masked`: zero the masked slots now and their gradients before every step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        banks: Sequence[LayerBanks],
        *,
        seed_steps: int = SurgeryConfig().seed_steps,
        freeze_masked: bool = True,
    ) -> None:
        if isinstance(seed_steps, bool) or not isinstance(seed_steps, int) or seed_steps < 1:
            raise ValueError(f"seed_steps={seed_steps!r} is invalid: expected an integer >= 1")
        self.optimizer = optimizer
        self.banks = list(banks)
        self.seed_steps = seed_steps
        self._seeds_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        self._pending: list[_Pending] = []
        self._masked: dict[int, tuple[int, Tensor, list[int]]] = {}  # bank index -> (mask version, idx, slots)
        self.freeze_masked = freeze_masked
        self._handles = [optimizer.register_step_pre_hook(self._pre_step)]
        if freeze_masked:
            self.hold_masked()

    # ------------------------------------------------------------------ persistence
    def _param_order(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The pending first-step seeds, keyed by parameter order index (as `torch.optim` keys its state), so
        they survive re-creating the optimiser: `{"pending": [[param_index, slot, steps_left], ...]}`."""
        index = {id(p): i for i, p in enumerate(self._param_order())}
        return {"pending": [[index[id(p.param)], p.slot, p.steps_left] for p in self._pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. Validated first (ValueError naming the entry); on error nothing changes."""
        params = self._param_order()
        groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        stacked = {id(r.param): r for b in self.banks for r in b.param_slots() if r.expert_dim is not None}
        rows = state.get("pending") if isinstance(state, Mapping) else None
        if not isinstance(rows, list):
            raise ValueError(f"optimizer-surgery state {state!r} is invalid: expected {{'pending': [...]}}")
        restored = []
        for entry in rows:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                raise ValueError(f"optimizer-surgery entry {entry!r} is invalid: expected [param_index, slot, steps]")
            i, slot, left = (int(x) for x in entry)
            if not 0 <= i < len(params) or id(params[i]) not in stacked:
                raise ValueError(
                    f"optimizer-surgery entry {list(entry)} names parameter {i}; expected the index of a stacked "
                    f"expert or router parameter among the optimiser's {len(params)} parameters"
                )
            row = stacked[id(params[i])]
            assert row.expert_dim is not None
            if not 0 <= slot < row.param.shape[row.expert_dim] or left < 1:
                raise ValueError(f"optimizer-surgery entry {list(entry)} has slot {slot} / steps {left} out of range")
            restored.append(_Pending(row.param, groups[id(row.param)], row.expert_dim, slot, left))
        self._pending = restored

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check(self, banks: LayerBanks) -> None:
        if not any(b.active_mask is banks.active_mask for b in self.banks):
            raise EditError("these banks are not attached to the OptimizerSurgery: pass them at construction")

    def apply(self, banks: LayerBanks, record: EditRecord) -> None:
        """Fresh state for `record.fresh_slots` (seeded at their first gradient) and `record.parked_slots`."""
        self.check(banks)
        index = next(i for i, b in enumerate(self.banks) if b.active_mask is banks.active_mask)
        self._masked_slots(index, banks)  # refresh the masked-slot cache now, not in the next step
        rows = banks.param_slots()
        touched = set(record.fresh_slots) | set(record.parked_slots)
        ids = {id(r.param) for r in rows}
        self._pending = [p for p in self._pending if not (id(p.param) in ids and p.slot in touched)]
        reset_slot_state(self.optimizer, rows, sorted(touched))
        if self._seeds_adam:
            groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
            self._pending += [
                _Pending(r.param, groups[id(r.param)], r.expert_dim, slot, self.seed_steps)
                for r in rows
                if r.expert_dim is not None and id(r.param) in groups
                for slot in record.fresh_slots
            ]

    # ------------------------------------------------------------------ hooks

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.freeze_masked:
            self.drop_masked_grads()
        self.seed_fresh()

    @torch.no_grad()
    def seed_fresh(self) -> None:
        """Seed the Adam moments of fresh slices from their gradients (what the pre-step hook runs)."""
        optimizer = self.optimizer
        for pending in self._pending:
            param, grad = pending.param, pending.param.grad
            state, group = optimizer.state.get(param), pending.group
            if grad is None or not state or "exp_avg_sq" not in state:
                continue  # no update this step, or Adam initialises the state itself at its step 1
            pending.steps_left -= 1
            g = grad.select(pending.dim, pending.slot)
            if group.get("maximize", False):
                g = -g
            beta1, beta2 = group["betas"]
            m_seed, v_seed = adam_first_step_seed(g.float(), state["step"], beta1, beta2)
            exp_avg = state["exp_avg"].select(pending.dim, pending.slot)
            exp_avg_sq = state["exp_avg_sq"].select(pending.dim, pending.slot)
            unseeded = exp_avg_sq == 0
            exp_avg.copy_(torch.where(unseeded, m_seed.to(exp_avg.dtype), exp_avg))
            exp_avg_sq.copy_(torch.where(unseeded, v_seed.to(exp_avg_sq.dtype), exp_avg_sq))
            if "max_exp_avg_sq" in state:
                max_sq = state["max_exp_avg_sq"].select(pending.dim, pending.slot)
                max_sq.copy_(torch.where(max_sq == 0, exp_avg_sq, max_sq))
        self._pending = [p for p in self._pending if p.steps_left > 0]

    def _masked_slots(self, i: int, banks: LayerBanks) -> tuple[Tensor, list[int]]:
        mask = banks.active_mask
        cached = self._masked.get(i)
        if cached is None or cached[0] != mask._version:
            slots = (~mask).nonzero().flatten()
            cached = (mask._version, slots, slots.tolist())
            self._masked[i] = cached
        return cached[1], cached[2]

    def _masked_rows(self) -> Iterator[tuple[Tensor, int | None, Tensor | None]]:
        """(param, expert_dim, masked slot index) for stacked parameters with masked slots; (param, None,
        None) for a per-slot parameter whose slot is masked. The index is recomputed only when a mask tensor
        changed (its version counter)."""
        for i, banks in enumerate(self.banks):
            index, slots = self._masked_slots(i, banks)
            if not slots:
                continue
            for row in banks.param_slots():
                if row.expert_dim is not None:
                    yield row.param, row.expert_dim, index.to(row.param.device)
                elif row.slot in slots:
                    yield row.param, None, None

    @torch.no_grad()
    def drop_masked_grads(self) -> None:
        """Zero the masked slices of the gradients (per-expert modules: drop the gradient), so the optimiser
        step keeps zero slots with zero state exactly at zero (what the pre-step hook runs)."""
        for param, dim, index in self._masked_rows():
            if param.grad is None:
                continue
            if dim is None or index is None:
                param.grad = None
            else:
                param.grad.index_fill_(dim, index, 0)

    @torch.no_grad()
    def hold_masked(self) -> None:
        """Zero the masked slots' weights and optimiser-state slices (run at attach; run it again after loading
        an optimiser or model state by hand)."""
        whole: list[Tensor] = []
        for param, dim, index in self._masked_rows():
            tensors = [param, *state_tensors(self.optimizer, param)]
            if dim is None or index is None:
                whole += tensors
            else:
                for tensor in tensors:
                    tensor.index_fill_(dim, index, 0)
        if whole:
            torch._foreach_zero_(whole)
