"""Device-side token counting: accumulate per-step counts without host syncs, report once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .events import RoutingEvent, check_int, check_mode

MasksLike = torch.Tensor | Sequence[torch.Tensor] | None


class TokenCounter:
    """Accumulates ``[n_slots]`` token-count tensors per layer into one ``[n_layers, n_slots]`` buffer.

    ``add`` is pure tensor work on the buffer's device (no ``.item()``, ``.tolist()`` or host branching),
    so it is safe inside a training step. ``to_events`` does one host transfer at report time. Float
    counts (e.g. from a one-hot matmul) are rounded before accumulation; negative counts cannot be
    checked without a sync and are rejected by ``to_events`` when the RoutingEvent is built.
    """

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.int64,
    ) -> None:
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.n_slots = check_int("n_slots", n_slots, minimum=1)
        if dtype not in (torch.int64, torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.int64, torch.float32 or torch.float64, got {dtype}")
        self.counts = torch.zeros(self.n_layers, self.n_slots, dtype=dtype, device=device)

    def _cast(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.detach()
        if counts.is_floating_point() and not self.counts.is_floating_point():
            counts = counts.round()
        return counts.to(device=self.counts.device, dtype=self.counts.dtype)

    def add(self, layer_id: int, counts: torch.Tensor) -> None:
        """Add one step's ``[n_slots]`` counts of ``layer_id`` (shape checks only; no host sync)."""
        if not 0 <= layer_id < self.n_layers:
            raise ValueError(f"layer_id={layer_id} outside range(n_layers={self.n_layers})")
        if tuple(counts.shape) != (self.n_slots,):
            raise ValueError(f"counts must have shape ({self.n_slots},), got {tuple(counts.shape)}")
        self.counts[layer_id].add_(self._cast(counts))

    def add_all(self, counts: torch.Tensor) -> None:
        """Add one step's stacked ``[n_layers, n_slots]`` counts (e.g. after one all-reduce)."""
        if tuple(counts.shape) != (self.n_layers, self.n_slots):
            expected = (self.n_layers, self.n_slots)
            raise ValueError(f"counts must have shape {expected}, got {tuple(counts.shape)}")
        self.counts.add_(self._cast(counts))

    def reset(self) -> None:
        self.counts.zero_()

    def _stack_masks(self, active_masks: MasksLike) -> torch.Tensor | None:
        if active_masks is None:
            return None
        masks = active_masks if isinstance(active_masks, torch.Tensor) else torch.stack(list(active_masks))
        if tuple(masks.shape) != (self.n_layers, self.n_slots) or masks.dtype != torch.bool:
            raise ValueError(
                f"active_masks must be bool of shape ({self.n_layers}, {self.n_slots}), "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )
        return masks

    def to_events(
        self,
        run_id: str,
        step: int,
        mode: str,
        top_k: int,
        active_masks: MasksLike = None,
        reset: bool = True,
    ) -> list[RoutingEvent]:
        """One RoutingEvent per layer from the accumulated counts (one device-to-host copy).

        With ``active_masks`` (``[n_layers, n_slots]`` bool, or one ``[n_slots]`` mask per layer) an
        event's ``n_experts`` is the layer's active width and ``expert_token_counts[i]`` is the count of
        the ``i``-th active slot in ascending slot order, i.e. slot ``active_mask.nonzero()[i]``.

        All events are built (every count validated) before anything is consumed: when a count is refused
        (ValueError, e.g. a negative count) the accumulated counts are left untouched, even with ``reset``.
        """
        check_mode(mode)
        masks = self._stack_masks(active_masks)
        payload = self.counts if masks is None else torch.cat([self.counts, masks.to(self.counts)], dim=0)
        host = payload.to("cpu", copy=True)  # a copy even on CPU, so reset cannot clear it
        counts = host[: self.n_layers]
        host_masks = host[self.n_layers :].bool() if masks is not None else None
        now = time.time()
        events = []
        for layer_id in range(self.n_layers):
            row = counts[layer_id] if host_masks is None else counts[layer_id][host_masks[layer_id]]
            if row.numel() == 0:
                raise ValueError(f"active mask of layer {layer_id} has no active slot; expected at least one")
            events.append(
                RoutingEvent.from_router_output(
                    run_id, step, mode, layer_id, row, int(row.numel()), top_k, timestamp=now
                )
            )
        # Validate first, then consume: every event was built (so every count was accepted) before the buffer is
        # cleared; a refused count raises above and leaves the accumulated counts as they were.
        if reset:
            self.counts.zero_()
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; ValueError (nothing changed) for a wrong shape or type, or a count that is
        negative, non-finite or (for an integer counter) fractional."""
        counts = state["counts"]
        if not isinstance(counts, torch.Tensor):
            raise ValueError(f"counts must be a tensor, got {type(counts).__name__}")
        if tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(f"counts must have shape {tuple(self.counts.shape)}, got {tuple(counts.shape)}")
        host = counts.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(host) | (host < 0)
        if not self.counts.is_floating_point():
            bad |= host != host.round()
        if bool(bad.any()):
            where = tuple(int(v) for v in bad.nonzero()[0].tolist())
            raise ValueError(
                f"counts[{where}] = {float(host[where])} is invalid: expected finite token counts >= 0"
                f"{' (integers)' if not self.counts.is_floating_point() else ''}"
            )
        self.counts.copy_(counts)
