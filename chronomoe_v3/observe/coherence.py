"""Per-expert sufficient statistics, the phase-coherence estimators, and CoherenceState.

Data flow: MoETrace -> `compute_expert_stats` (one vectorised pass) -> `coherence_from_stats` (phi per
expert, NaN where unmeasured) -> `CoherenceState.observe` (three debiased clocks, shares, role vectors).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..clocks import DebiasedEMA, ThreeClockEMA
from ..config import ESTIMATORS, ChronoConfig
from ..trace import MoETrace
from .stats import ExpertStats, coherence_reference, compute_expert_stats

# A reference or mean vector whose norm is below this fraction of the vectors it came from is "near zero":
# the cosine is then undefined and the expert is unmeasured for the step.
_REL_ZERO = 1e-5
_ABS_ZERO = 1e-30


def _cosine(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dot = (u * v).sum(-1)
    nu = u.norm(dim=-1)
    nv = v.norm(dim=-1)
    return dot / (nu * nv).clamp_min(_ABS_ZERO), nu, nv


def coherence_from_stats(stats: ExpertStats, estimator: str = "loo") -> Tensor:
    """phi [E] from sufficient statistics; NaN for experts unmeasured this step.

    loo:  phi_e = cos(S_e / n_e, (M - G_e) / N)   (mixture with e's own contribution removed)
    full: phi_e = cos(S_e / n_e, M / N)
    An expert is unmeasured when n_e == 0, when its statistics were non-finite, or when its mean output or
    its reference vector is (near) zero, e.g. when it is the only contributor under `loo`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid: expected one of {list(ESTIMATORS)}")
    n = stats.counts
    ybar = stats.sum_out / n.clamp_min(1.0).unsqueeze(1)
    big_n = stats.num_tokens.clamp_min(1.0)
    ref = coherence_reference(stats, estimator)
    if estimator == "loo":
        scale = (stats.sum_mixture.norm(dim=-1) + stats.sum_weighted.norm(dim=-1)) / big_n
    else:
        scale = ref.norm(dim=-1)
    cos, ny, nref = _cosine(ybar, ref)
    ybar_scale = (stats.sum_out.abs().sum(-1) / n.clamp_min(1.0)).clamp_min(_ABS_ZERO)
    ok = stats.measured & (nref > _REL_ZERO * scale + _ABS_ZERO) & (ny > _REL_ZERO * ybar_scale)
    return torch.where(ok, cos.clamp(-1.0, 1.0), torch.full_like(cos, float("nan")))


def compute_coherence(trace_or_stats: MoETrace | ExpertStats, estimator: str = "loo") -> Tensor:
    """Per-expert phase coherence phi `[E]` of one forward; NaN for unmeasured experts."""
    if isinstance(trace_or_stats, MoETrace):
        stats = compute_expert_stats(trace_or_stats.validate(check_values=False))
    elif isinstance(trace_or_stats, ExpertStats):
        stats = trace_or_stats
    else:
        raise ValueError(
            f"compute_coherence got {type(trace_or_stats).__name__}; expected an MoETrace or ExpertStats"
        )
    return coherence_from_stats(stats, estimator)


def layer_coherence(phi: Tensor, weights: Tensor) -> Tensor:
    """Psi = sum_e w_e phi_e over measured experts (finite phi), with `weights` renormalised over them.

    NaN when no expert is measured.
    """
    ok = torch.isfinite(phi) & (weights > 0)
    wts = torch.where(ok, weights, torch.zeros_like(weights))
    total = wts.sum()
    psi = (wts * torch.where(ok, phi, torch.zeros_like(phi))).sum() / total.clamp_min(_ABS_ZERO)
    return torch.where(total > 0, psi, torch.full_like(psi, float("nan")))


def _nanmedian_masked(x: Tensor, mask: Tensor) -> Tensor:
    """Median of x over mask (lower median, like torch.nanmedian); NaN when mask is empty."""
    return torch.where(mask, x, torch.full_like(x, float("nan"))).nanmedian()


class CoherenceState(nn.Module):
    """One layer's coherence record: fp32 device buffers, updated from traces with no host sync.

    Per expert slot: phi at three clocks (debiased), token shares at three clocks, a role vector (EMA of
    the unit mean output), observation counts, last-seen step and non-finite skip counts. Experts
    unmeasured on a step are left untouched.
    """

    step: Tensor
    last_seen: Tensor
    nonfinite_skips: Tensor
    phi_last: Tensor
    alpha_floor: Tensor

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        config: ChronoConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else ChronoConfig()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size!r} is invalid: expected an integer >= 1")
        self.phi = ThreeClockEMA(num_experts, self.config.coherence.alphas, device=device)
        self.share = ThreeClockEMA(num_experts, self.config.coherence.alphas, device=device)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("last_seen", torch.full((num_experts,), -1, dtype=torch.int64, device=device))
        self.register_buffer("nonfinite_skips", torch.zeros(num_experts, dtype=torch.int64, device=device))
        self.register_buffer("phi_last", torch.full((num_experts,), float("nan"), device=device))
        self.role = DebiasedEMA(num_experts, [self.config.coherence.role.retention], (hidden_size,), device=device)
        # Identity: cos(this step's unit mean output, the role vector before it), at the fast and slow clocks.
        # An expert whose weights are broken (a bad update, corruption) keeps its traffic but changes what it
        # outputs: its fast identity falls far below its slow one while its phi may hardly move.
        coh = self.config.coherence
        self.identity = DebiasedEMA(num_experts, [coh.fast.retention, coh.slow.retention], device=device)
        c = self.config
        floors = [c.bridge.alpha_floor_fast, c.bridge.alpha_floor_mid, c.coherence.slow.retention]
        # A constant of the config (not saved): the retentions relevance pulls the clocks towards.
        self.register_buffer("alpha_floor", torch.tensor(floors, device=device), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.phi.num_entries

    @property
    def hidden_size(self) -> int:
        return int(self.role.value.shape[-1])

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def observe(
        self,
        stats: ExpertStats,
        active_mask: Tensor | None = None,
        relevance: Tensor | None = None,
    ) -> Tensor:
        """Fold one step's statistics into the clocks; returns this step's phi `[E]` (NaN = unmeasured).

        `active_mask [E]` restricts updates to active slots. `relevance` (device scalar in [0, 1], from the
        bridge detector) lowers the fast and mid retentions towards their floors:
        `alpha_eff = alpha * r + alpha_floor * (1 - r)`; the slow clock is fixed.

        Skip rules (no host sync; the state never holds NaN/Inf): an expert whose statistics are non-finite
        is unmeasured this step (counted in `nonfinite_skips`); a non-finite reading of any clock is not
        folded in for that expert (`DebiasedEMA.update`); a non-finite `relevance` reads as 1 (no evidence
        of bridging: the clocks run at their own retentions) and a finite one is clamped to [0, 1]; a step
        whose token counts are non-finite records no shares.
        """
        if stats.num_experts != self.num_experts or stats.sum_out.shape[-1] != self.hidden_size:
            raise ValueError(
                f"stats have {stats.num_experts} experts x {stats.sum_out.shape[-1]} hidden; this state expects "
                f"{self.num_experts} x {self.hidden_size}"
            )
        phi = coherence_from_stats(stats, self.config.coherence.estimator)
        measured = torch.isfinite(phi)
        active = torch.ones_like(measured) if active_mask is None else active_mask.to(measured.device)
        measured = measured & active
        alphas = None
        if relevance is not None:
            r = relevance.to(device=self.phi.alphas.device, dtype=self.phi.alphas.dtype).reshape(())
            r = torch.where(torch.isfinite(r), r.clamp(0.0, 1.0), torch.ones_like(r))
            alphas = self.phi.alphas * r + self.alpha_floor * (1.0 - r)
            alphas = torch.cat([alphas[:2], self.phi.alphas[2:]])
        self.phi.update(phi, measured, alphas)
        # Shares: every active expert gets a reading (0 when it saw no token) on steps that routed tokens.
        total = stats.counts.sum()
        share = stats.counts / total.clamp_min(1.0)
        self.share.update(share, active & (total > 0) & torch.isfinite(total))
        unit = stats.sum_out / stats.sum_out.norm(dim=-1, keepdim=True).clamp_min(_ABS_ZERO)
        role = self.role.read()[0]
        known = measured & torch.isfinite(role).all(dim=-1)
        known_role = torch.nan_to_num(role, nan=0.0)
        same = (unit * known_role).sum(-1) / known_role.norm(dim=-1).clamp_min(_ABS_ZERO)
        self.identity.update(same, known)
        self.role.update(unit, measured)
        self.last_seen.copy_(torch.where(measured, self.step, self.last_seen))
        self.nonfinite_skips.add_((stats.nonfinite & active).to(torch.int64))
        self.phi_last.copy_(torch.where(active, phi, torch.full_like(phi, float("nan"))))
        self.step.add_(1)
        return phi

    @torch.no_grad()
    def reset_experts(self, experts: Tensor) -> None:
        """Forget the history of slots (bool `[E]`), e.g. a slot reused by spawn."""
        self.phi.reset_entries(experts)
        self.share.reset_entries(experts)
        self.role.reset_entries(experts)
        self.identity.reset_entries(experts)
        self.last_seen.masked_fill_(experts, -1)
        self.nonfinite_skips.masked_fill_(experts, 0)
        self.phi_last.masked_fill_(experts, float("nan"))

    @torch.no_grad()
    def copy_expert(self, src: int, dst: int) -> None:
        """Give slot `dst` the record of slot `src` (split children inherit their parent's history). Both
        must be slot indices in [0, E) (IndexError otherwise, before anything is copied: a negative index
        would silently address the last slots)."""
        for name, index in (("src", src), ("dst", dst)):
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_experts:
                raise IndexError(f"{name}={index!r} is out of range: expected a slot in [0, {self.num_experts})")
        self.phi.copy_entry(src, dst)
        self.share.copy_entry(src, dst)
        self.role.copy_entry(src, dst)
        self.identity.copy_entry(src, dst)
        self.last_seen[dst] = self.last_seen[src]
        self.phi_last[dst] = self.phi_last[src]

    # ------------------------------------------------------------------ readings
    @property
    def phi_clocks(self) -> Tensor:
        """[3, E] debiased phi (fast, mid, slow); NaN where never measured."""
        return self.phi.read()

    @property
    def phi_fast(self) -> Tensor:
        return self.phi_clocks[0]

    @property
    def phi_mid(self) -> Tensor:
        return self.phi_clocks[1]

    @property
    def phi_slow(self) -> Tensor:
        return self.phi_clocks[2]

    @property
    def share_clocks(self) -> Tensor:
        """[3, E] debiased token shares (fast, mid, slow)."""
        return self.share.read()

    @property
    def observations(self) -> Tensor:
        """[E] int64: steps on which each expert was measured."""
        return self.phi.count

    @property
    def role_vectors(self) -> Tensor:
        """[E, H] debiased role vectors (EMA of unit mean outputs); NaN rows where never measured."""
        return self.role.read()[0]

    @property
    def phi_delta(self) -> Tensor:
        """[E] phi_fast - phi_slow."""
        clocks = self.phi_clocks
        return clocks[0] - clocks[2]

    @property
    def degrade_delta(self) -> Tensor:
        """[E] phi_fast - phi_baseline, the delta the degrading flag judges (baseline: `degrade_baseline`)."""
        clocks = self.phi_clocks
        return clocks[0] - clocks[1 if self.config.degrade.baseline == "mid" else 2]

    def degrading(self, active_mask: Tensor | None = None) -> Tensor:
        """[E] bool: experts whose fast coherence has fallen below their baseline (mid or slow) coherence, or
        whose identity broke (`broken`).

        With `degrade_reference="layer_median"` (default) each expert's delta is judged against the median
        delta of the layer's active measured experts, so a layer drifting as a whole flags nobody, and the
        threshold widens to `degrade_z` robust standard deviations (scaled MAD) of the layer's deltas when
        those are noisier than `delta_threshold`; with "absolute" against zero. Experts with fewer than
        `min_observations_to_flag` observations are never flagged.
        """
        delta = self.degrade_delta
        eligible = torch.isfinite(delta) & (self.observations >= self.config.degrade.min_observations)
        if active_mask is not None:
            eligible = eligible & active_mask.to(eligible.device)
        threshold = torch.tensor(self.config.degrade.threshold, device=delta.device)
        if self.config.degrade.reference == "layer_median":
            median = _nanmedian_masked(delta, eligible)
            relative = delta - torch.where(torch.isfinite(median), median, torch.zeros_like(median))
            if self.config.degrade.z > 0:
                # Robust spread of the layer's deltas (scaled MAD): an expert must stand out from its layer.
                mad = _nanmedian_masked(relative.abs(), eligible) * 1.4826
                threshold = torch.maximum(threshold, torch.nan_to_num(mad, nan=0.0) * self.config.degrade.z)
        else:
            relative = delta
        return (eligible & (relative < -threshold)) | self.broken(active_mask)

    @property
    def identity_clocks(self) -> Tensor:
        """[2, E] debiased identity (fast, slow): how closely each expert's mean output keeps its direction
        (cosine of a step's unit mean output with the role vector before it); NaN where never measured."""
        return self.identity.read()

    def broken(self, active_mask: Tensor | None = None) -> Tensor:
        """[E] bool: experts whose identity broke: fast identity below slow identity by more than
        `degrade.identity_threshold`, beyond the layer's median drop and `degrade.z` robust spreads of it (so
        a layer changing as a whole flags nobody), after `degrade.min_observations` observations. This is
        the damage signal phi can miss: a broken expert that was never very coherent keeps a similar phi."""
        clocks = self.identity_clocks
        delta = clocks[0] - clocks[1]
        eligible = torch.isfinite(delta) & (self.observations >= self.config.degrade.min_observations)
        if active_mask is not None:
            eligible = eligible & active_mask.to(eligible.device)
        median = _nanmedian_masked(delta, eligible)
        relative = delta - torch.where(torch.isfinite(median), median, torch.zeros_like(median))
        threshold = torch.tensor(self.config.degrade.identity_threshold, device=delta.device)
        if self.config.degrade.z > 0:
            mad = _nanmedian_masked(relative.abs(), eligible) * 1.4826
            threshold = torch.maximum(threshold, torch.nan_to_num(mad, nan=0.0) * self.config.degrade.z)
        return eligible & (relative < -threshold)

    def layer_psi(self, clock: int = 2) -> Tensor:
        """Layer coherence Psi on a clock (0 fast, 1 mid, 2 slow): share-weighted phi of measured experts."""
        return layer_coherence(self.phi_clocks[clock], torch.nan_to_num(self.share_clocks[clock], nan=0.0))


def attach_coherence(layer: nn.Module, state: CoherenceState, compile: bool | None = None) -> RemovableHandle:
    """Track `layer`'s coherence in `state` on every observed forward (a layer with `add_observer`,
    such as ChronoMoELayer). Returns the handle; `handle.remove()` detaches.

    `compile` runs the statistics and clock update through `torch.compile`, which fuses its many small
    kernels (on an H100 this cut the observe path's device time 1.5-2.4x: benchmarks/results). The default
    (None) compiles when the layer lives on a CUDA device and runs eagerly elsewhere. A model that is itself
    compiled fuses the observer anyway.
    """
    add_observer = getattr(layer, "add_observer", None)
    if add_observer is None:
        raise ValueError(f"{type(layer).__name__} has no add_observer(); expected a ChronoMoELayer-like module")
    mask = getattr(layer, "active_mask", None)

    def _observe(trace: MoETrace) -> None:
        bridge = getattr(trace, "bridge", None)
        state.observe(compute_expert_stats(trace), mask, bridge.relevance if bridge is not None else None)

    use_compile = compile if compile is not None else bool(mask is not None and mask.is_cuda)
    observer = torch.compile(_observe) if use_compile else _observe
    handle: RemovableHandle = add_observer(observer)
    return handle
