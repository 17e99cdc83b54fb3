"""Data-parallel ChronoSystem: every rank measures its shard of the batch, one stacked all-reduce sums all
layers' measurements, and every rank folds the same sums into its clocks (docs/distributed.md).

What a rank holds after each reduced forward is what one process holds after a forward of the global batch
(the concatenation of the ranks' batches in rank order), within float tolerance of the summation order:
- the sufficient statistics (`n_e`, `S_e`, `G_e`, `N`, non-finite flags), the co-routing increment and its
  token count, the starved-token count and the bridge relevance (weighted by real tokens) are summed; means
  are formed from the sums after the reduction;
- the detector's samples are exact: every rank draws the same permutation of the *global* token-slots
  from the system's generator (seeded identically; its consumption equals the single process's), keeps,
  per expert, its `S` local slots of lowest global key, and the reduction gathers every rank's candidates
  (a rank-slotted region summed with zeros elsewhere); every rank then keeps the `S` lowest keys per
  expert: the single process's draw.
Edits read only reduced state and the shared generator, so every rank decides and applies the same edits.

No host synchronisation per forward: the reduction is issued (`async_op=True`) when every layer has been
measured and waited for (a stream wait on NCCL) when the next forward measures a layer, or at `step()`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .observe.bimodality import sample_slots
from .observe.observer import Measurement
from .observe.stats import ExpertStats
from .observe.tokens import TokenBasins
from .trace import MoETrace

KEY_BITS = 24  # a global slot key travels as two fp32 numbers (key >> 24, key & (2**24 - 1)), exact below 2**48


def process_group_of(process_group: Any = None) -> Any:
    """The group to reduce over: `process_group` when given, else the default group when torch.distributed
    is initialised, else None (a single process: nothing is reduced, nothing changes)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def refuse_sharded_banks(names: list[str], params: list[list[Tensor]]) -> None:
    """ValueError when an expert bank holds a DTensor (FSDP2 `fully_shard`, tensor parallel): edits write slot
    slices of whole parameters in place, which a sharded parameter does not have on any one rank."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return
    for name, group in zip(names, params, strict=True):
        if any(isinstance(p, DTensor) for p in group):
            raise ValueError(
                f"MoE layer {name!r} holds sharded (DTensor) expert weights, e.g. from FSDP2 fully_shard: "
                "ChronoSystem edits whole expert slots in place and does not support sharded expert banks yet "
                "(docs/distributed.md). Build the system on the unsharded model, or keep the MoE layers out of "
                "fully_shard (shard the other modules) and data-parallelise them with DDP"
            )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def check_same_setup(fingerprint: dict[str, Any], group: Any) -> None:
    """Every rank gathers every rank's `fingerprint` (the config and the MoE layers' names and widths) and
    raises the same ValueError, naming the ranks and the fields that differ from rank 0's, when they differ.
    One collective, bounded by the group's timeout: no rank hangs on a mismatch."""
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, fingerprint, group=group)
    base = _flat(gathered[0])
    problems = []
    for rank, other in enumerate(gathered[1:], start=1):
        flat = _flat(other)
        fields = sorted(k for k in set(base) | set(flat) if base.get(k) != flat.get(k))
        if fields:
            shown = "; ".join(f"{k}: {flat.get(k)!r} (rank 0: {base.get(k)!r})" for k in fields[:6])
            problems.append(f"rank {rank} differs from rank 0 in {fields}: {shown}")
    if problems:
        raise ValueError(
            "ChronoSystem ranks were built differently (every rank must build the same model and config): "
            + " | ".join(problems)
        )


def fingerprint(config: dict[str, Any], layers: dict[str, list[Any]]) -> dict[str, Any]:
    """What must agree across ranks: the config (and its hash) and, per MoE layer, name and widths."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config_hash": digest, "config": config, "layers": layers}


@dataclass
class _Part:
    layer: int
    name: str
    shape: tuple[int, ...]
    offset: int
    gathered: bool  # rank-slotted: [world, *shape] at offset, this rank writes its own row


class StatisticsReducer:
    """Pending measurements of one forward of every layer, reduced in one stacked all-reduce (fp32 SUM).

    `draw_permutation(trace, generator)` draws the global keys of the trace's token-slots; `add(i, measured,
    keys)` records layer i's measurement; `start()` packs and issues the all-reduce; `finish()` waits and
    returns each layer's global `Measurement`. `mismatch` (device bool) is set when the ranks' forwards had
    different numbers of token-slots (the shared draw then assumed a wrong global size): checked at `step()`.
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = device
        self.pending: dict[int, tuple[Measurement, Tensor, int]] = {}
        self.layout: list[_Part] = []
        self.buffer: Tensor | None = None
        self.work: Any = None
        self.mismatch = torch.zeros((), dtype=torch.bool, device=device)
        self.bytes_last = 0  # size of the last reduced buffer

    # ------------------------------------------------------------------ per forward
    def draw_permutation(self, trace: MoETrace, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`(keys [T*K], perm [T*K])`: this rank's slice of one permutation of the global `world*T*K` slots
        (what a single process over the global batch draws from the same generator state), and the local
        permutation with the same order (what `sample_slots` takes)."""
        t, k = trace.topk_index.shape
        n = t * k
        glob = torch.randperm(n * self.world, device=trace.expert_out.device, generator=generator)
        keys = glob[self.rank * n : (self.rank + 1) * n]
        perm = torch.empty_like(keys)
        perm[torch.argsort(keys)] = torch.arange(n, device=keys.device)
        return keys, perm

    def sample_keys(self, trace: MoETrace, samples_per_expert: int, keys: Tensor, perm: Tensor) -> Tensor:
        """[E, S] int64 global keys of the slots the detector sampled from this rank (-1 where none)."""
        src, taken = sample_slots(trace, samples_per_expert, perm=perm)
        return torch.where(taken, keys[src], torch.full_like(src, -1))

    def has(self, i: int) -> bool:
        return i in self.pending

    def add(self, i: int, measured: Measurement, keys: Tensor, slots: int) -> None:
        """Record layer i's measurement, the global keys of its samples (`sample_keys`) and its number of
        token-slots `T*K` (host int)."""
        self.pending[i] = (measured, keys, slots)

    def _parts(self, m: Measurement, keys: Tensor) -> list[tuple[str, Tensor, bool]]:
        st = m.stats
        parts: list[tuple[str, Tensor, bool]] = [
            ("counts", st.counts, False), ("sum_out", st.sum_out, False),
            ("sum_weighted", st.sum_weighted, False), ("num_tokens", st.num_tokens.reshape(1), False),
            ("nonfinite", st.nonfinite.float(), False),
            ("coactivation_tokens", m.coactivation_tokens.reshape(1).float(), False),
        ]
        if m.coactivation is not None:
            parts.append(("coactivation", m.coactivation, False))
        if m.relevance is not None:
            parts.append(("relevance_sum", (m.relevance.float() * st.num_tokens).reshape(1), False))
        if m.starved is not None:
            parts.append(("starved_sum", (m.starved.float() * m.coactivation_tokens).reshape(1), False))
        taken = keys >= 0
        safe = keys.clamp_min(0)
        parts += [
            ("samples", m.samples, True), ("valid", m.valid.float(), True), ("gate", m.gate, True),
            ("taken", taken.float(), True),
            ("key_hi", (safe >> KEY_BITS).float(), True), ("key_lo", (safe & ((1 << KEY_BITS) - 1)).float(), True),
        ]
        if m.router_input is not None:
            parts.append(("router_input", m.router_input, True))
        return parts

    def start(self) -> None:
        """Pack every pending layer into one fp32 buffer and issue its all-reduce (asynchronous)."""
        if self.work is not None or not self.pending:
            return
        layout: list[_Part] = []
        tensors: list[Tensor] = []
        offset = 0
        for i in sorted(self.pending):
            m, keys, slots = self.pending[i]
            parts = self._parts(m, keys)
            # the token-slots of this rank's forward, in its own entry: all ranks must agree (checked at step())
            parts.append(("slot_count", torch.full((1,), float(slots), device=self.device), True))
            for name, t, gathered in parts:
                shape = tuple(t.shape)
                layout.append(_Part(i, name, shape, offset, gathered))
                tensors.append(t)
                offset += t.numel() * (self.world if gathered else 1)
        buffer = torch.zeros(offset, dtype=torch.float32, device=self.device)
        for part, t in zip(layout, tensors, strict=True):
            size = t.numel()
            start = part.offset + (self.rank * size if part.gathered else 0)
            buffer[start : start + size].copy_(t.reshape(-1))
        self.layout, self.buffer = layout, buffer
        self.bytes_last = buffer.numel() * buffer.element_size()
        self.work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def finish(self, samples_per_expert: int) -> list[tuple[int, Measurement]]:
        """Wait for the reduction (issuing it first if needed) and return every layer's global measurement."""
        if not self.pending:
            return []
        self.start()
        assert self.work is not None and self.buffer is not None
        self.work.wait()
        buf, w = self.buffer, self.world
        views: dict[int, dict[str, Tensor]] = {}
        for part in self.layout:
            size = 1
            for d in part.shape:
                size *= d
            total = size * (w if part.gathered else 1)
            shape = ((w,) if part.gathered else ()) + part.shape
            views.setdefault(part.layer, {})[part.name] = buf[part.offset : part.offset + total].view(shape)
        out = []
        for i in sorted(self.pending):
            local = self.pending[i][0]
            out.append((i, self._global(views[i], local, samples_per_expert)))
        self.pending, self.layout, self.buffer, self.work = {}, [], None, None
        return out

    def _global(self, v: dict[str, Tensor], local: Measurement, s: int) -> Measurement:
        nonfinite = v["nonfinite"] > 0
        zero = torch.zeros((), device=self.device)
        counts = torch.where(nonfinite, zero, v["counts"])
        sum_out = torch.where(nonfinite.unsqueeze(1), zero, v["sum_out"])
        sum_weighted = torch.where(nonfinite.unsqueeze(1), zero, v["sum_weighted"])
        num_tokens = v["num_tokens"].reshape(())
        stats = ExpertStats(counts, sum_out, sum_weighted, sum_weighted.sum(0), num_tokens, nonfinite)
        relevance = None
        if "relevance_sum" in v:
            rel = v["relevance_sum"].reshape(()) / num_tokens.clamp_min(1.0)
            relevance = torch.where(num_tokens > 0, rel, torch.ones_like(rel))
        tokens = v["coactivation_tokens"].reshape(())
        starved = None
        if "starved_sum" in v:
            starved = v["starved_sum"].reshape(()) / tokens.clamp_min(1.0)
        slot_count = v["slot_count"].reshape(-1)
        self.mismatch |= (slot_count != slot_count[0]).any()
        # the S lowest global keys per expert among every rank's candidates: the single process's draw
        w, e = v["taken"].shape[:2]
        key = v["key_hi"].double() * float(1 << KEY_BITS) + v["key_lo"].double()
        key = torch.where(v["taken"] > 0, key, torch.full_like(key, float("inf")))  # [W, E, S]
        order = key.permute(1, 0, 2).reshape(e, -1).argsort(dim=1, stable=True)[:, :s]  # [E, S]

        def pick(x: Tensor) -> Tensor:
            flat = x.transpose(0, 1).reshape(e, w * x.shape[2], *x.shape[3:])
            index = order.view(e, s, *([1] * (flat.dim() - 2))).expand(e, s, *flat.shape[2:])
            return flat.gather(1, index)

        router_input = pick(v["router_input"]) if "router_input" in v else None
        return Measurement(
            stats=stats, relevance=relevance, samples=pick(v["samples"]), valid=pick(v["valid"]) > 0,
            router_input=router_input, gate=pick(v["gate"]),
            coactivation=v["coactivation"].clone() if "coactivation" in v else local.coactivation,
            coactivation_tokens=tokens, starved=starved,
        )

    # ------------------------------------------------------------------ per step() window
    def reduce_token_basins(self, pending: dict[int, TokenBasins]) -> None:
        """Sum the token-basin counts the ranks added since the last call (one all-reduce, in place)."""
        if not pending:
            return
        layers = sorted(pending)
        flat = torch.cat([pending[i].counts.reshape(-1) for i in layers])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for i in layers:
            counts = pending[i].counts
            counts.copy_(flat[offset : offset + counts.numel()].view_as(counts))
            offset += counts.numel()

    def mean_loss(self, loss: float | None) -> float | None:
        """The ranks' mean of `loss` (host floats; one tiny all-reduce at `step()`). ValueError on every rank
        when some ranks passed a loss and others None."""
        t = torch.tensor([0.0 if loss is None else float(loss), 0.0 if loss is None else 1.0], dtype=torch.float64)
        if self.device.type != "cpu":
            t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        total, given = float(t[0]), int(round(float(t[1])))
        if given == 0:
            return None
        if given != self.world:
            raise ValueError(
                f"step(loss=...) was given a loss on {given} of {self.world} ranks: pass a loss on every rank "
                "or on none"
            )
        return total / self.world
