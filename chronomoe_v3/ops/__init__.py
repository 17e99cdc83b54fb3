"""Lifecycle operations on fixed-width expert banks: weights, router rows, registry and optimiser state."""

from .common import EditRecord
from .merge import merge
from .optimizer import OptimizerSurgery, adam_first_step_seed, reset_slot_state
from .prune import prune, restore
from .spawn import spawn
from .split import split

__all__ = [
    "EditRecord",
    "OptimizerSurgery",
    "adam_first_step_seed",
    "merge",
    "prune",
    "reset_slot_state",
    "restore",
    "spawn",
    "split",
]
