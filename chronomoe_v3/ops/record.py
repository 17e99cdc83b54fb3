"""What an edit changed (`EditRecord`) and how a refused edit says no (`EditError`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class EditError(ValueError):
    """An edit or registry transition was refused; nothing was changed."""


@dataclass(frozen=True)
class EditRecord:
    """What one operation changed in one layer.

    `fresh_slots`: slots unmasked by this edit; their per-slot state (optimiser moments, coherence clocks,
    slow bias beta) must start fresh. `parked_slots`: slots masked by this edit; their per-slot state is
    dead. `kept_slots`: slots whose weights changed but whose per-slot state carries over (merge survivor,
    split child in the parent's slot). `logit_shift`: the routing-logit shift per slot that preserves
    routing mass; applied to the router bias when `logit_shift_applied`, otherwise (router without bias)
    the caller should add it to the slot's logit bias (beta).
    """

    kind: str
    layer: int
    step: int
    born_ids: tuple[str, ...] = ()
    ended_ids: tuple[str, ...] = ()
    parent_id: str | None = None
    fresh_slots: tuple[int, ...] = ()
    parked_slots: tuple[int, ...] = ()
    kept_slots: tuple[int, ...] = ()
    logit_shift: Mapping[int, float] = field(default_factory=dict)
    logit_shift_applied: bool = False

    @property
    def slots(self) -> tuple[int, ...]:
        """Every slot whose weights or mask changed."""
        return tuple(sorted(set(self.fresh_slots) | set(self.parked_slots) | set(self.kept_slots)))
