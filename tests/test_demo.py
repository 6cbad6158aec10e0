"""The shipped pre-trained demo base, the demo task it never saw, and `train --demo` taking it past 90%."""

import json
import os
import random

import pytest

from perft_qlora import load_model
from perft_qlora.formats.demo_corpus import DEMO_FAMILY, FAMILIES, TEMPLATES, pretraining_example
from perft_qlora.quant.nf4_experts import NF4Experts
from perft_qlora.training.demo import DemoReport, demo_rows, held_out_accuracy, prepare_demo_base
from perft_qlora.training.demo_base import MANIFEST, check, demo_base_dir
from perft_qlora.training.train import run
from perft_qlora.training.train_options import parse_args

CHANCE = 0.5  # true / false


def test_shipped_base_matches_its_manifest_and_size_limits():
    assert check() == []
    directory = demo_base_dir()
    weights = os.path.join(directory, "model.safetensors")
    assert os.path.getsize(weights) <= 20 * 2**20
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    assert config["model_type"] == "olmoe" and config["num_experts_per_tok"] == 2 and config["num_experts"] >= 8
    assert config["hidden_size"] % 64 == 0 and config["intermediate_size"] % 64 == 0
    with open(os.path.join(directory, MANIFEST)) as handle:
        record = json.load(handle)
    assert record["pretraining_seconds"] > 0 and record["machine"]


def test_check_notices_a_changed_file(tmp_path):
    directory = prepare_demo_base(str(tmp_path))
    with open(os.path.join(demo_base_dir(), MANIFEST)) as handle:
        (tmp_path / "base" / MANIFEST).write_text(handle.read())
    assert check(directory) == []
    with open(os.path.join(directory, "tokenizer.json"), "a") as handle:
        handle.write(" ")
    assert check(directory) == [f"tokenizer.json: sha256 differs from {MANIFEST}"]


def test_shipped_base_loads_with_nf4_experts():
    model, tokenizer = load_model(demo_base_dir(), device="cpu", progress=False)
    assert all(isinstance(layer.mlp.experts, NF4Experts) for layer in model.model.layers)
    assert tokenizer(" true", add_special_tokens=False).input_ids != tokenizer(" false", add_special_tokens=False).input_ids


def test_the_demo_question_is_not_in_the_pretraining_corpus():
    rng = random.Random(0)
    instructions = {pretraining_example(rng)[0] for _ in range(2000)}
    demo = DEMO_FAMILY(random.Random(1))["instruction"]
    assert not any(demo in prompt for prompt in instructions)
    assert all(demo != family(random.Random(1))["instruction"] for family in FAMILIES.values())
    assert set(TEMPLATES) == {"alpaca", "released_train", "released_eval"}


def test_report_table_and_next_commands():
    report = DemoReport(0.05, 0.95, 40, 1234, 61.0, "out/base", "out/adapter")
    text = report.table()
    assert "5.0%" in text and "95.0%" in text and "1,234" in text and "out/adapter" in text
    commands = report.next_commands("out")
    assert "python -m perft_qlora.evaluate --model out/base --adapter out/adapter --tasks demo" in commands
    assert "python -m perft_qlora.app --demo --demo-dir out" in commands  # runs from any directory
    assert ("python -m perft_qlora.generate --model out/base --adapter out/adapter 'Is the following text written in "
            "small letters? Answer format: true/false' --input 'hello world'") in commands


@pytest.mark.slow
def test_demo_takes_the_base_from_chance_to_90_percent(tmp_path):
    """The README's quick start, as is (seeded, CPU): base <= chance + 10 points, adapter >= 90% held out."""
    from perft_qlora.training.demo import run_demo

    report = run_demo(parse_args(["--demo", "--output-dir", str(tmp_path)]), run)
    assert report.rows == len(demo_rows()) == 40
    assert report.base_accuracy <= CHANCE + 0.10, report
    assert report.adapter_accuracy >= 0.90, report
    model, tokenizer = load_model(str(tmp_path / "base"), device="cpu", progress=False)
    assert held_out_accuracy(model, tokenizer, demo_rows(8))[0] <= 0.5  # the copied base is the untrained one
    app_answers_like_the_table(tmp_path)


def app_answers_like_the_table(demo_dir):
    """The app's chat path (``ChatModel``, as ``apps/compare.py --demo`` uses it): adapter right, base wrong."""
    from perft_qlora.evaluation.tasks import TASKS
    from perft_qlora.serving.chat import BASE, ChatModel, GenerationSettings

    chat = ChatModel.load(str(demo_dir / "base"), device="cpu")
    chat.register_adapter("demo", str(demo_dir / "adapter"))
    correct = {BASE: 0, "demo": 0}
    rows = demo_rows(8)
    for row in rows:
        for name in correct:
            *_, (history, _) = chat.respond(name, [], row["instruction"], GenerationSettings(16), context=row["input"])
            correct[name] += TASKS["demo"].extract(history[-1]["content"]) == row["answer"]
    assert correct["demo"] >= len(rows) - 1 and correct[BASE] <= 2, correct


@pytest.mark.slow
def test_the_demo_written_as_conversations_trains_through_chatml_to_90_percent(tmp_path):
    """Issue 24's proof: the demo task as ``messages`` rows, rendered by ``--chat-template chatml`` (the demo
    tokenizer has no chat template; ChatML's turns end with its EOS), loss on the assistant turns, scored through
    the recorded template as evaluate does: the base stays near chance, the adapter >= 90% held out."""
    from perft_qlora.formats.chat_templates import ChatTemplate, user_message
    from perft_qlora.formats.demo_data import demo_data_path

    with open(demo_data_path("train"), encoding="utf-8") as f:
        rows = json.load(f)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": user_message(row["instruction"], row["input"])},
        {"role": "assistant", "content": row["output"]}]}) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "out"
    report = run_demo_with(["--demo", "--data", str(data), "--chat-template", "chatml", "--output-dir", str(out)])
    assert report.base_accuracy <= CHANCE + 0.10, report
    assert report.adapter_accuracy >= 0.90, report
    with open(out / "adapter" / "perft_config.json", encoding="utf-8") as f:
        training = json.load(f)["extra"]["training"]
    assert training["data_format"] == "messages" and training["loss_on"] == "assistant"
    assert ChatTemplate.from_record(training).name == "chatml"


def run_demo_with(argv):
    from perft_qlora.training.demo import run_demo

    return run_demo(parse_args(argv), run)
