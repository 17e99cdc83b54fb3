"""Shared test helpers (tests/ is on sys.path when pytest collects these files)."""

import math

import torch


def tree_equal(a, b) -> bool:
    """Bitwise equality of nested dicts/lists/tensors (dtype and shape included); NaN equals NaN at the same
    place, in tensors and in floats."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(tree_equal(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def lifecycle_config(**fields):
    """A ChronoConfig whose only changes are lifecycle fields (bounds, cooling, archive, ...)."""
    from chronomoe_v3.config import ChronoConfig, LifecycleConfig

    return ChronoConfig(lifecycle=LifecycleConfig(**fields))
