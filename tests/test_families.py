"""Every supported family beyond OLMoE/Mixtral, on tiny checkpoints written by save_pretrained (the hub's
per-expert layout): NF4 loading (routed and shared experts), the attached model equal to the base, training
moves only adapters, adapter round trip, PERFT-E on the base router's exact output, generate, loading peak."""

from __future__ import annotations

import os
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from alloc_tracker import AllocationTracker
from safetensors.torch import save_file
from test_model import _randomize_adapters
from torch import nn
from transformers import AutoModelForCausalLM

from perft_qlora import (
    PerftConfig,
    attach_perft,
    iter_perft_blocks,
    load_adapter,
    load_model,
    memory_report,
    save_adapter,
)
from perft_qlora.method.model import parameter_report
from perft_qlora.method.routing import GATING
from perft_qlora.quant.arch import ARCHITECTURES
from perft_qlora.quant.nf4_experts import NF4Experts
from perft_qlora.training.tiny import save_tiny_model, tiny_config

FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe")
SIGMOID = ("deepseek_v3", "glm4_moe")  # DeepSeek-V3's router: float32, sigmoid + bias, groups, scaled weights


def _reference(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()


def _dense_linears(model) -> list[str]:
    return [n for n, m in model.model.layers.named_modules() if type(m) is nn.Linear]


def _moe_layers(model) -> list[int]:
    return ARCHITECTURES[model.config.model_type].moe_layers(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_and_shared_experts_load_as_nf4(tmp_path, family):
    extra = {"first_k_dense_replace": 0} if hasattr(tiny_config(family), "first_k_dense_replace") else {}
    directory = save_tiny_model(
        str(tmp_path), family, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=1, **extra
    )
    model, _ = load_model(directory, device="cpu", progress=False)
    report = memory_report(model)
    assert report.expert_fraction_4bit() >= 0.95
    assert not report.dense["experts"]
    arch = ARCHITECTURES[family]
    block = model.model.layers[0].mlp
    assert isinstance(block.experts, NF4Experts)
    if arch.shared_expert:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(getattr(block, arch.shared_expert), proj), bnb.nn.Linear4bit)
    # Only the family's keep-dense linears (Qwen2-MoE's 1-output shared-expert gate) stay in bf16.
    assert sorted(_dense_linears(model)) == sorted(f"0.mlp.{name}" for name in arch.keep_dense)
    # Routers stay exact: bf16, or float32 where the family keeps it so (DeepSeek's router and score bias).
    assert block.gate.weight.dtype == (torch.float32 if family in SIGMOID else torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_experts_are_bitsandbytes_bytes_of_the_fused_tensor(tiny_checkpoint, family):
    """The per-expert hub keys (gate_proj, up_proj, down_proj) land in the fused rows transformers builds."""
    directory = tiny_checkpoint(family)
    model, _ = load_model(directory, device="cpu", progress=False)
    ref = _reference(directory)
    for i in _moe_layers(model):
        layer, ref_layer = model.model.layers[i], ref.model.layers[i]
        for name in ("gate_up_proj", "down_proj"):
            dense = getattr(ref_layer.mlp.experts, name).data
            packed, _ = bnbF.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(getattr(layer.mlp.experts, name).packed, packed)
    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    first = _moe_layers(model)[0]
    with torch.no_grad():
        ours, theirs = model.model.layers[first].mlp(h).float(), ref.model.layers[first].mlp(h).float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert 0.0 < rel < 0.2  # NF4 weight error; same routing (bf16 routers)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_fused_checkpoints_load_to_the_same_model(tmp_path, tiny_checkpoint, family, token_batch):
    directory = tiny_checkpoint(family)
    ref = _reference(directory)
    sharded = str(tmp_path / "sharded")
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(fused / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        text = Path(directory, name).read_text()
        (fused / name).write_text(text)
        if name != "config.json":
            Path(sharded, name).write_text(text)
    ids, mask = token_batch
    logits = []
    for d in (directory, sharded, str(fused)):
        model, _ = load_model(d, device="cpu", progress=False)
        with torch.no_grad():
            logits.append(model(ids, attention_mask=mask).logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_moves_only_the_adapters(tiny_nf4, family, token_batch):
    model, _ = tiny_nf4(family)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0))
    _randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".perft_router." in n or ".perft_experts." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids, mask = token_batch
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == trainable  # every adapter tensor moved (the shared expert's and all base bytes did not)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_save_load_round_trip_is_exact(tmp_path, tiny_nf4, family, token_batch):
    model, _ = tiny_nf4(family)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2))
    _randomize_adapters(model)
    ids, mask = token_batch
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    save_adapter(model, str(tmp_path / "adapter"))
    fresh, _ = tiny_nf4(family)
    load_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_perft_e_uses_the_family_routers_own_indices_and_weights(tiny_nf4, family, token_batch):
    model, _ = tiny_nf4(family)
    attach_perft(model, PerftConfig(variant="perft_e"))
    _randomize_adapters(model)
    outputs = {}
    for i, block in iter_perft_blocks(model):
        block.base.gate.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
    ids, mask = token_batch
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for i, block in iter_perft_blocks(model):
        _, weights, indices = outputs[i]  # what the family's router returned
        assert torch.equal(block.last_routing.indices, indices) and torch.equal(block.last_routing.weights, weights)
        sums = weights.float().sum(-1) / getattr(model.config, "routed_scaling_factor", 1.0)
        renormalized = torch.allclose(sums, torch.ones_like(sums), atol=1e-2)
        assert renormalized == bool(model.config.norm_topk_prob)  # qwen3, deepseek: renormalised; qwen2: not


@pytest.mark.parametrize("family", FAMILIES)
def test_perft_router_gates_like_the_family(tiny_nf4, family):
    model, _ = tiny_nf4(family)
    attach_perft(model, PerftConfig(variant="perft", num_experts=6, top_k=3), dtype=torch.float32)
    block = dict(iter_perft_blocks(model))[_moe_layers(model)[0]]
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    routing = block.perft_router(h, None, None)
    gating = ARCHITECTURES[family].gating
    assert block.perft_router.gating == gating == ("sigmoid" if family in SIGMOID else "softmax")
    probs = GATING[gating](h @ block.perft_router.weight.T)
    weights, indices = torch.topk(probs, 3, dim=-1)
    if model.config.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    assert torch.equal(routing.indices, indices)
    torch.testing.assert_close(routing.weights, weights, rtol=1e-6, atol=1e-6)


def _sigmoid_family_delta(config, router_weight, down, up, scaling, h, top_k):
    """The PERFT branch token by token, written from the DeepSeek-V3 / GLM-4.5 router's definition
    (transformers' ``DeepseekV3TopkRouter`` / ``DeepseekV3MoE.route_tokens_to_experts``): independent sigmoid
    scores, top-K', divided by their sum when ``norm_topk_prob`` (no score bias or expert groups: those belong to
    the base's N experts, not to the M PEFT experts). Plain float32 torch, none of the package's code."""
    out = torch.zeros(h.shape[0], h.shape[1])
    for t in range(h.shape[0]):
        u = h[t].float()
        scores = 1.0 / (1.0 + torch.exp(-(router_weight.float() @ u)))  # sigmoid, written out
        chosen = sorted(range(scores.numel()), key=lambda j: -scores[j].item())[:top_k]
        weights = [scores[j] for j in chosen]
        if config.norm_topk_prob:
            total = sum(weights)
            weights = [w / total for w in weights]
        for w, j in zip(weights, chosen):
            out[t] += w * scaling * (up[j].float() @ (down[j].float() @ u))
    return out


@pytest.mark.parametrize("family", SIGMOID)
def test_perft_on_a_sigmoid_family_matches_the_familys_per_token_definition(tiny_nf4, family, token_batch):
    """In a whole forward, each MoE block's PERFT branch (block output minus the frozen block's) equals the
    per-token computation above; a router scoring these families by softmax fails here (tests/mutation)."""
    model, _ = tiny_nf4(family)
    attach_perft(model, PerftConfig(variant="perft", num_experts=6, top_k=3, dropout=0.0), dtype=torch.float32)
    _randomize_adapters(model)
    model.eval()
    seen = {}
    for i, block in iter_perft_blocks(model):
        block.register_forward_hook(lambda _m, args, out, i=i: seen.__setitem__(("in", i), args[0]) or
                                    seen.__setitem__(("out", i), out))
        block.base.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(("base", i), out))
    ids, mask = token_batch
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert model.config.norm_topk_prob  # the tiny configs renormalise, like Moonlight and GLM-4.5
    blocks = dict(iter_perft_blocks(model))
    assert blocks
    for i, block in blocks.items():
        h = seen[("in", i)].reshape(-1, seen[("in", i)].shape[-1])
        base = seen[("base", i)]
        base = (base[0] if isinstance(base, tuple) else base).reshape(h.shape)
        delta = (seen[("out", i)].reshape(h.shape).float() - base.float())
        experts = block.perft_experts
        expected = _sigmoid_family_delta(model.config, block.perft_router.weight, experts.down, experts.up,
                                         experts.scaling, h, top_k=3)
        assert expected.abs().max() > 0.1  # the adapters do something
        torch.testing.assert_close(delta, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_works_and_matches_the_base_at_init(tiny_nf4, family, token_batch):
    model, tokenizer = tiny_nf4(family)
    ids, _ = token_batch
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        base = model.generate(ids[:1], **kwargs)
        attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2))
        attached = model.generate(ids[:1], **kwargs)
    assert attached.shape == (1, ids.shape[1] + 4)
    assert torch.equal(base, attached)


@pytest.mark.parametrize(
    "family, dense", [("qwen3_moe", {"mlp_only_layers": [0]}), ("deepseek_v3", {}), ("glm4_moe", {})]
)
def test_dense_mlp_layers_load_in_nf4_and_get_no_perft_block(tmp_path, family, dense):
    directory = save_tiny_model(str(tmp_path), family, num_hidden_layers=3, **dense)  # deepseek: first_k_dense_replace=1
    model, _ = load_model(directory, device="cpu", progress=False)
    dense_mlp = model.model.layers[0].mlp
    assert all(isinstance(getattr(dense_mlp, p), bnb.nn.Linear4bit) for p in ("gate_proj", "up_proj", "down_proj"))
    attach_perft(model, PerftConfig(variant="perft_s"))
    assert [i for i, _ in iter_perft_blocks(model)] == [1, 2]
    assert "dense MLP layers [0] have no PERFT block" in str(parameter_report(model))
    fresh, _ = load_model(directory, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"layers \[0\] are dense MLP layers"):
        attach_perft(fresh, PerftConfig(variant="perft_s", layers=[0, 1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_peak_is_final_footprint_plus_about_one_layer(tmp_path, family):
    # float32 on disk, so every tensor the loader materialises in bf16 is a fresh allocation the tracker sees.
    directory = save_tiny_model(
        str(tmp_path), family, dtype=torch.float32, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=4
    )
    with AllocationTracker() as tracker:
        model, _ = load_model(directory, device="cpu", progress=False)
    final = memory_report(model).total
    ref = _reference(directory)
    one_layer_bf16 = max(sum(p.numel() * 2 for p in layer.parameters()) for layer in ref.model.layers)
    whole_bf16 = sum(p.numel() * 2 for p in ref.parameters())
    assert tracker.peak <= final + one_layer_bf16
    assert tracker.peak < 0.6 * whole_bf16  # a load-then-quantize loader would need the whole bf16 model


def test_prequantized_hub_checkpoints_are_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}'
    )
    with pytest.raises(ValueError, match="fp8-quantized weights.*bf16 release"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_cli_trains_each_family(tmp_path, family):
    from perft_qlora.training.train import run
    from perft_qlora.training.train_options import parse_args

    base = save_tiny_model(str(tmp_path / family), family)
    trainer = run(parse_args([
        "--demo", "--model", base, "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--val-size", "0",
        "--batch-size", "2", "--max-length", "64", "--logging-steps", "1", "--save-steps", "100", "--warmup-steps", "0",
        "--no-completion-only-loss",  # 64 tokens cut every response off: train on the (truncated) whole sequence
    ]))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "perft_aux_loss" in logs[-1]
    # The base router's Switch loss: on for the softmax families, off for DeepSeek (bias-balanced).
    assert ("aux_loss" in logs[-1]) == ARCHITECTURES[family].base_balance_loss
    assert os.path.isfile(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
