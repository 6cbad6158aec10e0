"""python -m perft_qlora.plan: weight bytes equal to load_model's, adapters equal to attach_perft's, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from perft_qlora import PerftConfig, attach_perft, load_model, memory_report
from perft_qlora.bench.random_checkpoint import write_random_checkpoint
from perft_qlora.plan import KNOWN_MODELS, activation_bytes, main, make_plan, moe_facts, read_config
from perft_qlora.quant.arch import ARCHITECTURES, PLANNED_ONLY
from perft_qlora.quant.footprint import weight_footprint
from perft_qlora.quant.sharding import shardable_storage
from perft_qlora.training.tiny import tiny_config

LOADABLE = ("olmoe", "mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe")


def _meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


@pytest.mark.parametrize("family", LOADABLE)
@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_bytes_equal_what_load_model_allocates(tmp_path, family, double_quant):
    # reduced-depth random checkpoint (written by layer, like bench train's), loaded on CPU
    config = tiny_config(family, num_hidden_layers=3, hidden_size=128, tie_word_embeddings=family == "qwen2_moe")
    directory = write_random_checkpoint(config, str(tmp_path), progress=False)
    model, _ = load_model(directory, device="cpu", progress=False, double_quant=double_quant)
    planned = weight_footprint(_meta(config), "cpu", torch.bfloat16, double_quant)
    report = memory_report(model)
    assert planned.total == report.total
    assert sum(planned.nf4.values()) == sum(report.nf4.values())
    assert planned.nf4["experts"] == report.nf4["experts"]
    # Under FSDP2: parameters are sharded; buffers and the linears' quant state (scales) stay whole on every rank.
    shardable_storage(model)
    sharded = sum(p.numel() * p.element_size() for p in model.parameters())
    whole = sum(b.numel() * b.element_size() for b in model.buffers()) + report.scales["linear"]
    assert (planned.total - planned.replicated, planned.replicated) == (sharded, whole)


@pytest.mark.slow
def test_weight_bytes_at_qwen3_30b_widths(tmp_path):
    """Qwen3-30B-A3B's real layer widths (hidden 2048, 32 heads of 128, expert width 768), cut to one layer,
    8 experts and a 1k vocabulary so that the CPU load stays small."""
    _, config = read_config("qwen3-30b-a3b")
    config.num_hidden_layers, config.num_experts, config.vocab_size = 1, 8, 1024
    directory = write_random_checkpoint(config, str(tmp_path), progress=False)
    model, _ = load_model(directory, device="cpu", progress=False)
    assert weight_footprint(_meta(config), "cpu").total == memory_report(model).total


@pytest.mark.parametrize("family", LOADABLE)
@pytest.mark.parametrize("variant", [dict(variant="perft", num_experts=4, top_k=2), dict(variant="perft_e")])
def test_adapter_parameters_equal_attach_perfts(tiny_nf4, family, variant):
    model, _ = tiny_nf4(family)
    perft = PerftConfig(**variant)
    plan = make_plan(family, model.config, perft, batch=2, seq=8, device="cpu")
    attach_perft(model, perft, dtype=torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.adapters.params == trainable
    assert plan.adapters.total == 16 * trainable  # float32 weights, grads and two AdamW moments


def test_shipped_configs_are_the_published_models():
    published = {  # parameters in billions, as the model cards state them
        "olmoe-1b-7b": 6.9, "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5, "qwen1.5-moe-a2.7b": 14.3,
        "moonlight-16b-a3b": 16.0, "gpt-oss-20b": 20.9,
    }
    assert set(published) == set(KNOWN_MODELS)
    for name, billions in published.items():
        _, config = read_config(name)
        count = sum(p.numel() for p in _meta(config).parameters())
        assert abs(count / 1e9 - billions) < 0.06, (name, count)


def test_each_shipped_config_is_its_registry_family():
    families = [*((t, a.shipped) for t, a in ARCHITECTURES.items() if a.shipped), *PLANNED_ONLY.items()]
    assert [shipped.name for _, shipped in families] == list(KNOWN_MODELS)
    for model_type, shipped in families:
        assert json.loads(shipped.path.read_text())["model_type"] == model_type, shipped.name
    assert not set(PLANNED_ONLY) & set(ARCHITECTURES)  # planned only: load_model refuses these families


def test_qwen3_30b_fits_a_24gb_gpu_with_perft(capsys):
    assert main(["--model", "qwen3-30b-a3b", "--variant", "perft", "--batch", "16", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_moe; loadable" in out and "fits 24 GB: yes" in out
    _, config = read_config("Qwen/Qwen3-30B-A3B")
    plan = make_plan("q", config, PerftConfig(variant="perft", num_experts=4, top_k=2), 16, 256)
    assert 15 * 2**30 < plan.weights.total < 17 * 2**30  # every big weight in NF4 (bf16: ~57 GiB)
    assert plan.weights.nf4["experts"] == 48 * 128 * 3 * 2048 * 768 // 2


def test_families_the_loader_cannot_serve_are_accounted_and_said_so(capsys):
    main(["--model", "moonlight-16b-a3b", "--model", "gpt-oss-20b", "--variant", "perft_s"])
    out = capsys.readouterr().out
    assert out.count("not loadable by this version") == 1
    assert "| gpt-oss-20b | gpt_oss | no |" in out and "| moonlight-16b-a3b | deepseek_v3 | yes |" in out
    assert "top-6 sigmoid" in out and "26 MoE" in out  # Moonlight: first layer dense


def test_activation_estimate_scales_with_the_batch():
    _, config = read_config("olmoe-1b-7b")
    model, facts, perft = _meta(config), moe_facts(config), PerftConfig(variant="perft", num_experts=4, top_k=2)
    one, four = activation_bytes(model, facts, perft, 1, 256), activation_bytes(model, facts, perft, 4, 256)
    assert 3.5 * one < four < 4 * one  # linear in tokens, plus one dequantized weight


def test_bad_model_is_one_clear_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", "nowhere-7b"])
    assert "neither a shipped config" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path)])
    assert "no model_type" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_activation_estimate_is_near_a_measured_cpu_peak(tmp_path, family):
    """One checkpointed training step on CPU (reference kernels, full logits), allocations counted by the tracker.
    A GPU run (SDPA kernels, Triton experts, TRL's tiled loss) may differ; no GPU peak exists yet to check it."""
    from alloc_tracker import AllocationTracker

    from perft_qlora.training.tiny import save_tiny_model

    directory = save_tiny_model(str(tmp_path), family, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4)
    model, _ = load_model(directory, device="cpu", progress=False)
    perft = PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0)
    attach_perft(model, perft, dtype=torch.float32)
    model.activation_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    with AllocationTracker() as tracker:
        model(ids, labels=ids).loss.backward()
    estimate = make_plan(family, model.config, perft, batch=4, seq=128, device="cpu").activations
    assert 0.75 < estimate / tracker.peak < 1.35  # measured 0.91-1.13 across families (CPU, this machine)


def test_fsdp_plan_divides_what_fsdp_shards(capsys):
    _, config = read_config("mixtral-8x7b")
    perft = PerftConfig(variant="perft", num_experts=4, top_k=2)
    one, two = make_plan("m", config, perft, 16, 256), make_plan("m", config, perft, 16, 256, gpus=2)
    assert two.shard == -(-(one.weights.total - one.weights.replicated) // 2)
    layer = one.weights.nf4["experts"] // 32  # the experts dominate a Mixtral layer
    assert 2 * layer < two.gathered < 2 * layer + 2**30
    assert two.weights_per_gpu == two.shard + one.weights.replicated + two.gathered < one.weights.total
    assert one.fits()[24] is False and two.fits()[24] is True  # the case FSDP is for: Mixtral on 2 x 24 GB
    assert main(["--model", "mixtral-8x7b", "--gpus", "2"]) == 0
    assert "FSDP2 x 2" in capsys.readouterr().out


# --gpu-memory: experts streamed from host memory (issue 26) ---------------------------------------------------


def test_place_experts_keeps_as_many_layers_resident_as_the_budget_allows():
    from perft_qlora.quant.expert_placement import place_experts

    layers = [0, 10, 10, 10, 10]  # a dense first layer, four MoE layers of 10 bytes
    assert place_experts(layers, "auto", 40).offloaded == ()  # everything fits: nothing streams
    tight = place_experts(layers, "auto", 39)  # 3 resident + one buffer = 40, 2 resident + two buffers = 40: 1 resident
    assert len(tight.offloaded) == 3 and tight.device_bytes == 30
    assert place_experts(layers, "auto", 20).offloaded == (1, 2, 3, 4) and place_experts(layers, "auto", 20).staging_bytes == 20
    assert place_experts(layers, "all").offloaded == (1, 2, 3, 4)
    assert place_experts(layers, "none", 0).offloaded == ()
    half = place_experts([10] * 8, "auto", 60)  # 4 resident + 2 buffers
    assert half.offloaded == (1, 3, 5, 7) and half.device_bytes == 60  # spread, not the last four


def test_mixtral_fits_a_24_gib_card_with_a_printed_pcie_budget(capsys):
    main(["--model", "mixtral-8x7b", "--gpu-memory", "24", "--pcie-gbps", "25", "--tflops", "50"])
    out = capsys.readouterr().out
    plan = make_plan("mixtral-8x7b", read_config("mixtral-8x7b")[1], PerftConfig(variant="perft", num_experts=4, top_k=2),
                     16, 256)
    placement = plan.placement(24)
    assert placement is not None and 0 < len(placement.offloaded) < 32
    on_card = plan.total - sum(plan.expert_layer_bytes) + placement.device_bytes
    assert on_card <= 24 * 2**30 < plan.total  # it fits only thanks to the streamed layers
    assert placement.host_bytes + placement.device_bytes - placement.staging_bytes == sum(plan.expert_layer_bytes)
    gb = 2 * placement.host_bytes / 1e9  # two copies of each streamed layer per step
    assert f"PCIe         {gb:.1f} GB per step" in out and f"{gb / 25:.2f} s at 25 GB/s" in out
    assert "hides behind compute" in out and "--gpu-memory-limit" in out
    # 8 FLOP per active parameter and token with recompute; Mixtral has ~12.9 B active parameters
    assert 12.5e9 < plan.active_parameters < 13.2e9 and f"{8 * plan.active_parameters * 16 * 256:.2e} FLOP" in out


def test_a_card_too_small_even_when_streaming_everything_is_said(capsys):
    main(["--model", "mixtral-8x7b", "--gpu-memory", "4"])
    assert "does not fit even with every MoE layer's experts streamed" in capsys.readouterr().out


def test_a_stream_slower_than_compute_is_said(capsys):
    main(["--model", "olmoe-1b-7b", "--gpu-memory", "6", "--pcie-gbps", "0.5"])
    assert "does NOT hide behind compute" in capsys.readouterr().out


def test_plan_gpu_memory_limit_is_the_budget_train_uses(tmp_path):
    """The limit plan prints for train leads train's budget to the planner's placement (same bytes)."""
    from perft_qlora.quant.footprint import other_weight_bytes

    name, config = read_config("qwen3-30b-a3b")
    plan = make_plan(name, config, PerftConfig(variant="perft", num_experts=4, top_k=2), 16, 256)
    limit = plan.weights_limit(12)
    budget = limit * 2**30 - other_weight_bytes(config, "cuda")
    expected = 12 * 2**30 - (plan.total - sum(plan.expert_layer_bytes))
    assert abs(budget - expected) < 2**20
