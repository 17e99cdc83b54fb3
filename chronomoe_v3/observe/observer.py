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
from typing import Protocol

import torch
from torch import Tensor, nn

from ..clocks import DebiasedEMA
from ..config import ChronoConfig
from ..trace import MoETrace
from ..view import LayerView
from .bimodality import BimodalityState, sample_expert_outputs
from .coherence import CoherenceState
from .stats import ExpertStats, add_coactivation, coherence_reference, compute_expert_stats, starvation_fraction
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
    def observe(self, trace: MoETrace, active_mask: Tensor, generator: torch.Generator | None = None) -> ExpertStats:
        """Fold one training forward into the fast state; returns its statistics (for the token counter)."""
        stats = compute_expert_stats(trace)
        relevance = trace.bridge.relevance if trace.bridge is not None else None
        self.coherence.observe(stats, active_mask, relevance)
        samples, valid, inputs, gate = sample_expert_outputs(
            trace, self.config.bimodality.samples_per_expert, generator=generator, details=True
        )
        reference = coherence_reference(stats, self.config.coherence.estimator)
        usable = trace.router_input is not None and inputs.shape[-1] == self.bimodality.router_size
        load = stats.counts / stats.num_tokens.clamp_min(1.0)
        self.bimodality.update(
            samples, valid, active_mask, reference=reference, router_input=inputs if usable else None, gate=gate,
            load=load,
        )
        self.coactivation_tokens.add_(add_coactivation(self.coactivation, trace, active_mask))
        if trace.router_logits_clean is not None:
            starved = starvation_fraction(
                trace.router_logits_clean, active_mask, self.top_k, trace.token_mask,
                self.config.objective.starvation_confidence,
            )
            self.starvation.update(starved.view(1), torch.ones(1, dtype=torch.bool, device=starved.device))
        self.evidence.mul_(self.slow_retention).add_(stats.counts)
        return stats

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
            alerts=tuple(alerts),
            pressure=pressure,
            age=age,
        ).to_host()
