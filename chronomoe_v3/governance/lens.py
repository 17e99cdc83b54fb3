"""ChronoLens: a steering nudge on a router's input, built from the router's *current* weights.

The lens keeps per-expert steering weights ``c`` (set at report time from utilisation shares) and, in
``forward``, forms ``d = normalize(c @ W)`` from the bound router's live weight ``W [n_slots, d_model]``,
so the direction follows training and changes of the active expert set. The push is relative to each
token's norm: ``x' = x + s * ||x|| * d`` (``s`` dimensionless), plus the optional low-rank warp
``s * (x V) U``. Forward is pure tensor work: the scale is a buffer and nothing branches on tensor values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

SHARE_FLOOR_OF_UNIFORM = 0.01


class SteeringMode(str, Enum):
    """How per-expert steering weights are derived from utilisation shares."""

    ANTI_DOMINANCE = "ANTI_DOMINANCE"
    LIFT_TAIL = "LIFT_TAIL"
    ENTROPY_MAX = "ENTROPY_MAX"


def parse_steering_mode(mode: str | SteeringMode) -> SteeringMode:
    try:
        return SteeringMode(mode)
    except ValueError:
        raise ValueError(f"steering mode must be one of {[m.value for m in SteeringMode]}, got {mode!r}") from None


def steering_weights(shares: torch.Tensor, active_mask: torch.Tensor, mode: str | SteeringMode) -> torch.Tensor:
    """Per-slot weights ``c`` such that ``d = sum_e c_e W_e``; zero on inactive slots.

    ANTI_DOMINANCE: ``c_e = 1/n - s_e``. LIFT_TAIL: its positive part (only under-used experts pull).
    ENTROPY_MAX: ``c_e = -log(n s_e)``, the log-share deviation from uniform (shares floored at 1% of the
    uniform share, so ``c_e <= log 100``): same signs as ANTI_DOMINANCE, but starved experts pull far harder
    and dominant ones are pushed down only logarithmically.
    """
    mode = parse_steering_mode(mode)
    mask = active_mask.to(shares.dtype)
    n = mask.sum().clamp_min(1.0)
    if mode is SteeringMode.ENTROPY_MAX:
        return -(shares * n).clamp_min(SHARE_FLOOR_OF_UNIFORM).log() * mask
    c = (1.0 / n - shares) * mask
    return c.clamp_min(0.0) if mode is SteeringMode.LIFT_TAIL else c


def _router_weight(router: nn.Module | torch.Tensor) -> torch.Tensor:
    weight = router if isinstance(router, torch.Tensor) else getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"router must have a 2-D .weight [n_experts, d_model] (or be that tensor), got {router!r}")
    return weight


class ChronoLens(nn.Module):
    """Steers one layer's router input toward under-used experts (see module docstring)."""

    scale: torch.Tensor
    steering: torch.Tensor
    active_mask: torch.Tensor

    def __init__(self, d_model: int, rank: int = 8, layer_id: int = 0, use_warp: bool = False) -> None:
        super().__init__()
        if d_model < 1 or rank < 1 or layer_id < 0:
            raise ValueError(f"need d_model >= 1, rank >= 1, layer_id >= 0; got {d_model}, {rank}, {layer_id}")
        self.d_model = d_model
        self._rank = rank
        self.layer_id = layer_id
        self.use_warp = use_warp
        self.mode = SteeringMode.ANTI_DOMINANCE
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32))
        self.register_buffer("steering", torch.zeros(0, dtype=torch.float32))
        self.register_buffer("active_mask", torch.ones(0, dtype=torch.bool))
        # LoRA-style init: U = 0, so enabling the warp is the identity until U is trained.
        self.V = nn.Parameter(torch.randn(d_model, rank) / math.sqrt(d_model))
        self.U = nn.Parameter(torch.zeros(rank, d_model))
        # A plain tuple, so the router is referenced (live weights) but not registered as a submodule.
        self._router: tuple[nn.Module | torch.Tensor, ...] = ()
        self._hook: RemovableHandle | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def s(self) -> float:
        """Current scale (read-only: reading never changes state)."""
        return float(self.scale.detach().cpu())

    @property
    def router(self) -> nn.Module | torch.Tensor | None:
        return self._router[0] if self._router else None

    def bind_router(self, router: nn.Module | torch.Tensor, apply_as_hook: bool = False) -> RemovableHandle | None:
        """Keep a reference to ``router`` (a module with ``.weight``, or the weight tensor itself).

        The weight is read at every forward, never copied. With ``apply_as_hook=True`` the lens is also
        installed as a forward pre-hook on the router module, so ``router(x)`` computes ``router(lens(x))``.
        """
        weight = _router_weight(router)
        if weight.shape[1] != self.d_model:
            raise ValueError(f"router weight must be [n_experts, d_model={self.d_model}], got {tuple(weight.shape)}")
        self.unbind_router()
        self._router = (router,)
        n_slots = weight.shape[0]
        if self.steering.numel() != n_slots:
            self.steering = torch.zeros(n_slots, dtype=torch.float32, device=weight.device)
            self.active_mask = torch.ones(n_slots, dtype=torch.bool, device=weight.device)
        if apply_as_hook:
            if not isinstance(router, nn.Module):
                raise ValueError("apply_as_hook=True needs a router nn.Module, got a tensor")
            self._hook = router.register_forward_pre_hook(lambda _m, args: (self(args[0]), *args[1:]))
        return self._hook

    def unbind_router(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._router = ()

    def set_scale(self, s: float | torch.Tensor) -> None:
        if isinstance(s, torch.Tensor):
            self.scale.copy_(s.detach())
            return
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"scale must be a finite float >= 0, got {s!r}")
        self.scale.fill_(float(s))

    def set_steering_mode(self, mode: str | SteeringMode) -> None:
        self.mode = parse_steering_mode(mode)

    def set_active_mask(self, active_mask: torch.Tensor | Sequence[bool]) -> None:
        """Which router rows are live experts (kept until changed; shares map onto its True slots)."""
        mask = torch.as_tensor(active_mask, dtype=torch.bool).detach().to(self.active_mask.device).flatten()
        if self.router is not None and mask.numel() != self.steering.numel():
            raise ValueError(f"active_mask must have {self.steering.numel()} entries, got {mask.numel()}")
        if not bool(mask.any()):
            raise ValueError("active_mask must mark at least one active slot")
        self.active_mask = mask

    def update_steering(
        self,
        utilization_shares: torch.Tensor | np.ndarray | Sequence[float],
        active_mask: torch.Tensor | Sequence[bool] | None = None,
    ) -> None:
        """Set the steering weights from shares (report time).

        ``utilization_shares`` is either full width (one per router row) or active width (one per active
        slot, in ascending slot order, as in RoutingEvent / LayerSnapshot).
        """
        if self.router is None:
            raise ValueError("update_steering needs a router: call lens.bind_router(router) first")
        if active_mask is not None:
            self.set_active_mask(active_mask)
        shares = torch.as_tensor(np.asarray(utilization_shares, dtype=np.float32)).flatten()
        if not torch.isfinite(shares).all() or bool((shares < 0).any()):
            raise ValueError(f"utilization_shares must be finite and >= 0, got {shares.tolist()}")
        mask = self.active_mask.cpu()
        n_slots, n_active = mask.numel(), int(mask.sum())
        if shares.numel() == n_active:
            full = torch.zeros(n_slots, dtype=torch.float32)
            full[mask] = shares
        elif shares.numel() == n_slots:
            full = shares * mask
        else:
            raise ValueError(
                f"utilization_shares must have {n_active} (active) or {n_slots} (all slots) entries, "
                f"got {shares.numel()}"
            )
        weights = steering_weights(full, mask, self.mode)
        self.steering = weights.to(self.steering.device)

    def direction(self) -> torch.Tensor:
        """Unit steering direction from the router's current weights (zero if balanced or unbound)."""
        if self.router is None:
            return torch.zeros(self.d_model, device=self.scale.device)
        weight = _router_weight(self.router).detach()
        if weight.shape[0] != self.steering.numel():
            raise ValueError(
                f"router now has {weight.shape[0]} rows but steering has {self.steering.numel()}; "
                "call bind_router(router) again after resizing it"
            )
        d = self.steering.to(weight.device, torch.float32) @ weight.float()
        return d / d.norm().clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.direction().to(x.device)
        scale = self.scale.to(x.device)
        push = scale * x.detach().float().norm(dim=-1, keepdim=True) * d
        out = x + push.to(x.dtype)
        if self.use_warp:
            out = out + (scale * ((x @ self.V.to(x.dtype)) @ self.U.to(x.dtype)).float()).to(x.dtype)
        return out

    def get_extra_state(self) -> dict[str, str]:
        return {"mode": self.mode.value}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.set_steering_mode(state["mode"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # steering / active_mask follow the router's width, which may differ from a fresh lens's.
        for name in ("steering", "active_mask"):
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_norms(self) -> dict[str, float]:
        """Report-time diagnostics: scale, steering-weight and warp factor norms."""
        return {
            "scale": self.s,
            "steering_norm": float(self.steering.norm()),
            "U_norm": float(self.U.detach().norm()),
            "V_norm": float(self.V.detach().norm()),
        }

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, rank={self.rank}, layer_id={self.layer_id}, use_warp={self.use_warp}"


class IdentityLens(nn.Module):
    """A lens that never changes its input; it accepts every lens call so a Controller can drive it."""

    def __init__(self, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.mode = SteeringMode.ANTI_DOMINANCE
        self._scale = 0.0

    @property
    def rank(self) -> int:
        return 0

    @property
    def s(self) -> float:
        """The last scale a controller set (recorded only; it has no effect)."""
        return self._scale

    def set_scale(self, s: float | torch.Tensor) -> None:
        self._scale = float(s)

    def set_steering_mode(self, mode: str | SteeringMode) -> None:
        self.mode = parse_steering_mode(mode)

    def update_steering(self, utilization_shares: Any, active_mask: Any = None) -> None:
        return None

    def get_norms(self) -> dict[str, float]:
        return {"scale": self._scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LogitLens(nn.Module):
    """The mid clock's actuator on a router's logits: a per-slot *selection* offset that moves tokens from
    dominant experts to starved ones, integrated from the controller's pressure.

    A controller drives it like any lens (`set_steering_mode`, `update_steering(shares)`, `set_scale(s)`):
    `update_steering` computes steering weights `c` from the window's utilisation shares (by default
    ENTROPY_MAX: `c_e = -log(n s_e)`, centred over the active slots, so the offsets keep mean 0), and
    `set_scale(s)` integrates them: `offset <- clip(offset + gain * s * c, -max_offset, max_offset)`. The
    layer adds `offset` to the scores that choose the top-k and to nothing else (gate weights stay the
    router's, as in aux-loss-free balancing), so it redistributes traffic without distorting what the chosen
    experts are weighted by. A controller that abstains (scale 0) leaves the offset where it is: like an
    aux-loss-free bias, what it learned keeps the layer balanced. Unlike an input lens (`ChronoLens`), whose
    push is one direction in the router's input space (a rank-1 change of the logits), this reaches every
    expert's logit independently (projectdesign.md, "Mid clock", says why it is the default; docs/results.md has
    its effect on a collapsed start).
    """

    offset: torch.Tensor
    steering: torch.Tensor
    scale: torch.Tensor
    active_mask: torch.Tensor

    def __init__(
        self,
        num_slots: int,
        gain: float = 1.0,
        max_offset: float = 8.0,
        layer_id: int = 0,
        mode: str | SteeringMode = SteeringMode.ENTROPY_MAX,
    ) -> None:
        super().__init__()
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} is invalid: expected an integer >= 1")
        for name, value in (("gain", gain), ("max_offset", max_offset)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0")
        self.gain = float(gain)
        self.max_offset = float(max_offset)
        self.layer_id = layer_id
        self.mode = parse_steering_mode(mode)
        self.register_buffer("offset", torch.zeros(num_slots, dtype=torch.float32))
        self.register_buffer("steering", torch.zeros(num_slots, dtype=torch.float32))
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32))
        self.register_buffer("active_mask", torch.ones(num_slots, dtype=torch.bool), persistent=False)

    @property
    def num_slots(self) -> int:
        return int(self.offset.shape[0])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LogitLens:
        # A model-wide cast (`.to(torch.bfloat16)`, `.double()`) must not round the integrated offset: keep the
        # fp32 buffers and take only the device the cast chose (as SlowBias does for beta).
        names = ("offset", "steering", "scale")
        keep = {name: getattr(self, name) for name in names}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return self

    @property
    def s(self) -> float:
        """The last scale the controller set (reading never changes state)."""
        return float(self.scale.detach().cpu())

    def set_steering_mode(self, mode: str | SteeringMode) -> None:
        self.mode = parse_steering_mode(mode)

    def set_active_mask(self, active_mask: torch.Tensor | Sequence[bool]) -> None:
        """Which slots are live experts (shares of `update_steering` map onto its True slots)."""
        mask = torch.as_tensor(active_mask, dtype=torch.bool).detach().flatten()
        if mask.numel() != self.num_slots:
            raise ValueError(f"active_mask must have {self.num_slots} entries, got {mask.numel()}")
        self.active_mask = mask.to(self.offset.device)

    def update_steering(
        self,
        utilization_shares: torch.Tensor | np.ndarray | Sequence[float],
        active_mask: torch.Tensor | Sequence[bool] | None = None,
    ) -> None:
        """Steering weights from shares (active width, ascending slot order, or full width), centred over the
        active slots."""
        if active_mask is not None:
            self.set_active_mask(active_mask)
        shares = torch.as_tensor(np.asarray(utilization_shares, dtype=np.float32)).flatten()
        if not bool(torch.isfinite(shares).all()) or bool((shares < 0).any()):
            raise ValueError(f"utilization_shares must be finite and >= 0, got {shares.tolist()}")
        mask = self.active_mask.cpu()
        n_active = int(mask.sum())
        if shares.numel() == n_active:
            full = torch.zeros(self.num_slots)
            full[mask] = shares
        elif shares.numel() == self.num_slots:
            full = shares * mask
        else:
            raise ValueError(
                f"utilization_shares must have {n_active} (active) or {self.num_slots} (all slots) entries, "
                f"got {shares.numel()}"
            )
        c = steering_weights(full, mask, self.mode)
        c = torch.where(mask, c - c[mask].mean() if n_active else c, torch.zeros_like(c))
        self.steering = c.to(self.offset.device)

    @torch.no_grad()
    def set_scale(self, s: float | torch.Tensor) -> None:
        """Record the controller's scale and integrate: `offset += gain * s * steering` (clipped)."""
        value = float(s.detach()) if isinstance(s, torch.Tensor) else s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"scale must be a finite float >= 0, got {s!r}")
        self.scale.fill_(float(value))
        if value > 0:
            step = self.gain * float(value) * self.steering
            self.offset.copy_((self.offset + step).clamp(-self.max_offset, self.max_offset))
        self.steering.zero_()  # each integration uses the shares of its own window once

    def get_norms(self) -> dict[str, float]:
        """Report-time diagnostics: scale and the largest offset."""
        return {"scale": self.s, "offset_absmax": float(self.offset.abs().max())}

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, gain={self.gain}, max_offset={self.max_offset}, mode={self.mode.value}"
