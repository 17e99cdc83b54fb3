"""Bimodality: the "one expert, two roles" detector (SPEC 6).

What the detector sees. A step's *mean* output of an expert averages every token it served, so when one
expert serves two separated input clusters inside mixed batches, each step's mean lies between the two roles
and a detector fed only with means sees one role. The detector is therefore fed **per-token samples**:
`sample_expert_outputs` draws, uniformly at random and without replacement, up to `S` kept token-slots per
expert from a trace and returns them as a fixed-shape `[E, S, H]` block with a validity mask `[E, S]`
(fewer than S valid slots where the expert saw fewer tokens). It uses one sort of the T*K routing
assignments and two scatters: fixed shapes, no host sync, no loop over experts. A per-step mean is the
special case S = 1 (`update` also accepts `[E, H]` with a mask `[E]`), useful when batches are homogeneous.

Two unit centroids per expert, `c1, c2`, and decayed assignment counts `n1, n2`. On each step, for the
experts with at least one valid sample:
1. seeding of c1: an expert with no centroid yet takes its first valid sample (a random token-slot) as c1;
2. every valid unit sample is assigned to the closer seeded centroid (ties go to c1);
3. seeding of c2 (and re-seeding of a dead centroid): the sample farthest from the other centroid is taken
   as the new centroid when its cosine to that centroid is below `seed_cosine` (default 0.9). A seeded
   centroid is re-seeded the same way when it won no sample this step and its count has fallen below
   `reseed_balance` (default 0.05) times the other's. Samples are then re-assigned;
4. each centroid that won samples moves towards the unit mean direction `d_j` of its samples,
   `c_j <- normalise(alpha * c_j + (1 - alpha) * d_j)` (alpha = `alpha_centroid`);
5. both counts decay and the winners add this step's assignment fractions: `n_j <- alpha * n_j + f_j`,
   `f_j` = fraction of the step's valid samples assigned to j (with S = 1: +1 to the winner).

Why this does not invent bimodality from noise: seeding may fire on a diffuse single-role cloud, but the
centroids then converge to the unit means of two halves of one cloud, which nearly coincide (and a seed
on an outlier wins nothing, so its count and the balance fall to ~0). Only two genuinely separated groups
of outputs keep two distant centroids that both win samples.

Readings: `separation = 1 - cos(c1, c2)`, `balance = min(n1, n2) / max(n1, n2)`,
`bimodality = separation * balance` (0 until both centroids are seeded). Optionally (`reference` passed to
`update`, the expert's coherence reference vector of the step, e.g. the leave-one-out mixture mean) the
state also keeps a debiased EMA of `cos(c_j, reference)` per centroid: the coherence each split child is
predicted to have (`centroid_phi`), read by the slow objective's split prediction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..clocks import DebiasedEMA, ema_update
from ..config import BimodalityConfig, ChronoConfig
from ..trace import MoETrace

DEFAULT_SAMPLES_PER_EXPERT = BimodalityConfig().samples_per_expert
_ABS_ZERO = 1e-30


def draw_permutation(trace: MoETrace, generator: torch.Generator | None = None) -> Tensor:
    """The random order `sample_slots` draws its samples in: a permutation of the trace's `T*K` token-slots
    (`torch.randperm` on the trace's device). Drawn outside a compiled observer (the generator is host state
    `torch.compile` cannot trace) and handed to it as a tensor: the same draw, eager or compiled."""
    t, k = trace.topk_index.shape
    return torch.randperm(t * k, device=trace.expert_out.device, generator=generator)


def sample_slots(
    trace: MoETrace,
    samples_per_expert: int = DEFAULT_SAMPLES_PER_EXPERT,
    generator: torch.Generator | None = None,
    *,
    perm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Up to `S` random kept token-slots per expert: `(slot [E, S] long, taken [E, S] bool)`.

    `slot` indexes the flattened `[T*K]` token-slots (token `slot // K`); rows not taken hold 0. Slots are
    drawn uniformly without replacement among the expert's kept, non-padding slots. `generator` (on the
    trace's device) makes the draw reproducible; `perm` (from `draw_permutation`) replaces the draw.
    """
    if isinstance(samples_per_expert, bool) or not isinstance(samples_per_expert, int) or samples_per_expert < 1:
        raise ValueError(f"samples_per_expert={samples_per_expert!r} is invalid: expected an integer >= 1")
    t, k = trace.topk_index.shape
    e, s, n = trace.num_experts, samples_per_expert, t * k
    device = trace.expert_out.device
    if perm is None:
        perm = draw_permutation(trace, generator)
    elif tuple(perm.shape) != (n,):
        raise ValueError(f"perm has shape {tuple(perm.shape)}; expected ({n},), a permutation of the T*K slots")
    idx = trace.topk_index.reshape(n).to(torch.long)
    keep = trace.kept_slots().reshape(n)
    target = torch.where(keep, idx, torch.full_like(idx, e))  # dropped / padded slots sort last, into row E
    # Sort by (expert, random rank): a random order of slots within each expert. The keys are distinct, so
    # the stable sort (several times faster on the CPU) gives the same order as any other.
    # int32 keys where they fit: half the radix-sort passes of int64 keys on CUDA, the same order
    key_dtype = torch.int32 if (e + 1) * n < 2**31 else torch.long
    order = torch.argsort(target.to(key_dtype) * n + perm.to(device=device, dtype=key_dtype), stable=True)
    sorted_target = target[order]
    counts = torch.zeros(e + 1, dtype=torch.long, device=device).scatter_add_(0, target, torch.ones_like(target))
    starts = counts.cumsum(0) - counts
    rank = torch.arange(n, device=device) - starts[sorted_target]
    take = (rank < s) & (sorted_target < e)
    dest = torch.where(take, sorted_target * s + rank.clamp_max(s - 1), torch.full_like(rank, e * s))
    src = torch.full((e * s + 1,), n, dtype=torch.long, device=device)
    src[dest] = order  # taken destinations are unique; the dump row e*s is discarded
    src = src[: e * s]
    taken = src < n
    return src.clamp_max(n - 1).view(e, s), taken.view(e, s)


def sample_expert_outputs(
    trace: MoETrace,
    samples_per_expert: int = DEFAULT_SAMPLES_PER_EXPERT,
    generator: torch.Generator | None = None,
    *,
    details: bool = False,
    perm: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Up to `S` random kept token-slot outputs per expert: `(samples [E, S, H] fp32, valid [E, S] bool)`.

    Slots are drawn by `sample_slots` (`perm`: see there); rows that are not valid (expert saw fewer than S
    tokens, or the row is non-finite or zero) are zero. Only `E * S` rows are gathered. With `details` two
    more tensors come back: `router_input [E, S, H_r]` (fp32), the sampled tokens' `trace.router_input`
    (zeros where not valid, or everywhere when the trace has none), and `gate [E, S]` (fp32), the sampled
    slots' gate weights.
    """
    t, k, h = trace.expert_out.shape
    e, s, n = trace.num_experts, samples_per_expert, t * k
    device = trace.expert_out.device
    src, valid = sample_slots(trace, samples_per_expert, generator, perm=perm)
    src = src.reshape(e * s)
    rows = trace.expert_out.reshape(n, h)[src].float()
    valid = valid.reshape(e * s) & torch.isfinite(rows).all(-1) & (rows.abs().sum(-1) > 0)
    rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros((), device=device))
    if not details:
        return rows.view(e, s, h), valid.view(e, s)
    if trace.router_input is None:
        inputs = torch.zeros(e * s, h, device=device)
    else:
        inputs = trace.router_input[src // k].float()
        inputs = torch.where(valid.unsqueeze(-1), torch.nan_to_num(inputs), torch.zeros((), device=device))
    gate = torch.where(valid, trace.topk_weight.reshape(n)[src].float(), torch.zeros((), device=device))
    return rows.view(e, s, h), valid.view(e, s), inputs.view(e, s, -1), gate.view(e, s)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_ABS_ZERO)


class BimodalityState(nn.Module):
    """Two-centroid detector over E expert slots of width H (fp32 buffers, no host sync on update).

    Buffers: `centroid [2, E, H]` (c1, c2; unit rows, zero until seeded), `seeded [2, E]` bool,
    `count [2, E]` decayed assignment counts (n1, n2); debiased EMAs (entry `j * E + e` is centroid j of
    expert e): `centroid_phi_ema` (each centroid's cosine to the coherence reference) and `router_mean_ema`
    (`[2E, H_r]`, the mean router input of the samples each centroid won; `router_size` H_r defaults to H).
    A reseeded centroid forgets its readings. Seeding and re-seeding thresholds come from `config.bimodality`.
    """

    centroid: Tensor
    seeded: Tensor
    count: Tensor
    alpha: Tensor

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        config: ChronoConfig | None = None,
        *,
        router_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config if config is not None else ChronoConfig()
        router_size = hidden_size if router_size is None else router_size
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size), ("router_size", router_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
        self.seed_cosine = config.bimodality.seed_cosine
        self.reseed_balance = config.bimodality.reseed_balance
        alpha = config.bimodality.centroid.retention
        e, h = num_experts, hidden_size
        self.register_buffer("centroid", torch.zeros(2, e, h, device=device))
        self.register_buffer("seeded", torch.zeros(2, e, dtype=torch.bool, device=device))
        self.register_buffer("count", torch.zeros(2, e, device=device))
        self.centroid_phi_ema = DebiasedEMA(2 * e, [alpha], device=device)
        self.router_mean_ema = DebiasedEMA(2 * e, [alpha], (router_size,), device=device)
        # A constant of the config (not saved): the centroids' own retention.
        self.register_buffer("alpha", torch.tensor([alpha], device=device), persistent=False)

    @property
    def num_experts(self) -> int:
        return int(self.count.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.centroid.shape[-1])

    @property
    def router_size(self) -> int:
        return int(self.router_mean_ema.value.shape[-1])

    # ------------------------------------------------------------------ update
    @staticmethod
    def _assign(cos: Tensor, valid: Tensor, seeded: Tensor) -> Tensor:
        """[2, E, S] one-hot assignment of valid samples to the closer seeded centroid (ties to c1)."""
        to_c2 = seeded[1].unsqueeze(1) & seeded[0].unsqueeze(1) & (cos[1] > cos[0])
        return torch.stack([~to_c2 & valid, to_c2 & valid])

    @torch.no_grad()
    def update(
        self,
        samples: Tensor,
        valid: Tensor,
        active_mask: Tensor | None = None,
        reference: Tensor | None = None,
        router_input: Tensor | None = None,
        gate: Tensor | None = None,
        load: Tensor | None = None,
    ) -> None:
        """Fold one step's output samples into the detector.

        `samples [E, S, H]` (any scale; normalised here) with `valid [E, S]` bool, as returned by
        `sample_expert_outputs`; or one vector per expert `[E, H]` with `valid [E]` (S = 1).
        `active_mask [E]` restricts updates to active slots. `reference [E, H]` (optional): each expert's
        coherence reference vector for the step (the leave-one-out mixture `(M - G_e) / N`), used for
        `centroid_phi`; with `gate [E, S]` (the samples' gate weights) and `load [E]` (`n_e / N`, the expert's
        tokens per real token) the reference of each role's child also holds its sibling's estimated
        contribution `load_e / S_e * sum_{s in other role} gate_s * y_s` (see `centroid_phi`).
        `router_input [E, S, H_r]`
        (optional): what the router read for each sample, folded into each centroid's `router_mean`.
        """
        if samples.dim() == 2:
            samples, valid = samples.unsqueeze(1), valid.unsqueeze(1)
        e, h = self.num_experts, self.hidden_size
        if samples.dim() != 3 or samples.shape[0] != e or samples.shape[2] != h:
            raise ValueError(f"samples have shape {tuple(samples.shape)}; expected [{e}, S, {h}] or [{e}, {h}]")
        if valid.shape != samples.shape[:2] or valid.dtype != torch.bool:
            raise ValueError(
                f"valid has shape {tuple(valid.shape)} and dtype {valid.dtype}; "
                f"expected {tuple(samples.shape[:2])} bool"
            )
        # Skip rule: a sample that is non-finite, zero, or whose norm overflows fp32 is not valid (never
        # folded in); its row of `x` is zeroed so that no NaN reaches the sums below (0 * NaN = NaN).
        raw_f = samples.float()
        norm = raw_f.norm(dim=-1)
        valid = valid & torch.isfinite(raw_f).all(-1) & torch.isfinite(norm) & (norm > 0)
        if active_mask is not None:
            valid = valid & active_mask.to(valid.device).view(e, 1)
        x = torch.where(valid.unsqueeze(-1), _unit(raw_f), torch.zeros((), device=raw_f.device))
        measured = valid.any(1)
        num_valid = valid.sum(1).clamp_min(1)

        # 1. c1 of a fresh expert: its first valid (randomly drawn) sample.
        first = valid.to(torch.int8).argmax(1)
        seed1 = measured & ~self.seeded[0]
        c = self.centroid.clone()
        c[0] = torch.where(seed1.unsqueeze(1), x[torch.arange(e, device=x.device), first], c[0])
        seeded = self.seeded.clone()
        seeded[0] = seeded[0] | seed1
        count = torch.where(seed1.unsqueeze(0), torch.zeros_like(self.count), self.count)

        # 2. provisional assignment; 3. (re)seed a missing or dead centroid at the farthest sample.
        cos = torch.einsum("jeh,esh->jes", c, x)  # [2, E, S]
        assign = self._assign(cos, valid, seeded)
        won = assign.any(2)  # [2, E]
        far_cos = torch.where(valid.unsqueeze(0), cos, torch.full_like(cos, 2.0)).min(2)  # [2, E]
        far_idx = far_cos.indices.flip(0)  # candidate for centroid j: farthest from the other centroid
        far_ok = (far_cos.values.flip(0) < self.seed_cosine) & measured.unsqueeze(0) & seeded.flip(0)
        dead = seeded & ~won & (count < self.reseed_balance * count.flip(0))
        reseed = far_ok & (dead | ~seeded)
        reseed[0] = reseed[0] & ~reseed[1]  # at most one centroid per expert per step
        experts = torch.arange(e, device=x.device)
        far_rows = torch.stack([x[experts, far_idx[0]], x[experts, far_idx[1]]])  # [2, E, H]
        c = torch.where(reseed.unsqueeze(-1), far_rows, c)
        seeded = seeded | reseed
        count = torch.where(reseed, torch.zeros_like(count), count)
        cos = torch.einsum("jeh,esh->jes", c, x)
        assign = self._assign(cos, valid, seeded)

        # 4. move winning centroids towards the unit mean of their samples; 5. decayed counts.
        a = assign.to(x.dtype)
        direction = _unit(torch.einsum("jes,esh->jeh", a, x))
        won = assign.any(2)
        alpha = self.alpha.to(c.dtype)
        dummy = torch.ones(1, 2 * e, device=c.device)
        moved, _ = ema_update(c.view(1, 2 * e, h), dummy, direction.reshape(2 * e, h), won.reshape(-1), alpha)
        self.centroid.copy_(_unit(moved.view(2, e, h)) * seeded.unsqueeze(-1))
        frac = a.sum(2) / num_valid.to(a.dtype).unsqueeze(0)
        self.count.copy_(torch.where(measured.unsqueeze(0), alpha * count + frac, count))
        # what follows is optional and skips non-finite inputs entry by entry (`ema_update`): `gate`, `load`,
        # `reference` or `router_input` holding NaN/Inf leave those readings of the expert untouched
        self.seeded.copy_(seeded)

        self.centroid_phi_ema.reset_entries(reseed.view(-1))
        self.router_mean_ema.reset_entries(reseed.view(-1))
        if reference is not None:
            ref = torch.nan_to_num(reference.to(self.centroid.device, torch.float32)).unsqueeze(0).expand(2, e, h)
            if gate is not None and load is not None:
                g = torch.where(valid, gate.to(x.device, torch.float32), torch.zeros((), device=x.device))
                raw = torch.where(valid.unsqueeze(-1), raw_f, torch.zeros((), device=x.device))
                role_sum = torch.einsum("jes,esh->jeh", a, raw * g.unsqueeze(-1))  # [2, E, H]
                per_sample = load.to(x.device, torch.float32) / num_valid.to(torch.float32)
                ref = ref + per_sample.view(1, e, 1) * role_sum.flip(0)  # child j's reference: + sibling's part
            finite = torch.isfinite(reference.to(ref.device)).all(-1).unsqueeze(0)
            ref_norm = ref.norm(dim=-1)
            ref_ok = finite & torch.isfinite(ref_norm) & (ref_norm > 0) & measured.unsqueeze(0)
            ref_cos = (self.centroid * _unit(ref)).sum(-1)  # [2, E]
            phi_ok = (seeded & ref_ok).view(-1)
            self.centroid_phi_ema.update(ref_cos.reshape(-1), phi_ok)
        if router_input is not None:
            r = router_input.to(self.centroid.device, torch.float32)
            if r.dim() == 2:
                r = r.unsqueeze(1)
            if tuple(r.shape) != (e, x.shape[1], self.router_size):
                raise ValueError(
                    f"router_input has shape {tuple(router_input.shape)}; "
                    f"expected [{e}, {x.shape[1]}, {self.router_size}]"
                )
            r = torch.where(valid.unsqueeze(-1), torch.nan_to_num(r), torch.zeros((), device=r.device))
            total = torch.einsum("jes,esr->jer", a, r)
            mean = total / a.sum(2, keepdim=True).clamp_min(1.0)
            self.router_mean_ema.update(mean.reshape(2 * e, -1), won.reshape(-1))

    # ------------------------------------------------------------------ slot management
    def _check_slots(self, **slots: int) -> None:
        e = self.num_experts
        for name, index in slots.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < e:
                raise IndexError(f"{name}={index!r} is out of range: expected a slot in [0, {e})")

    @torch.no_grad()
    def reset_experts(self, experts: Tensor) -> None:
        """Forget the detector state of slots (bool `[E]`), e.g. a slot reused by spawn."""
        experts = experts.to(self.count.device)
        self.centroid.masked_fill_(experts.view(1, -1, 1), 0.0)
        self.seeded.masked_fill_(experts.view(1, -1), False)
        self.count.masked_fill_(experts.view(1, -1), 0.0)
        both = experts.repeat(2)
        self.centroid_phi_ema.reset_entries(both)
        self.router_mean_ema.reset_entries(both)

    @torch.no_grad()
    def copy_expert(self, src: int, dst: int) -> None:
        """Give slot `dst` the detector state of slot `src` (IndexError for a slot outside [0, E))."""
        e = self.num_experts
        self._check_slots(src=src, dst=dst)
        self.centroid[:, dst] = self.centroid[:, src]
        self.seeded[:, dst] = self.seeded[:, src]
        self.count[:, dst] = self.count[:, src]
        for j in range(2):
            self.centroid_phi_ema.copy_entry(j * e + src, j * e + dst)
            self.router_mean_ema.copy_entry(j * e + src, j * e + dst)

    @torch.no_grad()
    def split_expert(self, parent: int, child_a: int, child_b: int) -> None:
        """Hand a split parent's two roles to its children: child A starts with c1 (and n1), child B with c2
        (and n2), each as its own first centroid with no second one. `parent` may equal a child's slot.
        IndexError for a slot outside [0, E), before anything changes."""
        e = self.num_experts
        self._check_slots(parent=parent, child_a=child_a, child_b=child_b)
        c = self.centroid[:, parent].clone()
        n = self.count[:, parent].clone()
        s = self.seeded[:, parent].clone()
        emas = (self.centroid_phi_ema, self.router_mean_ema)
        pair = [parent, e + parent]
        saved = [(ema.value[:, pair].clone(), ema.decay[:, pair].clone()) for ema in emas]
        for j, child in enumerate((child_a, child_b)):
            self.centroid[0, child], self.centroid[1, child] = c[j], 0.0
            self.count[0, child], self.count[1, child] = n[j], 0.0
            self.seeded[0, child], self.seeded[1, child] = s[j], False
            for ema, (value, decay) in zip(emas, saved, strict=True):
                # the child's first centroid takes role j's readings; its second starts empty
                ema.value[:, child], ema.decay[:, child] = value[:, j], decay[:, j]
                ema.value[:, e + child], ema.decay[:, e + child] = 0.0, 1.0

    # ------------------------------------------------------------------ readings
    def centroids(self, expert: int) -> Tensor:
        """[2, H] the unit centroids (c1, c2) of one expert; a row is zero where not seeded."""
        return self.centroid[:, expert]

    @property
    def c1(self) -> Tensor:
        return self.centroid[0]

    @property
    def c2(self) -> Tensor:
        return self.centroid[1]

    @property
    def n1(self) -> Tensor:
        return self.count[0]

    @property
    def n2(self) -> Tensor:
        return self.count[1]

    @property
    def separation(self) -> Tensor:
        """[E] 1 - cos(c1, c2); 0 until both centroids are seeded."""
        both = self.seeded.all(0)
        sep = (1.0 - (self.centroid[0] * self.centroid[1]).sum(-1)).clamp(0.0, 2.0)
        return torch.where(both, sep, torch.zeros_like(sep))

    @property
    def balance(self) -> Tensor:
        """[E] min(n1, n2) / max(n1, n2); 0 where no count."""
        hi = self.count.max(0).values
        return torch.where(hi > 0, self.count.min(0).values / hi.clamp_min(_ABS_ZERO), torch.zeros_like(hi))

    @property
    def bimodality(self) -> Tensor:
        """[E] separation * balance, in [0, 2]; 0 until both centroids are seeded."""
        return self.separation * self.balance

    @property
    def centroid_weights(self) -> Tensor:
        """[2, E] n_j / (n1 + n2): the share of the expert's traffic each centroid (split child) takes."""
        total = self.count.sum(0, keepdim=True)
        return torch.where(total > 0, self.count / total.clamp_min(_ABS_ZERO), torch.zeros_like(self.count))

    @property
    def router_mean(self) -> Tensor:
        """[2, E, H_r] debiased EMA of the mean router input of the samples each centroid won (alpha_centroid);
        NaN rows where never measured. A split gives the children router rows that separate these two."""
        return self.router_mean_ema.read().view(2, self.num_experts, -1)

    @property
    def centroid_phi(self) -> Tensor:
        """[2, E] debiased EMA of each role's predicted coherence as a split child; NaN where never measured.

        The coherence a child of role j would have right after a split, measured the way `phi` is measured
        (its mean output against the leave-one-out mixture of everyone else): `cos(c_j, ref_e + sib_j)`, with
        `ref_e` the parent's reference and `sib_j` the sibling's (role `not j`) contribution to the mixture,
        which the parent's own reference leaves out but the child's includes. Without `gate`/`load` in
        `update` the sibling term is 0. Compare with the parent's `phi` (same estimator, parent's mean), not
        with a per-role reading of the parent: `phi` is a cosine of a mean, and the mean of two roles is
        better aligned with the reference than either role by construction."""
        return self.centroid_phi_ema.read().view(2, self.num_experts)
