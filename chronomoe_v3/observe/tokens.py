"""Token basins: which token ids each expert of a layer attracts, from bounded counts on the device.

When the training loop hands the system the batch's token ids (`ChronoSystem.observe_tokens(ids)` before
the forward), each observed forward adds one count per dispatched (token, expert) pair to a fixed
`[E, V + 1]` table (`V = vocab_limit`; ids >= V, or negative, share the last column, "other"). The table's
size never changes, whatever the run length; `decay` (once per `step()`) lets recent routing dominate.
Nothing here reads device values: the per-forward update is one `index_add_`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TokenBasins(nn.Module):
    """Per expert slot of one layer, decayed counts of the token ids routed to it (fp32 device buffer)."""

    counts: Tensor

    def __init__(self, num_slots: int, vocab_limit: int = 4096, device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, value in (("num_slots", num_slots), ("vocab_limit", vocab_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
        self.vocab_limit = vocab_limit
        self.register_buffer("counts", torch.zeros(num_slots, vocab_limit + 1, device=device))

    @property
    def num_slots(self) -> int:
        return int(self.counts.shape[0])

    @torch.no_grad()
    def add(self, token_ids: Tensor, topk_index: Tensor, keep: Tensor) -> None:
        """Count one forward: `token_ids [T]` (any integer dtype), `topk_index [T, K]` the experts each token
        was dispatched to, `keep [T, K]` bool the slots that count (kept, real tokens)."""
        t, k = topk_index.shape
        if tuple(token_ids.shape) != (t,):
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}; expected ({t},) to match the routing")
        if tuple(keep.shape) != (t, k):
            raise ValueError(f"keep has shape {tuple(keep.shape)}; expected ({t}, {k})")
        v = self.vocab_limit
        ids = token_ids.to(device=self.counts.device, dtype=torch.long)
        ids = torch.where((ids >= 0) & (ids < v), ids, torch.full_like(ids, v))
        slots = topk_index.to(device=self.counts.device, dtype=torch.long).clamp(0, self.num_slots - 1)
        key = slots * (v + 1) + ids.unsqueeze(1)
        self.counts.view(-1).index_add_(0, key.reshape(-1), keep.reshape(-1).to(self.counts))

    @torch.no_grad()
    def decay(self, factor: float) -> None:
        """Multiply every count by `factor` in [0, 1]."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"factor={factor!r} is invalid: expected a value in [0, 1]")
        self.counts.mul_(factor)

    @torch.no_grad()
    def reset_slots(self, slots: list[int] | tuple[int, ...]) -> None:
        """Forget the counts of slots that now hold a different expert."""
        if slots:
            self.counts[list(slots)] = 0.0

    def top(self, n: int = 20) -> list[tuple[float, list[tuple[int, float]]]]:
        """Host side: per slot, (total count, up to `n` (token id, count) pairs, most counted first; id
        `vocab_limit` stands for every id outside [0, vocab_limit))."""
        table = self.counts.detach().cpu()
        k = min(n, table.shape[1])
        values, index = table.topk(k, dim=1)
        totals = table.sum(1).tolist()
        out = []
        for slot in range(table.shape[0]):
            pairs = [(int(i), float(c)) for c, i in zip(values[slot].tolist(), index[slot].tolist(), strict=True)
                     if c > 0]
            out.append((float(totals[slot]), pairs))
        return out
