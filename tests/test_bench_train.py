"""`python -m perft_qlora.bench train`: the harness on the tiny arch (CPU), the random checkpoints, the baselines."""

import argparse
import json
import os

import bitsandbytes as bnb
import pytest
import torch
from torch.nn.utils import parametrize

from perft_qlora import load_model, memory_report
from perft_qlora.bench import train as bench_train
from perft_qlora.bench.random_checkpoint import arch_config, write_random_checkpoint
from perft_qlora.errors import UsageError


def test_published_shapes():
    olmoe, mixtral = arch_config("olmoe-1b-7b"), arch_config("mixtral-8x7b")
    assert (olmoe.hidden_size, olmoe.intermediate_size, olmoe.num_experts, olmoe.num_experts_per_tok) == (2048, 1024, 64, 8)
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_local_experts) == (4096, 14336, 8)
    assert arch_config("mixtral-8x7b", num_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown arch"):
        arch_config("llama")


def test_random_checkpoint_is_sharded_by_layer_reused_and_loads_in_nf4(tmp_path):
    directory = write_random_checkpoint(arch_config("tiny"), str(tmp_path / "ckpt"), progress=False)
    with open(os.path.join(directory, "model.safetensors.index.json")) as handle:
        shards = set(json.load(handle)["weight_map"].values())
    assert shards == {"model-layer000.safetensors", "model-layer001.safetensors", "model-other.safetensors"}
    stamp = os.path.getmtime(os.path.join(directory, "model-layer000.safetensors"))
    write_random_checkpoint(arch_config("tiny"), directory, progress=False)  # same config: nothing rewritten
    assert os.path.getmtime(os.path.join(directory, "model-layer000.safetensors")) == stamp
    model, _ = load_model(directory, device="cpu", progress=False)
    report = memory_report(model)
    assert report.nf4["experts"] > 0 and not report.dense.get("experts")  # every expert value in NF4


def _args(**overrides):
    values = dict(device="cpu", variant="perft", num_experts=4, top_k=2, bottleneck=16)
    return argparse.Namespace(**{**values, **overrides})


def test_baselines_are_built_as_their_recipes_say(tmp_path):
    directory = write_random_checkpoint(arch_config("tiny"), str(tmp_path / "ckpt"), progress=False)
    qlora, _ = bench_train.build_model("hf-qlora", directory, _args())
    base = qlora.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    # The trap this toolkit exists for: load_in_4bit leaves the fused experts in 16-bit (bitsandbytes #1849).
    assert base.model.layers[0].mlp.experts.gate_up_proj.dtype in (torch.bfloat16, torch.float32)
    param4, _ = bench_train.build_model("bnb-param4", directory, _args())
    experts = param4.get_base_model().model.layers[0].mlp.experts
    assert parametrize.is_parametrized(experts, "gate_up_proj") and parametrize.is_parametrized(experts, "down_proj")
    assert all(p.requires_grad is False for n, p in param4.named_parameters() if "lora_" not in n)


def test_harness_runs_every_setup_and_writes_json(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = bench_train.main([
        "--arch", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1", "--baseline", "bnb-param4",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ])
    assert code == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    assert [r["setup"] for r in result["results"]] == ["perft_qlora", "bnb-param4"]
    for row in result["results"]:
        assert row["tokens_per_s"] > 0 and row["steps_timed"] == 1 and row["train_peak_gib"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_unknown_baseline_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown baseline"):
        bench_train.main(["--baseline", "hf-int8", "--cache-dir", str(tmp_path)])


def test_packing_runs_the_same_examples_padded_and_packed(tmp_path, capsys):
    assert bench_train.setup_runs(["bnb-param4"], packing=True) == [
        "perft_qlora", "perft_qlora+packing", "bnb-param4", "bnb-param4+packing"]
    assert bench_train.setup_runs(["bnb-param4"], packing=False) == ["perft_qlora", "bnb-param4"]
    argv = ["--arch", "tiny", "--batch", "2", "--seq", "16", "--lengths", "uniform:2-16", "--packing", "--steps", "1",
            "--warmup", "1", "--cache-dir", str(tmp_path / "cache")]
    rows = []
    for setup in ("perft_qlora", "perft_qlora+packing"):  # in this process, as each child runs them (fast)
        assert bench_train.main([*argv, "--only", setup]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    padded, packed = rows
    assert (padded["setup"], packed["setup"]) == ("perft_qlora", "perft_qlora+packing")
    assert padded["real_tokens"] == packed["real_tokens"] >= 2 * 16 * 2  # the same examples, each seen once
    assert packed["pad_tokens"] < padded["pad_tokens"] and packed["padding_share"] < padded["padding_share"]
    assert packed["steps_timed"] >= 1 and packed["tokens_per_s"] > 0 and padded["tokens_per_s"] > 0
    table = bench_train.render(rows, tokens=True)
    assert "pad share" in table and "perft_qlora+packing" in table


def test_lengths_are_checked_before_any_model():
    with pytest.raises(SystemExit):
        bench_train.make_parser().parse_args(["--lengths", "uniform:9-3"])
    with pytest.raises(UsageError, match="longer than --seq 16"):
        bench_train.main(["--seq", "16", "--lengths", "uniform:4-32", "--cache-dir", "/nonexistent"])
