"""Routing-health metrics over utilisation shares (pure functions, v2 names).

All functions take shares at the layer's *active* width; a masked slot is not part of the vector, so it
is never counted as dead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .events import RoutingEvent, check_counts

ENTROPY_FLOOR = 1e-10
NEARLY_DEAD_SHARE = 0.01

SharesLike = np.ndarray | Sequence[float] | torch.Tensor
CountsLike = Sequence[RoutingEvent] | np.ndarray | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def _as_shares(shares: SharesLike) -> np.ndarray:
    if isinstance(shares, torch.Tensor):
        shares = shares.detach().cpu().double().numpy()
    arr = np.asarray(shares, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"utilization shares must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"utilization shares must be finite and >= 0, got {arr.tolist()}")
    return arr


def compute_utilization_shares(events: CountsLike, n_experts: int | None = None) -> np.ndarray:
    """Per-expert counts summed over the window, normalised to sum 1 (zeros if nothing was routed).

    ``events`` is a sequence of RoutingEvents of one layer (all of the same width), or raw counts: a
    ``[n_experts]`` vector or a ``[window, n_experts]`` matrix.
    """
    if isinstance(events, Sequence) and len(events) > 0 and isinstance(events[0], RoutingEvent):
        widths = {e.n_experts for e in events}  # type: ignore[union-attr]
        if len(widths) != 1 or (n_experts is not None and widths != {n_experts}):
            raise ValueError(f"events must share one n_experts (expected {n_experts}), got widths {sorted(widths)}")
        totals = np.sum([e.expert_token_counts for e in events], axis=0, dtype=np.float64)  # type: ignore[union-attr]
    else:
        if isinstance(events, torch.Tensor):
            events = events.detach().cpu().numpy()
        arr = np.asarray(events)
        if arr.size == 0:
            if n_experts is None:
                raise ValueError("n_experts is required when the window is empty")
            return np.zeros(n_experts, dtype=np.float64)
        if arr.ndim not in (1, 2):
            raise ValueError(f"counts must be [n_experts] or [window, n_experts], got shape {arr.shape}")
        rows = arr if arr.ndim == 2 else arr[None, :]
        totals = np.sum([check_counts("counts", r, n_experts) for r in rows], axis=0, dtype=np.float64)
    total = totals.sum()
    return totals / total if total > 0 else np.zeros_like(totals)


def compute_entropy(shares: SharesLike) -> float:
    """Shannon entropy in nats over shares > 1e-10."""
    s = _as_shares(shares)
    s = s[s > ENTROPY_FLOOR]
    return float(-(s * np.log(s)).sum())


def compute_n_effective(shares: SharesLike) -> float:
    """Effective number of experts, ``exp(entropy)`` (1.0 for an all-zero window)."""
    return math.exp(compute_entropy(shares))


def compute_top2_share(shares: SharesLike) -> float:
    """Sum of the two largest shares; 1.0 when there are fewer than 2 experts."""
    s = _as_shares(shares)
    if s.shape[0] < 2:
        return 1.0
    return float(np.partition(s, -2)[-2:].sum())


def count_dead_experts(shares: SharesLike) -> int:
    """Strict: experts whose share over the window is exactly 0."""
    return int((_as_shares(shares) == 0).sum())


def count_nearly_dead_experts(shares: SharesLike, threshold: float = NEARLY_DEAD_SHARE) -> int:
    """Experts with ``0 < share < threshold`` (dead experts are not nearly dead)."""
    s = _as_shares(shares)
    return int(((s > 0) & (s < threshold)).sum())


def compute_gini_coefficient(shares: SharesLike, normalized: bool = False) -> float:
    """Gini coefficient ``sum_ij |s_i - s_j| / (2 n^2 mean)`` of the shares.

    Un-normalised (v2's formula) it is 0 when balanced and peaks at ``(n - 1) / n`` when one expert takes
    everything; ``normalized=True`` rescales by ``n / (n - 1)`` so the peak is exactly 1.
    """
    s = np.sort(_as_shares(shares))
    n = s.shape[0]
    total = s.sum()
    if n < 2 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    gini = float(((2 * ranks - n - 1) * s).sum() / (n * total))
    return gini * n / (n - 1) if normalized else gini


def compute_layer_metrics(events: CountsLike, n_experts: int | None = None) -> dict[str, Any]:
    """All layer metrics of one window: the keyword arguments of ``LayerSnapshot`` (minus layer_id) + gini."""
    shares = compute_utilization_shares(events, n_experts)
    return {
        "utilization_shares": shares.tolist(),
        "entropy": compute_entropy(shares),
        "dead_expert_count": count_dead_experts(shares),
        "n_effective": compute_n_effective(shares),
        "top2_share": compute_top2_share(shares),
        "nearly_dead_count": count_nearly_dead_experts(shares),
        "active_experts": np.flatnonzero(shares > 0).tolist(),
        "gini_coefficient": compute_gini_coefficient(shares),
    }
