"""Top-k routing over a fixed-width, masked expert set, with an optional additive logit bias.

`z_clean = W h (+ b)`; `z_biased = z_clean + bias` (fp32 add, then back to the logits' dtype); inactive
slots get -inf; then softmax -> top-k -> (optional) renormalisation. Two bias modes (SPEC 4):
`logits` (the bias moves selection and gate weights) and `selection` (the bias moves only which experts
are chosen; gate weights come from the clean logits, as in aux-loss-free balancing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import BIAS_MODES

if TYPE_CHECKING:
    from .bias import BridgeReport


@dataclass
class Routing:
    """The result of routing T tokens over E slots."""

    topk_index: Tensor  # [T, K] int64
    topk_weight: Tensor  # [T, K] fp32 gate weights
    logits_clean: Tensor  # [T, E] masked clean logits (fp32)
    logits_biased: Tensor  # [T, E] masked biased logits (fp32); equals logits_clean without a bias
    probs_clean: Tensor  # [T, E] softmax of the masked clean logits
    probs_biased: Tensor  # [T, E] softmax of the masked biased logits
    bridge: BridgeReport | None = None  # overlap safety of the bias (set by `bias.route_with_bias`)


def mask_logits(logits: Tensor, active_mask: Tensor | None) -> Tensor:
    """Set inactive slots to -inf so they can never be selected."""
    if active_mask is None:
        return logits
    return logits.masked_fill(~active_mask, float("-inf"))


def route_topk(
    logits: Tensor,
    top_k: int,
    active_mask: Tensor | None = None,
    bias: Tensor | None = None,
    mode: str = "logits",
    normalize: bool = True,
    check_values: bool = False,
    selection_bias: Tensor | None = None,
) -> Routing:
    """Route with the softmax -> top-k (-> renormalise) rule (Mixtral; Qwen/OLMoE with norm_topk_prob).

    `logits [T,E]` are the clean router logits; `bias [E]` is added in fp32. `selection_bias [E]` (e.g. an
    aux-loss-free balancer's per-expert bias, `balance.py`) is added in fp32 to the scores that choose the
    top-k and to nothing else: it never moves gate weights, whatever `mode` says. Works for any router that
    produces logits, not only ChronoMoELayer's. No host synchronisation, unless `check_values` asks for
    the logits and the biases to be checked finite (a read of device values: for explicit API calls and
    tests, not for the per-step path).
    """
    if mode not in BIAS_MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {list(BIAS_MODES)}")
    if logits.dim() != 2:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [T, E]")
    e = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer in [1, {e}]")
    if active_mask is not None and (tuple(active_mask.shape) != (e,) or active_mask.dtype != torch.bool):
        raise ValueError(
            f"active_mask has shape {tuple(active_mask.shape)} and dtype {active_mask.dtype}; expected ({e},) bool"
        )
    for name, value in (("bias", bias), ("selection_bias", selection_bias)):
        if value is not None and tuple(value.shape) != (e,):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected ({e},) to match the logits' width")
    if check_values:
        for name, value in (("logits", logits), ("bias", bias), ("selection_bias", selection_bias)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds non-finite values; expected finite {name}")
    z = logits.float()
    z_clean = mask_logits(z, active_mask)
    if bias is not None:
        z_biased = mask_logits(z + bias.float(), active_mask)
    else:
        z_biased = z_clean
    p_clean = torch.softmax(z_clean, dim=-1)
    p_biased = torch.softmax(z_biased, dim=-1) if bias is not None else p_clean
    scores = z_biased if selection_bias is None else z_biased + selection_bias.float()
    _, index = torch.topk(scores, top_k, dim=-1)
    source = p_biased if mode == "logits" else p_clean
    weight = source.gather(1, index)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(
        topk_index=index,
        topk_weight=weight,
        logits_clean=z_clean,
        logits_biased=z_biased,
        probs_clean=p_clean,
        probs_biased=p_biased,
    )
