"""load_model: every big weight in NF4 (experts included), exact bitsandbytes bytes, bounded loading peak."""

from __future__ import annotations

import io
import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from alloc_tracker import AllocationTracker
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from perft_qlora import UnsupportedArchitectureError, load_model, memory_report
from perft_qlora.quant.checkpoint_reader import CheckpointReader
from perft_qlora.quant.load_report import LoadProgress
from perft_qlora.quant.memory import count_values
from perft_qlora.quant.nf4_experts import NF4Experts
from perft_qlora.training.tiny import save_tiny_model

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


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_weights_are_bitsandbytes_bytes_of_the_checkpoint_tensor(tiny_checkpoint, double_quant):
    directory = tiny_checkpoint("olmoe")
    model, _ = load_model(directory, device="cpu", progress=False, double_quant=double_quant)
    ref = _reference(directory)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for name in ("q_proj", "o_proj"):
        ours = getattr(model.model.layers[1].self_attn, name)
        dense = getattr(ref.model.layers[1].self_attn, name).weight.data
        packed, state = bnbF.quantize_4bit(dense, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(ours.weight.data, packed) and torch.equal(ours.weight.quant_state.absmax, state.absmax)
        expected = bnb.nn.Linear4bit(64, dense.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                     compress_statistics=double_quant, quant_type="nf4")
        expected.weight = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=double_quant,
                                            quant_type="nf4", module=expected).to("cpu")
        expected.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            assert torch.equal(ours(h), expected(h))


_LOAD_AND_MEASURE = """
import json, os, sys
import torch
from perft_qlora.quant.host_memory import HostPeak
from perft_qlora import load_model, memory_report
directory = sys.argv[1]
import perft_qlora.quant.loader  # imports are not loading
with HostPeak() as host:
    model, _ = load_model(directory, device="cpu", progress=False)
maps = open("/proc/self/maps").read()
fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
       if os.path.exists(f"/proc/self/fd/{fd}")]
report = getattr(model, "load_report", None)
print(json.dumps({
    "host": host.report.__dict__, "final": memory_report(model).total,
    "mapped": sum(directory in line for line in maps.splitlines()), "open": sum(directory in f for f in fds),
    "own_peak": None if report is None else report.host.peak,
}))
"""


@pytest.mark.slow
def test_host_peak_at_real_widths_counts_mapped_pages_and_stays_within_final_plus_one_and_a_half_layers(tmp_path):
    # OLMoE-1B-7B's widths (hidden 2048, intermediate 1024) with 8 experts and 4 layers (~400 MB on disk), loaded
    # in a fresh process; /proc accounting: anonymous + file-backed resident pages, so a memory-mapped shard counts.
    import subprocess
    import sys

    from perft_qlora.bench.random_checkpoint import arch_config, write_random_checkpoint

    config = arch_config("olmoe-1b-7b", num_layers=4)
    config.num_experts, config.vocab_size = 8, 1024
    directory = write_random_checkpoint(config, str(tmp_path / "olmoe-widths"), progress=False)
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_MEASURE, directory], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    host = result["host"]
    layer_bf16 = 8 * 3 * 2048 * 1024 * 2 + 4 * 2048 * 2048 * 2
    assert result["mapped"] == 0 and result["open"] == 0  # nothing of a shard stays mapped or open
    assert host["peak_file"] - host["start_file"] < 64 * 2**20  # checkpoint pages never become resident
    assert host["peak"] <= host["start"] + result["final"] + 1.5 * layer_bf16
    assert abs(result["own_peak"] - host["peak"]) < 64 * 2**20  # the loader's own report says the same


def test_reader_reads_by_offset_and_closes_finished_shards(tmp_path):
    a, b = torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.ones(2, 5, dtype=torch.bfloat16)
    save_file({"a": a}, str(tmp_path / "s1.safetensors"))
    save_file({"b": b, "c": torch.zeros(1, dtype=torch.int64)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}}))
    seen = []
    with CheckpointReader(str(tmp_path), on_read=seen.append) as reader:
        assert torch.equal(reader.get_rows("a", 1, 3), a[1:3]) and torch.equal(reader.get_row("a", 2), a[2])
        assert torch.equal(reader.get("b"), b)
        assert reader.open_files == 2 and reader.close_finished() == 1 and reader.open_files == 1  # s2: c unread
        reader.get("c")
        assert reader.close_finished() == 1 and reader.open_files == 0
        assert reader.bytes_read == sum(seen) == 8 * 4 + 4 * 4 + 10 * 2 + 8
        with pytest.raises(ValueError, match="cannot read a"):
            reader.read_rows_into("a", 2, torch.empty(2, 4))  # past the end


def test_progress_bar_counts_layers_and_gib_and_is_quiet_off_a_terminal(tiny_checkpoint, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = LoadProgress(3 * 2**30, num_layers=2, file=screen)
    bar.read(2**30)
    bar.layer_done(0)
    bar.read(2 * 2**30)
    bar.layer_done(1)
    bar.close()
    text = screen.getvalue()
    assert "layer 2/2" in text and "3.00/3.00 GiB" in text and "<" in text  # elapsed<ETA
    load_model(tiny_checkpoint("olmoe"), device="cpu", progress=True)  # pytest's stderr is no terminal
    assert "loading NF4" not in capsys.readouterr().err


def test_load_report_and_bench_load_give_time_cpu_and_host_peaks(tiny_checkpoint):
    from perft_qlora.bench.load import measure_load, render

    directory = tiny_checkpoint("olmoe")
    model, _ = load_model(directory, device="cpu", progress=False)
    report = model.load_report
    weights_file = os.path.join(directory, "model.safetensors")
    assert report.bytes_read == os.path.getsize(weights_file) - _header_bytes(weights_file)  # each byte read once
    assert report.host.peak >= report.host.start > 0 and report.host.peak_anon > 0 and report.device_peak is None
    assert "host peak" in str(report) and "file-backed" in str(report)
    rows = [measure_load(setup, directory, "cpu") for setup in ("perft_qlora", "hf-bf16")]
    for row in rows:
        assert row["host_peak_gib"] >= row["host_start_gib"] > 0 and row["weights_gib"] > 0 and row["user_s"] >= 0
    assert "perft_qlora" in render(rows) and "hf-bf16" in render(rows)


def _header_bytes(path: str) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_loads_only_the_experts_fsdp_keeps_on_it(tiny_checkpoint, caplog, arch, rank):
    """``experts_shard``: this rank's experts hold a whole load's bytes, every expert's scales (double-quantized
    over all experts) are a whole load's, and the other rank's checkpoint tensors are neither read nor reported."""
    from perft_qlora.quant.sharding import ExpertShard

    directory = tiny_checkpoint(arch)
    whole, _ = load_model(directory, device="cpu", progress=False)
    plain, _ = load_model(directory, device="cpu", progress=False, double_quant=False)  # float32 scales
    gathered = []

    def gather(own):  # the other rank's part from the whole load, in rank order
        which = ("gate_up_proj", "down_proj")[len(gathered) % 2]
        full = getattr(plain.model.layers[len(gathered) // 2].mlp.experts, which).absmax
        half = full.numel() // 2
        assert torch.equal(own, full[rank * half : (rank + 1) * half])  # this rank's own scales
        gathered.append(which)
        return full.clone()

    with CheckpointReader(directory) as reader:
        total = reader.total_bytes
    caplog.set_level("WARNING")
    model, _ = load_model(directory, device="cpu", progress=False, experts_shard=ExpertShard(rank, 2, gather))
    assert len(gathered) == 2 * len(model.model.layers)
    for mine, reference in zip(model.model.layers, whole.model.layers):
        for which in ("gate_up_proj", "down_proj"):
            got, expected = getattr(mine.mlp.experts, which), getattr(reference.mlp.experts, which)
            half = expected.packed.shape[0] // 2
            assert torch.equal(got.packed[rank * half : (rank + 1) * half], expected.packed[rank * half : (rank + 1) * half])
            for name in ("absmax", "absmax2", "offset", "code", "code2"):
                assert torch.equal(getattr(got, name), getattr(expected, name)), name
    experts = sum(w.numel for layer in whole.model.layers for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj))
    assert model.load_report.bytes_read == pytest.approx(total - experts * 2 / 2, rel=0.01)  # half the bf16 experts
    assert "not used by the model" not in caplog.text
