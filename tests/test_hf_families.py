"""transformers 5.x MoE families through `chronomoe_v3.integrations.hf`: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
Granite-MoE, Jamba, GPT-OSS, DeepSeek-V3 and SwitchTransformers; tiny models built from their configs, hooked with
no model edit."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import lifecycle_config
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

transformers = pytest.importorskip("transformers")

from chronomoe_v3.adapters import LayerBanks, adapter_for  # noqa: E402
from chronomoe_v3.balance import AuxLossFreeBalancer  # noqa: E402
from chronomoe_v3.integrations.hf import (  # noqa: E402
    ConfigNormSoftmaxAdapter,
    GptOssAdapter,
    HFMoEAdapter,
    RenormalisedSoftmaxAdapter,
    SigmoidGroupAdapter,
    SwitchAdapter,
    TopKSoftmaxAdapter,
    UnnormalisedSoftmaxAdapter,
    build_fixed_width,
    fixed_width_config,
)
from chronomoe_v3.ops import merge, prune, replace, revert, snapshot_slots, spawn, split  # noqa: E402
from chronomoe_v3.system import ChronoSystem  # noqa: E402
from chronomoe_v3.trace import MoETrace  # noqa: E402

torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and a busy machine makes two much slower

E, K, V = 8, 2, 64
COMMON = dict(
    vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, num_experts_per_tok=K, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
SWIGLU_LIMIT = 0.1  # GPT-OSS's clamp (7.0 by default) low enough that the tiny model's activations reach it


def _family(name: str) -> tuple[type, object]:
    t = transformers
    if name == "mixtral":
        return t.MixtralForCausalLM, t.MixtralConfig(intermediate_size=64, num_local_experts=E, **COMMON)
    if name == "qwen2_moe":
        return t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=E, **COMMON
        )
    if name == "qwen3_moe":  # with renormalisation (the config default is off): both rules are covered
        return t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, num_experts=E, head_dim=8, norm_topk_prob=True, **COMMON
        )
    if name == "olmoe":
        return t.OlmoeForCausalLM, t.OlmoeConfig(intermediate_size=32, num_experts=E, **COMMON)
    if name == "granitemoe":
        return t.GraniteMoeForCausalLM, t.GraniteMoeConfig(intermediate_size=32, num_local_experts=E, **COMMON)
    if name == "jamba":  # MoE on layers 0 and 2 only; layer 1 attention with a dense MLP, 0 and 2 Mamba
        return t.JambaForCausalLM, t.JambaConfig(
            intermediate_size=32, num_experts=E, expert_layer_period=2, expert_layer_offset=0, attn_layer_period=3,
            attn_layer_offset=1, mamba_d_state=8, **{**COMMON, "num_hidden_layers": 3},
        )
    if name == "gpt_oss":
        return t.GptOssForCausalLM, t.GptOssConfig(
            intermediate_size=32, num_local_experts=E, head_dim=8, sliding_window=16, swiglu_limit=SWIGLU_LIMIT,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **COMMON,
        )
    if name == "deepseek_v3":  # layer 0 dense (first_k_dense_replace); 2 groups of 4 experts, 1 group per token
        return t.DeepseekV3ForCausalLM, t.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=16, n_routed_experts=E, n_group=2, topk_group=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
        )
    # One sparse encoder layer and one sparse decoder layer (of 2 each); no dropout or jitter (random); a capacity
    # above the sequence length (test_switch_capacity_drops_are_exact_and_not_counted drops tokens).
    assert name == "switch_transformers"
    return t.SwitchTransformersForConditionalGeneration, t.SwitchTransformersConfig(
        vocab_size=V, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=E,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=64, router_jitter_noise=0.0,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )


FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "jamba", "gpt_oss", "deepseek_v3",
    "switch_transformers",
]
ADAPTER: dict[str, type[HFMoEAdapter]] = {
    "mixtral": RenormalisedSoftmaxAdapter, "qwen2_moe": ConfigNormSoftmaxAdapter, "qwen3_moe": ConfigNormSoftmaxAdapter,
    "olmoe": ConfigNormSoftmaxAdapter, "granitemoe": TopKSoftmaxAdapter, "jamba": UnnormalisedSoftmaxAdapter,
    "gpt_oss": GptOssAdapter, "deepseek_v3": SigmoidGroupAdapter, "switch_transformers": SwitchAdapter,
}
RENORMALISED = {  # whether the k gate weights sum to 1 (before DeepSeek-V3's routed_scaling_factor)
    "mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False, "granitemoe": True, "jamba": False,
    "gpt_oss": True, "deepseek_v3": True, "switch_transformers": False,
}
LAYERS = {
    "granitemoe": ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"],
    "jamba": ["model.layers.0.feed_forward", "model.layers.2.feed_forward"],
    "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"],
    "switch_transformers": ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"],
}
BANK_NAMES = {
    "gpt_oss": {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"},
    "switch_transformers": {"wi.weight", "wo.weight"},
}


def _top_k(name: str) -> int:
    return 1 if name == "switch_transformers" else K


def _build(name: str, seed: int = 0, implementation: str | None = None, **overrides: object) -> nn.Module:
    cls, config = _family(name)
    if implementation is not None:
        config._experts_implementation = implementation
    for field, value in overrides.items():
        setattr(config, field, value)
    torch.manual_seed(seed)
    return cls(config)


def _fixed(name: str, num_active: int, seed: int = 0) -> nn.Module:
    cls, config = _family(name)
    torch.manual_seed(seed)
    return build_fixed_width(cls, config, E, num_active)


def _ids(seed: int = 0, batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    return model(ids, **extra).logits


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks, in module order."""
    return [m for m in model.modules() if adapter_for(m) is not None]


def _router(block: nn.Module) -> nn.Module:
    router = getattr(block, "gate", None)
    return router if isinstance(router, nn.Module) else block.router


def _record(model: nn.Module) -> list[list[MoETrace]]:
    """Per MoE block, the traces its observers receive."""
    traces: list[list[MoETrace]] = []
    for block in _blocks(model):
        adapter = adapter_for(block)
        assert adapter is not None
        seen: list[MoETrace] = []
        adapter.add_observer(seen.append)
        traces.append(seen)
    return traces


def _counts(trace: MoETrace) -> torch.Tensor:
    kept = trace.kept_slots().reshape(-1).float()
    return torch.zeros(trace.num_experts).scatter_add_(0, trace.topk_index.reshape(-1), kept)


def _reference_routing(name: str, block: nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(index [T,K], weights [T,K])` from the router's own transformers forward (called past the hooks)."""
    router = _router(block)
    if name == "switch_transformers":  # capacity counts per sequence: the router reads [B, S, H]
        dispatch, probs, _ = type(router).forward(router, x.view(batch, -1, x.shape[-1]))
        return dispatch.reshape(-1, E).argmax(-1, keepdim=True), probs.reshape(-1, 1)
    _, weights, index = type(router).forward(router, x)
    return index, weights


def _weights_from_logits(name: str, block: nn.Module, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The family's gate weights of experts `index` from (clean) router logits, written out."""
    if name in ("granitemoe", "gpt_oss"):  # top-k logits -> softmax over the k
        return torch.softmax(logits.gather(1, index), dim=-1)
    if name == "deepseek_v3":  # the un-biased sigmoid scores, normalised, scaled
        w = torch.sigmoid(logits).gather(1, index)
        return w / (w.sum(-1, keepdim=True) + 1e-20) * block.gate.routed_scaling_factor
    w = torch.softmax(logits, dim=-1).gather(1, index)
    return w / w.sum(-1, keepdim=True) if RENORMALISED[name] else w


def _manual_experts(name: str, block: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-slot unweighted expert outputs `[T,K,H]` computed from the weights, written out per layout."""
    experts = block.experts
    if name == "switch_transformers":  # per-expert modules: wo(relu(wi x))
        wi = torch.stack([experts[f"expert_{e}"].wi.weight for e in range(E)])[index]
        wo = torch.stack([experts[f"expert_{e}"].wo.weight for e in range(E)])[index]
        return torch.einsum("tkhf,tkf->tkh", wo, F.relu(torch.einsum("tkfh,th->tkf", wi, x)))
    if name == "gpt_oss":  # transposed, gate/up interleaved, biases, clamped SwiGLU with (up + 1)
        gate_up = torch.einsum("th,tkhj->tkj", x, experts.gate_up_proj[index]) + experts.gate_up_proj_bias[index]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        assert bool((gate > SWIGLU_LIMIT).any()) and bool((up.abs() > SWIGLU_LIMIT).any())  # the clamp is exercised
        gate, up = gate.clamp(max=SWIGLU_LIMIT), up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return torch.einsum("tki,tkih->tkh", act, experts.down_proj[index]) + experts.down_proj_bias[index]
    gate, up = torch.einsum("tkoh,th->tko", experts.gate_up_proj[index], x).chunk(2, dim=-1)
    return torch.einsum("tkhi,tki->tkh", experts.down_proj[index], F.silu(gate) * up)


def _bank_is_zero(banks: LayerBanks, slot: int) -> bool:
    return all(float(w.abs().sum()) == 0.0 for w in banks.experts.read(slot).values())


# ---------------------------------------------------------------------- discovery
def test_discovery_is_automatic_and_the_core_never_imports_transformers() -> None:
    code = (
        "import sys, torch\n"
        "import chronomoe_v3\n"
        "assert 'transformers' not in sys.modules, 'the core imported transformers'\n"
        "from transformers import MixtralConfig, MixtralForCausalLM\n"
        "assert 'chronomoe_v3.integrations.hf' not in sys.modules\n"
        "model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,"
        " num_experts_per_tok=2))\n"
        "system = chronomoe_v3.ChronoSystem(model)\n"
        "print(system.layer_names)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['model.layers.0.mlp', 'model.layers.1.mlp']" in out.stdout


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_gets_the_adapter_of_its_routing_rule(name: str) -> None:
    model = _build(name)
    system = ChronoSystem(model, controller=None)
    assert system.layer_names == LAYERS.get(name, ["model.layers.0.mlp", "model.layers.1.mlp"])
    assert all(type(a) is ADAPTER[name] for a in system.adapters)
    adapter = system.adapters[0]
    assert isinstance(adapter, HFMoEAdapter)
    k = _top_k(name)
    assert (adapter.top_k, adapter.hidden_size, adapter.router_input_size, system.banks[0].num_slots) == (k, 32, 32, E)
    assert adapter.state.renormalise is RENORMALISED[name]
    banks = system.banks[0]
    if name in BANK_NAMES:
        assert set(banks.experts.read(0)) == BANK_NAMES[name]
    if name in ("qwen2_moe", "deepseek_v3"):  # the shared experts are not lifecycle-managed slots
        assert {r.param.shape[0] for r in banks.param_slots()} == {E}
    assert banks.router.has_bias is (name == "gpt_oss")


def _implementations() -> list[tuple[str, str | None]]:
    return [(n, i) for n in FAMILIES for i in ("grouped_mm", "eager") if n != "switch_transformers"] + [
        ("switch_transformers", None)  # one implementation: the per-expert loop
    ]


@pytest.mark.parametrize(("name", "implementation"), _implementations())
def test_hooked_output_is_bitwise_the_unhooked_output(name: str, implementation: str | None) -> None:
    model = _build(name, implementation=implementation)
    reference = copy.deepcopy(model)
    system = ChronoSystem(model, controller=None)  # beta 0, no lens, all slots active
    ids = _ids()
    for training in (True, False):
        model.train(training)
        reference.train(training)
        assert torch.equal(_logits(model, ids), _logits(reference, ids)), training
    assert system.layer_steps == [1, 1]  # the training forward took the per-slot path and was observed
    twin = copy.deepcopy(model)  # a copy's hooks drive the copy's own state
    _blocks(twin)[0].chrono.active_mask[0] = False
    assert bool(_blocks(model)[0].chrono.active_mask[0])
    assert not torch.equal(_logits(twin, ids), _logits(reference, ids))


@pytest.mark.parametrize("name", FAMILIES)
def test_captured_outputs_are_the_unweighted_expert_outputs_and_routing_follows_the_family_rule(name: str) -> None:
    model = _build(name)
    traces = _record(model)
    model.train()
    _logits(model, _ids())
    block = _blocks(model)[0]
    trace = traces[0][0]
    x = trace.router_input  # what the router and the experts read
    assert x is not None
    index, weights = _reference_routing(name, block, x, batch=4)  # transformers' own router on the same input
    assert torch.equal(trace.topk_index, index)
    assert torch.equal(trace.topk_weight, weights)
    assert trace.router_logits_clean is not None
    torch.testing.assert_close(trace.topk_weight, _weights_from_logits(name, block, trace.router_logits_clean, index))
    manual = _manual_experts(name, block, x, index)  # per-slot expert outputs, computed from the bank's weights
    torch.testing.assert_close(trace.expert_out, manual, atol=1e-5, rtol=1e-5)
    assert trace.mixture is not None
    torch.testing.assert_close(trace.mixture, (manual * trace.topk_weight.unsqueeze(-1)).sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_positive_beta_raises_the_token_share_of_its_expert(name: str) -> None:
    model = _build(name)
    system = ChronoSystem(model, controller=None)
    if name == "switch_transformers":  # its router init spreads the logits by ~6: bring them within beta's reach (1)
        with torch.no_grad():
            system.banks[0].router.param_slots()[0].param.mul_(0.1)
    traces = _record(model)
    model.train()
    ids = _ids(length=32)
    with torch.no_grad():
        _logits(model, ids)
        before = _counts(traces[0][-1])
        expert = int(before.argmin())
        beta = torch.zeros(E)
        beta[expert] = 1.0
        bias = system.biases[0]
        assert bias is not None
        bias.set_beta(beta)
        _logits(model, ids)
    after = _counts(traces[0][-1])
    assert after[expert] > before[expert], (before, after)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_selection_bias_moves_the_choice_only(name: str) -> None:
    model = _fixed(name, num_active=E)  # the blocks carry their state from the start: a balancer finds them
    balancer = AuxLossFreeBalancer(model)
    system = ChronoSystem(model, controller=None)
    block = _blocks(model)[0]
    bias = block.chrono.expert_bias
    assert balancer.layers == [b.chrono for b in _blocks(model)] and system.adapters[0].selection_bias() is bias
    if name == "deepseek_v3":  # the router's own aux-loss-free bias is the balancer's
        assert bias is block.gate.e_score_correction_bias
    traces = _record(model)
    bias[5] = 100.0  # far above any score gap: every token chooses expert 5
    model.train()
    _logits(model, _ids())
    trace = traces[0][0]
    assert bool((trace.topk_index == 5).any(-1).all())
    assert trace.router_logits_clean is not None  # weights: the clean router's
    expected = _weights_from_logits(name, block, trace.router_logits_clean, trace.topk_index)
    torch.testing.assert_close(trace.topk_weight.float(), expected)
    assert float(block.chrono.tokens_per_expert[5]) == trace.num_tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_masked_slots_get_no_token(name: str) -> None:
    model = _fixed(name, num_active=6)
    assert [int(b.chrono.active_mask.sum()) for b in _blocks(model)] == [6, 6]
    _blocks(model)[0].chrono.active_mask[2] = False
    traces = _record(model)
    model.train()
    out = model(_ids(length=32), labels=_ids(length=32))
    assert torch.isfinite(out.loss)
    counts = [_counts(t[0]) for t in traces]
    assert counts[0][[2, 6, 7]].sum() == 0 and counts[1][[6, 7]].sum() == 0
    assert counts[0].sum() == counts[1].sum() == 4 * 32 * _top_k(name)


# ---------------------------------------------------------------------- lifecycle and training
def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _bank_params(banks: LayerBanks) -> list[torch.Tensor]:
    return [r.param.detach().clone() for r in banks.experts.param_slots()]


@pytest.mark.parametrize("name", FAMILIES)
def test_split_prune_and_rollback_through_the_ops_keep_training(name: str) -> None:
    model = _fixed(name, num_active=6)
    system = ChronoSystem(model, config=lifecycle_config(min_experts_per_layer=2, max_experts_per_layer=E))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    surgery = system.attach_optimizer(opt)
    ids = _ids(length=32)
    traces = _record(model)
    for _ in range(2):
        _train_step(model, opt, ids)
    system.step()
    banks, registry, layer = system.banks[0], system.registry, 0
    usage = _counts(traces[0][-1])
    parent = int(usage.argmax())  # the busiest expert: its split child takes the tokens that chose it first
    victim = int(torch.where(torch.arange(E) == parent, usage.max() + 1, usage)[:6].argmin())

    router_before = banks.router.read(parent)
    record = split(registry, banks, layer, parent, step=system.global_step, optimizer=surgery)
    system.observers[layer].on_edit(record)
    assert record.fresh_slots == (6,) and bool(banks.active_mask[6])
    bias = system.biases[layer]
    assert bias is not None
    applied = record.logit_shift_applied  # GPT-OSS: the shift went into the router bias, for both children
    assert applied is banks.router.has_bias
    if applied:
        for child in (parent, 6):
            torch.testing.assert_close(banks.router.read(child)["bias"], router_before["bias"] + record.logit_shift[6])
    shift = torch.zeros(E)
    if not applied:  # the children share the parent's routing mass through their beta
        for slot, value in record.logit_shift.items():
            shift[slot] = value
        bias.set_beta(shift, shift != 0)
    before = snapshot_slots(registry, banks, layer, [victim])
    weights_before = banks.experts.read(victim)
    record = prune(registry, banks, layer, victim, step=system.global_step, optimizer=surgery)
    system.observers[layer].on_edit(record)
    assert not bool(banks.active_mask[victim]) and _bank_is_zero(banks, victim)
    loss = _train_step(model, opt, ids)
    assert torch.isfinite(torch.tensor(loss))
    trace = traces[0][-1]
    assert _counts(trace)[victim] == 0  # the pruned slot is dark
    clean, biased = trace.router_logits_clean, trace.router_logits_biased
    assert clean is not None and biased is not None
    assert torch.equal(clean[:, 6], clean[:, parent]) and bool(torch.isfinite(biased[:, 6]).all())  # the child is open
    torch.testing.assert_close(biased[:, 6], clean[:, 6] + float(shift[6]))  # with its beta

    record = revert(registry, banks, layer, before, step=system.global_step, optimizer=surgery)  # the rollback
    system.observers[layer].on_edit(record)
    assert bool(banks.active_mask[victim])
    for n, w in weights_before.items():
        assert torch.equal(banks.experts.read(victim)[n], w), n
    snapshot = _bank_params(banks)
    for _ in range(2):
        assert torch.isfinite(torch.tensor(_train_step(model, opt, ids)))
    assert not all(torch.equal(a, b) for a, b in zip(_bank_params(banks), snapshot, strict=True))  # still steps
    assert _bank_is_zero(banks, 7)  # a masked slot stays held at zero
    system.step()


@pytest.mark.parametrize("name", FAMILIES)
def test_spawn_merge_and_replace_through_the_ops_keep_training(name: str) -> None:
    model = _fixed(name, num_active=5)
    system = ChronoSystem(model, config=lifecycle_config(min_experts_per_layer=2, max_experts_per_layer=E))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    surgery = system.attach_optimizer(opt)
    ids = _ids(length=32)
    traces = _record(model)
    _train_step(model, opt, ids)
    banks, registry, layer = system.banks[0], system.registry, 0
    generator = torch.Generator().manual_seed(0)
    step = system.global_step
    edits = [
        spawn(registry, banks, layer, step=step, parent=1, strategy="clone_and_perturb", generator=generator,
              optimizer=surgery),
        spawn(registry, banks, layer, step=step, strategy="random", generator=generator, optimizer=surgery),
        merge(registry, banks, layer, 0, 2, step=step, usage=(3.0, 1.0), optimizer=surgery),
        replace(registry, banks, layer, 3, 4, step=step, generator=generator, optimizer=surgery),
    ]
    for record in edits:
        system.observers[layer].on_edit(record)
    assert banks.active_mask.tolist() == [True, True, False, True, True, True, True, False]
    assert _bank_is_zero(banks, 2) and not _bank_is_zero(banks, 6)  # merged away; spawned
    for _ in range(2):
        assert torch.isfinite(torch.tensor(_train_step(model, opt, ids)))
    counts = _counts(traces[0][-1])
    assert counts[[2, 7]].sum() == 0 and counts.sum() == 4 * 32 * _top_k(name)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_few_training_steps_reduce_the_loss(name: str) -> None:
    model = _fixed(name, num_active=6)
    system = ChronoSystem(model)  # all three clocks, the mid clock's offsets included
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    system.attach_optimizer(opt)
    model.train()
    ids = _ids(length=32)
    losses = []
    for _ in range(12):
        losses.append(_train_step(model, opt, ids))
        system.step(loss=losses[-1])
    assert losses[-1] < 0.8 * losses[0], losses
    assert system.layer_steps == [12, 12]


def _per_step_counts(name: str, checkpointing: str | None) -> list[list[torch.Tensor]]:
    """Per training step, the token counts of every trace the blocks' observers received."""
    model = _build(name)
    ChronoSystem(model, controller=None)
    if checkpointing is not None:
        model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    traces = _record(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    out = []
    for step in range(3):
        ids = _ids(seed=step)
        # "full": the non-reentrant recompute runs the whole block again (no early stop), hooks included
        with set_checkpoint_early_stop(checkpointing != "full"):
            loss = model(ids, labels=ids, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
        opt.step()
        out.append([_counts(t) for per_block in traces for t in per_block])
        for per_block in traces:
            per_block.clear()
    return out


@pytest.mark.parametrize(
    ("name", "mode"), [(n, "full") for n in FAMILIES] + [("mixtral", "non_reentrant"), ("mixtral", "reentrant")]
)
def test_gradient_checkpointing_counts_each_training_forward_once(name: str, mode: str) -> None:
    plain = _per_step_counts(name, None)
    checkpointed = _per_step_counts(name, mode)
    assert [len(step) for step in checkpointed] == [2, 2, 2]  # one trace per block per step
    for a, b in zip(plain, checkpointed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_forwards_are_not_counted(name: str) -> None:
    model = _build(name)
    system = ChronoSystem(model, controller=None)
    traces = _record(model)
    model.eval()
    _logits(model, _ids())
    with torch.no_grad():
        _logits(model, _ids())
    assert system.layer_steps == [0, 0] and not any(traces)
    model.train()
    _logits(model, _ids())
    assert system.layer_steps == [1, 1] and [len(t) for t in traces] == [1, 1]


def test_the_block_state_is_saved_with_the_model() -> None:
    model = _fixed("qwen3_moe", num_active=6)
    system = ChronoSystem(model)
    bias = system.biases[1]
    assert bias is not None
    bias.set_beta(0.5, torch.arange(E) == 3)
    model.model.layers[1].mlp.chrono.active_mask[4] = False
    state = model.state_dict()
    for key in ("active_mask", "slow_bias.beta", "logit_lens.offset"):
        assert f"model.layers.1.mlp.chrono.{key}" in state
    other = _fixed("qwen3_moe", num_active=6, seed=1)
    ChronoSystem(other)
    other.load_state_dict(state)
    block = other.model.layers[1].mlp.chrono
    assert block.active_mask.tolist() == [True] * 4 + [False, True, False, False]
    assert float(block.slow_bias.beta[3]) == 0.5


# ---------------------------------------------------------------------- family specifics
def test_switch_capacity_drops_are_exact_and_not_counted() -> None:
    model = _build("switch_transformers", expert_capacity=3)  # 3 tokens per expert and sequence
    reference = copy.deepcopy(model)
    ChronoSystem(model, controller=None)
    AuxLossFreeBalancer(model)  # counts the tokens each expert receives
    traces = _record(model)
    ids = _ids(length=32)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        assert torch.equal(_logits(model, ids), _logits(reference, ids)), training
    trace = traces[0][0]  # the encoder's block
    kept = trace.kept_slots()[:, 0]
    assert 0 < int(kept.sum()) < trace.num_tokens  # some tokens were dropped
    sequence = torch.arange(trace.num_tokens) // 32
    per_sequence = torch.zeros(4, E).index_put_((sequence, trace.topk_index[:, 0]), kept.float(), accumulate=True)
    assert float(per_sequence.max()) == 3.0  # no expert keeps more than its capacity in any sequence
    assert trace.mixture is not None
    assert float(trace.expert_out[~kept].abs().sum()) == 0.0 and float(trace.mixture[~kept].abs().sum()) == 0.0
    assert torch.equal(_blocks(model)[0].chrono.tokens_per_expert, _counts(trace))  # dropped tokens not counted


def test_deepseek_offsets_compose_with_its_correction_bias_and_move_the_choice_only() -> None:
    model = _build("deepseek_v3")
    system = ChronoSystem(model)  # with the mid clock's selection offsets
    block = _blocks(model)[0]
    lens = system.adapters[0].logit_lens()
    assert lens is not None
    correction, offset = torch.linspace(-0.05, 0.05, E), torch.linspace(0.04, -0.04, E)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(correction)
        lens.offset.copy_(offset)
    traces = _record(model)
    model.train()
    _logits(model, _ids())
    trace = traces[0][0]
    assert trace.router_input is not None and trace.router_logits_clean is not None
    with torch.no_grad():  # transformers' router whose own bias is ours plus the offset: the same choice and weights
        block.gate.e_score_correction_bias.add_(offset)
        index, weights = _reference_routing("deepseek_v3", block, trace.router_input, batch=4)
        block.gate.e_score_correction_bias.copy_(correction)
        without_offset, _ = _reference_routing("deepseek_v3", block, trace.router_input, batch=4)
    assert torch.equal(trace.topk_index, index) and torch.equal(trace.topk_weight, weights)
    assert not torch.equal(index.sort(-1).values, without_offset.sort(-1).values)  # the offset moved the choice
    expected = _weights_from_logits("deepseek_v3", block, trace.router_logits_clean, index)
    torch.testing.assert_close(trace.topk_weight, expected)  # from the un-biased sigmoid scores


def test_deepseek_group_limited_choice_never_takes_a_masked_slot() -> None:
    model = _build("deepseek_v3")
    ChronoSystem(model, controller=None)
    traces = _record(model)
    model.train()
    mask = _blocks(model)[0].chrono.active_mask
    mask[5:] = False  # group 1 keeps one slot: without two it cannot score (top-2 sum), so group 0 always wins
    _logits(model, _ids())
    assert bool((traces[0][-1].topk_index < 4).all())
    mask[:] = False
    mask[[1, 4]] = True  # one slot per group: no single group holds top_k slots, so tokens choose among all
    _logits(model, _ids())
    index = traces[0][-1].topk_index
    assert torch.equal(index.sort(-1).values, torch.tensor([[1, 4]]).expand_as(index))


def test_deepseek_correction_bias_is_the_balancer_bias_and_stays_the_router_state() -> None:
    model = _build("deepseek_v3")
    system = ChronoSystem(model, controller=None)
    gate = _blocks(model)[0].gate
    assert system.adapters[0].selection_bias() is gate.e_score_correction_bias  # carried by structural edits
    balancer = AuxLossFreeBalancer(model, rate=0.01)
    model.train()
    _logits(model, _ids())
    balancer.step()
    assert bool(gate.e_score_correction_bias.ne(0).any())  # the balancer drives DeepSeek-V3's own bias
    state = model.state_dict()
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in state
    assert not any(key.endswith("chrono.expert_bias") for key in state)  # one copy: the router's


def test_deepseek_correction_bias_follows_a_lifecycle_split_and_its_rollback() -> None:
    from chronomoe_v3.lifecycle.cycle import LayerParts, apply_edit, open_audit, roll_back, router_state
    from chronomoe_v3.lifecycle.objective import EditCandidate, FreeEnergy

    model = _fixed("deepseek_v3", num_active=6)
    system = ChronoSystem(model, config=lifecycle_config(min_experts_per_layer=2, max_experts_per_layer=E))
    model.train()
    _logits(model, _ids())
    correction = _blocks(model)[0].gate.e_score_correction_bias
    with torch.no_grad():
        correction.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0]))
    parts = LayerParts(system.banks[0], system.observers[0], system.biases[0], (system.adapters[0].selection_bias(),))
    edit = EditCandidate("split", 0, 1, 0.0, FreeEnergy(0.0, 0.0, 0.0, 0.0), "test")
    before = snapshot_slots(system.registry, system.banks[0], 0, [1, 6])
    saved = router_state(parts, [1, 6])
    view = system.layer_view(0)
    record = apply_edit(edit, parts, system.registry, view, step=system.global_step)
    assert record.fresh_slots == (6,) and float(correction[6]) == pytest.approx(0.2)  # the child takes its sibling's
    audit = open_audit(edit, record, parts, before, saved, view, step=system.global_step, child_id=None,
                       expert_id=None, losses=[])
    roll_back(audit, parts, system.registry, step=system.global_step)
    assert float(correction[6]) == 0.0 and not bool(system.banks[0].active_mask[6])


# ---------------------------------------------------------------------- errors
def test_a_model_without_an_moe_block_is_refused() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE layer"):
        ChronoSystem(model)


def test_an_unsupported_family_is_named() -> None:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    config = transformers.DeepseekV2Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=E, num_experts_per_tok=K,
        n_group=1, topk_group=1,
    )
    with pytest.raises(ValueError, match=r"'0' is a DeepseekV2Moe \(transformers model type 'deepseek_v2'\)"):
        ChronoSystem(nn.Sequential(DeepseekV2Moe(config)))


def test_llama4_is_refused_with_the_reason() -> None:
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    block = llama4.Llama4TextMoe(transformers.Llama4TextConfig(
        hidden_size=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=1,
    ))
    with pytest.raises(ValueError, match=r"Llama4TextMoe.*scales the expert \*input\*"):
        ChronoSystem(nn.Sequential(block))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: RenormalisedSoftmaxAdapter(nn.Linear(4, 4)), TypeError, "Linear is not a transformers 5.x MoE block"),
        (lambda: fixed_width_config(transformers.LlamaConfig(), 8), ValueError, "model_type 'llama'; expected one of"),
        (lambda: fixed_width_config(_family("olmoe")[1], 1), ValueError, r"num_slots=1 is invalid: .* >= 2"),
        (lambda: build_fixed_width(*_family("mixtral"), 8, 1), ValueError, r"num_active=1 .* in \[2, 8\]"),
        (lambda: build_fixed_width(*_family("mixtral"), 8, 9), ValueError, r"num_active=9 .* in \[2, 8\]"),
        (lambda: SwitchAdapter(nn.Linear(4, 4)), TypeError, "Linear is not a SwitchTransformers sparse MLP"),
        (lambda: GptOssAdapter(_blocks(_build("mixtral"))[0]), TypeError,
         r"MixtralSparseMoeBlock is not .*: expected a `router` router .* `gate_up_proj \[E, H, 2I\]`"),
        (lambda: fixed_width_config(_family("deepseek_v3")[1], 7), ValueError,
         "num_slots=7 is invalid for DeepSeek-V3 with n_group=2: expected a multiple of n_group"),
        (lambda: build_fixed_width(*_family("switch_transformers"), 8, 0), ValueError, r"num_active=0 .* in \[1, 8\]"),
    ],
)
def test_bad_inputs_are_named(call: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_fixed_width_config_sets_the_family_expert_count() -> None:
    cls, config = _family("mixtral")
    wide = fixed_width_config(config, 12)
    assert wide.num_local_experts == 12 and config.num_local_experts == E
    assert fixed_width_config(_family("olmoe")[1], 12).num_experts == 12
    fields = {"granitemoe": "num_local_experts", "jamba": "num_experts", "gpt_oss": "num_local_experts",
              "deepseek_v3": "n_routed_experts", "switch_transformers": "num_experts"}
    for name, field in fields.items():
        assert getattr(fixed_width_config(_family(name)[1], 12), field) == 12, name
