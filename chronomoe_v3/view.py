"""LayerView: what the slow clock reads of one layer (the fast -> slow contract), built once per review.

The fast clock (`observe/`) keeps device state per forward; at review time `LayerObserver.view()` copies what
the slow objective needs into a `LayerView` on the host, and everything in `lifecycle/` reads only that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerView:
    """What the slow objective reads for one layer (E slots, width H). Any device; read on the host.

    active [E] bool: slots in play (router unmasked), cooling experts included.
    cooling [E] bool: born and not yet judged; never a candidate.
    phi_slow [E]: debiased slow coherence, NaN = unmeasured. share_slow [E]: slow token share.
    role [E, H]: role vectors (NaN rows = never measured). bimodality [E]: BimodalityState.bimodality.
    coactivation [E, E]: co-routing over the window, any scale (only ratios are read): row e sums, over
    tokens with e among the clean top-2, the router's interchangeability `min(1, p_f / p_e)` (so the
    diagonal counts e's candidate tokens); see `routing_overlap`. starvation: slow EMA of
    `starvation_fraction`. observations [E]: measured steps.
    centroid_phi / centroid_weights [2, E] (optional): BimodalityState readings for the split prediction
    (each role's predicted coherence as a split child, and its traffic share).
    evidence [E] (optional): tokens each expert was routed over the slow window (a count decayed at the slow
    clock's retention), what a judged reading rests on. phi_fast [E] (optional): the fast clock's phi.
    degrading [E] bool (optional): the degrading flag. alerts: the v2 alert kinds raised on this layer at
    this review (PRE_COLLAPSE, COLLAPSE_CONFIRMED). pressure: the mid clock's redistribution pressure on the
    layer (0 without a mid clock): a layer under pressure is still being rebalanced. age [E] (optional):
    training steps since the expert in each slot was born (0 for a free slot); a removal needs its own
    history, not an inherited one. jumped [E] bool (optional): the expert's weights jumped away from its shadow
    copy (ops/shadow.py), restorable from it; drift [E] (optional): the estimated relative distance of its
    weights from that copy; shadow_step [E] (optional): the training step the copy was taken at (-1: none).
    identity [2, E] (optional): the debiased identity clocks (fast, slow): how closely each expert's mean output
    keeps its own earlier direction (`CoherenceState.identity_clocks`).
    offset [E] (optional): the mid clock's selection offset on each slot (its lens; None without a mid clock):
    a negative offset means chronomoe itself is moving tokens away from that expert.
    """

    layer_id: int
    active: Tensor
    cooling: Tensor
    phi_slow: Tensor
    share_slow: Tensor
    role: Tensor
    bimodality: Tensor
    coactivation: Tensor
    starvation: Tensor | float
    observations: Tensor
    centroid_phi: Tensor | None = None
    centroid_weights: Tensor | None = None
    evidence: Tensor | None = None
    phi_fast: Tensor | None = None
    degrading: Tensor | None = None
    alerts: tuple[str, ...] = ()
    pressure: float = 0.0
    age: Tensor | None = None
    jumped: Tensor | None = None
    drift: Tensor | None = None
    shadow_step: Tensor | None = None
    offset: Tensor | None = None
    identity: Tensor | None = None

    @property
    def num_slots(self) -> int:
        return int(self.active.shape[0])

    def validate(self) -> LayerView:
        e = self.num_slots
        vectors = {
            "active": self.active, "cooling": self.cooling, "phi_slow": self.phi_slow, "share_slow": self.share_slow,
            "bimodality": self.bimodality, "observations": self.observations,
        }
        for name, t in vectors.items():
            if tuple(t.shape) != (e,):
                raise ValueError(f"LayerView.{name} has shape {tuple(t.shape)}; expected ({e},)")
        for name in ("active", "cooling"):
            if vectors[name].dtype != torch.bool:
                raise ValueError(f"LayerView.{name} has dtype {vectors[name].dtype}; expected torch.bool")
        if self.role.dim() != 2 or self.role.shape[0] != e:
            raise ValueError(f"LayerView.role has shape {tuple(self.role.shape)}; expected ({e}, H)")
        if tuple(self.coactivation.shape) != (e, e):
            raise ValueError(f"LayerView.coactivation has shape {tuple(self.coactivation.shape)}; expected ({e}, {e})")
        for name in ("centroid_phi", "centroid_weights", "identity"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (2, e):
                raise ValueError(f"LayerView.{name} has shape {tuple(t.shape)}; expected (2, {e})")
        for name in ("evidence", "phi_fast", "degrading", "age", "jumped", "drift", "shadow_step", "offset"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (e,):
                raise ValueError(f"LayerView.{name} has shape {tuple(t.shape)}; expected ({e},)")
        for name in ("degrading", "jumped"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.bool:
                raise ValueError(f"LayerView.{name} has dtype {t.dtype}; expected torch.bool")
        s = float(self.starvation)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"LayerView.starvation={s!r} is invalid: expected a fraction in [0, 1]")
        return self

    def to_host(self) -> LayerView:
        """A validated copy on the CPU in float64 (bool masks kept)."""
        self.validate()

        def f(t: Tensor) -> Tensor:
            return t.detach().to("cpu", torch.float64)

        return LayerView(
            layer_id=int(self.layer_id),
            active=self.active.detach().cpu(),
            cooling=self.cooling.detach().cpu(),
            phi_slow=f(self.phi_slow),
            share_slow=f(self.share_slow),
            role=f(self.role),
            bimodality=f(self.bimodality),
            coactivation=f(self.coactivation),
            starvation=float(self.starvation),
            observations=self.observations.detach().cpu().to(torch.int64),
            centroid_phi=None if self.centroid_phi is None else f(self.centroid_phi),
            centroid_weights=None if self.centroid_weights is None else f(self.centroid_weights),
            evidence=None if self.evidence is None else f(self.evidence),
            phi_fast=None if self.phi_fast is None else f(self.phi_fast),
            degrading=None if self.degrading is None else self.degrading.detach().cpu(),
            alerts=tuple(str(a) for a in self.alerts),
            pressure=float(self.pressure),
            age=None if self.age is None else self.age.detach().cpu().to(torch.int64),
            jumped=None if self.jumped is None else self.jumped.detach().cpu(),
            drift=None if self.drift is None else f(self.drift),
            shadow_step=None if self.shadow_step is None else self.shadow_step.detach().cpu().to(torch.int64),
            offset=None if self.offset is None else f(self.offset),
            identity=None if self.identity is None else f(self.identity),
        )
