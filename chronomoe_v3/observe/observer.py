"""LayerObserver: one MoE layer's fast state, its per-forward update, and what happens to it on an edit.

Per observed training forward (`observe`; tensor ops only, no host synchronisation): sufficient statistics
-> coherence clocks (relevance-modulated when a slow bias routes) -> bimodality detector (sampled outputs;
each role's predicted coherence as a split child; each role's mean router input, the anchors of a split's
router rows) -> co-routing accumulator -> starvation (slow debiased EMA) -> evidence; and, when the
training loop handed over the batch's token ids, the token basins.

`on_edit(record)` is the ONE place where per-slot fast state follows a structural edit (the fast clock
learns of edits only through it); `view(...)` copies what the slow clock reads into a host `LayerView`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..clocks import DebiasedEMA
from ..config import ChronoConfig
from ..trace import MoETrace
from ..view import LayerView
from .bimodality import BimodalityState, sample_expert_outputs
from .coherence import CoherenceState
from .stats import ExpertStats, coherence_reference, compute_expert_stats, router_signals
from .tokens import TokenBasins


class SlotEdit(Protocol):
    """What the fast clock needs to know of a structural edit (`ops.EditRecord` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def fresh_slots(self) -> tuple[int, ...]: ...

    @property
    def parked_slots(self) -> tuple[int, ...]: ...

    @property
    def kept_slots(self) -> tuple[int, ...]: ...


@dataclass
class Measurement:
    """One observed forward of one layer, measured (`LayerObserver.measure`) but not yet folded (`fold`).

    `stats` (`ExpertStats`); `relevance []` (bridge) or None; the detector's samples `samples [E, S, H]`,
    `valid [E, S]`, `router_input [E, S, H_r]` or None, `gate [E, S]`; `coactivation [E, E]`, the co-routing
    increment (None when it was added in place), over `coactivation_tokens []` real tokens; `starved []`, the
    fraction of starved tokens, or None without clean router logits.
    """

    stats: ExpertStats
    relevance: Tensor | None
    samples: Tensor
    valid: Tensor
    router_input: Tensor | None
    gate: Tensor
    coactivation: Tensor | None
    coactivation_tokens: Tensor
    starved: Tensor | None


def _mask(num_slots: int, slots: Sequence[int], device: torch.device) -> Tensor:
    mask = torch.zeros(num_slots, dtype=torch.bool, device=device)
    if slots:
        mask[list(slots)] = True
    return mask


class LayerObserver(nn.Module):
    """The fast state of one MoE layer of E slots and hidden width H (fp32 device buffers).

    Submodules: `coherence` (`CoherenceState`), `bimodality` (`BimodalityState`), `starvation` (slow EMA of
    the fraction of tokens no expert fits), `tokens` (`TokenBasins`, once token ids were handed over).
    Buffers: `coactivation [E, E]` and `coactivation_tokens []` (co-routing since the last slow review),
    `evidence [E]` (tokens routed to each
    expert, decayed at the slow clock's retention: what a slow reading rests on).
    """

    coactivation: Tensor
    coactivation_tokens: Tensor
    evidence: Tensor
    slow_retention: Tensor

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        top_k: int,
        config: ChronoConfig | None = None,
        *,
        router_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else ChronoConfig()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} is invalid: expected an integer >= 1")
        self.top_k = top_k
        e = num_experts
        self.coherence = CoherenceState(e, hidden_size, self.config, device=device)
        self.bimodality = BimodalityState(e, hidden_size, self.config, router_size=router_size, device=device)
        self.starvation = DebiasedEMA(1, [self.config.coherence.slow.retention], device=device)
        self.tokens: TokenBasins | None = None
        self.register_buffer("coactivation", torch.zeros(e, e, device=device))
        self.register_buffer("coactivation_tokens", torch.zeros((), device=device))
        self.register_buffer("evidence", torch.zeros(e, device=device))
        # A constant of the config (not saved): the slow clock's retention, at which evidence decays.
        self.register_buffer(
            "slow_retention", torch.tensor(self.config.coherence.slow.retention, device=device), persistent=False
        )

    @property
    def num_experts(self) -> int:
        return self.coherence.num_experts

    @property
    def device(self) -> torch.device:
        return self.evidence.device

    def enable_tokens(self) -> TokenBasins:
        """Start counting token basins (idempotent); returns them."""
        if self.tokens is None:
            self.tokens = TokenBasins(self.num_experts, self.config.basins.vocab_limit, device=self.device)
        return self.tokens

    # ------------------------------------------------------------------ per forward (device only)
    @torch.no_grad()
    def observe(
        self,
        trace: MoETrace,
        active_mask: Tensor,
        generator: torch.Generator | None = None,
        perm: Tensor | None = None,
    ) -> ExpertStats:
        """Fold one training forward into the fast state; returns its statistics (for the token counter).

        `perm` (a random permutation of the trace's `T*K` token-slots, drawn by the caller with `generator`:
        `draw_permutation`) orders the detector's sampling; without it one is drawn here from `generator`. A
        compiled caller passes it, so that the generator (which `torch.compile` cannot trace) stays outside
        the graph. Same as `fold(measure(...))`."""
        measured = self.measure(trace, active_mask, generator, perm)
        self.fold(measured, active_mask)
        return measured.stats

    @torch.no_grad()
    def measure(
        self,
        trace: MoETrace,
        active_mask: Tensor,
        generator: torch.Generator | None = None,
        perm: Tensor | None = None,
        coactivation: Tensor | None = None,
    ) -> Measurement:
        """One forward's local readings, not yet folded into the clocks (`fold`). The co-routing is added in
        place to `coactivation` (`[E, E]`; default: this observer's accumulator, and `fold` then adds none).
        A data-parallel run measures on every rank, sums the measurements (`distributed.py`), then folds."""
        stats = compute_expert_stats(trace)
        relevance = trace.bridge.relevance if trace.bridge is not None else None
        samples, valid, inputs, gate = sample_expert_outputs(
            trace, self.config.bimodality.samples_per_expert, generator=generator, details=True, perm=perm
        )
        usable = trace.router_input is not None and inputs.shape[-1] == self.bimodality.router_size
        into = self.coactivation if coactivation is None else coactivation
        tokens, starved = router_signals(
            into, trace, active_mask, self.top_k, self.config.objective.starvation_confidence
        )
        return Measurement(
            stats, relevance, samples, valid, inputs if usable else None, gate,
            None if coactivation is None else coactivation, tokens, starved,
        )

    @torch.no_grad()
    def fold(self, measured: Measurement, active_mask: Tensor) -> None:
        """Fold one forward's readings (`measure`, or their sum over data-parallel ranks) into the fast state."""
        stats = measured.stats
        self.coherence.observe(stats, active_mask, measured.relevance)
        reference = coherence_reference(stats, self.config.coherence.estimator)
        load = stats.counts / stats.num_tokens.clamp_min(1.0)
        self.bimodality.update(
            measured.samples, measured.valid, active_mask, reference=reference, router_input=measured.router_input,
            gate=measured.gate, load=load,
        )
        if measured.coactivation is not None:
            self.coactivation.add_(measured.coactivation)
        self.coactivation_tokens.add_(measured.coactivation_tokens)
        starved = measured.starved
        if starved is not None:
            self.starvation.update(starved.view(1), torch.ones(1, dtype=torch.bool, device=starved.device))
        self.evidence.mul_(self.slow_retention).add_(stats.counts)

    def count_tokens(self, token_ids: Tensor, trace: MoETrace) -> None:
        """Add this forward's (token id, expert) pairs to the token basins (enables them)."""
        self.enable_tokens().add(token_ids.to(trace.topk_index.device), trace.topk_index, trace.kept_slots())

    # ------------------------------------------------------------------ edits
    @torch.no_grad()
    def on_edit(self, record: SlotEdit) -> None:
        """Carry the per-slot fast state through a structural edit (the one place that does).

        - split: both children inherit the parent's clock history (they are cooling, never judged on it);
          the detector hands role 1 to the child in the parent's slot and role 2 to the new slot;
        - slots whose expert ends (prune, merge: the absorbed one) or that start a new expert from nothing
          (spawn, restore) forget their clocks and detector;
        - every edited slot's co-routing row and column start over;
        - token basins restart for every slot that now holds a different expert (the split child in the
          parent's slot included); a merge survivor keeps its basin.
        """
        e, device = self.num_experts, self.device
        if record.kind == "split":
            parent, target = record.kept_slots[0], record.fresh_slots[0]
            self.coherence.copy_expert(parent, target)
            self.bimodality.split_expert(parent, parent, target)
        forget = list(record.parked_slots) + ([] if record.kind == "split" else list(record.fresh_slots))
        if forget:
            mask = _mask(e, forget, device)
            self.coherence.reset_experts(mask)
            self.bimodality.reset_experts(mask)
        # evidence is the expert's own: every slot that now holds another expert starts with none
        renewed = list(record.fresh_slots) + list(record.parked_slots) + (
            list(record.kept_slots) if record.kind == "split" else []
        )
        if renewed:
            self.evidence.index_fill_(0, torch.as_tensor(renewed, dtype=torch.long, device=device), 0.0)
        slots = sorted(set(record.fresh_slots) | set(record.parked_slots) | set(record.kept_slots))
        idx = torch.as_tensor(slots, dtype=torch.long, device=device)
        self.coactivation.index_fill_(0, idx, 0.0)
        self.coactivation.index_fill_(1, idx, 0.0)
        if self.tokens is not None:
            renamed = list(record.kept_slots) if record.kind == "split" else []
            self.tokens.reset_slots(list(record.fresh_slots) + list(record.parked_slots) + renamed)

    @torch.no_grad()
    def start_window(self) -> None:
        """A slow review read the co-routing: the next window starts empty."""
        self.coactivation.zero_()
        self.coactivation_tokens.zero_()

    # ------------------------------------------------------------------ host side
    def starvation_level(self) -> float:
        """The debiased slow starvation fraction, clamped to [0, 1] (0 before the first observation)."""
        value = float(self.starvation.read().view(()))
        return 0.0 if value != value else min(max(value, 0.0), 1.0)

    def view(
        self,
        layer_id: int,
        active: Tensor,
        cooling: Tensor,
        alerts: Sequence[str] = (),
        pressure: float = 0.0,
        age: Tensor | None = None,
    ) -> LayerView:
        """What the slow objective reads of this layer, on the host (`active`, `cooling`: `[E]` bool; `alerts`:
        the v2 alert kinds on this layer now; `pressure`: the mid clock's pressure on it; `age`: `[E]` training
        steps since each slot's expert was born)."""
        coh, bim = self.coherence, self.bimodality
        tokens = float(self.coactivation_tokens)
        return LayerView(
            layer_id=layer_id,
            active=active.detach().cpu().clone(),
            cooling=cooling.detach().cpu(),
            phi_slow=coh.phi_slow.detach().cpu(),
            share_slow=coh.share_clocks[2].detach().cpu(),
            role=coh.role_vectors.detach().cpu(),
            bimodality=bim.bimodality.detach().cpu(),
            coactivation=(self.coactivation / max(tokens, 1.0)).detach().cpu(),
            starvation=self.starvation_level(),
            observations=coh.observations.detach().cpu(),
            centroid_phi=bim.centroid_phi.detach().cpu(),
            centroid_weights=bim.centroid_weights.detach().cpu(),
            evidence=self.evidence.detach().cpu(),
            phi_fast=coh.phi_fast.detach().cpu(),
            degrading=coh.degrading(active).detach().cpu(),
            identity=coh.identity_clocks.detach().cpu(),
            alerts=tuple(alerts),
            pressure=pressure,
            age=age,
        ).to_host()
