"""load_model: every big weight in NF4 (experts included), exact bitsandbytes bytes, bounded loading peak."""

from __future__ import annotations

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from alloc_tracker import AllocationTracker
from perft_qlora import UnsupportedArchitectureError, load_model, memory_report
from perft_qlora.memory import count_values
from perft_qlora.nf4_experts import NF4Experts
from perft_qlora.tiny import save_tiny_model

ARCHS = ("olmoe", "mixtral")


def _reference(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_big_weight_is_nf4_and_small_ones_stay_bf16(tiny_nf4, arch):
    model, tokenizer = tiny_nf4(arch)
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, NF4Experts)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layer.self_attn, proj)
            assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.quant_state.quant_type == "nf4"
            assert linear.support_avx512bf16_for_cpu is False
        assert layer.mlp.gate.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    report = memory_report(model)
    assert not report.dense["experts"], "no expert bytes may stay in a dense dtype"
    assert not report.dense["linear"], "attention projections must all be 4-bit"
    assert tokenizer.pad_token is not None


def test_at_least_95_percent_of_expert_bytes_are_4bit(tmp_path):
    directory = save_tiny_model(str(tmp_path), "olmoe", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    model, _ = load_model(directory, device="cpu", progress=False)
    report = memory_report(model)
    assert report.expert_fraction_4bit() >= 0.95
    total, experts = count_values(model)
    assert experts == 8 * 3 * 256 * 256  # every expert value is accounted for, in NF4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_expert_dequantization_equals_bitsandbytes_on_the_checkpoint_tensor(tiny_checkpoint, arch, double_quant):
    directory = tiny_checkpoint(arch)
    model, _ = load_model(directory, device="cpu", progress=False, double_quant=double_quant)
    ref = _reference(directory)
    for layer, ref_layer in zip(model.model.layers, ref.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            dense = getattr(ref_layer.mlp.experts, name).data
            packed, state = bnbF.quantize_4bit(dense, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            ours = getattr(layer.mlp.experts, name)
            assert torch.equal(ours.packed, packed)
            assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_moe_block_is_close_to_the_bf16_block(tiny_checkpoint, arch):
    directory = tiny_checkpoint(arch)
    model, _ = load_model(directory, device="cpu", progress=False)
    ref = _reference(directory)
    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        ours, theirs = model.model.layers[0].mlp(h).float(), ref.model.layers[0].mlp(h).float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert 0.0 < rel < 0.2  # NF4 weight error is ~10% relative; identical routing (routers are bf16)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_none_gives_the_plain_model(tiny_checkpoint, arch, token_batch):
    directory = tiny_checkpoint(arch)
    model, _ = load_model(directory, quantize="none", device="cpu")
    ids, mask = token_batch
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, _reference(directory)(ids, attention_mask=mask).logits)
    assert not any(p.requires_grad for p in model.parameters())


def test_loading_peak_is_final_footprint_plus_about_one_layer(tmp_path):
    # float32 on disk, so every tensor the loader materialises in bf16 is a fresh allocation the tracker sees.
    directory = save_tiny_model(
        str(tmp_path), "olmoe", dtype=torch.float32, hidden_size=128, intermediate_size=128, num_hidden_layers=4
    )
    with AllocationTracker() as tracker:
        model, _ = load_model(directory, device="cpu", progress=False)
    final = memory_report(model).total
    ref = _reference(directory)
    one_layer_bf16 = sum(p.numel() * 2 for p in ref.model.layers[0].parameters())
    whole_bf16 = sum(p.numel() * 2 for p in ref.parameters())
    assert tracker.peak <= final + one_layer_bf16
    assert tracker.peak < 0.6 * whole_bf16  # a load-then-quantize loader would need the whole bf16 model
    with AllocationTracker() as naive:
        _reference(directory)
    assert naive.peak >= 0.9 * whole_bf16  # the tracker does see a full bf16 load


def test_sharded_and_fused_checkpoints_load_to_the_same_bytes(tmp_path, tiny_checkpoint, token_batch):
    directory = tiny_checkpoint("olmoe")
    ref = _reference(directory)
    sharded = str(tmp_path / "sharded")
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    fused = str(tmp_path / "fused")
    os.makedirs(fused)
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}  # transformers-5 fused expert layout
    save_file(tensors, os.path.join(fused, "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(directory, name)) as src, open(os.path.join(fused, name), "w") as dst:
            dst.write(src.read())
    ids, mask = token_batch
    logits = []
    for d in (directory, sharded, fused):
        model, _ = load_model(d, device="cpu", progress=False)
        with torch.no_grad():
            logits.append(model(ids, attention_mask=mask).logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_unsupported_architecture_is_named_before_any_weight_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UnsupportedArchitectureError, match="llama.*supported: .*mixtral, olmoe, qwen2_moe, qwen3_moe"):
        load_model(str(tmp_path), device="cpu")


def test_missing_tensor_is_a_clear_error(tmp_path, tiny_checkpoint):
    directory = tiny_checkpoint("olmoe")
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_text(open(os.path.join(directory, name)).read())
    with pytest.raises(KeyError, match="layers.1.self_attn.q_proj.weight"):
        load_model(str(broken), device="cpu", progress=False)


def test_missing_directory_or_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_model(str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_bad_quantize_argument(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantize must be"):
        load_model(tiny_checkpoint("olmoe"), quantize="int8")
