"""Clocks: one signal read at several timescales, debiased like Adam.

`ema_update` / `ema_debiased` are the pure math; `DebiasedEMA` is the one stateful debiased EMA of the
library (every value/decay pair is one of these); `ThreeClockEMA` is a `DebiasedEMA` at the fast, mid and
slow retentions with per-entry observation counts; `ClockConfig` converts retention <-> half-life.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def fp32(value: float) -> float:
    """`value` rounded to fp32 (the dtype of every clock buffer), back as a Python float (inf on overflow)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


# The largest retention that stays below 1 in fp32.
FP32_MAX_ALPHA = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))


@dataclass(frozen=True)
class ClockConfig:
    """A clock's retention `alpha`, given directly or as a half-life in steps.

    `half_life = ln 2 / -ln alpha` exactly (no truncation), so `alpha = 2 ** (-1 / half_life)`.
    Exactly one of `alpha` / `half_life` must be given; both are validated before any arithmetic. The clocks
    run in fp32, so the retention must also lie strictly inside (0, 1) once rounded to fp32 (an `alpha` so
    close to 1 that it rounds to 1.0, e.g. a half-life beyond ~1e7 steps, would never move). Two clocks are
    equal when their names and retentions are (the half-life is derived).
    """

    name: str
    alpha: float | None = None
    half_life: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        name, alpha, half_life = self.name, self.alpha, self.half_life
        if (alpha is None) == (half_life is None):
            raise ValueError(
                f"ClockConfig({name!r}): give exactly one of alpha or half_life (got alpha={alpha!r}, "
                f"half_life={half_life!r})"
            )
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha < 1.0):
                raise ValueError(f"ClockConfig({name!r}): alpha={alpha!r} is invalid: expected 0 < alpha < 1")
            half_life = math.log(2.0) / -math.log(alpha)
        else:
            assert half_life is not None
            if (
                isinstance(half_life, bool)
                or not isinstance(half_life, (int, float))
                or not math.isfinite(half_life)
                or half_life <= 0
            ):
                raise ValueError(
                    f"ClockConfig({name!r}): half_life={half_life!r} is invalid: expected a finite value > 0"
                )
            alpha = 2.0 ** (-1.0 / half_life)
            if not 0.0 < alpha < 1.0:
                raise ValueError(
                    f"ClockConfig({name!r}): half_life={half_life!r} gives alpha={alpha!r}, outside (0, 1)"
                )
        if not 0.0 < fp32(alpha) < 1.0:
            given = f"alpha={alpha!r}" if self.alpha is not None else f"half_life={half_life!r} (alpha={alpha!r})"
            raise ValueError(
                f"ClockConfig({name!r}): {given} rounds to {fp32(alpha)!r} in fp32 (the clocks' dtype): "
                f"expected 0 < alpha < 1 after rounding (the largest such alpha is {FP32_MAX_ALPHA!r})"
            )
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "half_life", float(half_life))

    @property
    def retention(self) -> float:
        """`alpha` as a plain float (always set after construction)."""
        assert self.alpha is not None
        return self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "half_life": self.half_life}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClockConfig:
        """From `to_dict()` (the retention is authoritative; the half-life is derived again)."""
        if not isinstance(data, Mapping) or "name" not in data or "alpha" not in data:
            raise ValueError(f"clock {data!r} is invalid: expected a mapping with 'name' and 'alpha'")
        return cls(str(data["name"]), alpha=data["alpha"])


def ema_update_applied(
    value: Tensor, decay: Tensor, x: Tensor, measured: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`ema_update`, also returning the entries it folded in (`applied [E]` bool, a device tensor).

    The skip rule (no host sync): an entry is folded in only when it is measured, its reading `x[e]` is
    finite (every element of it), and the result is finite at every clock (a finite reading whose fold
    overflows fp32, or a non-finite retention, is skipped too). A skipped entry keeps its value and decay
    exactly, so no NaN/Inf ever enters the state.
    """
    extra = (1,) * (value.dim() - 2)
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    a = alpha.to(value.dtype).view(-1, 1, *extra)
    xv = x.to(value.dtype)
    finite_x = torch.isfinite(xv).reshape(xv.shape[0], -1).all(-1) if xv.dim() > 1 else torch.isfinite(xv)
    ok = measured & finite_x
    x_safe = torch.where(ok.view(-1, *extra), xv, zero)
    cand = a * value + (1.0 - a) * x_safe.unsqueeze(0)
    cand_decay = decay * alpha.to(decay.dtype).view(-1, 1)
    fin = torch.isfinite(cand).reshape(cand.shape[0], cand.shape[1], -1).all(-1) & torch.isfinite(cand_decay)
    ok = ok & fin.all(0)
    new_value = torch.where(ok.view(1, -1, *extra), cand, value)
    new_decay = torch.where(ok.unsqueeze(0), cand_decay, decay)
    return new_value, new_decay, ok


def ema_update(
    value: Tensor, decay: Tensor, x: Tensor, measured: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor]:
    """One masked EMA step for C clocks over E entries (pure function).

    value [C, E, *D], decay [C, E] (product of the retentions applied so far), x [E, *D],
    measured [E] bool, alpha [C] retentions. Unmeasured entries are returned unchanged; NaN in an
    unmeasured `x` never leaks in. A measured entry whose reading is non-finite (or whose fold would be) is
    skipped like an unmeasured one (`ema_update_applied` says which entries were folded in).
    """
    new_value, new_decay, _ = ema_update_applied(value, decay, x, measured, alpha)
    return new_value, new_decay


def ema_debiased(value: Tensor, decay: Tensor) -> Tensor:
    """Debiased reading `value / (1 - prod alpha)`; NaN for entries never observed (decay == 1).

    With a constant retention `prod alpha = alpha ** count`, i.e. Adam's bias correction; the product
    form stays exact when the retention varies from step to step (relevance-modulated clocks).
    """
    weight = 1.0 - decay
    extra = (1,) * (value.dim() - 2)
    weight = weight.view(*weight.shape, *extra)
    observed = weight > 0
    return torch.where(observed, value / torch.where(observed, weight, torch.ones_like(weight)),
                       torch.full_like(value, float("nan")))


def _check_retentions(alphas: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in alphas)
    if not out or any(not (0.0 < a < 1.0 and 0.0 < fp32(a) < 1.0) for a in out):
        raise ValueError(
            f"alphas={out!r} is invalid: expected one or more retentions, each in (0, 1) also once rounded to fp32"
        )
    return out


def _check_entry(name: str, index: int, num_entries: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_entries:
        raise IndexError(f"{name}={index!r} is out of range: expected an integer in [0, {num_entries})")
    return index


class DebiasedEMA(nn.Module):
    """Masked, debiased EMAs of a per-entry signal at C retentions, vectorised over E entries.

    Buffers (saved): `value [C, E, *D]`, `decay [C, E]` (the product of the retentions applied to each
    entry). The retentions `alphas [C]` are a constant of the construction (a non-persistent buffer, so a
    checkpoint never overrides them). Only measured entries move; `read()` returns `value / (1 - decay)`:
    a constant signal reads as itself after one observation, also when the retention varies from step to
    step (`update(..., alphas=...)`). Entries never observed read NaN. A non-finite reading is skipped for
    its entry (never stored): `value` and `decay` are always finite.
    """

    value: Tensor
    decay: Tensor
    alphas: Tensor

    def __init__(
        self,
        num_entries: int,
        alphas: Sequence[float],
        trailing_shape: Sequence[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_entries, bool) or not isinstance(num_entries, int) or num_entries < 1:
            raise ValueError(f"num_entries={num_entries!r} is invalid: expected an integer >= 1")
        retentions = _check_retentions(alphas)
        shape = (len(retentions), num_entries, *trailing_shape)
        self.register_buffer("value", torch.zeros(shape, dtype=torch.float32, device=device))
        self.register_buffer("decay", torch.ones(len(retentions), num_entries, dtype=torch.float32, device=device))
        self.register_buffer(
            "alphas", torch.tensor(retentions, dtype=torch.float32, device=device), persistent=False
        )

    @property
    def num_entries(self) -> int:
        return int(self.decay.shape[1])

    def _check(self, x: Tensor, measured: Tensor) -> None:
        if x.shape != self.value.shape[1:]:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected {tuple(self.value.shape[1:])}")
        if tuple(measured.shape) != (self.num_entries,) or measured.dtype != torch.bool:
            raise ValueError(
                f"measured has shape {tuple(measured.shape)} and dtype {measured.dtype}; expected "
                f"({self.num_entries},) bool"
            )

    @torch.no_grad()
    def update(self, x: Tensor, measured: Tensor, alphas: Tensor | None = None) -> Tensor:
        """Fold `x [E, *D]` into the entries where `measured [E]` is True; returns the entries folded in
        (`[E]` bool, device). `alphas [C]` (device tensor) overrides the retentions for this step, e.g.
        relevance-modulated ones: clamped to [0, 1], a non-finite one falls back to the clock's own.

        Skip rule: a measured entry whose reading is non-finite (or whose fold would overflow fp32) is left
        exactly as it was, like an unmeasured one: the state never holds NaN/Inf. No host sync."""
        self._check(x, measured)
        if alphas is None:
            a = self.alphas
        else:
            if tuple(alphas.shape) != tuple(self.alphas.shape):
                raise ValueError(f"alphas has shape {tuple(alphas.shape)}; expected {tuple(self.alphas.shape)}")
            a = alphas.to(self.alphas)
            a = torch.where(torch.isfinite(a), a.clamp(0.0, 1.0), self.alphas)
        value, decay, applied = ema_update_applied(self.value, self.decay, x, measured.to(self.decay.device), a)
        self.value.copy_(value)
        self.decay.copy_(decay)
        return applied

    def read(self) -> Tensor:
        """Debiased readings `[C, E, *D]`; NaN where never observed."""
        return ema_debiased(self.value, self.decay)

    @torch.no_grad()
    def reset_entries(self, entries: Tensor) -> None:
        """Forget entries (bool mask `[E]`): a reused slot starts with no history."""
        extra = (1,) * (self.value.dim() - 2)
        self.value.masked_fill_(entries.view(1, -1, *extra), 0.0)
        self.decay.masked_fill_(entries.unsqueeze(0), 1.0)

    @torch.no_grad()
    def copy_entry(self, src: int, dst: int) -> None:
        """Give entry `dst` the history of entry `src` (IndexError for an index outside [0, E))."""
        _check_entry("src", src, self.num_entries)
        _check_entry("dst", dst, self.num_entries)
        self.value[:, dst] = self.value[:, src]
        self.decay[:, dst] = self.decay[:, src]


class ThreeClockEMA(DebiasedEMA):
    """A `DebiasedEMA` at three retentions (fast < mid < slow) that also counts each entry's observations
    (`count [E]` int64, saved)."""

    count: Tensor

    def __init__(
        self,
        num_entries: int,
        alphas: Sequence[float] = (0.9, 0.99, 0.999),
        trailing_shape: Sequence[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        retentions = tuple(float(a) for a in alphas)
        if len(retentions) != 3:
            raise ValueError(f"alphas={retentions!r} is invalid: expected three retentions (fast, mid, slow)")
        for a in retentions:
            if not (0.0 < a < 1.0 and 0.0 < fp32(a) < 1.0):
                raise ValueError(
                    f"alphas={retentions!r} is invalid: expected each retention in (0, 1), also once rounded to fp32"
                )
        if not retentions[0] < retentions[1] < retentions[2]:
            raise ValueError(f"alphas={retentions!r} is invalid: expected fast < mid < slow")
        if not fp32(retentions[0]) < fp32(retentions[1]) < fp32(retentions[2]):
            raise ValueError(
                f"alphas={retentions!r} is invalid: expected fast < mid < slow also once rounded to fp32 (got "
                f"{tuple(fp32(a) for a in retentions)!r})"
            )
        super().__init__(num_entries, retentions, trailing_shape, device)
        self.register_buffer("count", torch.zeros(num_entries, dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, x: Tensor, measured: Tensor, alphas: Tensor | None = None) -> Tensor:
        applied = super().update(x, measured, alphas)
        self.count.add_(applied.to(self.count.dtype))  # a skipped (non-finite) reading is not an observation
        return applied

    @torch.no_grad()
    def reset_entries(self, entries: Tensor) -> None:
        super().reset_entries(entries)
        self.count.masked_fill_(entries, 0)

    @torch.no_grad()
    def copy_entry(self, src: int, dst: int) -> None:
        super().copy_entry(src, dst)
        self.count[dst] = self.count[src]
