"""Shared test helpers (tests/ is on sys.path when pytest collects these files)."""

import math

import torch


def tree_equal(a, b) -> bool:
    """Exact equality of nested dicts/lists/tensors (dtype included); NaN floats equal each other."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def lifecycle_config(**fields):
    """A ChronoConfig whose only changes are lifecycle fields (bounds, cooling, archive, ...)."""
    from chronomoe_v3.config import ChronoConfig, LifecycleConfig

    return ChronoConfig(lifecycle=LifecycleConfig(**fields))
