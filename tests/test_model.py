"""attach_perft: the four variants against per-token loops, zero-init identity, gradients, checkpointing, aux loss."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, OlmoeConfig

from perft_qlora import (
    PerftConfig,
    attach_perft,
    iter_perft_blocks,
    parameter_report,
    perft_balance_loss,
    routing_stats,
)
from perft_qlora.method.layer import PerftMoEBlock
from perft_qlora.quant.arch import ARCHITECTURES

ARCHS = ("olmoe", "mixtral")
CONFIGS = {
    "perft": dict(variant="perft", num_experts=4, top_k=2),
    "perft_e": dict(variant="perft_e"),
    "perft_d": dict(variant="perft_d", num_experts=3),
    "perft_s": dict(variant="perft_s"),
}
SCALING = 2.0
"""alpha / DB with the defaults DB = 16, alpha = 2 * DB (the authors' launch scripts), written out by hand."""
BASE_EXPERTS = {"olmoe": 8, "mixtral": 4}
"""N of the tiny configs (perft_qlora/training/tiny.py)."""
PEFT_EXPERTS = {"perft": lambda arch: 4, "perft_e": BASE_EXPERTS.get, "perft_d": lambda arch: 3, "perft_s": lambda arch: 1}
"""M per variant for CONFIGS: PERFT-E pairs one with each base expert, PERFT-S has exactly one."""


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))  # every family (the rest: test_families.py)
@pytest.mark.parametrize("variant", CONFIGS)
def test_attached_model_equals_base_model_at_init(tiny_nf4, arch, variant, token_batch):
    model, _ = tiny_nf4(arch)
    ids, mask = token_batch
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        attach_perft(model, PerftConfig(**CONFIGS[variant]))
        attached = model(ids, attention_mask=mask).logits
    assert torch.equal(base, attached)
    assert len(list(iter_perft_blocks(model))) == 2


def _loop_delta(block: PerftMoEBlock, h: torch.Tensor, variant: str, renormalize: bool, m: int) -> torch.Tensor:
    """Per-token loop reference of the PEFT branch, straight from the method description (float32)."""
    experts, router = block.perft_experts, block.perft_router
    down, up, s = experts.down.float(), experts.up.float(), SCALING
    base_gate = block.base.gate.weight.float()
    out = torch.zeros(h.shape[0], h.shape[1])
    for t in range(h.shape[0]):
        u = h[t].float()
        if variant == "perft":
            probs = torch.softmax(router.weight.float() @ u, dim=-1)
            w, j = torch.topk(probs, 2)  # K' = 2 in CONFIGS
        elif variant == "perft_e":
            probs = torch.softmax(base_gate @ u, dim=-1)
            w, j = torch.topk(probs, 2)  # the tiny configs' K
        else:  # PERFT-D / PERFT-S: every expert, weight 1
            j = torch.arange(m)
            w = torch.ones(m)
        if variant != "perft_d" and variant != "perft_s" and renormalize:
            w = w / w.sum()
        for weight, e in zip(w, j):
            out[t] += weight * s * (up[e] @ (down[e] @ u))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", CONFIGS)
def test_each_variant_matches_a_per_token_loop(tiny_nf4, arch, variant):
    model, _ = tiny_nf4(arch)
    model.model.layers[0].mlp.gate.weight.data = model.model.layers[0].mlp.gate.weight.data.float()
    attach_perft(model, PerftConfig(**CONFIGS[variant]), dtype=torch.float32)
    _randomize_adapters(model)
    block = model.model.layers[0].mlp
    h = torch.randn(1, 11, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, bw, bi = block.base.gate(h.reshape(-1, 64))
        routing = block.perft_router(h.reshape(-1, 64), bw, bi)
        delta = block.perft_experts(h.reshape(-1, 64), routing.weights, routing.indices)
        whole = block(h.to(torch.float32)).reshape(-1, 64)
        base_only = block.base.experts(h.reshape(-1, 64), bi, bw)
    renormalize = arch == "mixtral"
    m = PEFT_EXPERTS[variant](arch)
    assert block.perft_experts.down.shape == (m, 16, 64) and block.perft_experts.up.shape == (m, 64, 16)
    expected = _loop_delta(block, h.reshape(-1, 64), variant, renormalize, m)
    torch.testing.assert_close(delta.float(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole.float(), (base_only.float() + expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_perft_e_reuses_the_base_routers_choice(tiny_nf4, arch):
    model, _ = tiny_nf4(arch)
    attach_perft(model, PerftConfig(variant="perft_e"))
    block = model.model.layers[1].mlp
    h = torch.randn(7, 64).to(torch.bfloat16)
    _, bw, bi = block.base.gate(h)
    routing = block.perft_router(h, bw, bi)
    assert routing.indices is bi and routing.weights is bw and routing.logits is None
    assert block.perft_experts.num_experts == BASE_EXPERTS[arch]
    assert routing.indices.shape == routing.weights.shape == (7, 2)
    with pytest.raises(ValueError, match="N=8"):
        attach_perft(tiny_nf4("olmoe")[0], PerftConfig(variant="perft_e", num_experts=4))


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapters_receive_gradients(tiny_nf4, arch, token_batch):
    model, _ = tiny_nf4(arch)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0))
    _randomize_adapters(model)
    model.train()
    ids, mask = token_batch
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".perft_router." in n or ".perft_experts." in n for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_identical_gradients(tiny_nf4, arch, token_batch):
    ids, mask = token_batch
    results = []
    for checkpointing in (False, True):
        model, _ = tiny_nf4(arch)
        attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0))
        _randomize_adapters(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), _grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def _switch_loss(logits_per_layer, top_k):
    logits = torch.cat(logits_per_layer).float()
    probs = torch.softmax(logits, dim=-1)
    m = probs.shape[-1]
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, m).sum(1).float()  # (T_all, M)
    return m * (chosen.mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("arch", ARCHS)
def test_balance_loss_is_added_with_its_coefficient(tiny_nf4, arch, token_batch):
    model, _ = tiny_nf4(arch)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, router_aux_loss_coef=0.5, dropout=0.0))
    ids, _ = token_batch
    model.train()
    out = model(ids, labels=ids)
    logits = [b.last_routing.logits for _, b in iter_perft_blocks(model)]
    expected_aux = _switch_loss(logits, 2)
    # transformers' load_balancing_loss_func takes the softmax in the logits' dtype (bf16 here): ~1e-3 relative.
    torch.testing.assert_close(out.perft_aux_loss.float(), expected_aux, rtol=5e-3, atol=1e-5)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.float(), ce + 0.5 * out.perft_aux_loss.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(perft_balance_loss(model), out.perft_aux_loss)
    stats = routing_stats(model)
    assert set(stats) == {0, 1}
    for layer in stats.values():
        assert len(layer["expert_fraction"]) == 4 and abs(sum(layer["expert_fraction"]) - 1) < 1e-6


def test_default_coefficient_is_the_recipes_and_untrained_routers_add_nothing(tiny_nf4, token_batch):
    ids, _ = token_batch
    model, _ = tiny_nf4("mixtral")
    attach_perft(model, PerftConfig(variant="perft_d", num_experts=2))
    out = model(ids, labels=ids)
    assert "perft_aux_loss" not in out
    model, _ = tiny_nf4("mixtral")
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=1))
    assert model.perft_hook is not None
    out = model(ids, labels=ids)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.float(), ce + 0.02 * out.perft_aux_loss.float(), rtol=1e-4, atol=1e-4)


def test_eval_and_generate_before_training_keep_gradients_flowing(tiny_nf4, token_batch):
    """The AVX512-BF16 trap: an eval forward must not repack Linear4bit weights into a layout without backward."""
    ids, mask = token_batch
    grads = []
    for warm_up in (False, True):
        model, tokenizer = tiny_nf4("olmoe")
        attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0))
        _randomize_adapters(model)
        if warm_up:
            model.eval()
            with torch.no_grad():
                model(ids, attention_mask=mask)
                model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        model.train()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(_grads(model))
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    for name in grads[0]:
        assert grads[1][name].abs().sum() > 0, name
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="the repacking only happens on CPUs with AVX512-BF16")
def test_the_trap_is_real_without_the_guard():
    linear = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear = linear.to("cpu").eval()
    assert linear.support_avx512bf16_for_cpu
    with torch.no_grad():
        linear(torch.randn(2, 64, dtype=torch.bfloat16))
    assert getattr(linear.weight.quant_state, "packing_format_for_cpu", False)


def test_parameter_counts_match_the_papers_formula_at_olmoe_1b_7b_size():
    config = OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    attach_perft(model, PerftConfig(variant="perft", num_experts=8, top_k=2, bottleneck=16))
    report = parameter_report(model)
    assert report.trainable == 16 * (8 * 2 * 2048 * 16 + 2048 * 8) == 8_650_752  # the authors' reference figure
    assert report.trainable_per_token == 16 * (2 * 2 * 2048 * 16 + 2048 * 8)
    assert 6.8e9 < report.backbone < 7.0e9  # OLMoE-1B-7B: 6.9 B parameters
    assert 1.2e9 < report.backbone_per_token < 1.4e9  # ... 1.3 B activated per token
    assert "activated per token" in str(report)


@pytest.mark.parametrize("arch", ARCHS)
def test_subset_of_layers_and_bad_layers(tiny_nf4, arch):
    model, _ = tiny_nf4(arch)
    attach_perft(model, PerftConfig(variant="perft_s", layers=[1]))
    assert [i for i, _ in iter_perft_blocks(model)] == [1]
    assert not isinstance(model.model.layers[0].mlp, PerftMoEBlock)
    with pytest.raises(ValueError, match="already has PERFT"):
        attach_perft(model, PerftConfig(variant="perft_s"))
    with pytest.raises(ValueError, match="2 decoder layers"):
        attach_perft(tiny_nf4(arch)[0], PerftConfig(variant="perft_s", layers=[2]))
