"""Data parallel and sharded (FSDP2) training with two CPU processes (`accelerate launch` -> torchrun, gloo)
against one process.

The launched commands are the README's: ``accelerate launch --config_file examples/accelerate/ddp.yaml -m
perft_qlora.train ...`` and, for FSDP2, ``accelerate launch --config_file examples/accelerate/fsdp.yaml
tests/fsdp_on_cpu.py ...`` (accelerate enables FSDP on GPUs only; that script supplies what it sets there). Parity needs float32 compute (``--base-dtype float32``: bf16 matmuls round differently
for different batch shapes) and rows of one token length (padding would change the routed token counts).
What is averaged where is stated in ``perft_qlora/training/distributed.py``'s module docstring; each claim has a test here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from perft_qlora.errors import UsageError
from perft_qlora.method.checkpoint import WEIGHTS_NAME
from perft_qlora.quant.nf4 import NF4Weight
from perft_qlora.training import distributed
from perft_qlora.training.tiny import save_tiny_model
from perft_qlora.training.train import run
from perft_qlora.training.train_options import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP_CONFIG = os.path.join(REPO, "examples", "accelerate", "ddp.yaml")
FSDP_CONFIG = os.path.join(REPO, "examples", "accelerate", "fsdp.yaml")
FSDP_ON_CPU = os.path.join(REPO, "tests", "fsdp_on_cpu.py")  # accelerate's FSDP2 on CPU processes (see its docstring)
STEPS = 4
# One adapter and optimizer (rank 0), one RNG state per rank, nothing left over from a second writer.
CHECKPOINT_FILES = {"README.md", "perft_config.json", WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    "rng_state_0.pth", "rng_state_1.pth", "checkpoint_complete.json"}  # the last, once both ranks' are in


def equal_length_rows(path) -> str:
    """64 distinct rows of exactly the same token length in the shipped demo base's tokenizer (no padding, so
    a 2-rank run and one process see the same tokens), as training renders them (the released template)."""
    from collections import defaultdict

    from transformers import AutoTokenizer

    from perft_qlora.formats.records import RecordSet
    from perft_qlora.training.data import to_prompt_completion
    from perft_qlora.training.demo_base import demo_base_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    rng = random.Random(0)
    candidates = []
    for _ in range(1000):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))
        letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
        answer = "yes" if letter in word else "nop"
        candidates.append({"instruction": f"Does '{word}' contain '{letter}'?", "input": "", "output": f"the answer is {answer}"})
    by_length = defaultdict(list)
    for row, example in zip(candidates, to_prompt_completion(RecordSet(source="mem", rows=candidates))):
        by_length[len(tokenizer(example["prompt"] + example["completion"]).input_ids)].append(row)
    rows = max(by_length.values(), key=len)[:64]
    assert len(rows) == 64
    path.write_text(json.dumps(rows))
    return str(path)


def common(data: str, out, *extra) -> list[str]:
    return [
        "--demo", "--data", data, "--output-dir", str(out), "--max-steps", str(STEPS), "--val-size", "0",
        "--max-length", "256", "--logging-steps", "1", "--warmup-steps", "0", "--save-steps", "2",
        "--base-dtype", "float32", "--global-batch-size", "4", *extra,
    ]


def launch(options: list[str], config: str = DDP_CONFIG, target: tuple[str, ...] = ("-m", "perft_qlora.train"),
           env: dict | None = None) -> str:
    """Run ``perft_qlora.training.train`` in 2 processes; returns stdout + stderr. A free port: tests may run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
               "--main_process_port", str(port), *target, *options]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, WEIGHTS_NAME))


def assert_same_adapter(got, expected, atol, stragglers=0):
    """Every value within ``atol``, or all but ``stragglers`` values of each tensor and those within ``10 * atol``.

    AdamW divides by sqrt(v): a value whose gradients sit at fp32-rounding level moves by an amount set by the
    rounding, not by the gradient, so summing in another order can move such a rare value further."""
    assert got.keys() == expected.keys()
    for key in got:
        diff = (got[key] - expected[key]).abs()
        if stragglers == 0:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)
            continue
        assert float(diff.max()) <= 10 * atol, (key, float(diff.max()))
        assert int((diff > atol).sum()) <= stragglers, (key, int((diff > atol).sum()))


def train_logs(history) -> dict[int, dict]:
    return {entry["step"]: entry for entry in history if "loss" in entry}


def launched_logs(out) -> dict[int, dict]:
    with open(os.path.join(out, f"checkpoint-{STEPS}", "trainer_state.json")) as handle:
        return train_logs(json.load(handle)["log_history"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return equal_length_rows(tmp_path_factory.mktemp("rows") / "rows.json")


@pytest.fixture(scope="module")
def ddp_perft(tmp_path_factory, data):
    """PERFT (own router, both balance losses on) in 2 processes, global batch 4 = 2 per rank."""
    out = tmp_path_factory.mktemp("ddp-perft")
    output = launch(common(data, out))
    return out, output


@pytest.mark.slow
def test_ddp_equals_one_process_accumulating_the_same_micro_batches(ddp_perft, data, tmp_path):
    """Balance losses per rank, gradients averaged by DDP == one process, --grad-accum 2 over the same micro-batches."""
    out, _ = ddp_perft
    single = run(parse_args(common(data, tmp_path, "--grad-accum", "2")))
    assert single.args.per_device_train_batch_size == 2  # --global-batch-size 4 / (1 rank x 2 accumulation steps)
    # One value of a tensor may straggle (assert_same_adapter): measured on a 2-core AVX512 CPU, all but one value
    # of layers.{0,1}'s banks agreed within 1e-6, those two by 2.9e-6 and 4.8e-6 (the all-reduce sums in another order).
    assert_same_adapter(adapter(out / "adapter"), adapter(tmp_path / "adapter"), atol=1e-6, stragglers=1)
    got, expected = launched_logs(out), train_logs(single.state.log_history)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        for key in ("loss", "grad_norm", "aux_loss", "perft_aux_loss"):  # logged: means over ranks and accum. steps
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)


@pytest.mark.slow
def test_routing_statistics_count_the_tokens_of_both_ranks(ddp_perft, data, tmp_path):
    """At step 1 (same initial adapter) the logged routing equals one process's over the whole global batch of 4."""
    out, _ = ddp_perft
    single = run(parse_args(common(data, tmp_path, "--max-steps", "1")))
    assert single.args.per_device_train_batch_size == 4
    got, expected = launched_logs(out)[1], train_logs(single.state.log_history)[1]
    keys = [k for k in expected if k.startswith("routing/")]
    assert len(keys) == 2 * 4  # imbalance and entropy for each of the shipped demo base's 4 layers
    for key in keys:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.slow
def test_only_rank_0_writes_checkpoints_and_log_lines(ddp_perft):
    out, output = ddp_perft
    assert sorted(os.listdir(out)) == [".perft-qlora-demo", "README.md", "adapter", "base", "checkpoint-2", f"checkpoint-{STEPS}"]
    for step in (2, STEPS):
        files = set(os.listdir(out / f"checkpoint-{step}"))
        assert files == CHECKPOINT_FILES, files
    assert output.count("done  step") == 1  # the console's training summary: rank 0 only
    assert output.count("adapter saved to") == 1  # and train.py's own lines


@pytest.mark.slow
def test_resume_under_ddp_reproduces_the_uninterrupted_run(ddp_perft, data, tmp_path):
    out, _ = ddp_perft
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    output = launch(common(data, tmp_path, "--resume"))
    assert_same_adapter(adapter(tmp_path / "adapter"), adapter(out / "adapter"), atol=1e-7)
    assert "Continuing training from checkpoint" in output or (tmp_path / f"checkpoint-{STEPS}").is_dir()
    got, expected = launched_logs(tmp_path), launched_logs(out)
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6)


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_same_global_batch(data, tmp_path):
    """Without balance losses the 2-rank run is the 1-process run of batch 4 (token-normalised loss over both ranks)."""
    options = ["--variant", "perft_e", "--base-aux-loss-coef", "0"]  # perft_e: no PERFT router, so no perft_aux_loss
    launch(common(data, tmp_path / "ddp", *options))
    single = run(parse_args(common(data, tmp_path / "one", *options)))
    got, expected = launched_logs(tmp_path / "ddp"), train_logs(single.state.log_history)
    for step in range(1, STEPS + 1):  # grad_norm is taken before clipping: a gradient scaled by 2 would show here
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)
    # Not bit-identical: the gradient sums run in another order (one batch of 4 vs two ranks' all-reduce), and
    # AdamW's 1/sqrt(v) turns fp32 rounding of near-zero gradients into differences after 4 steps: on the shipped
    # demo base all but one of 65,536 values agreed within 3.4e-6 (values up to ~2), that one by 9e-5.
    assert_same_adapter(adapter(tmp_path / "ddp" / "adapter"), adapter(tmp_path / "one" / "adapter"), atol=2e-5,
                        stragglers=1)


# ---- sharded (FSDP2): accelerate's plugin through the Trainer, on CPU processes (tests/fsdp_on_cpu.py) ------------


def fsdp_options(data: str, out) -> list[str]:
    """As ``common``, plus held-out rows: evaluation and loading the best checkpoint run under FSDP too."""
    return common(data, out, "--val-size", "8", "--eval-steps", "2")


@pytest.fixture(scope="module")
def fsdp_perft(tmp_path_factory, data):
    """PERFT (both balance losses on) under FSDP2 in 2 processes, global batch 4, with each rank's shard report."""
    out = tmp_path_factory.mktemp("fsdp-perft")
    report = out.parent / (out.name + "-shards")
    output = launch(fsdp_options(data, out), config=FSDP_CONFIG, target=(FSDP_ON_CPU,),
                    env={"PERFT_QLORA_SHARD_REPORT": str(report)})
    return out, output, report


@pytest.mark.slow
def test_fsdp_shards_the_nf4_experts_the_nf4_linears_and_the_adapters(fsdp_perft):
    _, _, report = fsdp_perft
    for rank in (0, 1):
        with open(report / f"rank{rank}.json") as handle:
            shards = json.load(handle)
        dtypes = {"nf4_experts": "torch.uint8", "nf4_linear": "torch.bfloat16", "adapter": "torch.float32"}
        for kind, dtype in dtypes.items():  # bitsandbytes' linears: their bytes viewed as bf16 (quant/sharding.py)
            tensor = shards[kind]
            assert tensor["type"] == "DTensor" and tensor["dtype"] == dtype, (rank, kind, tensor)
            assert tensor["local"][0] * 2 == tensor["whole"][0] and tensor["local"][1:] == tensor["whole"][1:], (rank, kind)


@pytest.mark.slow
def test_fsdp_equals_one_process_accumulating_the_same_micro_batches(fsdp_perft, data, tmp_path):
    out, _, _ = fsdp_perft
    single = run(parse_args(fsdp_options(data, tmp_path) + ["--grad-accum", "2"]))
    # 3.9e-6 measured (values up to ~2): the reduce-scatter sums the two ranks' gradients in another order.
    assert_same_adapter(adapter(out / "adapter"), adapter(tmp_path / "adapter"), atol=2e-5)
    got, expected = launched_logs(out), train_logs(single.state.log_history)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        for key in ("loss", "grad_norm", "aux_loss", "perft_aux_loss"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)


@pytest.mark.slow
def test_fsdp_checkpoints_are_whole_tensors_written_once(fsdp_perft, tiny_checkpoint):
    """The files one process writes (not the Trainer's sharded whole-model checkpoint), of whole tensors."""
    from perft_qlora.method.checkpoint import adapter_parameters, load_adapter
    from perft_qlora.quant.loader import load_model

    out, output, _ = fsdp_perft
    assert sorted(os.listdir(out)) == [".perft-qlora-demo", "README.md", "adapter", "base", "checkpoint-2", f"checkpoint-{STEPS}"]
    for step in (2, STEPS):
        assert set(os.listdir(out / f"checkpoint-{step}")) == CHECKPOINT_FILES
    model, _ = load_model(str(out / "base"), device="cpu", dtype=torch.float32, progress=False)
    load_adapter(model, str(out / f"checkpoint-{STEPS}"))  # one process, no FSDP: whole tensors load as they are
    params = adapter_parameters(model)
    optimizer = torch.load(out / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(params)  # the adapter's state only, each of its whole shape
    assert sorted(p.shape for p in params.values()) == sorted(s["exp_avg"].shape for s in optimizer["state"].values())
    assert output.count("done  step") == 1 and output.count("adapter saved to") == 1
    assert output.count("demo task, 40 held-out rows") == 1  # the before/after table: rank 0 only
    assert "Params4bit" not in output  # accelerate's warning when it leaves 4-bit linears unsharded


@pytest.mark.slow
def test_resume_under_fsdp_reproduces_the_uninterrupted_run(fsdp_perft, data, tmp_path):
    out, _, _ = fsdp_perft
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    launch(fsdp_options(data, tmp_path) + ["--resume"], config=FSDP_CONFIG, target=(FSDP_ON_CPU,))
    assert_same_adapter(adapter(tmp_path / "adapter"), adapter(out / "adapter"), atol=1e-7)
    got, expected = launched_logs(tmp_path), launched_logs(out)
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6)


@pytest.mark.gpu
def test_fsdp_on_a_gpu_moves_each_shard_there_and_trains_like_one_gpu(data, tmp_path):
    """What CPU processes cannot show: the model loaded into host memory and moved to the GPU unit by unit by
    ``fully_shard``, bf16 mixed precision over the uint8 / bf16-viewed 4-bit storage, the linears' quant state
    found again on the GPU after each all-gather. One GPU is enough for that (one rank under torchrun)."""
    report = tmp_path / "shards"
    options = ["--demo", "--data", data, "--max-steps", str(STEPS), "--val-size", "0", "--max-length", "256",
               "--logging-steps", "1", "--warmup-steps", "0", "--save-steps", "2", "--batch-size", "4"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "1",
               FSDP_ON_CPU, *options, "--output-dir", str(tmp_path / "fsdp")]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PERFT_QLORA_SHARD_REPORT": str(report)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    with open(report / "rank0.json") as handle:
        shards = json.load(handle)
    assert {kind: (t["type"], t["device"]) for kind, t in shards.items()} == {
        kind: ("DTensor", "cuda:0") for kind in ("nf4_experts", "nf4_linear", "adapter")}
    single = run(parse_args([*options, "--output-dir", str(tmp_path / "one")]))
    got, expected = launched_logs(tmp_path / "fsdp"), train_logs(single.state.log_history)
    for step in range(1, STEPS + 1):  # bf16 both ways, cast at different places: close, not equal
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=5e-2), step


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process(fsdp_perft, data, tmp_path):
    """Checkpoints hold whole tensors, the optimizer state by parameter name: one process continues an FSDP run
    (here with --grad-accum 2 over the same micro-batches) to the FSDP run's adapter."""
    out, _, _ = fsdp_perft
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    resumed = run(parse_args(fsdp_options(data, tmp_path) + ["--grad-accum", "2", "--resume"]))
    assert resumed.state.global_step == STEPS
    assert_same_adapter(adapter(tmp_path / "adapter"), adapter(out / "adapter"), atol=2e-5)


# ---- rank-aware device choice and launch checks, with a faked multi-GPU environment --------------------------


@pytest.fixture
def two_gpu_rank_1(monkeypatch):
    """Rank 1 of 2 on a node with two (fake) GPUs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_each_rank_loads_onto_its_own_gpu(two_gpu_rank_1, monkeypatch):
    assert distributed.rank_device("cuda") == "cuda:1"
    assert two_gpu_rank_1 == [1]
    assert distributed.rank_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="same GPU; pass --device cuda"):
        distributed.rank_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UsageError, match="LOCAL_RANK 2 has no GPU of its own"):
        distributed.rank_device("cuda")


def test_train_loads_the_model_onto_the_rank_device(two_gpu_rank_1, monkeypatch, tmp_path):
    """`python -m perft_qlora.train` under a launcher: load_model gets cuda:LOCAL_RANK, not cuda (= GPU 0)."""
    from perft_qlora.training import train

    loaded = {}

    class Loaded(Exception):
        pass

    def fake_load(name, **kwargs):
        loaded.update(kwargs)
        raise Loaded

    monkeypatch.setattr(distributed, "gather_fingerprints", lambda args, device: [distributed.options_fingerprint(args)] * 2)
    monkeypatch.setattr(train, "load_model", fake_load)
    monkeypatch.setattr(train, "is_main_process", lambda: False)  # rank 1 neither writes nor removes the demo base
    base_config = tmp_path / "base" / "config.json"
    save_tiny_model(str(tmp_path / "base"), "olmoe")  # what rank 0 wrote before rank 1 looks
    os.utime(base_config, (1, 1))
    # --max-length: the tiny base's byte-level tokenizer makes the demo's prompts ~400 tokens, and rows whose
    # response --max-length cuts away are dropped before loading
    args = parse_args(["--demo", "--output-dir", str(tmp_path), "--device", "cuda", "--max-length", "512"])
    with pytest.raises(Loaded):
        train.run(args)
    assert loaded["device"] == "cuda:1" and args.device == "cuda:1"
    assert os.stat(base_config).st_mtime == 1  # rank 0's base is neither removed nor rewritten by rank 1


def test_global_batch_must_divide_over_ranks_and_accumulation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(["--model", "m", "--data", "d.json", "--global-batch-size", "16", "--grad-accum", "2"])
    assert args.batch_size == 4
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match=r"^--global-batch-size 16 is not divisible by 3 rank\(s\)"):
        parse_args(["--model", "m", "--data", "d.json", "--global-batch-size", "16"])


def test_ranks_with_different_options_are_refused(monkeypatch):
    one = parse_args(["--model", "m", "--data", "d.json"])
    other = parse_args(["--model", "m", "--data", "d.json", "--learning-rate", "3e-5"])
    same = parse_args(["--model", "m", "--data", "d.json", "--device", "cuda:1"])  # the device is the rank's own
    assert distributed.options_fingerprint(one) == distributed.options_fingerprint(same)
    prints = [distributed.options_fingerprint(a) for a in (one, one, other)]
    distributed.check_same_options(prints[:2])
    with pytest.raises(UsageError, match=r"^the ranks were started with different options .*ranks \[2\]"):
        distributed.check_same_options(prints)


def test_options_an_engine_cannot_run_fail_with_one_line(monkeypatch):
    args = parse_args(["--model", "m", "--data", "d.json", "--backend", "unsloth"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="^--backend unsloth runs in one process only"):
        distributed.check_engine(args)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UsageError, match="^DeepSpeed is not supported"):
        distributed.check_engine(args)


def test_ddp_does_not_broadcast_the_nf4_buffers():
    from perft_qlora.quant.arch import get_arch
    from perft_qlora.training.tiny import tiny_config
    from perft_qlora.training.train_options import make_sft_config

    args = parse_args(["--model", "m", "--data", "d.json", "--device", "cpu"])
    config = make_sft_config(args, get_arch(tiny_config("olmoe")), has_validation=False)
    # DDP's default re-sends every buffer from rank 0 before each forward: all the NF4 expert bytes, each step.
    assert config.ddp_broadcast_buffers is False and config.ddp_find_unused_parameters is True


def test_expert_fractions_in_one_process_are_the_routing_stats(tiny_nf4, token_batch):
    from perft_qlora import PerftConfig, attach_perft, routing_stats

    model, _ = tiny_nf4("olmoe")
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=4))
    ids, mask = token_batch
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    fractions = distributed.expert_fractions(model)
    assert fractions.keys() == {0, 1}
    for layer, stats in routing_stats(model).items():
        assert fractions[layer] == pytest.approx(stats["expert_fraction"])


def test_shardable_storage_keeps_keys_bytes_and_outputs(tiny_nf4, token_batch):
    import bitsandbytes as bnb

    from perft_qlora.quant.sharding import shardable_storage

    model, _ = tiny_nf4("olmoe")
    ids, mask = token_batch
    with torch.no_grad():
        before, state = model(input_ids=ids, attention_mask=mask).logits, dict(model.state_dict())
    counts = shardable_storage(model)
    weights = [m for m in model.modules() if isinstance(m, NF4Weight)]
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert counts == {"nf4_experts": len(weights), "linear4bit": len(linears)} and weights and linears
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in after.items():  # the same bytes: NF4 linears' only viewed two at a time
        assert torch.equal(value.reshape(-1).view(torch.uint8), state[key].reshape(-1).view(torch.uint8)), key
    assert all(set(dict(w.named_parameters())) == {"packed", "absmax"} for w in weights)  # what FSDP2 shards
    assert all(m.weight.dtype == torch.bfloat16 and isinstance(m.weight, bnb.nn.Params4bit) for m in linears)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_float_scales_stay_replicated_buffers():
    """Without double quantization ``absmax`` is float32, which FSDP's mixed precision would cast to bf16."""
    weight = NF4Weight.quantize(torch.randn(2, 64, 128), double_quant=False).storage_as_parameters()
    assert set(dict(weight.named_parameters())) == {"packed"} and weight.absmax.dtype == torch.float32
    assert "absmax" in dict(weight.named_buffers())


@pytest.mark.parametrize(("env", "extra", "message"), [
    ({"FSDP_VERSION": "1"}, [], "^FSDP version 1 is not supported, only FSDP2"),
    ({}, ["--variant", "lora"], "^--variant lora is not supported under FSDP"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, [], "^fsdp_activation_checkpointing and --gradient-checkpointing"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, [], "^fsdp_offload_params is not supported"),
])
def test_what_fsdp_cannot_run_fails_with_one_line(monkeypatch, env, extra, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=message):
        distributed.check_engine(parse_args(["--model", "m", "--data", "d.json", *extra]))


def test_fsdp_loads_into_host_memory_and_accepts_perft(monkeypatch):
    args = parse_args(["--model", "m", "--data", "d.json", "--device", "cuda:0"])
    assert distributed.load_device("cuda:0") == "cuda:0"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    distributed.check_engine(args)  # FSDP2 + PERFT + our activation checkpointing: accepted
    assert distributed.load_device("cuda:0") == "cpu"  # fully_shard then moves each rank's shard to its GPU
