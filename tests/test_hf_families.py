"""transformers 5.x MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) through `chronomoe_v3.integrations.hf`:
tiny models built from their configs, hooked with no model edit."""

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

from chronomoe_v3.adapters import adapter_for  # noqa: E402
from chronomoe_v3.balance import AuxLossFreeBalancer  # noqa: E402
from chronomoe_v3.integrations.hf import (  # noqa: E402
    ConfigNormSoftmaxAdapter,
    HFMoEAdapter,
    RenormalisedSoftmaxAdapter,
    build_fixed_width,
    fixed_width_config,
)
from chronomoe_v3.ops import prune, revert, snapshot_slots, split  # noqa: E402
from chronomoe_v3.system import ChronoSystem  # noqa: E402
from chronomoe_v3.trace import MoETrace  # noqa: E402

torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and a busy machine makes two much slower

E, K, V = 8, 2, 64
COMMON = dict(
    vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, num_experts_per_tok=K, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


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
    assert name == "olmoe"
    return t.OlmoeForCausalLM, t.OlmoeConfig(intermediate_size=32, num_experts=E, **COMMON)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
RENORMALISED = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False}


def _build(name: str, seed: int = 0, implementation: str | None = None) -> nn.Module:
    cls, config = _family(name)
    if implementation is not None:
        config._experts_implementation = implementation
    torch.manual_seed(seed)
    return cls(config)


def _fixed(name: str, num_active: int, seed: int = 0) -> nn.Module:
    cls, config = _family(name)
    torch.manual_seed(seed)
    return build_fixed_width(cls, config, E, num_active)


def _ids(seed: int = 0, batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


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
    expected = RenormalisedSoftmaxAdapter if name == "mixtral" else ConfigNormSoftmaxAdapter
    assert system.layer_names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(type(a) is expected for a in system.adapters)
    adapter = system.adapters[0]
    assert isinstance(adapter, HFMoEAdapter)
    assert (adapter.top_k, adapter.hidden_size, adapter.router_input_size, system.banks[0].num_slots) == (K, 32, 32, E)
    assert adapter.state.renormalise is RENORMALISED[name]
    if name == "qwen2_moe":  # the shared expert is not a lifecycle-managed slot
        assert {r.param.shape[0] for r in system.banks[0].param_slots()} == {E}


# ---------------------------------------------------------------------- exactness and the routing rule
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_hooked_output_is_bitwise_the_unhooked_output(name: str, implementation: str) -> None:
    model = _build(name, implementation=implementation)
    reference = copy.deepcopy(model)
    system = ChronoSystem(model, controller=None)  # beta 0, no lens, all slots active
    ids = _ids()
    for training in (True, False):
        model.train(training)
        reference.train(training)
        assert torch.equal(model(ids).logits, reference(ids).logits), training
    assert system.layer_steps == [1, 1]  # the training forward took the per-slot path and was observed
    twin = copy.deepcopy(model)  # a copy's hooks drive the copy's own state
    twin.model.layers[0].mlp.chrono.active_mask[0] = False
    assert bool(model.model.layers[0].mlp.chrono.active_mask[0])
    assert not torch.equal(twin(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_captured_outputs_are_the_unweighted_expert_outputs_and_routing_follows_the_family_rule(name: str) -> None:
    model = _build(name)
    traces = _record(model)
    model.train()
    model(_ids())
    block = _blocks(model)[0]
    trace = traces[0][0]
    x = trace.router_input  # what the router and the experts read
    assert x is not None
    # routing: transformers' own rule on the same logits
    probs = torch.softmax(F.linear(x, block.gate.weight).float(), dim=-1)
    top, index = torch.topk(probs, K, dim=-1)
    if RENORMALISED[name]:
        top = top / top.sum(-1, keepdim=True)
    assert torch.equal(trace.topk_index, index)
    assert torch.equal(trace.topk_weight.float(), top)
    # per-slot expert outputs, computed from the stacked weights
    gate, up = torch.einsum("tkoh,th->tko", block.experts.gate_up_proj[index], x).chunk(2, dim=-1)
    manual = torch.einsum("tkhi,tki->tkh", block.experts.down_proj[index], F.silu(gate) * up)
    torch.testing.assert_close(trace.expert_out, manual, atol=1e-5, rtol=1e-5)
    assert trace.mixture is not None
    torch.testing.assert_close(trace.mixture, (manual * trace.topk_weight.unsqueeze(-1)).sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_positive_beta_raises_the_token_share_of_its_expert(name: str) -> None:
    model = _build(name)
    system = ChronoSystem(model, controller=None)
    traces = _record(model)
    model.train()
    ids = _ids(length=32)
    with torch.no_grad():
        model(ids)
        before = _counts(traces[0][-1])
        expert = int(before.argmin())
        beta = torch.zeros(E)
        beta[expert] = 1.0
        bias = system.biases[0]
        assert bias is not None
        bias.set_beta(beta)
        model(ids)
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
    traces = _record(model)
    bias[5] = 100.0  # far above any logit gap: every token chooses expert 5
    model.train()
    model(_ids())
    trace = traces[0][0]
    assert bool((trace.topk_index == 5).any(-1).all())
    assert trace.router_logits_clean is not None
    probs = torch.softmax(trace.router_logits_clean, -1).gather(1, trace.topk_index)  # weights: the clean router's
    if RENORMALISED[name]:
        probs = probs / probs.sum(-1, keepdim=True)
    torch.testing.assert_close(trace.topk_weight.float(), probs)
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
    assert counts[0].sum() == counts[1].sum() == 4 * 32 * K


# ---------------------------------------------------------------------- lifecycle and training
def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


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
    experts = _blocks(model)[0].experts
    usage = _counts(traces[0][-1])
    parent = int(usage.argmax())  # the busiest expert: its split child takes the tokens that chose it first
    victim = int(torch.where(torch.arange(E) == parent, usage.max() + 1, usage)[:6].argmin())

    record = split(registry, banks, layer, parent, step=system.global_step, optimizer=surgery)
    system.observers[layer].on_edit(record)
    assert record.fresh_slots == (6,) and bool(banks.active_mask[6])
    bias = system.biases[layer]
    assert bias is not None
    shift = torch.zeros(E)
    for slot, value in record.logit_shift.items():
        shift[slot] = value
    bias.set_beta(shift, shift != 0)  # the children share the parent's routing mass (router without bias)
    record_shift = float(record.logit_shift[6])
    before = snapshot_slots(registry, banks, layer, [victim])
    weights_before = banks.experts.read(victim)
    record = prune(registry, banks, layer, victim, step=system.global_step, optimizer=surgery)
    system.observers[layer].on_edit(record)
    assert not bool(banks.active_mask[victim]) and float(experts.down_proj[victim].detach().abs().sum()) == 0.0
    loss = _train_step(model, opt, ids)
    assert torch.isfinite(torch.tensor(loss))
    trace = traces[0][-1]
    assert _counts(trace)[victim] == 0  # the pruned slot is dark
    clean, biased = trace.router_logits_clean, trace.router_logits_biased
    assert clean is not None and biased is not None
    assert torch.equal(clean[:, 6], clean[:, parent]) and bool(torch.isfinite(biased[:, 6]).all())  # the child is open
    torch.testing.assert_close(biased[:, 6], clean[:, 6] + record_shift)  # with its beta

    record = revert(registry, banks, layer, before, step=system.global_step, optimizer=surgery)  # the rollback
    system.observers[layer].on_edit(record)
    assert bool(banks.active_mask[victim])
    for n, w in weights_before.items():
        assert torch.equal(banks.experts.read(victim)[n], w), n
    snapshot = experts.down_proj.detach().clone()
    for _ in range(2):
        assert torch.isfinite(torch.tensor(_train_step(model, opt, ids)))
    assert not torch.equal(experts.down_proj.detach(), snapshot)  # the optimiser still steps
    assert float(experts.down_proj[7].detach().abs().sum()) == 0.0  # a masked slot stays held at zero
    system.step()


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
    model(_ids())
    with torch.no_grad():
        model(_ids())
    assert system.layer_steps == [0, 0] and not any(traces)
    model.train()
    model(_ids())
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


# ---------------------------------------------------------------------- errors
def test_a_model_without_an_moe_block_is_refused() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE layer"):
        ChronoSystem(model)


def test_an_unsupported_family_is_named() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=E, num_experts_per_tok=K,
        n_group=1, topk_group=1,
    )
    with pytest.raises(ValueError, match=r"'0' is a DeepseekV3MoE \(transformers model type 'deepseek_v3'\)"):
        ChronoSystem(nn.Sequential(DeepseekV3MoE(config)))


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
