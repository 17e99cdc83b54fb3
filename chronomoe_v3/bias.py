"""The locus: the slow routing bias beta (SPEC 4).

Experts that stay coherent earn a small persistent routing advantage:
`beta_e <- clip(beta_e + eta * (Phi_slow_e - tau), beta_min, beta_max)` for measured, active experts, then
(optionally, default on) a centring shift over the active experts. `slow_bias_update` is that rule as a pure
function; `SlowBias` is the thin module that owns the fp32 `beta [E]` buffer. Routing with beta, and the
bridge detector that keeps it honest, live in `routing.py` (`route_with_bias`).

Choice (docs/slow_bias.md): clip, then centre. The centring shift `c` is the one that gives the active betas
mean 0 *while staying inside [beta_min, beta_max]* (`beta_e <- clip(beta_e - c)`; when no bound binds, `c` is
the plain mean, a common shift that leaves every softmax unchanged). Both invariants then hold after every
update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .config import ChronoConfig


def _check_vector(name: str, value: Tensor, width: int | None, dtype: torch.dtype | None = None) -> int:
    if not isinstance(value, Tensor) or value.dim() != 1 or (width is not None and value.shape[0] != width):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        expected = f"({width},)" if width is not None else "[E]"
        raise ValueError(f"{name} has shape {shape}; expected {expected}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name} has dtype {value.dtype}; expected {dtype}")
    if dtype is None and not value.is_floating_point():
        raise ValueError(f"{name} has dtype {value.dtype}; expected a floating dtype")
    return int(value.shape[0])


# ---------------------------------------------------------------------- the update rule (pure functions)
def center_beta(beta: Tensor, active_mask: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """Shift the active betas so that their mean is 0 while each stays in [beta_min, beta_max].

    Returns `where(active, clip(beta - c, beta_min, beta_max), beta)` with the scalar `c` solving
    `sum_active clip(beta_e - c) = 0`. That sum is piecewise linear and non-increasing in `c`, with
    breakpoints at `beta_e - beta_max` and `beta_e - beta_min`, so `c` is found exactly by evaluating it at
    every breakpoint and interpolating on the piece where it changes sign ([2E, E] work, no host sync).
    Such a `c` exists because the bounds contain 0. When no bound binds, `c` is the mean of the active betas.
    Inactive slots are returned unchanged; with no active slot nothing changes.
    """
    b = beta.float()
    active = active_mask.to(device=b.device, dtype=torch.bool)
    candidates = torch.sort(torch.cat([b - beta_max, b - beta_min])).values  # [2E]
    clipped = (b.unsqueeze(0) - candidates.unsqueeze(1)).clamp(beta_min, beta_max)  # [2E, E]
    g = torch.where(active.unsqueeze(0), clipped, torch.zeros_like(clipped)).sum(1)  # non-increasing
    last = candidates.shape[0] - 1
    j = ((g >= 0).sum() - 1).clamp(0, last).view(1)
    j1 = (j + 1).clamp_max(last)
    # gather, not `candidates[j]`: indexing with a tensor scalar would read it on the host
    s0, s1, g0, g1 = candidates.gather(0, j), candidates.gather(0, j1), g.gather(0, j), g.gather(0, j1)
    drop = g0 - g1
    c = torch.where(drop > 0, s0 + g0 * (s1 - s0) / torch.where(drop > 0, drop, torch.ones_like(drop)), s0)
    return torch.where(active, (b - c).clamp(beta_min, beta_max), b)


def fp32_inward(low: float, high: float) -> tuple[float, float]:
    """`[low, high]` narrowed to the nearest fp32 numbers inside it (the bounds the fp32 beta is clamped to): a
    bound that is not an fp32 number would otherwise round outward, e.g. 1e-45 -> 1.4e-45 > 1e-45."""
    inf = torch.tensor(math.inf)
    lo, hi = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    if float(lo) < low:
        lo = torch.nextafter(lo, inf)
    if float(hi) > high:
        hi = torch.nextafter(hi, -inf)
    return float(lo), float(hi)


def slow_bias_update(
    beta: Tensor,
    phi_slow: Tensor,
    active_mask: Tensor | None = None,
    *,
    eta: float,
    tau: float,
    beta_min: float,
    beta_max: float,
    center: bool = True,
    check_values: bool = True,
) -> Tensor:
    """One slow-bias step (SPEC 4); returns the new fp32 beta `[E]` and leaves its inputs untouched.

    `beta_e <- clip(beta_e + eta * (phi_slow_e - tau), beta_min, beta_max)` for experts that are active and
    measured (finite `phi_slow`); others keep their beta, so a NaN/Inf phi never reaches beta (skipped for
    that expert). Then, with `center`, `center_beta` over the active experts (clip first, then a
    bound-respecting centring). An entry whose result would be non-finite (an incoming non-finite beta
    with `check_values=False`) keeps its incoming value.

    Shapes and dtypes are always checked (free). With `check_values` (default, for direct calls) the
    incoming beta must also be finite: a read of device values, i.e. a host sync, which
    `SlowBias.update` skips in the per-step path (its beta is checked where it is written).
    """
    e = _check_vector("beta", beta, None)
    _check_vector("phi_slow", phi_slow, e)
    for name, value in (("eta", eta), ("tau", tau), ("beta_min", beta_min), ("beta_max", beta_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is invalid: expected a finite number")
    if not beta_min <= 0.0 <= beta_max:
        raise ValueError(f"[beta_min, beta_max]=[{beta_min}, {beta_max}] is invalid: expected bounds that contain 0")
    if active_mask is not None:
        _check_vector("active_mask", active_mask, e, torch.bool)
    if check_values and not bool(torch.isfinite(beta).all()):
        raise ValueError("beta holds non-finite values; expected finite slow biases")
    b = beta.float()
    beta_min, beta_max = fp32_inward(beta_min, beta_max)  # clamps in fp32 never step outside the fp64 bounds
    phi = phi_slow.to(device=b.device, dtype=torch.float32)
    active = (
        torch.ones(e, dtype=torch.bool, device=b.device) if active_mask is None else active_mask.to(b.device)
    )
    measured = torch.isfinite(phi) & active
    step = eta * (torch.where(measured, phi, torch.full_like(phi, tau)) - tau)
    new = torch.where(measured, (b + step).clamp(beta_min, beta_max), b)
    if center:
        new = center_beta(new, active, beta_min, beta_max)
    return torch.where(torch.isfinite(new), new, b)


# ---------------------------------------------------------------------- state
class SlowBias(nn.Module):
    """One layer's slow routing bias: a persistent fp32 buffer `beta [E_max]` and its update.

    Attach it to a `ChronoMoELayer` with `layer.attach_slow_bias(config)` (or route any router's logits
    with `route_with_bias(logits, ..., beta=slow_bias.beta)`); advance it with
    `slow_bias.update(coherence_state.phi_slow, layer.active_mask)`. `beta` stays fp32 when the model is
    cast (`.half()`, `.to(torch.bfloat16)`): only its device follows the cast. Values are checked where
    they enter (constructor, `set_beta`, `load_state_dict`); the per-step `update` does no host sync.
    """

    beta: Tensor

    def __init__(
        self,
        num_experts: int,
        config: ChronoConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r} is invalid: expected an integer >= 1")
        if config is not None and not isinstance(config, ChronoConfig):
            raise ValueError(f"config is a {type(config).__name__}; expected a ChronoConfig")
        self.config = config if config is not None else ChronoConfig()
        self.register_buffer("beta", torch.zeros(num_experts, dtype=torch.float32, device=device))

    @property
    def num_experts(self) -> int:
        return int(self.beta.shape[0])

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_experts={self.num_experts}, eta={c.bias.eta}, tau={c.bias.tau}, "
            f"clip=[{c.bias.beta_min}, {c.bias.beta_max}], "
            f"center={c.bias.center}, mode={c.bias.mode!r}, veto={c.bridge.veto}"
        )

    @torch.no_grad()
    def update(self, phi_slow: Tensor, active_mask: Tensor | None = None) -> Tensor:
        """Apply one step of the update rule in place (tensor ops only, no host sync); returns `beta`."""
        c = self.config
        new = slow_bias_update(
            self.beta, phi_slow, active_mask, eta=c.bias.eta, tau=c.bias.tau, beta_min=c.bias.beta_min,
            beta_max=c.bias.beta_max, center=c.bias.center, check_values=False,
        )
        self.beta.copy_(new)
        return self.beta

    @torch.no_grad()
    def set_beta(self, values: Tensor | float, experts: Tensor | None = None) -> None:
        """Write `values` (a number or `[E]`) into the slots selected by `experts` (bool `[E]`; all when None),
        e.g. a newborn expert's starting bias. Checked: finite and within [beta_min, beta_max] (host sync)."""
        e = self.num_experts
        v = torch.as_tensor(values, dtype=torch.float32, device=self.beta.device)
        if v.dim() == 0:
            v = v.expand(e)
        _check_vector("beta", v, e)
        if experts is not None:
            _check_vector("experts", experts, e, torch.bool)
        self._check_values(v if experts is None else v[experts.to(v.device)])
        mask = torch.ones(e, dtype=torch.bool, device=v.device) if experts is None else experts.to(v.device)
        self.beta.copy_(torch.where(mask, v, self.beta))

    def _check_values(self, beta: Tensor) -> None:
        c = self.config
        if not bool(torch.isfinite(beta).all()):
            raise ValueError("beta holds non-finite values; expected finite slow biases")
        if beta.numel() and (float(beta.min()) < c.bias.beta_min or float(beta.max()) > c.bias.beta_max):
            raise ValueError(
                f"beta holds values in [{float(beta.min())}, {float(beta.max())}]; expected values within "
                f"[beta_min={c.bias.beta_min}, beta_max={c.bias.beta_max}]"
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "beta"
        if key in state_dict:
            _check_vector("beta", state_dict[key], self.num_experts)
            self._check_values(state_dict[key].float())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SlowBias:
        # A model-wide cast (`.half()`, `.to(torch.bfloat16)`) must not round beta: keep the fp32 values and
        # take only the device the cast chose.
        beta = self.beta
        super()._apply(fn, recurse)
        if self.beta.dtype != torch.float32:
            self.beta = beta.to(device=self.beta.device, dtype=torch.float32)
        return self


