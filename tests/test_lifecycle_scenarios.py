"""Slow-clock scenarios on small real layers: each asserts the decision and its logged reason."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from chronomoe_v3.config import BasinConfig, ChronoConfig, DegradeConfig, LifecycleConfig, ObjectiveConfig
from chronomoe_v3.layers import ChronoMoELayer
from chronomoe_v3.system import ChronoSystem
from chronomoe_v3.telemetry import COLLAPSE_CONFIRMED, Alert, SystemSnapshot

torch.set_num_threads(1)

D = 8
# Short clocks so that the slow clock acts within a few hundred steps (the defaults are for real runs).
CFG = ChronoConfig(
    lifecycle=LifecycleConfig(eval_interval=20, cooldown_steps=40, cooling_period=40),
    degrade=DegradeConfig(min_observations=50),
    objective=ObjectiveConfig(min_observations_to_judge=50, min_evidence_tokens=500, min_age_to_remove=50),
    basins=BasinConfig(history=30),
)


def _clusters(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, D, generator=g)
    return 3 * centres / centres.norm(dim=1, keepdim=True), torch.randn(n, D, generator=g)


def _separated_clusters(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `_clusters`, with mutually orthogonal centres (norm 3): every pair of clusters is well separated."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    return 3 * q[:n], torch.randn(n, D, generator=g)


def _train(
    layer: ChronoMoELayer,
    cfg: ChronoConfig,
    n_clusters: int,
    steps: int,
    clusters: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ChronoSystem:
    """Regression of cluster targets from noisy cluster inputs; `system.step()` after every step."""
    centres, targets = _clusters(n_clusters) if clusters is None else clusters
    system = ChronoSystem(layer, config=cfg, run_id="scenario")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, n_clusters, (16 * n_clusters,), generator=g)
        x = centres[idx] + 0.3 * torch.randn(len(idx), D, generator=g)
        loss = (layer(x) - targets[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        system.step()
    return system


def _edits(system: ChronoSystem) -> list:
    return [r for r in system.decisions if r.action != "do_nothing"]


def test_a_dead_expert_is_not_pruned_and_the_mid_clock_pulls_traffic_towards_it() -> None:
    # Starvation is not decoherence: slot 3 never wins a token, so it has no evidence to be judged on; the
    # layer's routing is what is wrong, and the built-in mid clock (on by default) answers with pressure.
    torch.manual_seed(0)
    layer = ChronoMoELayer(D, 16, 6, 1, num_active=4, router_bias=True)
    with torch.no_grad():
        layer.router.bias[3] = -30.0
    system = _train(layer, CFG, 4, 200)
    assert not [r for r in _edits(system) if r.action in ("prune", "merge")]
    assert bool(layer.active_mask[3])
    lens = system.lenses[0]
    assert int(lens.offset.argmax()) == 3 and float(lens.offset[3]) > 0


def test_expert_serving_two_separated_clusters_is_split() -> None:
    # 2 experts, top-1, 4 separated (orthogonal) clusters, and a router that sends clusters {0, 1} to E0 and
    # {2, 3} to E1: each expert serves two clusters (the premise; under top-1 with normalised gates the router
    # gets no gradient, so it stays so). With `_clusters`' centres and a random router the premise did not
    # hold: E1 served 2.7 clusters and 28% of the tokens were starved, where spawn is the remedy.
    torch.manual_seed(0)
    layer = ChronoMoELayer(D, 16, 4, 1, num_active=2)
    clusters = _separated_clusters(4)
    centres = clusters[0]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = centres[[0, 1]].mean(0)
        layer.router.weight[1] = centres[[2, 3]].mean(0)
    system = _train(layer, CFG, 4, 160, clusters=clusters)
    edits = _edits(system)
    assert edits, "expected a split"
    first = edits[0]
    assert first.action == "split" and first.child_id is not None
    assert first.reason is not None and "most bimodal expert" in first.reason
    assert first.coherence_state.bimodality is not None and first.coherence_state.bimodality > 0.2
    # The children specialise: each of the parent's clusters goes to one child, and the two children do not
    # take the same clusters. Their router rows were set by the split from the detector's per-role mean
    # router inputs (measured during training), and nothing else moves the router here.
    children = [s for s in range(4) if system.registry.expert_at(0, s) is not None
                and system.registry.expert_at(0, s).parent_id == first.expert_id]
    assert len(children) == 2
    with torch.no_grad():
        top = layer.route(centres).topk_index[:, 0].tolist()
    served = {c: {k for k, t in enumerate(top) if t == c} for c in children}
    assert all(served.values()) and not (served[children[0]] & served[children[1]]), (top, children)
    parent_clusters = {0, 1} if first.expert_id == "L0_E0" else {2, 3}
    assert served[children[0]] | served[children[1]] == parent_clusters
    # After the split the children are no longer bimodal: each serves one role.
    bim = system.observers[0].bimodality.bimodality
    assert all(float(bim[c]) < 0.2 for c in children), bim


def test_duplicated_experts_are_merged() -> None:
    torch.manual_seed(0)
    layer = ChronoMoELayer(D, 16, 6, 2, num_active=4)
    with torch.no_grad():
        for p in (layer.w_gate, layer.w_up, layer.w_down):
            p[1] = p[0]
        layer.router.weight[1] = layer.router.weight[0]
    # Duplicates drift apart at the top-k boundary (ties go to one of them), so judge them early.
    early = replace(CFG.objective, min_observations_to_judge=20, min_age_to_remove=20)
    system = _train(layer, replace(CFG, objective=early), 4, 300)
    merges = [r for r in _edits(system) if r.action == "merge"]
    assert merges and {merges[0].expert_id, merges[0].child_id} == {"L0_E0", "L0_E1"}
    assert "most redundant pair" in (merges[0].reason or "")


def test_too_few_experts_for_the_clusters_spawns() -> None:
    torch.manual_seed(0)
    layer = ChronoMoELayer(D, 16, 6, 1, num_active=2)
    system = _train(layer, CFG, 6, 300)
    edits = _edits(system)
    assert edits and edits[0].action == "spawn"
    assert "starvation" in (edits[0].reason or "") and "fit no expert" in (edits[0].reason or "")


def test_healthy_layer_makes_no_edit_over_1000_steps() -> None:
    # A fast synthetic layer: four identical experts (coherent), a confident router that sends each of four
    # clusters to its own expert (no starvation), no dead expert, nothing bimodal.
    torch.manual_seed(0)
    layer = ChronoMoELayer(D, 16, 6, 1, num_active=4)
    centres, _ = _clusters(4)
    with torch.no_grad():
        for p in (layer.w_gate, layer.w_up, layer.w_down):
            p[1:4] = p[0]
        layer.router.weight.zero_()
        layer.router.weight[:4] = 5 * centres
    system = ChronoSystem(layer, config=CFG, run_id="healthy")
    start = time.time()
    for step in range(1000):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 4, (32,), generator=g)
        layer(centres[idx] + 0.1 * torch.randn(32, D, generator=g))
        system.step()
    assert _edits(system) == [], [r.reason for r in _edits(system)]
    assert time.time() - start < 20


def _coherent_starved_layer_with_dead_expert() -> tuple[ChronoMoELayer, ChronoSystem]:
    torch.manual_seed(0)
    layer = ChronoMoELayer(D, 16, 6, 1, num_active=4, router_bias=True)
    with torch.no_grad():
        for p in (layer.w_gate, layer.w_up, layer.w_down):
            p[1:4] = p[0]
        layer.router.weight.mul_(0.01)  # near-uniform router: most tokens fit no expert well
        layer.router.bias.zero_()
        layer.router.bias[3] = -30.0  # and slot 3 is dead (never a prune candidate)
    # The regular review never comes due here; instability weight 0 keeps split (the other additive edit) out.
    cfg = replace(CFG, lifecycle=replace(CFG.lifecycle, eval_interval=10_000),
                  objective=replace(CFG.objective, kappa_instability=0.0))
    system = ChronoSystem(layer, config=cfg, run_id="emergency")
    for step in range(80):
        g = torch.Generator().manual_seed(step)
        layer(torch.randn(32, D, generator=g))
    return layer, system


def test_emergency_expedites_spawn_but_not_prune() -> None:
    layer, system = _coherent_starved_layer_with_dead_expert()
    quiet = system.step()
    assert quiet.lifecycle_actions == []
    snapshot = SystemSnapshot(step=system.global_step, timestamp=0.0, train_loss=None, val_loss=None, layers=[],
                              alerts=[Alert(COLLAPSE_CONFIRMED, 0, 3, "test")])
    result = system.step(snapshot=snapshot)
    assert [a.action for a in result.lifecycle_actions] == ["spawn"]
    record = _edits(system)[0]
    assert record.action == "spawn" and "COLLAPSE_CONFIRMED" in record.trigger
    assert "starvation" in (record.reason or "")
    competing = {c.action for c in record.competing_edits}
    assert "prune" not in competing, "a dead expert is never a prune candidate (no fallback)"
    assert bool(layer.active_mask[3])


def _regression_layer(seed: int = 0) -> tuple[ChronoMoELayer, torch.Tensor, torch.Tensor]:
    """4 experts, top-1, each cluster routed to its own expert; targets share a common direction, so healthy
    experts are coherent (their outputs point with the mixture) and a damaged one is not."""
    torch.manual_seed(seed)
    layer = ChronoMoELayer(D, 16, 6, 1, num_active=4)
    centres, _ = _separated_clusters(4, seed)
    g = torch.Generator().manual_seed(seed + 7)
    common = torch.randn(D, generator=g)
    targets = 2 * common / common.norm() + 0.5 * torch.randn(4, D, generator=g)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:4] = 3 * centres
    return layer, centres, targets


def _run(layer: ChronoMoELayer, system: ChronoSystem, opt: torch.optim.Optimizer, centres: torch.Tensor,
         targets: torch.Tensor, steps: range, on_step=None) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 4, (64,), generator=g)
        x = centres[idx] + 0.3 * torch.randn(len(idx), D, generator=g)
        loss = (layer(x) - targets[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
        system.step(loss=losses[-1])
    return losses


def test_a_damaged_expert_is_flagged_and_replaced() -> None:
    # Without shadow copies (ops/shadow.py: with them, the expert gets its own earlier weights back; tests/
    # test_shadow.py), the coherence flag replaces it by a perturbed copy of a neighbour.
    layer, centres, targets = _regression_layer()
    no_shadow = replace(CFG, shadow=replace(CFG.shadow, enabled=False))
    system = ChronoSystem(layer, config=no_shadow, run_id="damage")
    opt = torch.optim.Adam(layer.parameters(), lr=2e-3)  # slow enough that gradients do not repair it at once
    system.attach_optimizer(opt)
    _run(layer, system, opt, centres, targets, range(300))
    assert not _edits(system)
    with torch.no_grad():
        for p in (layer.w_gate, layer.w_up, layer.w_down):
            noise = torch.randn_like(p[2])
            p[2].copy_(noise * p[2].norm() / noise.norm())
    _run(layer, system, opt, centres, targets, range(300, 340))
    edits = _edits(system)
    assert edits and edits[0].action == "replace" and edits[0].expert_id == "L0_E2", [r.reason for r in edits]
    assert edits[0].step <= 300 + 20, "replaced within 20 steps of the damage"
    assert "degrading" in (edits[0].trigger + (edits[0].reason or ""))
    new = system.registry.expert_at(0, 2)
    assert new is not None and new.origin == "replace" and new.parent_id is not None


def test_a_layer_does_not_regrow_right_after_a_removal() -> None:
    # Every expert is prunable under this config; once one is pruned its layer may neither split nor spawn for
    # `regrow_hold_steps` training steps (the readings that would justify growth predate the removal).
    layer, centres, targets = _regression_layer(1)
    cfg = replace(CFG, objective=replace(CFG.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                         prune_min_absorbable=0.0, lambda_complexity=0.5),
                  lifecycle=replace(CFG.lifecycle, audit_steps=1000, cooldown_steps=20, regrow_hold_steps=700))
    system = ChronoSystem(layer, config=cfg, run_id="regrow")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    pruned: list[int] = []

    def stop_after_prune(step: int) -> None:
        if any(r.action == "prune" for r in _edits(system)):
            pruned.append(step)

    for chunk in range(10):  # stop at the first chunk of 20 steps that saw a prune
        _run(layer, system, opt, centres, targets, range(20 * chunk, 20 * chunk + 20), stop_after_prune)
        if pruned:
            break
    (prune,) = [r for r in _edits(system) if r.action == "prune"]
    for kind in ("split", "spawn"):
        assert system.barred[(0, kind)] == prune.step + 700
    assert (0, "prune") not in system.barred and (0, "merge") not in system.barred


def test_an_edit_made_to_hurt_is_rolled_back() -> None:
    # A complexity weight so high that removing any expert looks like a gain, and a prune rule that calls every
    # expert decoherent, on a task where each expert serves a cluster of its own: the prune hurts, the audit
    # sees the loss rise beyond noise, and the expert comes back bit for bit with fresh optimiser state.
    layer, centres, targets = _regression_layer(1)
    hurtful = replace(CFG, objective=replace(CFG.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                             prune_min_absorbable=0.0, lambda_complexity=0.5),
                      lifecycle=replace(CFG.lifecycle, audit_steps=20, cooldown_steps=20))
    system = ChronoSystem(layer, config=hurtful, run_id="hurt")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    surgery = system.attach_optimizer(opt)
    weights_before_step: dict[str, torch.Tensor] = {}
    pruned_weights: dict[str, torch.Tensor] = {}
    pruned_slot = None
    for step in range(200):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 4, (64,), generator=g)
        x = centres[idx] + 0.3 * torch.randn(len(idx), D, generator=g)
        loss = (layer(x) - targets[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights_before_step = {n: getattr(layer, n).detach().clone() for n in ("w_gate", "w_up", "w_down")}
        result = system.step(loss=float(loss.detach()))
        for action in result.lifecycle_actions:
            if action.action == "prune" and pruned_slot is None:
                pruned_slot = action.record.parked_slots[0]
                pruned_weights = {n: w[pruned_slot] for n, w in weights_before_step.items()}
            if action.action == "rollback" and pruned_slot is not None:
                for n, w in pruned_weights.items():
                    assert torch.equal(getattr(layer, n)[pruned_slot], w), n
                state = opt.state[layer.w_down]
                assert float(state["exp_avg"][pruned_slot].abs().sum()) == 0.0  # fresh moments
                assert surgery is system.surgery
                break
        else:
            continue
        break
    edits = _edits(system)
    prunes = [r for r in edits if r.action == "prune"]
    rollbacks = [r for r in edits if r.action == "rollback"]
    assert prunes and rollbacks, [(r.action, r.reason) for r in edits]
    prune, rollback = prunes[0], rollbacks[0]
    assert rollback.expert_id == prune.expert_id and f"prune at step {prune.step}" in rollback.trigger
    assert "harmful: loss rose" in (rollback.reason or "")
    verdict = next(a for a in system.audit_log if a.edit_step == prune.step)
    assert verdict.verdict == "rolled_back" and verdict.loss["change"] is not None and verdict.loss["change"] > 0
    assert verdict.predicted["delta_F"] < 0  # it was predicted to help
    restored = system.registry.expert_at(0, pruned_slot)
    assert restored is not None and restored.origin == "restore" and restored.parent_id == prune.expert_id
    assert bool(layer.active_mask[pruned_slot])
    # The same kind of edit is not retried on the layer right away.
    more = _run(layer, system, opt, centres, targets, range(200, 260))
    assert more and not [r for r in _edits(system) if r.action == "prune" and r.step > rollback.step]


def test_close_judges_the_edits_still_under_audit(tmp_path) -> None:
    # Training ends 5 steps after an edit whose audit window is 50: close() judges it on those steps, logs it as
    # `partial` in audits.jsonl and rolls nothing back.
    layer, centres, targets = _regression_layer(1)
    hurtful = replace(CFG, objective=replace(CFG.objective, prune_coherence_floor=1.0, prune_max_share=1.0,
                                             prune_min_absorbable=0.0, lambda_complexity=0.5),
                      lifecycle=replace(CFG.lifecycle, audit_steps=50, cooldown_steps=50))
    system = ChronoSystem(layer, config=hurtful, run_id="closing", output_dir=tmp_path)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    edit_step = None
    for step in range(200):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 4, (64,), generator=g)
        x = centres[idx] + 0.3 * torch.randn(len(idx), D, generator=g)
        loss = (layer(x) - targets[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        result = system.step(loss=float(loss.detach()))
        if edit_step is None and any(a.action == "prune" for a in result.lifecycle_actions):
            edit_step = system.global_step
        if edit_step is not None and system.global_step >= edit_step + 5:
            break
    assert edit_step is not None and system.audits, "an edit is under audit when training ends"
    active_before = layer.active_mask.clone()
    closed = system.close()
    assert len(closed) == 1 and closed[0].verdict == "partial" and closed[0].edit_step == edit_step
    assert "run closed 5 of 50 audit steps" in closed[0].reason and closed[0].loss["after"] is not None
    assert not system.audits and torch.equal(layer.active_mask, active_before)  # nothing rolled back
    logged = [json.loads(line) for line in (tmp_path / "closing" / "audits.jsonl").read_text().splitlines()]
    assert logged[-1]["verdict"] == "partial" and logged[-1]["edit_step"] == edit_step
    assert system.close() == []  # idempotent


def test_the_mid_clock_redistributes_a_collapsed_layer_and_keeps_the_starved_experts() -> None:
    layer, centres, targets = _regression_layer(2)
    with torch.no_grad():
        layer.router.weight[:4] = 0.3 * centres / 3  # a weak router ...
    layer.router.bias = torch.nn.Parameter(torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0, 0.0]))  # ... biased to 2 experts
    system = ChronoSystem(layer, config=CFG, run_id="collapse")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    counts = torch.zeros(6)
    handle = layer.add_observer(lambda tr: counts.add_(torch.bincount(tr.topk_index.flatten(), minlength=6).float()))
    _run(layer, system, opt, centres, targets, range(10))
    early = counts.clone()
    _run(layer, system, opt, centres, targets, range(10, 250))
    counts.zero_()
    _run(layer, system, opt, centres, targets, range(250, 300))
    handle.remove()

    def neff(c: torch.Tensor) -> float:
        p = c[:4] / c[:4].sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    assert neff(early) < 2.5 and neff(counts) >= 2.8, (early, counts)  # 2 of 4 experts used -> at least 3
    # The experts the collapse starved (slots 2 and 3) are never removed; nothing is pruned.
    assert not [r for r in _edits(system) if r.action == "prune"]
    assert bool(layer.active_mask[2]) and bool(layer.active_mask[3])
    assert all(r.expert_id not in ("L0_E2", "L0_E3") for r in _edits(system) if r.action == "merge")
