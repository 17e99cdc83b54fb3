"""ClockConfig and ThreeClockEMA: one signal read at three timescales, debiased like Adam."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ClockConfig:
    """A clock's retention `alpha`, given directly or as a half-life in steps.

    `half_life = ln 2 / -ln alpha` exactly (no truncation), so `alpha = 2 ** (-1 / half_life)`.
    Exactly one of `alpha` / `half_life` must be given; both are validated before any arithmetic.
    """

    __slots__ = ("name", "alpha", "half_life")

    def __init__(self, name: str, alpha: float | None = None, half_life: float | None = None) -> None:
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
        self.name = name
        self.alpha = float(alpha)
        self.half_life = float(half_life)

    def __repr__(self) -> str:
        return f"ClockConfig(name={self.name!r}, alpha={self.alpha!r}, half_life={self.half_life!r})"


def ema_update(
    value: Tensor, decay: Tensor, x: Tensor, measured: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor]:
    """One masked EMA step for C clocks over E entries (pure function).

    value [C, E, *D], decay [C, E] (product of the retentions applied so far), x [E, *D],
    measured [E] bool, alpha [C] retentions. Unmeasured entries are returned unchanged; NaN in an
    unmeasured `x` never leaks in.
    """
    extra = (1,) * (value.dim() - 2)
    a = alpha.to(value.dtype).view(-1, 1, *extra)
    m = measured.view(1, -1, *extra)
    x_safe = torch.where(measured.view(-1, *extra), x.to(value.dtype), torch.zeros((), dtype=value.dtype,
                                                                                      device=value.device))
    new_value = torch.where(m, a * value + (1.0 - a) * x_safe.unsqueeze(0), value)
    new_decay = torch.where(measured.unsqueeze(0), decay * alpha.to(decay.dtype).view(-1, 1), decay)
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


class ThreeClockEMA(nn.Module):
    """Masked EMAs of a per-entry signal at three retentions (fast, mid, slow), vectorised over entries.

    Only measured entries are updated; each entry keeps its observation count and the running product of
    the retentions applied to it, so `read()` returns debiased values: a constant signal reads as itself
    after one observation, on every clock. Entries never observed read NaN.
    """

    value: Tensor
    decay: Tensor
    count: Tensor
    alphas: Tensor

    def __init__(
        self,
        num_entries: int,
        alphas: Sequence[float] = (0.9, 0.99, 0.999),
        trailing_shape: Sequence[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_entries, bool) or not isinstance(num_entries, int) or num_entries < 1:
            raise ValueError(f"num_entries={num_entries!r} is invalid: expected an integer >= 1")
        alphas = tuple(float(a) for a in alphas)
        if len(alphas) != 3:
            raise ValueError(f"alphas={alphas!r} is invalid: expected three retentions (fast, mid, slow)")
        for a in alphas:
            if not 0.0 < a < 1.0:
                raise ValueError(f"alphas={alphas!r} is invalid: expected each retention in (0, 1)")
        if not alphas[0] < alphas[1] < alphas[2]:
            raise ValueError(f"alphas={alphas!r} is invalid: expected fast < mid < slow")
        shape = (3, num_entries, *trailing_shape)
        self.register_buffer("value", torch.zeros(shape, dtype=torch.float32, device=device))
        self.register_buffer("decay", torch.ones(3, num_entries, dtype=torch.float32, device=device))
        self.register_buffer("count", torch.zeros(num_entries, dtype=torch.int64, device=device))
        self.register_buffer("alphas", torch.tensor(alphas, dtype=torch.float32, device=device))

    @property
    def num_entries(self) -> int:
        return int(self.count.shape[0])

    @torch.no_grad()
    def update(self, x: Tensor, measured: Tensor, alphas: Tensor | None = None) -> None:
        """Fold `x [E, *D]` into the entries where `measured [E]` is True.

        `alphas [3]` (device tensor) overrides the retentions for this step, e.g. relevance-modulated ones.
        """
        if x.shape != self.value.shape[1:]:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected {tuple(self.value.shape[1:])}")
        if measured.shape != self.count.shape or measured.dtype != torch.bool:
            raise ValueError(
                f"measured has shape {tuple(measured.shape)} and dtype {measured.dtype}; expected "
                f"{tuple(self.count.shape)} bool"
            )
        a = self.alphas if alphas is None else alphas
        value, decay = ema_update(self.value, self.decay, x, measured, a)
        self.value.copy_(value)
        self.decay.copy_(decay)
        self.count.add_(measured.to(self.count.dtype))

    def read(self) -> Tensor:
        """Debiased readings `[3, E, *D]` (fast, mid, slow); NaN where never observed."""
        return ema_debiased(self.value, self.decay)

    @torch.no_grad()
    def reset_entries(self, entries: Tensor) -> None:
        """Forget entries (bool mask `[E]`): a reused slot starts with no history."""
        extra = (1,) * (self.value.dim() - 2)
        self.value.masked_fill_(entries.view(1, -1, *extra), 0.0)
        self.decay.masked_fill_(entries.unsqueeze(0), 1.0)
        self.count.masked_fill_(entries, 0)

    @torch.no_grad()
    def copy_entry(self, src: int, dst: int) -> None:
        """Give entry `dst` the history of entry `src` (split children inherit their parent's record)."""
        self.value[:, dst] = self.value[:, src]
        self.decay[:, dst] = self.decay[:, src]
        self.count[dst] = self.count[src]
