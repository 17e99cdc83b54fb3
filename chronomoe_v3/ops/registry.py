"""ExpertRegistry: who lives in which slot of each fixed-width layer, their lineage, basins and archive.

Slots are fixed per layer. A slot is `free` or holds one live expert, `cooling` (born, not yet judged by
the slow clock) or `active`; both are routed (`active_mask` is True for them). Retired experts (pruned,
merged away, or split into children) become `archived`: their record stays, their slot is freed, and their
weights (expert and router row) are parked in the archive so they can be restored bit-exactly.

Expert ids are unique over a run: the first expert in slot 5 of layer 2 is `L2_E5`; the next expert born in
that slot (a reused slot) is `L2_E5_g1`, then `L2_E5_g2`, ... (`g` = the slot's generation).

The registry only keeps books: it never touches weights. The operations in `chronomoe_v3.ops` edit the
weights through banks and then update the registry; every state transition here is validated first and
raises `EditError` (a `ValueError`) without changing anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import ChronoConfig
from .basin import BasinHistory, check_basin_reading
from .record import EditError

EXPERT_STATES = ("cooling", "active", "archived")
LIVE_STATES = ("cooling", "active")
ORIGINS = ("initial", "spawn", "split", "restore", "replace")
ENDINGS = ("prune", "merge", "split", "replace", "rollback")

Parked = dict[str, dict[str, Tensor]]  # {"experts": {name: tensor}, "router": {name: tensor}}


def expert_id(layer: int, slot: int, generation: int) -> str:
    """`L{layer}_E{slot}` for a slot's first expert, `L{layer}_E{slot}_g{generation}` for later ones."""
    base = f"L{layer}_E{slot}"
    return base if generation == 0 else f"{base}_g{generation}"


@dataclass
class ExpertRecord:
    """One expert's life: where it lives, where it came from, how it ended."""

    expert_id: str
    layer: int
    slot: int
    state: str
    born_step: int
    origin: str
    basin: BasinHistory
    parent_id: str | None = None
    absorbed_ids: list[str] = field(default_factory=list)
    ended_step: int | None = None
    ended_by: str | None = None
    successor_id: str | None = None

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "expert_id": self.expert_id, "layer": self.layer, "slot": self.slot, "state": self.state,
            "born_step": self.born_step, "origin": self.origin, "parent_id": self.parent_id,
            "absorbed_ids": list(self.absorbed_ids), "ended_step": self.ended_step, "ended_by": self.ended_by,
            "successor_id": self.successor_id, "basin": self.basin.state_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertRecord:
        state = str(data["state"])
        if state not in EXPERT_STATES:
            raise ValueError(f"saved expert state {state!r} is invalid: expected one of {list(EXPERT_STATES)}")
        eid = data.get("expert_id")
        for key in ("layer", "slot", "born_step"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"saved expert {eid!r} {key}={value!r} is invalid: expected an integer >= 0")
        ended = data["ended_step"]
        if ended is not None and (isinstance(ended, bool) or not isinstance(ended, int) or ended < 0):
            raise ValueError(f"saved expert {eid!r} ended_step={ended!r} is invalid: expected None or an integer >= 0")
        return cls(
            expert_id=str(data["expert_id"]), layer=int(data["layer"]), slot=int(data["slot"]), state=state,
            born_step=int(data["born_step"]), origin=str(data["origin"]),
            basin=BasinHistory.from_state_dict(data["basin"]),
            parent_id=data["parent_id"], absorbed_ids=[str(a) for a in data["absorbed_ids"]],
            ended_step=None if data["ended_step"] is None else int(data["ended_step"]),
            ended_by=data["ended_by"], successor_id=data["successor_id"],
        )


class ExpertRegistry:
    """Slots, states, lineage, basins and the weight archive of every managed MoE layer.

    `initial_active[l]` is layer l's active mask at attach time: those slots hold `active` experts born at
    `step` (origin `initial`); the rest are free. Limits come from `config`: a layer holds between
    `min_experts_per_layer` and `min(max_experts_per_layer, slots)` live experts.
    """

    def __init__(
        self,
        initial_active: Sequence[Tensor | Sequence[bool]],
        config: ChronoConfig | None = None,
        step: int = 0,
    ) -> None:
        self.config = config if config is not None else ChronoConfig()
        if not initial_active:
            raise ValueError("initial_active is empty: expected one active mask per layer")
        masks = [[bool(v) for v in torch.as_tensor(m).reshape(-1).tolist()] for m in initial_active]
        self._slots: list[list[str | None]] = [[None] * len(m) for m in masks]
        self._generation: list[list[int]] = [[0] * len(m) for m in masks]
        self._experts: dict[str, ExpertRecord] = {}
        self._archive: dict[str, Parked] = {}
        for layer, mask in enumerate(masks):
            live = sum(mask)
            if not self.config.lifecycle.min_experts_per_layer <= live <= self.max_live(layer):
                raise ValueError(
                    f"layer {layer} starts with {live} active experts; expected between min_experts_per_layer="
                    f"{self.config.lifecycle.min_experts_per_layer} and {self.max_live(layer)} (max_experts_per_layer="
                    f"{self.config.lifecycle.max_experts_per_layer}, {len(mask)} slots)"
                )
            for slot, on in enumerate(mask):
                if on:
                    record = self.birth(layer, slot, step, origin="initial")
                    record.state = "active"

    # ------------------------------------------------------------------ reading
    @property
    def num_layers(self) -> int:
        return len(self._slots)

    def num_slots(self, layer: int) -> int:
        self.check_layer(layer)
        return len(self._slots[layer])

    def max_live(self, layer: int) -> int:
        return min(self.config.lifecycle.max_experts_per_layer, len(self._slots[layer]))

    def check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self._slots):
            raise EditError(f"layer={layer!r} is out of range: expected an integer in [0, {len(self._slots)})")

    def check_slot(self, layer: int, slot: int) -> None:
        self.check_layer(layer)
        n = len(self._slots[layer])
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < n:
            raise EditError(f"slot={slot!r} of layer {layer} is out of range: expected an integer in [0, {n})")

    def expert(self, expert_id: str) -> ExpertRecord:
        try:
            return self._experts[expert_id]
        except KeyError:
            raise EditError(f"expert id {expert_id!r} is unknown: expected an id this registry issued") from None

    def experts(self, state: str | None = None) -> Iterator[ExpertRecord]:
        """All records in birth order (optionally only those in `state`)."""
        return (r for r in self._experts.values() if state is None or r.state == state)

    def expert_at(self, layer: int, slot: int) -> ExpertRecord | None:
        self.check_slot(layer, slot)
        eid = self._slots[layer][slot]
        return None if eid is None else self._experts[eid]

    def slot_state(self, layer: int, slot: int) -> str:
        """`free`, `cooling` or `active`."""
        record = self.expert_at(layer, slot)
        return "free" if record is None else record.state

    def live_slots(self, layer: int) -> list[int]:
        self.check_layer(layer)
        return [s for s, eid in enumerate(self._slots[layer]) if eid is not None]

    def free_slots(self, layer: int) -> list[int]:
        self.check_layer(layer)
        return [s for s, eid in enumerate(self._slots[layer]) if eid is None]

    def num_live(self, layer: int) -> int:
        return len(self.live_slots(layer))

    def active_mask(self, layer: int, device: torch.device | str | None = None) -> Tensor:
        """bool `[slots]`: True where a cooling or active expert lives (what the layer must route to)."""
        self.check_layer(layer)
        return torch.tensor([eid is not None for eid in self._slots[layer]], dtype=torch.bool, device=device)

    def live_record(self, layer: int, slot: int) -> ExpertRecord:
        """The live expert in `slot`, or `EditError` naming why there is none."""
        record = self.expert_at(layer, slot)
        if record is None:
            last = self._last_in_slot(layer, slot)
            why = f" (its last expert {last.expert_id} is {last.state})" if last is not None else ""
            raise EditError(f"slot {slot} of layer {layer} is free{why}: expected a live (cooling/active) expert")
        return record

    def _last_in_slot(self, layer: int, slot: int) -> ExpertRecord | None:
        found = None
        for r in self._experts.values():
            if r.layer == layer and r.slot == slot:
                found = r
        return found

    def archived_weights(self, expert_id: str) -> Parked:
        """The parked weights of an archived expert (do not modify them)."""
        record = self.expert(expert_id)
        if record.state != "archived" or expert_id not in self._archive:
            raise EditError(f"expert {expert_id!r} is {record.state} with no parked weights: expected archived")
        return self._archive[expert_id]

    def archived_ids(self) -> list[str]:
        """Ids whose weights are parked (restorable), oldest first."""
        return list(self._archive)

    # ------------------------------------------------------------------ transitions (used by ops)
    def birth(self, layer: int, slot: int, step: int, origin: str, parent_id: str | None = None) -> ExpertRecord:
        """A new `cooling` expert in free slot `slot` (ids never repeat: the slot's generation advances)."""
        self.check_slot(layer, slot)
        if origin not in ORIGINS:
            raise EditError(f"origin={origin!r} is invalid: expected one of {list(ORIGINS)}")
        if self._slots[layer][slot] is not None:
            raise EditError(f"slot {slot} of layer {layer} holds {self._slots[layer][slot]}: expected a free slot")
        if parent_id is not None:
            self.expert(parent_id)
        gen = self._generation[layer][slot]
        record = ExpertRecord(
            expert_id=expert_id(layer, slot, gen), layer=layer, slot=slot, state="cooling", born_step=int(step),
            origin=origin, basin=BasinHistory(self.config.basins.history), parent_id=parent_id,
        )
        self._generation[layer][slot] = gen + 1
        self._experts[record.expert_id] = record
        self._slots[layer][slot] = record.expert_id
        return record

    def retire(
        self,
        layer: int,
        slot: int,
        step: int,
        ended_by: str,
        parked: Parked,
        successor_id: str | None = None,
    ) -> ExpertRecord:
        """Archive the live expert in `slot` with its parked weights; the slot becomes free."""
        record = self.live_record(layer, slot)
        if ended_by not in ENDINGS:
            raise EditError(f"ended_by={ended_by!r} is invalid: expected one of {list(ENDINGS)}")
        record.state = "archived"
        record.ended_step = int(step)
        record.ended_by = ended_by
        record.successor_id = successor_id
        self._archive[record.expert_id] = parked
        # bounded memory: drop the oldest parked weights
        while len(self._archive) > self.config.lifecycle.archive_capacity:
            del self._archive[next(iter(self._archive))]
        self._slots[layer][slot] = None
        return record

    def unpark(self, expert_id: str) -> Parked:
        """Take an archived expert's weights out of the archive (restore); its record stays archived."""
        parked = self.archived_weights(expert_id)
        del self._archive[expert_id]
        return parked

    def advance(self, step: int) -> list[str]:
        """Promote cooling experts that have cooled for `cooling_period` steps; returns their ids."""
        promoted = []
        for r in self._experts.values():
            if r.state == "cooling" and step - r.born_step >= self.config.lifecycle.cooling_period:
                r.state = "active"
                promoted.append(r.expert_id)
        return promoted

    def record_basin(self, layer: int, share: Tensor, phi: Tensor, coactive: Tensor | None = None) -> None:
        """Append one reading to every live expert's basin: `share [E]`, `phi [E]` (NaN = unmeasured) and
        optionally `coactive [E, K]` slot indices of each expert's top co-activated experts (-1 = none).
        Slot indices are stored as the ids living there now. One host transfer per call."""
        self.check_layer(layer)
        e = len(self._slots[layer])
        if tuple(share.shape) != (e,) or tuple(phi.shape) != (e,):
            raise ValueError(f"share/phi have shapes {tuple(share.shape)}/{tuple(phi.shape)}; expected ({e},)")
        if coactive is not None and (coactive.dim() != 2 or coactive.shape[0] != e):
            raise ValueError(f"coactive has shape {tuple(coactive.shape)}; expected ({e}, K)")
        shares, phis = share.detach().float().cpu().tolist(), phi.detach().float().cpu().tolist()
        partners = coactive.detach().cpu().tolist() if coactive is not None else [[] for _ in range(e)]
        ids = self._slots[layer]
        # Validate every live expert's reading first: one bad value must not leave a partial update.
        for slot, eid in enumerate(ids):
            if eid is None:
                continue
            try:
                check_basin_reading(shares[slot], phis[slot])
            except ValueError as exc:
                raise ValueError(
                    f"record_basin: layer {layer} slot {slot} ({eid}): {exc}; nothing was recorded"
                ) from None
        for slot, eid in enumerate(ids):
            if eid is not None:
                names = [ids[p] for p in partners[slot] if 0 <= p < e and p != slot and ids[p] is not None]
                self._experts[eid].basin.record(shares[slot], phis[slot], [n for n in names if n is not None])

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only: survives `torch.save` + `torch.load(weights_only=True)`."""
        return {
            "format": 1,
            "slots": [[eid if eid is not None else "" for eid in layer] for layer in self._slots],
            "generation": [list(g) for g in self._generation],
            "experts": [r.to_dict() for r in self._experts.values()],
            "archive": {
                eid: {part: dict(tensors) for part, tensors in parked.items()} for eid, parked in self._archive.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. Validated first (ValueError naming the entry and the value); on error nothing
        changes: slot counts, every slot naming a live expert recorded in that layer and slot, live experts per
        layer within [min_experts_per_layer, max_live], non-negative steps and generations, finite basins and
        finite parked weights."""
        if int(state.get("format", -1)) != 1:
            raise ValueError(f"registry state format {state.get('format')!r} is unsupported: expected 1")
        slots = [[str(eid) if eid else None for eid in layer] for layer in state["slots"]]
        shape = [len(layer) for layer in self._slots]
        if [len(layer) for layer in slots] != shape:
            raise ValueError(f"saved registry has slots {[len(s) for s in slots]} per layer; expected {shape}")
        experts = {r.expert_id: r for r in (ExpertRecord.from_dict(d) for d in state["experts"])}
        for layer, ids in enumerate(slots):
            for slot, eid in enumerate(ids):
                if eid is not None and (eid not in experts or not experts[eid].is_live):
                    raise ValueError(f"saved slot {slot} of layer {layer} names {eid!r}: expected a live expert")
                if eid is not None and (experts[eid].layer, experts[eid].slot) != (layer, slot):
                    r = experts[eid]
                    raise ValueError(
                        f"saved slot {slot} of layer {layer} names {eid!r}, whose record says layer {r.layer} slot "
                        f"{r.slot}: expected them to agree"
                    )
            live, low = sum(eid is not None for eid in ids), self.config.lifecycle.min_experts_per_layer
            high = min(self.config.lifecycle.max_experts_per_layer, len(ids))
            if not low <= live <= high:
                raise ValueError(
                    f"saved registry layer {layer} has {live} live experts; expected between min_experts_per_layer="
                    f"{low} and {high} (max_experts_per_layer={self.config.lifecycle.max_experts_per_layer}, "
                    f"{len(ids)} slots)"
                )
        generation = [[int(g) for g in layer] for layer in state["generation"]]
        if [len(g) for g in generation] != shape or any(g < 0 for layer in generation for g in layer):
            raise ValueError(
                f"saved registry generation {generation!r} is invalid: expected non-negative integers, "
                f"{shape} per layer"
            )
        live_ids = {eid for layer in slots for eid in layer if eid is not None}
        for eid, record in experts.items():
            if record.state in LIVE_STATES and eid not in live_ids:
                raise ValueError(f"saved expert {eid!r} is {record.state} but no slot holds it: expected archived")
        archive = {
            str(eid): {str(part): dict(tensors) for part, tensors in parked.items()}
            for eid, parked in state["archive"].items()
        }
        for eid, parked in archive.items():
            for part, tensors in parked.items():
                for name, value in tensors.items():
                    where = f"saved archive {eid!r} {part}.{name}"
                    if not isinstance(value, Tensor):
                        raise ValueError(f"{where} is {type(value).__name__}; expected a tensor")
                    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise ValueError(f"{where} holds non-finite values; expected finite weights")
        self._slots = slots
        self._generation = generation
        self._experts = experts
        self._archive = archive
