"""The second pass of one-line errors (issue 23 items 4 and 5): every numeric train option in range, ``--config``
files that do not parse or hold a wrong type, a base ``config.json`` that disagrees with its weights, a damaged or
code-holding checkpoint on ``--resume``, adapters whose config disagrees with their own safetensors header (every
entry point), and an error during training printed as the last line, after the progress bar.

Each case: exit status 1, exactly one ``error:`` line, last, naming the fix; "before loading" is asserted by
``no_loading`` (``load_model`` fails the test) or, for the loader's own check, by weights that cannot be read."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_errors import single_error
from transformers import TrainerCallback

from perft_qlora import PerftConfig, attach_perft, load_adapter, load_model, save_adapter
from perft_qlora.analysis import analyze
from perft_qlora.cli import DEBUG_ENV, error_path
from perft_qlora.errors import UsageError
from perft_qlora.evaluation import evaluate
from perft_qlora.method.adapter_bank import AdapterBank
from perft_qlora.method.checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from perft_qlora.quant import loader
from perft_qlora.training import train
from perft_qlora.training.option_values import NUMBER_RULES
from perft_qlora.training.train_options import DEMO_PRESETS, TrainOptions, make_parser, parse_args

BASE = ["--data", DEMO_PRESETS["data"], "--val-size", "0", "--batch-size", "4", "--max-length", "64",
        "--logging-steps", "1", "--warmup-steps", "0", "--bottleneck", "8"]
SHAPE = ["--num-experts", "4", "--top-k", "2"]


@pytest.fixture
def no_loading(monkeypatch):
    """``load_model`` fails the test, wherever an entry point takes it from."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (train, evaluate, loader):
        monkeypatch.setattr(module, "load_model", must_not_load)
    monkeypatch.delenv(DEBUG_ENV, raising=False)


# ---- numeric options: one table -------------------------------------------------------------------------------

OPTION_CASES = [  # (argv, expected text); each value argparse accepts but torch, TRL or the Trainer would not
    (["--learning-rate", "nan"], "--learning-rate must be a number > 0, got nan"),
    (["--learning-rate=-1e-5"], "--learning-rate must be a number > 0, got -1e-05"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--grad-accum", "0", "--global-batch-size", "8"], "--grad-accum must be >= 1, got 0"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1, got 0"),
    (["--epochs", "inf"], "--epochs must be a number > 0, got inf"),
    (["--max-steps", "0"], "--max-steps must be >= 1, or -1 to run --epochs, got 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a number >= 0 (0: no clipping), got nan"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--save-total-limit", "0"], "--save-total-limit must be >= 1"),
    (["--alpha", "nan"], "--alpha must be a number > 0"),
    (["--adapter-dropout", "nan"], "--adapter-dropout must be in [0, 1), got nan"),
    (["--aux-loss-coef", "-1"], "--aux-loss-coef must be a number >= 0"),
    (["--base-aux-loss-coef", "inf"], "--base-aux-loss-coef must be a number >= 0"),
    (["--val-size", "-1"], "--val-size must be >= 0"),
    (["--gpu-memory-limit", "nan"], "--gpu-memory-limit must be a positive number of GiB, got nan"),
    (["--save-steps", "0"], "--save-steps must be >= 1, got 0"),
]


@pytest.mark.parametrize("extra, expected", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_out_of_range_options_end_as_one_line_before_loading(extra, expected, tiny_checkpoint, tmp_path, no_loading,
                                                             capsys):
    line = single_error(capsys, train.main, ["--model", tiny_checkpoint("olmoe"), *BASE, "--output-dir",
                                             str(tmp_path / "out"), *extra])
    assert expected in line and "leave the option out for its default" in line, line
    assert not (tmp_path / "out").exists()


def test_every_numeric_option_has_a_rule():
    """A new int/float option must join NUMBER_RULES (or be one PerftConfig checks, naming it the same way)."""
    checked_by_perft_config = {"num_experts", "top_k", "bottleneck"}
    numeric = {a.dest for a in make_parser()._actions if a.type in (int, float)}
    assert set(NUMBER_RULES) <= set(TrainOptions.__dataclass_fields__)
    assert numeric - checked_by_perft_config == set(NUMBER_RULES)


def test_options_built_in_python_are_checked_by_run_too(tmp_path, no_loading):
    import dataclasses

    options = dataclasses.replace(parse_args(["--demo", "--output-dir", str(tmp_path / "o")]), learning_rate=-1.0)
    with pytest.raises(UsageError, match="--learning-rate must be a number > 0"):
        train.run(options)


# ---- --config files ---------------------------------------------------------------------------------------------

CONFIG_CASES = [  # (file name, bytes, expected text)
    ("run.yaml", b"bottleneck: [8]\n", "bottleneck in {path} is [8]; it takes an integer"),
    ("run.yaml", b"bottleneck: 8\n  learning_rate: [\n", "is not valid YAML at line 2, column"),
    ("run.json", b'{"bottleneck": 8,}', "is not valid JSON"),
    ("run.yaml", b"overwrite: 3\n", "overwrite in {path} is 3; it takes true or false"),
    ("run.yaml", b"learning_rate: fast\n", "learning_rate in {path} is 'fast'; it takes a number"),
    ("run.yaml", b"batch_size: 8.5\n", "batch_size in {path} is 8.5; it takes an integer"),
    ("run.yaml", b"layers: [0, x]\n", "it takes a list of integers"),
    ("run.yaml", b"variant: nope\n", "it takes one of perft, perft_e, perft_d, perft_s, lora"),
    ("run.yaml", b"learning_rate: .nan\n", "--learning-rate must be a number > 0, got nan"),
    ("run.yaml", b"\xff\xfebottleneck: 8\n", "is not UTF-8 text"),
]


@pytest.mark.parametrize("name, content, expected", CONFIG_CASES, ids=[c[1].decode("latin-1") for c in CONFIG_CASES])
def test_bad_config_file_is_one_line(name, content, expected, tiny_checkpoint, tmp_path, no_loading, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    line = single_error(capsys, train.main, ["--model", tiny_checkpoint("olmoe"), *BASE, "--output-dir",
                                             str(tmp_path / "out"), "--config", str(path)])
    assert expected.format(path=path) in line, line
    assert "Traceback" not in line


def test_config_file_values_take_the_options_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning-rate: 1e-4\nbatch_size: 8\nlayers: [0, 1]\nreport_to: tensorboard\nresume: true\n"
                    "completion_only_loss: false\nmodel: m\ndata: d.json\n")
    options = parse_args(["--config", str(path)])
    assert (options.learning_rate, options.batch_size, options.layers) == (1e-4, 8, (0, 1))
    assert options.report_to == ("tensorboard",) and options.resume == "last" and options.completion_only_loss is False


# ---- a base config.json that is not its weights' --------------------------------------------------------------

def _header_only(directory) -> None:
    """Cut ``model.safetensors`` to its header: any tensor read would fail ("ended early")."""
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])


@pytest.mark.parametrize("change, expected", [
    ({"hidden_size": 32}, "model.embed_tokens.weight is [260, 64], the config makes it [260, 32]"),
    ({"num_experts": 4}, "model.layers.0.mlp.gate.weight is [8, 64], the config makes it [4, 64]"),
    ({"num_hidden_layers": 1}, "the weights hold 2 decoder layers, the config says num_hidden_layers 1"),
    ({"intermediate_size": 32}, "model.layers.0.mlp.experts.0.gate_proj.weight is [64, 64], the config makes it [32, 64]"),
])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_config_json_that_disagrees_with_the_weights_is_one_line_before_any_weight(command, change, expected,
                                                                                   tiny_checkpoint, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("olmoe"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    _header_only(model)
    if command == "train":
        argv = ["--model", str(model), *BASE, "--output-dir", str(tmp_path / "out")]
    else:
        argv = ["--model", str(model), "--tasks", "demo", "--output-dir", str(tmp_path / "eval")]
    line = single_error(capsys, {"train": train.main, "evaluate": evaluate.main}[command], argv)
    assert f"config.json of {model} does not match its weights: {expected}" in line, line
    assert "put back the checkpoint's own config.json" in line


def test_the_weights_check_passes_a_matching_checkpoint(tiny_checkpoint):
    from transformers import AutoConfig

    from perft_qlora.quant.weights_check import weight_mismatches

    for family in ("olmoe", "mixtral", "deepseek_v3"):
        directory = tiny_checkpoint(family)
        assert weight_mismatches(directory, AutoConfig.from_pretrained(directory)) == []


# ---- adapters against their own header, at every entry point --------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    model, _ = load_model(tiny_checkpoint("olmoe"), quantize="none", device="cpu", progress=False)
    attach_perft(model, PerftConfig(variant="perft", num_experts=2, top_k=1, bottleneck=4), dtype=torch.float32)
    return save_adapter(model, str(tmp_path_factory.mktemp("adapter") / "perft"))


def _lying(adapter, tmp_path, how: str) -> str:
    """A copy of ``adapter`` whose config no longer describes its weights."""
    copy = tmp_path / how
    shutil.copytree(adapter, copy)
    meta = json.loads((copy / CONFIG_NAME).read_text())
    if how == "billion-experts":
        meta["perft"]["num_experts"] = 10**9
    elif how == "wider-bottleneck":
        meta["perft"]["bottleneck"] = 64
    elif how == "mixed-dtypes":
        state = load_file(str(copy / WEIGHTS_NAME))
        first = min(state)
        save_file({**state, first: state[first].to(torch.bfloat16)}, str(copy / WEIGHTS_NAME), metadata={"format": "pt"})
    (copy / CONFIG_NAME).write_text(json.dumps(meta))
    return str(copy)


LIES = [("billion-experts", "the config makes it (1000000000, 4, 64)"), ("wider-bottleneck", "the config makes it (2, 64, 64)"),
        ("mixed-dtypes", "holds layer 0's tensors in ['BF16', 'F32']")]


@pytest.mark.parametrize("how, expected", LIES, ids=[c[0] for c in LIES])
def test_adapter_config_against_its_header_at_every_entry_point(how, expected, adapter, tiny_checkpoint, tiny_nf4,
                                                               tmp_path, no_loading, monkeypatch, capsys):
    lying = _lying(adapter, tmp_path, how)
    fix = "re-save or re-copy the adapter (both files)"
    # evaluate and analyze: one line, before the base loads
    line = single_error(capsys, evaluate.main, ["--model", tiny_checkpoint("olmoe"), "--adapter", lying, "--tasks",
                                                "demo", "--output-dir", str(tmp_path / "eval")])
    assert expected in line and fix in line, line
    line = single_error(capsys, analyze.main, ["--model", tiny_checkpoint("olmoe"), "--adapter", lying,
                                               "--out", str(tmp_path / "report")])
    assert expected in line and fix in line and not (tmp_path / "report").exists(), line
    # Python load_adapter and the app's add-adapter path: refused before attaching (10^9 experts would not fit)
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=re.escape(expected)):
        load_adapter(model, lying)
    assert getattr(model, "perft_config", None) is None
    bank = AdapterBank(model)
    with pytest.raises(AdapterError, match="re-save or re-copy the adapter"):
        bank.register("liar", lying)
    assert not bank.entries and getattr(bank.model, "perft_config", None) is None


# ---- --resume: the checkpoint checked before loading ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """A finished two-step run with checkpoints 1 and 2, and the argv that made it."""
    out = tmp_path_factory.mktemp("trained") / "out"
    argv = ["--model", tiny_checkpoint("olmoe"), *BASE, "--output-dir", str(out), "--max-steps", "2", "--save-steps",
            "1"]
    train.run(parse_args([*argv, *SHAPE]))
    return out, argv


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def _damage(checkpoint, how: str) -> None:
    if how == "truncated state":
        state = checkpoint / "trainer_state.json"
        state.write_text(state.read_text()[:40])
    elif how == "optimizer holds code":
        torch.save({"state": {}, "param_groups": [], "x": _Payload()}, checkpoint / "optimizer.pt")
    elif how == "rng state holds code":
        torch.save(_Payload(), checkpoint / "rng_state.pth")
    elif how == "truncated optimizer":
        path = checkpoint / "optimizer.pt"
        path.write_bytes(path.read_bytes()[:100])
    elif how == "garbage optimizer":
        (checkpoint / "optimizer.pt").write_bytes(b"state")  # torch.load raises IndexError on these bytes
    elif how == "billion-experts adapter":
        meta = json.loads((checkpoint / CONFIG_NAME).read_text())
        meta["perft"]["num_experts"] = 10**9
        (checkpoint / CONFIG_NAME).write_text(json.dumps(meta))


RESUME_CASES = [  # (damage, extra options on the resuming command, expected text)
    ("truncated state", [], "trainer_state.json is damaged"),
    ("optimizer holds code", [], "optimizer.pt holds code, not tensors (it would call print): refused"),
    ("rng state holds code", [], "rng_state.pth holds code, not tensors"),
    ("truncated optimizer", [], "optimizer.pt is damaged"),
    ("garbage optimizer", [], "optimizer.pt is damaged"),
    ("billion-experts adapter", [], "the config makes it (1000000000, 8, 64)"),
    (None, [*SHAPE, "--bottleneck", "4"], "was trained with other adapter options than this run's (--bottleneck 8 -> 4"),
    (None, ["--variant", "perft_d", "--num-experts", "4"], "--variant perft -> perft_d"),
    (None, ["--variant", "lora"], "was trained with a PERFT variant"),
]


@pytest.mark.parametrize("how, extra, expected", RESUME_CASES, ids=[c[0] or " ".join(c[1]) for c in RESUME_CASES])
def test_resume_checkpoint_checked_before_loading(how, extra, expected, trained, tmp_path, no_loading, capsys):
    out, argv = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    if how is not None:
        _damage(copy / "checkpoint-2", how)
    argv = [a if a != str(out) else str(copy) for a in argv]
    line = single_error(capsys, train.main, [*argv, *(extra or SHAPE), "--resume"])
    assert expected in line, line
    assert "weights_only" not in line and "this ran" not in capsys.readouterr().out
    if how is not None and how != "billion-experts adapter":
        assert "resume from an earlier checkpoint (--resume <its directory>)" in line


def test_resume_with_another_base_is_refused_from_its_config_json(trained, tiny_checkpoint, tmp_path, no_loading,
                                                                  capsys):
    out, argv = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    argv = [a if a != str(out) else str(copy) for a in argv]
    argv[argv.index("--model") + 1] = tiny_checkpoint("qwen3_moe")
    line = single_error(capsys, train.main, [*argv, *SHAPE, "--resume"])
    assert "was trained for model_type='olmoe'" in line and "pass the base model it was trained on" in line


# ---- an error during training: the last line, after the bar ---------------------------------------------------

class _FailAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise UsageError("disk full while training (test)")


def test_an_error_during_training_is_the_last_line_after_the_progress_bar(tiny_checkpoint, tmp_path, capsys):
    from tqdm.std import tqdm

    options = parse_args(["--model", tiny_checkpoint("olmoe"), *BASE, "--output-dir", str(tmp_path / "out"),
                          "--max-steps", "4", "--save-steps", "100"])
    with pytest.raises(SystemExit) as exit_info, error_path():
        train.run(options, callbacks=[_FailAt()])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "train:" in err  # the bar was drawn
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "error: disk full while training (test)", lines[-3:]
    assert sum("error:" in line for line in lines) == 1
    assert not list(getattr(tqdm, "_instances", ())), "a bar left open is redrawn after the error"


def test_the_apps_command_line_adapters_are_checked_before_the_base_loads(adapter, tiny_checkpoint, tmp_path):
    from transformers import AutoConfig

    from perft_qlora.app import check_adapters

    lying = _lying(adapter, tmp_path, "billion-experts")
    usable, errors = check_adapters({"good": adapter, "liar": lying},
                                    AutoConfig.from_pretrained(tiny_checkpoint("olmoe")))
    assert usable == {"good": adapter} and "the config makes it (1000000000, 4, 64)" in errors["liar"]
    usable, errors = check_adapters({"good": adapter}, AutoConfig.from_pretrained(tiny_checkpoint("qwen3_moe")))
    assert not usable and "was trained for model_type='olmoe'" in errors["good"]
