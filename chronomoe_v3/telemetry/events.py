"""RoutingEvent: what one MoE layer dispatched over one step (the v2 event, validated)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

MODES = ("TRAIN", "INFER")


def check_finite_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ValueError naming ``name`` if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out!r}")
    return out


def check_optional_float(name: str, value: Any) -> float | None:
    """Like :func:`check_finite_float`, but None passes through."""
    return None if value is None else check_finite_float(name, value)


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` as an int >= ``minimum`` (integral floats accepted), else raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name} must be an integer >= {minimum}, got fractional {value!r}")
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {int(value)}")
    return int(value)


def check_counts(name: str, values: Any, length: int | None = None) -> list[int]:
    """Validate a 1-D sequence or tensor of non-negative integral counts; return it as ``list[int]``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length n_experts={length}, got {arr.shape[0]}")
    if arr.size == 0:
        return []
    if arr.dtype == object and all(isinstance(v, int) and not isinstance(v, bool) for v in arr.tolist()):
        big = [i for i, v in enumerate(arr.tolist()) if not -(2**63) <= v < 2**63]
        if big:  # Python ints beyond int64 (numpy keeps them as objects)
            raise ValueError(f"{name}[{big[0]}] = {arr[big[0]]} exceeds the int64 range of token counts")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold non-negative integer counts, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name}[{i}] must be a non-negative integer count, got fractional {arr[i].item()!r}")
        big = np.abs(arr) >= 2.0**63
        if big.any():  # a cast to int64 would wrap silently
            i = int(np.argmax(big))
            raise ValueError(f"{name}[{i}] = {arr[i].item()!r} exceeds the int64 range of token counts")
    if (arr < 0).any():
        i = int(np.argmax(arr < 0))
        raise ValueError(f"{name}[{i}] must be a non-negative integer count, got {arr[i].item()!r}")
    return [int(v) for v in arr.astype(np.int64)]


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return str(mode)


@dataclass
class RoutingEvent:
    """Tokens one layer dispatched to each expert over one step.

    ``n_experts`` is the *active* width: when slots are masked, ``expert_token_counts`` lists only the
    active slots, in ascending slot order (entry ``i`` is the ``i``-th active slot). ``active_experts``
    are the indices (into ``expert_token_counts``) that received at least one token.
    """

    timestamp: float
    run_id: str
    step: int
    mode: str
    layer_id: int
    n_experts: int
    top_k: int
    expert_token_counts: list[int]
    active_experts: list[int]
    router_prob_sums: list[float] | None = None
    loss: float | None = None
    aux_loss: float | None = None

    def __post_init__(self) -> None:
        self.timestamp = check_finite_float("timestamp", self.timestamp)
        if not isinstance(self.run_id, str):
            raise ValueError(f"run_id must be a str, got {self.run_id!r}")
        self.step = check_int("step", self.step)
        self.mode = check_mode(self.mode)
        self.layer_id = check_int("layer_id", self.layer_id)
        self.n_experts = check_int("n_experts", self.n_experts, minimum=1)
        self.top_k = check_int("top_k", self.top_k, minimum=1)
        self.expert_token_counts = check_counts("expert_token_counts", self.expert_token_counts, self.n_experts)
        active = [check_int("active_experts entry", a) for a in self.active_experts]
        if any(a >= self.n_experts for a in active) or len(set(active)) != len(active):
            raise ValueError(
                f"active_experts must be distinct indices in range(n_experts={self.n_experts}), got {active}"
            )
        self.active_experts = active
        if self.router_prob_sums is not None:
            sums = [check_finite_float("router_prob_sums entry", v) for v in self.router_prob_sums]
            if len(sums) != self.n_experts:
                raise ValueError(f"router_prob_sums must have length n_experts={self.n_experts}, got {len(sums)}")
            self.router_prob_sums = sums
        self.loss = check_optional_float("loss", self.loss)
        self.aux_loss = check_optional_float("aux_loss", self.aux_loss)

    @property
    def token_count(self) -> int:
        """Tokens actually dispatched (x top_k, after capacity drops), not batch x seq."""
        return sum(self.expert_token_counts)

    @classmethod
    def from_router_output(
        cls,
        run_id: str,
        step: int,
        mode: str,
        layer_id: int,
        used_capacity: torch.Tensor | Sequence[int],
        n_experts: int,
        top_k: int,
        *,
        router_prob_sums: torch.Tensor | Sequence[float] | None = None,
        loss: float | None = None,
        aux_loss: float | None = None,
        timestamp: float | None = None,
    ) -> RoutingEvent:
        """Build an event from a per-expert count tensor (one host transfer; call at report time)."""
        n = check_int("n_experts", n_experts, minimum=1)
        counts = check_counts("used_capacity", used_capacity, n)
        sums: list[float] | None = None
        if router_prob_sums is not None:
            if isinstance(router_prob_sums, torch.Tensor):
                router_prob_sums = router_prob_sums.detach().float().cpu().tolist()
            sums = [float(v) for v in router_prob_sums]
        return cls(
            timestamp=time.time() if timestamp is None else timestamp,
            run_id=run_id,
            step=step,
            mode=mode,
            layer_id=layer_id,
            n_experts=n,
            top_k=top_k,
            expert_token_counts=counts,
            active_experts=[i for i, c in enumerate(counts) if c > 0],
            router_prob_sums=sums,
            loss=loss,
            aux_loss=aux_loss,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields plus ``token_count``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["expert_token_counts"] = list(self.expert_token_counts)
        out["active_experts"] = list(self.active_experts)
        if self.router_prob_sums is not None:
            out["router_prob_sums"] = list(self.router_prob_sums)
        out["token_count"] = self.token_count
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingEvent:
        """Inverse of :meth:`to_dict`; a stored ``token_count`` must agree with the counts."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - {"token_count"}
        if unknown:
            raise ValueError(f"RoutingEvent.from_dict got unknown keys {sorted(unknown)}; expected {sorted(names)}")
        missing = {f.name for f in fields(cls) if f.name not in data and f.name not in _OPTIONAL}
        if missing:
            raise ValueError(f"RoutingEvent.from_dict is missing keys {sorted(missing)}")
        event = cls(**{k: v for k, v in data.items() if k in names})
        if "token_count" in data and data["token_count"] != event.token_count:
            raise ValueError(
                f"token_count={data['token_count']!r} disagrees with sum(expert_token_counts)={event.token_count}"
            )
        return event


_OPTIONAL = {"router_prob_sums", "loss", "aux_loss"}
