"""Lifecycle operations on fixed-width expert banks: weights, router rows, registry and optimiser state."""

from .merge import merge
from .prune import prune, restore
from .record import EditError, EditRecord
from .registry import ExpertRecord, ExpertRegistry
from .replace import replace, restore_own
from .revert import SlotSnapshot, revert, snapshot_slots
from .shadow import ShadowBank
from .spawn import spawn
from .split import split
from .surgery import OptimizerSurgery, adam_first_step_seed, reset_slot_state

__all__ = [
    "EditError",
    "ExpertRecord",
    "ExpertRegistry",
    "EditRecord",
    "SlotSnapshot",
    "OptimizerSurgery",
    "adam_first_step_seed",
    "merge",
    "prune",
    "replace",
    "reset_slot_state",
    "restore",
    "restore_own",
    "ShadowBank",
    "revert",
    "snapshot_slots",
    "spawn",
    "split",
]
