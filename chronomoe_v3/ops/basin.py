"""BasinHistory: a bounded ring buffer of one expert's recent basin (token share, phi, co-activated experts)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any


def check_basin_reading(share: float, phi: float) -> tuple[float, float]:
    """One basin reading as floats, or ValueError: `share` finite and >= 0, `phi` a cosine in [-1, 1] or NaN
    (unmeasured)."""
    share, phi = float(share), float(phi)
    if not (math.isfinite(share) and share >= 0.0):
        raise ValueError(f"share={share!r} is invalid: expected a finite value >= 0")
    if not (math.isnan(phi) or -1.0 - 1e-6 <= phi <= 1.0 + 1e-6):
        raise ValueError(f"phi={phi!r} is invalid: expected a cosine in [-1, 1] or NaN (unmeasured)")
    return share, phi


class BasinHistory:
    """The last `window` slow-clock readings of one expert: share, phi (NaN = unmeasured), and the ids of
    the experts it was most co-activated with. Memory is bounded by `window`; oldest readings fall off."""

    def __init__(self, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} is invalid: expected an integer >= 1")
        self.window = window
        self._share: deque[float] = deque(maxlen=window)
        self._phi: deque[float] = deque(maxlen=window)
        self._coactive: deque[list[str]] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._share)

    def record(self, share: float, phi: float, coactive: Sequence[str] = ()) -> None:
        share, phi = check_basin_reading(share, phi)
        self._share.append(share)
        self._phi.append(phi)
        self._coactive.append([str(c) for c in coactive])

    @property
    def shares(self) -> list[float]:
        """Oldest first."""
        return list(self._share)

    @property
    def phis(self) -> list[float]:
        return list(self._phi)

    @property
    def coactive(self) -> list[list[str]]:
        return [list(c) for c in self._coactive]

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "share": self.shares, "phi": self.phis, "coactive": self.coactive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        window = int(state["window"])
        if window != self.window:
            raise ValueError(f"saved basin window is {window}; expected {self.window}")
        share, phi, coactive = list(state["share"]), list(state["phi"]), list(state["coactive"])
        if not len(share) == len(phi) == len(coactive) <= window:
            raise ValueError(
                f"saved basin has {len(share)} shares, {len(phi)} phis, {len(coactive)} co-activation lists; "
                f"expected equal lengths <= {window}"
            )
        for i, (sv, pv) in enumerate(zip(share, phi, strict=True)):
            try:
                check_basin_reading(sv, pv)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"saved basin reading {i}: {exc}") from None
        self._share = deque((float(v) for v in share), maxlen=window)
        self._phi = deque((float(v) for v in phi), maxlen=window)
        self._coactive = deque(([str(c) for c in row] for row in coactive), maxlen=window)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BasinHistory:
        out = cls(int(state["window"]))
        out.load_state_dict(state)
        return out
