"""Every bad input to the command lines ends in one ``error:`` line and a non-zero exit, before any model is
loaded (``load_model`` is replaced by a function that fails the test); Ctrl-C and ``--debug`` behave as
documented in ``perft_qlora/cli.py``; bitsandbytes' CPU notice is filtered in the entry points only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from perft_qlora import PerftConfig, attach_perft, load_model, save_adapter
from perft_qlora.cli import BNB_CPU_LOGGER, DEBUG_ENV
from perft_qlora.errors import UsageError
from perft_qlora.evaluation import evaluate
from perft_qlora.method.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from perft_qlora.training import train
from perft_qlora.training.train_options import DEMO_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_loading(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train, "load_model", must_not_load)
    monkeypatch.setattr(evaluate, "load_model", must_not_load)
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def single_error(capsys, main, argv) -> str:
    """Run ``main(argv)``; assert exit status 1, exactly one ``error: …`` line, last, and no traceback; return it.

    (Lines before it are the run's normal reports, e.g. the data file's row counts.)"""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 1, captured.err
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], captured.err
    assert lines[-1].startswith("error: ") and "Traceback" not in captured.err + captured.out, captured.err
    return lines[-1]


def _rows_file(tmp_path, content) -> str:
    path = tmp_path / "rows.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.fixture
def train_argv(tiny_checkpoint, tmp_path):
    def make(*extra, model=None, data=None):
        return ["--model", model or tiny_checkpoint("olmoe"), "--data", data or DEMO_PRESETS["data"],
                "--output-dir", str(tmp_path / "out"), *extra]

    return make


def _dir_with(tmp_path, name, files: dict) -> str:
    directory = tmp_path / name
    directory.mkdir()
    for filename, text in files.items():
        (directory / filename).write_text(text)
    return str(directory)


TRAIN_CASES = [  # (id, how to build the argv, expected text in the error line)
    ("missing data", lambda a, t: a(data=str(t / "nope.json")), "data file"),
    ("malformed data", lambda a, t: a(data=_rows_file(t, "[{oops")), "is not valid JSON"),
    ("no usable row", lambda a, t: a(data=_rows_file(t, [{"instruction": "x"}, {"output": 3}])), "no usable rows in"),
    ("val-size too large", lambda a, t: a("--val-size", "100000"), "--val-size"),
    ("num-experts 0", lambda a, t: a("--num-experts", "0"), "--num-experts (M) >= 1, got 0"),
    ("top-k > num-experts", lambda a, t: a("--num-experts", "2", "--top-k", "3"), "--top-k (K') <= --num-experts"),
    ("bottleneck 0", lambda a, t: a("--bottleneck", "0"), "--bottleneck (DB) must be >= 1"),
    ("lora rank 0", lambda a, t: a("--variant", "lora", "--bottleneck", "0"), "LoRA rank"),
    ("layers out of range", lambda a, t: a("--layers", "0,7"), "--layers [0, 7]: olmoe has decoder layers 0..1"),
    ("model dir without config.json", lambda a, t: a(model=_dir_with(t, "empty", {})), "no config.json in"),
    ("model dir missing", lambda a, t: a(model=str(t / "no-such-model")), "no such directory"),
    ("non-MoE model", lambda a, t: a(model=_dir_with(t, "llama", {"config.json": '{"model_type": "llama"}'})),
     "is a 'llama' model, not a supported mixture-of-experts family"),
    ("corrupt config.json", lambda a, t: a(model=_dir_with(t, "bad", {"config.json": "{"})), "is not a JSON object"),
    ("output dir is a file", lambda a, t: a("--output-dir", _rows_file(t, "[]")), "is a file"),
    ("resume without checkpoint", lambda a, t: a("--resume"), "no checkpoint-* directory"),
    ("checkpoints off the evaluations", lambda a, t: a("--eval-steps", "2", "--save-steps", "15"),
     "--save-steps 15 is not a multiple of --eval-steps 2"),
    ("eval-steps 0", lambda a, t: a("--eval-steps", "0"), "--eval-steps must be >= 1, got 0"),
]


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_base_balance_loss_refused_where_the_config_has_no_num_experts(family, train_argv, tiny_checkpoint, no_loading,
                                                                       capsys):
    # TRL's balance loss reads config.num_experts, which these configs lack: refuse before loading, not crash in TRL.
    line = single_error(capsys, train.main, train_argv("--variant", "perft_e", "--base-aux-loss-coef", "0.01",
                                                       model=tiny_checkpoint(family)))
    assert f"--base-aux-loss-coef 0.01: {family} has no Switch balance loss" in line
    assert "config.num_experts" in line and "leave --base-aux-loss-coef out" in line


@pytest.mark.parametrize("case, build, expected", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_is_one_error_line_before_loading(case, build, expected, train_argv, tmp_path, no_loading,
                                                          capsys):
    line = single_error(capsys, train.main, build(train_argv, tmp_path))
    assert expected in line, line


def test_training_rows_all_unusable_mention_the_rows(train_argv, tmp_path, no_loading, capsys):
    # The one line joins the report: the reason for each skipped row is still there.
    line = single_error(capsys, train.main, train_argv(data=_rows_file(tmp_path, [{"output": "x"}])))
    assert "row 1: missing or empty 'instruction'" in line


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    model, _ = load_model(tiny_checkpoint("olmoe"), quantize="none", device="cpu", progress=False)
    attach_perft(model, PerftConfig(variant="perft", num_experts=2, top_k=1, bottleneck=4))
    return save_adapter(model, str(tmp_path_factory.mktemp("adapter") / "perft"))


def _damaged(adapter_dir, tmp_path, how: str) -> str:
    copy = tmp_path / how
    shutil.copytree(adapter_dir, copy)
    weights, config = copy / WEIGHTS_NAME, copy / CONFIG_NAME
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "padded":
        weights.write_bytes(weights.read_bytes() + b"\0" * 8)
    elif how == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif how == "no-weights":
        weights.unlink()
    elif how == "bad-config":
        config.write_text("{ not json")
    elif how == "bad-perft":
        meta = json.loads(config.read_text())
        config.write_text(json.dumps({**meta, "perft": {**meta["perft"], "top_k": 9}}))
    return str(copy)


@pytest.mark.parametrize("how, expected", [
    ("truncated", "is truncated"), ("padded", "is too long"), ("garbage", "is not a valid safetensors file"),
    ("no-weights", "is missing"), ("bad-config", "is corrupt"), ("bad-perft", "invalid 'perft' section"),
])
def test_evaluate_damaged_adapter_is_one_error_line_before_loading(how, expected, adapter_dir, tiny_checkpoint,
                                                                   tmp_path, no_loading, capsys):
    argv = ["--model", tiny_checkpoint("olmoe"), "--adapter", _damaged(adapter_dir, tmp_path, how), "--tasks", "demo",
            "--output-dir", str(tmp_path / "eval")]
    assert expected in single_error(capsys, evaluate.main, argv)


def test_evaluate_model_without_config_json(tmp_path, no_loading, capsys):
    empty = _dir_with(tmp_path, "empty", {})
    line = single_error(capsys, evaluate.main, ["--model", empty, "--tasks", "demo", "--output-dir", str(tmp_path / "o")])
    assert f"no config.json in {empty}" in line


def test_debug_shows_the_traceback(train_argv, tmp_path, no_loading, monkeypatch):
    with pytest.raises(UsageError, match="--num-experts"):
        train.main(train_argv("--num-experts", "0", "--debug"))
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UsageError, match="--num-experts"):
        train.main(train_argv("--num-experts", "0"))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_says_what_was_saved_and_how_to_resume(train_argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model", _interrupt)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("interrupted")]
    assert exit_info.value.code == 130 and lines == [lines[0]] and "no checkpoint written yet" in lines[0]
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").write_text("{}")  # complete: its last file is in
    with pytest.raises(SystemExit):
        train.main(train_argv("--resume"))
    err = capsys.readouterr().err
    assert f"resuming from {tmp_path / 'out' / 'checkpoint-3'}" in err
    assert f"interrupted: the last checkpoint is {tmp_path / 'out' / 'checkpoint-3'}; continue with the same " \
           "command plus --resume" in err
    monkeypatch.setattr(evaluate, "load_model", _interrupt)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "m", "--tasks", "demo", "--output-dir", str(tmp_path / "eval")])
    assert exit_info.value.code == 130 and "interrupted: finished rows are in" in capsys.readouterr().err


@pytest.mark.slow  # two fresh interpreters importing torch / transformers: ~45 s on a loaded 2-core machine
def test_bitsandbytes_notice_is_filtered_by_entry_points_only():
    env = {**os.environ, "PYTHONPATH": ROOT}
    shown = subprocess.run([sys.executable, "-m", "perft_qlora.train", "--help"], capture_output=True, text=True,
                           env=env, timeout=120, check=True)
    assert "kernels-community" not in shown.stderr + shown.stdout and "--template" in shown.stdout
    probe = ("import logging, perft_qlora, perft_qlora.quant.loader; "
             f"print(len(logging.getLogger('{BNB_CPU_LOGGER}').filters))")
    library = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                             check=True)
    assert library.stdout.strip() == "0"  # importing the library leaves bitsandbytes' logging alone


def _parsers():
    from perft_qlora.bench import kernels as bench_kernels
    from perft_qlora.bench import train as bench_train
    from perft_qlora.exporting import export
    from perft_qlora.training.train_options import make_parser

    return {"train": make_parser(), "evaluate": evaluate.make_parser(), "bench train": bench_train.make_parser(),
            "bench kernels": bench_kernels.make_parser(), "export": export.make_parser()}


@pytest.mark.parametrize("command", ["train", "evaluate", "bench train", "bench kernels", "export"])
def test_every_option_has_help_and_states_its_default_once(command):
    parser = _parsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest in ("help", "only"):  # bench train --only is internal (suppressed)
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"{command} {action.option_strings} has no help"
        assert text.count("default:") <= 1, f"{command} {action.option_strings}: {text!r}"
        if not (action.default is None or action.default is False or action.default == []):
            assert "default:" in text, f"{command} {action.option_strings} does not state its default: {text!r}"
    no_device = ("bench kernels", "export")  # export runs on the CPU
    device = next(a for a in parser._actions if a.dest == "device") if command not in no_device else None
    if device is not None:  # one wording everywhere
        assert "(default: cuda when available, else cpu)" in formatter._expand_help(device)


def test_bench_kernels_smoke_sets_the_interpreter_itself(monkeypatch):
    import torch

    from perft_qlora.bench.__main__ import _interpret_triton_on_cpu

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _interpret_triton_on_cpu("kernels", ["--models", "olmoe"])
    assert "TRITON_INTERPRET" not in os.environ  # only --smoke, which is the one that runs on a CPU
    _interpret_triton_on_cpu("kernels", ["--smoke"])
    assert os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.slow  # Triton's interpreter on tiny shapes: ~25 s on a loaded 2-core machine
def test_bench_kernels_smoke_runs_on_cpu_without_setup():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "perft_qlora.bench", "kernels", "--smoke", "--parts", "adapter"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stderr and "Triton interpreter" in done.stdout


def test_bench_errors_are_one_line(capsys):
    from perft_qlora.bench.__main__ import COMMANDS
    from perft_qlora.bench.__main__ import main as bench_main

    assert bench_main(["nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: unknown command 'nope'; choose from {', '.join(COMMANDS)}"]
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["train", "--steps", "0"])
    assert exit_info.value.code != 0 and "error: --steps must be >= 1" in str(exit_info.value.code) + capsys.readouterr().err


def test_evaluate_uses_the_adapters_template_and_warns_on_override(adapter_dir, tmp_path, capsys):
    trained = tmp_path / "alpaca-adapter"
    shutil.copytree(adapter_dir, trained)
    meta = json.loads((trained / CONFIG_NAME).read_text())
    (trained / CONFIG_NAME).write_text(json.dumps({**meta, "extra": {"training": {"template": "alpaca"}}}))
    adapters = {"plain": adapter_dir, "clean": str(trained)}
    assert evaluate.choose_templates(None, adapters) == {"base": "released", "plain": "released", "clean": "alpaca"}
    assert capsys.readouterr().err == ""
    assert evaluate.choose_templates("released", adapters) == {"base": "released", "plain": "released",
                                                               "clean": "released"}
    assert capsys.readouterr().err.strip().splitlines() == [(
        "warning: adapter clean was trained with the 'alpaca' template; evaluating it with 'released' as "
        "--template asks")]


def test_demo_with_bad_knobs_writes_nothing(tmp_path, no_loading, capsys):
    out = tmp_path / "demo"
    line = single_error(capsys, train.main, ["--demo", "--output-dir", str(out), "--num-experts", "4", "--top-k", "5"])
    assert "--top-k (K') <= --num-experts (M=4); got 5" in line and not out.exists()
