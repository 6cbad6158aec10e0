"""``python -m perft_qlora.evaluate``: batched generation, an end-to-end run on a tiny NF4 model, resume, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from perft_qlora import PerftConfig, attach_perft, iter_perft_blocks, load_model, save_adapter
from perft_qlora.evaluation import evaluate, task_runner
from perft_qlora.evaluation.generate import generate_batch
from perft_qlora.evaluation.predictions import FIELDS
from perft_qlora.evaluation.tasks import TASKS
from perft_qlora.method.checkpoint import CONFIG_NAME, WEIGHTS_NAME

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def _randomize_experts(model) -> None:
    """Non-zero PEFT experts (``up`` starts at zero), so the adapter changes what the model generates."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, block in iter_perft_blocks(model):
            for param in block.perft_experts.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def saved_adapter(tiny_checkpoint, tmp_path_factory):
    """A PERFT adapter (own top-2-of-4 router) for the tiny OLMoE with random weights, saved with save_adapter."""
    model, _ = load_model(tiny_checkpoint("olmoe"), device="cpu", progress=False)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=8))
    _randomize_experts(model)
    return save_adapter(model, str(tmp_path_factory.mktemp("eval") / "perft"))


def _read_predictions(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "predictions.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _args(model, output_dir, *extra) -> list[str]:
    return ["--model", model, "--data-dir", FIXTURES, "--output-dir", str(output_dir), "--greedy", *extra]


# --- generate_batch ----------------------------------------------------------------------------------------


def test_generate_batch_left_padding_matches_unbatched(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint("olmoe"), quantize="none", dtype=torch.float32, device="cpu")
    tokenizer.padding_side = "right"
    prompts = ["Is ice cold?", "A much longer prompt that forces padding of the short one", "x"]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=6)
    single = [generate_batch(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored
    assert all(len(text) > 0 and not text.startswith(prompt) for text, prompt in zip(batched, prompts))
    beams = generate_batch(model, tokenizer, prompts[:2], max_new_tokens=3, num_beams=2)
    assert len(beams) == 2 and all(isinstance(text, str) for text in beams)
    assert generate_batch(model, tokenizer, [], max_new_tokens=3) == []
    with pytest.raises(ValueError):
        generate_batch(model, tokenizer, prompts, max_new_tokens=0)


def test_batched_generation_with_a_perft_router(tiny_checkpoint):
    """Left-padded batches through a trainable PERFT router (the balance-loss hook sees the padded, cached
    mask) give each prompt the continuation it gets alone, and the adapter changes what is generated."""
    model, tokenizer = load_model(tiny_checkpoint("olmoe"), quantize="none", dtype=torch.float32, device="cpu")
    prompts = ["Is ice cold?", "A much longer prompt that forces padding of the short one", "x"]
    plain = generate_batch(model, tokenizer, prompts, max_new_tokens=6)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=8), dtype=torch.float32)
    _randomize_experts(model)
    model.eval()
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=6)
    single = [generate_batch(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert batched != plain


# --- end to end on the tiny NF4 model --------------------------------------------------------------------


def test_end_to_end_tiny_nf4(tiny_checkpoint, saved_adapter, tmp_path, capsys, monkeypatch):
    model_dir, out = tiny_checkpoint("olmoe"), tmp_path / "out"
    run = ["--adapter", f"perft={saved_adapter}", "--tasks", "boolq,gsm8k", "--limit", "2", "--batch-size", "2",
           "--max-new-tokens", "6"]  # math would generate 256 tokens per row
    summary = evaluate.main(_args(model_dir, out, *run))
    assert "row 3: missing or empty 'answer'" in capsys.readouterr().out  # malformed rows reported, run goes on
    records = _read_predictions(out)
    assert len(records) == 2 * 2 * 2  # models x tasks x rows
    for record in records:
        assert set(FIELDS) <= set(record)
        task = TASKS[record["task"]]
        assert record["response"].startswith("the correct answer is" if task.family == "commonsense" else "")
        assert record["extracted"] == task.extract(record["response"])
        assert record["correct"] == task.is_correct(record["extracted"], record["gold"])
        prefix = "the correct answer is" if task.name == "boolq" else ""
        assert record["prompt"].endswith("### Response:\n" + " " * 16 + prefix)  # the released template
    by_model = {label: [r["generated"] for r in records if r["model"] == label] for label in ("base", "perft")}
    assert by_model["base"] != by_model["perft"]  # the adapter was active for its rows, and only for them
    for label in ("base", "perft"):
        for task in ("boolq", "gsm8k"):
            result = summary["results"][label][task]
            rows = [r for r in records if r["model"] == label and r["task"] == task]
            assert [r["row"] for r in rows] == [0, 1] and result["total"] == 2
            assert result["correct"] == sum(r["correct"] for r in rows)
    assert summary["results"]["base"]["boolq"]["skipped_rows"] == 2
    assert summary["decoding"]["protocol"] == "perft" and summary["decoding"]["num_beams"] == 1
    assert summary["decoding"]["template"] == {"base": "released", "perft": "released"}  # adapter: none recorded
    assert summary["decoding"]["families"]["math"]["max_new_tokens"] == 6
    assert summary["model"] == model_dir and summary["adapters"] == {"perft": saved_adapter}
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "results.md").read_text()
    assert table.startswith("| model | boolq | gsm8k | commonsense avg | math avg | avg |") and "| perft |" in table
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary files left

    # Resuming the finished run generates nothing and changes nothing.
    calls = []
    monkeypatch.setattr(task_runner, "generate_batch", lambda *a, **k: calls.append(a) or [])
    again = evaluate.main(_args(model_dir, out, *run, "--resume"))
    assert calls == [] and again["results"] == summary["results"] and len(_read_predictions(out)) == 8


# --- scoring, adapter switching and resume, with the model and generation faked ----------------------------


class FakeGeneration:
    """Stands in for generate_batch: answers each fixture question with its gold output, or wrongly."""

    def __init__(self, wrong_for: str | None = None):
        self.prompts: list[str] = []
        self.wrong_for = wrong_for
        self.current_adapter = None
        self.answers = {}
        for task in TASKS.values():
            if task.source is None and os.path.isdir(os.path.join(FIXTURES, task.directory)):
                with open(task.test_source(FIXTURES)) as handle:
                    for row in json.load(handle):
                        self.answers[row["instruction"]] = (task, row.get("output", ""))

    def __call__(self, model, tokenizer, prompts, max_new_tokens, num_beams):
        self.prompts += prompts
        texts = []
        for prompt in prompts:
            instruction = prompt.split("### Instruction:\n")[1].split("\n\n")[0].strip()  # released: indented
            task, output = self.answers[instruction]
            if task.family == "commonsense":
                output = output.removeprefix("the correct answer is")
            texts.append("nothing useful" if self.current_adapter == self.wrong_for else output)
        return texts


@pytest.fixture
def fake(monkeypatch, saved_adapter):
    generation = FakeGeneration(wrong_for=saved_adapter)
    events = []

    def attach_saved_adapter(model, directory):
        events.append(("load", directory))
        generation.current_adapter = directory
        return model

    def detach_adapter(model):
        events.append(("detach", generation.current_adapter))
        generation.current_adapter = None
        return model

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: events.append(("load_model", a[0])) or (None, None))
    monkeypatch.setattr(evaluate, "attach_saved_adapter", attach_saved_adapter)
    monkeypatch.setattr(evaluate, "detach_adapter", detach_adapter)
    monkeypatch.setattr(task_runner, "generate_batch", generation)
    generation.events = events
    return generation


def test_scoring_and_adapter_switching(fake, saved_adapter, tmp_path):
    summary = evaluate.main(_args("tiny", tmp_path, "--adapter", saved_adapter, "--tasks", "all", "--batch-size", "3"))
    assert fake.events == [("load_model", "tiny"), ("load", saved_adapter), ("detach", saved_adapter)]
    base, adapter = summary["results"]["base"], summary["results"][os.path.basename(saved_adapter)]
    assert set(base) == set(TASKS) - {"demo"}
    assert all(result["accuracy"] == 1.0 for result in base.values())  # gold outputs score 100%, AQuA included
    assert all(result["accuracy"] == 0.0 and result["invalid"] == result["total"] for result in adapter.values())
    assert summary["averages"]["base"] == {"all": 1.0, "commonsense": 1.0, "math": 1.0}
    assert base["boolq"]["total"] == 3 and base["gsm8k"]["total"] == 2  # malformed fixture rows skipped
    assert len(fake.prompts) == 2 * sum(result["total"] for result in base.values())


def test_resume_skips_finished_rows_and_redoes_a_cut_line(fake, tmp_path):
    evaluate.main(_args("tiny", tmp_path, "--tasks", "piqa,svamp", "--limit", "1"))
    assert len(fake.prompts) == 2
    with pytest.raises(SystemExit):
        evaluate.main(_args("tiny", tmp_path, "--tasks", "piqa,svamp"))  # would mix runs without --resume
    fake.prompts.clear()
    evaluate.main(_args("tiny", tmp_path, "--tasks", "piqa,svamp", "--limit", "2", "--resume"))
    assert len(fake.prompts) == 2 and all("Solution1: spoon" in p or "Half of 7" in p for p in fake.prompts)
    # A crash while writing the last row leaves half a line: resume drops it and redoes exactly that row.
    path = tmp_path / "predictions.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    fake.prompts.clear()
    summary = evaluate.main(_args("tiny", tmp_path, "--tasks", "piqa,svamp", "--resume"))
    assert len(fake.prompts) == 1 and "Half of 7" in fake.prompts[0]
    records = _read_predictions(tmp_path)
    assert sorted((r["task"], r["row"]) for r in records) == [("piqa", 0), ("piqa", 1), ("svamp", 0), ("svamp", 1)]
    assert summary["results"]["base"]["svamp"] == {"accuracy": 1.0, "correct": 2, "total": 2, "invalid": 0,
                                                    "skipped_rows": 0}


def test_resume_refuses_other_settings(fake, tmp_path, capsys):
    evaluate.main(_args("tiny", tmp_path, "--tasks", "piqa", "--limit", "1"))
    with pytest.raises(SystemExit):
        evaluate.main(_args("tiny", tmp_path, "--tasks", "piqa", "--resume", "--protocol", "llm-adapters"))
    assert "cannot --resume with different settings" in capsys.readouterr().err


# --- bad inputs: rejected before any model is loaded -------------------------------------------------------


@pytest.fixture
def mismatched_adapter(saved_adapter, tmp_path):
    directory = tmp_path / "wrong-size"
    directory.mkdir()
    with open(os.path.join(saved_adapter, CONFIG_NAME)) as handle:
        metadata = json.load(handle)
    (directory / CONFIG_NAME).write_text(json.dumps({**metadata, "hidden_size": 4096}))
    shutil.copy(os.path.join(saved_adapter, WEIGHTS_NAME), directory / WEIGHTS_NAME)
    return str(directory)


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "boolq,mmlu"], "unknown task(s) mmlu"),
    (["--tasks", "boolq", "--data-dir", "/nonexistent"], "test file for boolq not found"),
    (["--tasks", "piqa", "--test-file", "boolq=x.json"], "--test-file given for boolq"),
    (["--tasks", "piqa", "--test-file", "piqa"], "expects TASK=SOURCE"),
    (["--tasks", "piqa", "--test-file", "piqa=/nonexistent/test.json"], "not found: /nonexistent/test.json"),
    (["--tasks", "piqa", "--adapter", "/nonexistent/adapter"], "adapter directory /nonexistent/adapter does not exist"),
    (["--tasks", "piqa", "--adapter", FIXTURES], "is not an adapter directory"),
    (["--tasks", "piqa", "--adapter", "MISMATCH"], "hidden_size"),
    (["--tasks", "piqa", "--adapter", f"base={FIXTURES}"], "reserved"),
    (["--tasks", "piqa", "--no-base"], "nothing to evaluate"),
    (["--tasks", "piqa", "--limit", "0"], "must be a positive integer"),
    (["--tasks", "piqa", "--max-new-tokens", "-1"], "must be a positive integer"),
    (["--tasks", "piqa", "--protocol", "lm-eval"], "invalid choice"),
])
def test_bad_inputs_rejected_before_loading(extra, message, tiny_checkpoint, mismatched_adapter, tmp_path,
                                            monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(evaluate, "load_model", must_not_load)
    extra = [mismatched_adapter if item == "MISMATCH" else item for item in extra]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(_args(tiny_checkpoint("olmoe"), tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert message in err
    if exit_info.value.code == 2:  # argparse's own checks (types, choices): its usage line + error line
        assert "invalid choice" in message or "positive integer" in message
    else:  # ours: exactly one line
        assert exit_info.value.code == 1 and err.splitlines() == [f"error: {err.splitlines()[0][7:]}"], err


def test_missing_model_directory_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(_args("./no-such-model", tmp_path, "--tasks", "demo"))
    assert "--model ./no-such-model: no such directory" in capsys.readouterr().err


def test_command_line_entry_point_reports_errors():
    result = subprocess.run([sys.executable, "-m", "perft_qlora.evaluate", "--model", "m", "--tasks", "nope"],
                            capture_output=True, text=True, timeout=120, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: unknown task(s) nope; choose")
    assert "kernels-community" not in result.stderr and "Traceback" not in result.stderr
