"""Selection of the slow clock's edits: one per layer at most, only when it pays, under the cycle's rules.

Per layer, the candidate with the lowest predicted delta_F is taken only if `delta_F < -min_improvement`:
an edit never runs against its own prediction; otherwise the layer does nothing. Globally, layers in
cooldown (or with an edit still under audit) do nothing; when the regular review is not due, only layers
with an emergency flag are reviewed, and only the early actions (spawn, split, replace) may be executed;
then the best `max_edits_per_cycle` edits across layers (lowest delta_F first) are kept and the other layers
do nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..config import ChronoConfig
from .objective import ACTIONS, EARLY_ACTIONS, EditCandidate, LayerDecision


# ---------------------------------------------------------------------- selection
def _rank(c: EditCandidate) -> tuple[float, int, int]:
    return (c.delta_F, ACTIONS.index(c.action), -1 if c.expert_id is None else c.expert_id)


def select_edit(
    candidates: Sequence[EditCandidate],
    config: ChronoConfig,
    *,
    layer_id: int | None = None,
    allowed_actions: Sequence[str] = ACTIONS,
) -> LayerDecision:
    """The single best edit of one layer, or do nothing.

    Among candidates whose action is allowed, the lowest predicted delta_F wins if
    `delta_F < -min_improvement`; otherwise the layer does nothing.
    """
    layers = {c.layer_id for c in candidates}
    if layer_id is not None:
        layers.add(layer_id)
    if len(layers) != 1:
        raise ValueError(f"select_edit got candidates of layers {sorted(layers)}; expected exactly one layer")
    (layer,) = layers
    for action in allowed_actions:
        if action not in ACTIONS:
            raise ValueError(f"allowed action {action!r} is invalid: expected one of {list(ACTIONS)}")
    ranked = tuple(sorted(candidates, key=_rank))
    allowed = [c for c in ranked if c.action in allowed_actions]
    winners = [c for c in allowed if c.delta_F < -config.objective.min_improvement]
    if winners:
        edit = winners[0]
        why = f"predicted delta_F={edit.delta_F:.4f} < -min_improvement={-config.objective.min_improvement}"
        return LayerDecision(layer, edit, ranked, f"{edit.action}: {why}")
    if not ranked:
        return LayerDecision(layer, None, ranked, "do nothing: no candidate edit")
    if not allowed:
        return LayerDecision(layer, None, ranked, f"do nothing: only {list(allowed_actions)} allowed now")
    best = allowed[0]
    return LayerDecision(
        layer, None, ranked,
        f"do nothing: best candidate {best.action} predicts delta_F={best.delta_F:.4f}, "
        f"not below -min_improvement={-config.objective.min_improvement}",
    )


def _flag(flags: Mapping[int, bool] | Sequence[bool], layer: int, name: str) -> bool:
    try:
        return bool(flags[layer])
    except (KeyError, IndexError):
        raise ValueError(f"{name} has no entry for layer {layer}; expected one flag per reviewed layer") from None


def select_edits(
    per_layer_candidates: Mapping[int, Sequence[EditCandidate]],
    config: ChronoConfig,
    cooldown_ok: Mapping[int, bool] | Sequence[bool],
    emergency: Mapping[int, bool] | Sequence[bool],
    *,
    review_due: bool,
) -> list[LayerDecision]:
    """One decision per layer (sorted by layer id) under the cycle's rules.

    A layer in cooldown (`cooldown_ok[layer]` False) does nothing, emergency or not. When the regular
    review is due every action is allowed; otherwise only layers with `emergency[layer]` are reviewed, and
    only the early actions (spawn, split, replace) may run: prune and merge wait for the regular review. At
    most `max_edits_per_cycle` edits survive across layers, lowest predicted delta_F first.
    """
    decisions: dict[int, LayerDecision] = {}
    for layer in sorted(per_layer_candidates):
        candidates = per_layer_candidates[layer]
        ranked = tuple(sorted(candidates, key=_rank))
        if not _flag(cooldown_ok, layer, "cooldown_ok"):
            decisions[layer] = LayerDecision(
                layer, None, ranked, f"do nothing: layer cooling down (cooldown_steps="
                f"{config.lifecycle.cooldown_steps}, or an edit under audit)"
            )
        elif review_due:
            decisions[layer] = select_edit(candidates, config, layer_id=layer)
        elif _flag(emergency, layer, "emergency"):
            d = select_edit(candidates, config, layer_id=layer, allowed_actions=EARLY_ACTIONS)
            decisions[layer] = replace(d, reason=f"emergency review (only {list(EARLY_ACTIONS)} run early); "
                                                 f"{d.reason}")
        else:
            decisions[layer] = LayerDecision(layer, None, ranked, "do nothing: no review due")
    chosen = sorted(
        ((d, d.edit) for d in decisions.values() if d.edit is not None), key=lambda pair: _rank(pair[1])
    )
    for d, _ in chosen[config.lifecycle.max_edits_per_cycle:]:
        decisions[d.layer_id] = replace(
            d, edit=None,
            reason=f"do nothing: cycle budget max_edits_per_cycle={config.lifecycle.max_edits_per_cycle} spent "
                   f"(would have been: {d.reason})",
        )
    return [decisions[layer] for layer in sorted(decisions)]
