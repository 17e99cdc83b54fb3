"""Shadow copies of expert weights, and the weight-jump detector that says when to restore one.

An expert whose weights jump (a corrupted update, a bad load, a bit flip, a divergent step) has not learnt
something new: it has lost what it knew. The best repair is its own weights from just before the jump. A
`ShadowBank` keeps, per layer, a copy of every slot's expert weights (on the host by default: memory equal to
the expert bank, off the accelerator) taken at `refresh()`, and a small fingerprint of them on the weights'
device:

- the **sketch** of a weight matrix `W` (a slot's slice, reshaped to `[a, b]`) is `s_j = u_j^T W v_j` for
  `m` fixed Gaussian probe pairs `(u_j, v_j)`; for any matrix `D`, `E[(u^T D v)^2] = ||D||_F^2`, so
  `||s(W) - s(W')|| / ||s(W')||` estimates the relative Frobenius distance `||W - W'|| / ||W'||` (relative
  error about `sqrt(2/m)`), for the cost of one batched matmul over the bank and `m (a + b)` floats per weight;
- `drift()` is that distance between the live weights and the shadow, per slot, over all of a slot's weights;
- `jumped(drift, active)` flags the slots whose drift exceeds an absolute floor (`jump_threshold`) and whose
  drift per training step since their copy exceeds `jump_ratio` times the median of the layer's active slots:
  training moves every expert of a layer at a similar relative rate; one that moved several times faster
  than its peers, by a sizeable fraction of its own norm, jumped. (Weights replaced by noise of the same
  norm sit at drift ~1.41.) The caller leaves out experts still cooling after an edit: a newborn moves fast.

`refresh(keep)` copies the live weights of the `keep` slots into the shadow (a jumped slot keeps its
pre-jump copy until it is restored or its jump is accepted). On CUDA the copy goes to pinned host memory with
`non_blocking=True` on the current stream, so the host never waits for it; it is ordered before later kernels
of that stream (the optimiser's update of the same weights included); `state_dict()` waits for it before
reading the copy on the host. `weights(slot)` returns the shadow copy of a slot in the bank's layout
(`ExpertBank.read` format), on the weights' device.

Nothing here runs per forward: `drift()` and `refresh()` run at `ChronoSystem.step()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapters import ExpertBank, ParamSlots

STORAGES = ("host", "device")


def _as_matrix(t: Tensor) -> Tensor:
    """A slot's slice as `[a, b]` (vectors as `[n, 1]`, scalars as `[1, 1]`)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1)


class ShadowBank:
    """Shadow copies and sketches of one layer's expert slots (see the module docstring).

    `bank`: the layer's expert bank (its `param_slots()` rows: stacked or per-slot parameters).
    `probes`: sketch probes per weight. `storage`: "host" (CPU memory, pinned on CUDA) or "device" (the
    weights' own device). `generator`: draws the probes (CPU generator; the same seed gives the same probes
    on every rank).
    """

    def __init__(
        self, bank: ExpertBank, *, probes: int = 16, storage: str = "host", generator: torch.Generator | None = None
    ) -> None:
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes={probes!r} is invalid: expected an integer >= 1")
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r} is invalid: expected one of {list(STORAGES)}")
        self.bank = bank
        self.rows: list[ParamSlots] = bank.param_slots()
        self.num_slots = bank.num_slots
        self.storage = storage
        self.probes = probes
        self._u: list[Tensor] = []
        self._v: list[Tensor] = []
        self._copies: list[Tensor] = []
        for row in self.rows:
            shape = self._slot_shape(row)
            a, b = _as_matrix(torch.empty(shape, device="meta")).shape
            device = row.param.device
            self._u.append(torch.randn(a, probes, generator=generator).to(device))
            self._v.append(torch.randn(b, probes, generator=generator).to(device))
            where = torch.device("cpu") if storage == "host" else device
            pin = storage == "host" and device.type == "cuda"
            self._copies.append(torch.zeros(row.param.shape, dtype=row.param.dtype, device=where, pin_memory=pin))
        device = self.rows[0].param.device
        #: sketch of the shadow, [E, rows * probes] fp32 on the weights' device
        self.sketch = torch.zeros(self.num_slots, len(self.rows) * probes, device=device)
        #: the step each slot's shadow was taken at (-1: never)
        self.taken = torch.full((self.num_slots,), -1, dtype=torch.int64)

    @staticmethod
    def _slot_shape(row: ParamSlots) -> torch.Size:
        if row.expert_dim is None:
            return row.param.shape
        shape = list(row.param.shape)
        del shape[row.expert_dim]
        return torch.Size(shape)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: the shadow copies (on the host or the device) and the probes and sketches (device)."""
        copies = sum(c.numel() * c.element_size() for c in self._copies)
        small = sum(t.numel() * t.element_size() for t in (*self._u, *self._v, self.sketch))
        return {"copies": copies, "probes_and_sketch": small}

    @torch.no_grad()
    def _follow(self) -> None:
        """Follow a move of the weights (`model.to(dtype or device)` after attaching): copies take the weights'
        dtype (and device, for "device" storage), probes and sketch the weights' device; nothing is forgotten."""
        device = self.rows[0].param.device
        for i, row in enumerate(self.rows):
            copy, param = self._copies[i], row.param
            where = torch.device("cpu") if self.storage == "host" else param.device
            if copy.dtype != param.dtype or copy.device != where:
                self._settle()
                pin = self.storage == "host" and param.device.type == "cuda"
                moved = torch.empty(param.shape, dtype=param.dtype, device=where, pin_memory=pin)
                moved.copy_(copy)
                self._copies[i] = moved
            if self._u[i].device != param.device:
                self._u[i], self._v[i] = self._u[i].to(param.device), self._v[i].to(param.device)
        if self.sketch.device != device:
            self.sketch = self.sketch.to(device)

    @torch.no_grad()
    def _row_sketch(self, i: int, row: ParamSlots, tensor: Tensor) -> Tensor:
        """[E, probes] sketch of `tensor` (shaped like `row.param`), slot by slot (per-slot row: 0 but its slot)."""
        u, v = self._u[i], self._v[i]
        if row.expert_dim is not None:
            stacked = tensor.movedim(row.expert_dim, 0)
            mats = stacked.reshape(stacked.shape[0], *_as_matrix(stacked[0]).shape)
            wv = torch.matmul(mats, v.to(mats.dtype)).float()  # [E, a, m]
            return (wv * u.unsqueeze(0)).sum(dim=1)
        out = torch.zeros(self.num_slots, self.probes, device=u.device)
        mat = _as_matrix(tensor)
        out[row.slot] = ((mat @ v.to(mat.dtype)).float() * u).sum(dim=0)
        return out

    @torch.no_grad()
    def live_sketch(self) -> Tensor:
        """[E, rows * probes] sketch of the live weights."""
        self._follow()
        return torch.cat([self._row_sketch(i, r, r.param.detach()) for i, r in enumerate(self.rows)], dim=1)

    @torch.no_grad()
    def drift(self, live: Tensor | None = None) -> Tensor:
        """Per slot, the estimated relative distance of the live weights from the shadow, `||W - S|| / ||S||`
        (fp32 on the weights' device; NaN for slots never shadowed or with a zero shadow)."""
        live = self.live_sketch() if live is None else live
        num = (live - self.sketch).norm(dim=1)
        den = self.sketch.norm(dim=1)
        never = (self.taken < 0).to(den.device)
        return torch.where(never | (den <= 0), torch.full_like(num, float("nan")), num / den.clamp_min(1e-30))

    @torch.no_grad()
    def jumped(
        self, drift: Tensor, active: Tensor, *, threshold: float, ratio: float, step: int | None = None
    ) -> Tensor:
        """Active slots whose drift exceeds `threshold` and whose drift *rate* exceeds `ratio` x the median rate
        of the active slots with a reading (bool, on `drift`'s device). The rate is the drift per training step
        since the slot's copy (`step` given; otherwise the drift itself): a copy kept since an earlier jump, or
        older than its peers', is not compared with fresher ones as if they were as old. Fewer than 3
        readings: nothing is flagged (no peers to compare)."""
        active = active.to(drift.device)
        ok = active & torch.isfinite(drift)
        n = int(ok.sum())
        if n < 3:
            return torch.zeros_like(ok)
        rate = drift
        if step is not None:
            age = (step - self.taken).clamp_min(1).to(drift.device, drift.dtype)
            rate = drift / age
        median = rate[ok].median()
        return ok & (drift > threshold) & (rate > ratio * median)

    @torch.no_grad()
    def refresh(self, keep: Tensor, step: int, live: Tensor | None = None) -> None:
        """Copy the live weights of the slots in `keep` (bool [E]) into the shadow, with their sketch."""
        keep_host = keep.detach().to("cpu", torch.bool)
        if not bool(keep_host.any()):
            return
        live = self.live_sketch() if live is None else live
        slots = keep_host.nonzero().flatten()
        everything = bool(keep_host.all())
        for row, copy in zip(self.rows, self._copies, strict=True):
            src = row.param.detach()
            non_blocking = copy.is_pinned()
            if row.expert_dim is None:
                if bool(keep_host[row.slot]):
                    copy.copy_(src, non_blocking=non_blocking)
            elif everything:
                copy.copy_(src, non_blocking=non_blocking)
            else:
                idx = slots.to(src.device)
                picked = src.index_select(row.expert_dim, idx)
                picked = picked.to(copy.device)  # blocking: the host reads it just below
                copy.index_copy_(row.expert_dim, slots.to(copy.device), picked)
        k = keep_host.to(self.sketch.device)
        self.sketch.copy_(torch.where(k.unsqueeze(1), live, self.sketch))
        self.taken[keep_host] = int(step)

    def forget(self, slots: Sequence[int]) -> None:
        """Mark `slots` as never shadowed (after an edit gave them other weights)."""
        for s in slots:
            self.taken[s] = -1

    @torch.no_grad()
    def weights(self, slot: int) -> dict[str, Tensor]:
        """The shadow copy of `slot`'s expert weights, keyed like `ExpertBank.read`, on the weights' device."""
        if not 0 <= slot < self.num_slots or int(self.taken[slot]) < 0:
            raise ValueError(f"slot {slot} has no shadow copy: expected a slot shadowed by refresh()")
        out: dict[str, Tensor] = {}
        for row, copy in zip(self.rows, self._copies, strict=True):
            if row.expert_dim is not None:
                out[row.name] = copy.select(row.expert_dim, slot).to(row.param.device).clone()
            elif row.slot == slot:
                out[row.name] = copy.to(row.param.device).clone()
        return out

    def _settle(self) -> None:
        """Wait for in-flight copies into pinned host memory before the host reads them."""
        device = self.rows[0].param.device
        if device.type == "cuda" and any(c.is_pinned() for c in self._copies):
            torch.cuda.current_stream(device).synchronize()

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {"copies": [c.clone() for c in self._copies], "sketch": self.sketch.clone(),
                "taken": self.taken.clone(), "u": [u.clone() for u in self._u], "v": [v.clone() for v in self._v]}

    def _pairs(self, state: Mapping[str, Any]) -> list[tuple[str, Tensor, Any]]:
        copies, u, v = state["copies"], state["u"], state["v"]
        if len(copies) != len(self._copies) or len(u) != len(self._u) or len(v) != len(self._v):
            raise ValueError(f"shadow state has {len(copies)} weights; expected {len(self._copies)}")
        return [
            *(("copies", a, b) for a, b in zip(self._copies, copies, strict=True)),
            *(("u", a, b) for a, b in zip(self._u, u, strict=True)),
            *(("v", a, b) for a, b in zip(self._v, v, strict=True)),
            ("sketch", self.sketch, state["sketch"]), ("taken", self.taken, state["taken"]),
        ]

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError (naming the part) unless `state` is a `state_dict()` of a bank shaped like this one."""
        if not isinstance(state, Mapping) or set(state) != {"copies", "sketch", "taken", "u", "v"}:
            raise ValueError("shadow state is invalid: expected the keys copies, sketch, taken, u, v")
        for name, mine, theirs in self._pairs(state):
            if not isinstance(theirs, Tensor) or tuple(theirs.shape) != tuple(mine.shape):
                got = tuple(theirs.shape) if isinstance(theirs, Tensor) else type(theirs).__name__
                raise ValueError(f"shadow {name} is {got}; expected a tensor of shape {tuple(mine.shape)}")
            if mine.is_floating_point() and not bool(torch.isfinite(theirs).all()):
                raise ValueError(f"shadow {name} holds non-finite values; expected finite ones")

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state_dict(state)
        for _, mine, theirs in self._pairs(state):
            mine.copy_(theirs)
