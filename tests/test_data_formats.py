"""Training data in every format: detection, bad rows, files, and the tokens TRL trains (labels inspected)."""

import json
import shutil

import pyarrow
import pyarrow.parquet
import pytest
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from perft_qlora.errors import UsageError
from perft_qlora.formats.conversations import read_examples
from perft_qlora.formats.detect import parse_fields
from perft_qlora.formats.sources import DataError
from perft_qlora.quant.loader import load_tokenizer
from perft_qlora.training.data import fit_to_length, load_training_data
from perft_qlora.training.demo_base import demo_base_dir
from perft_qlora.training.loss_mask import IGNORE, resolve_loss, token_labels, training_chat_template
from perft_qlora.training.train import main

# A small ChatML-style template with {% generation %} spans, which TRL's assistant_only_loss masks by; the demo
# tokenizer's EOS ends each turn, inside the span, so the model learns to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{{ m['content'] }}{{ eos_token }}\n{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS = "<|endoftext|>"
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it big?"},
         {"role": "assistant", "content": "yes it is"}, {"role": "user", "content": "Sure?"},
         {"role": "assistant", "content": "no"}]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]), "value": t["content"]}
            for t in TURNS]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), str(path))
    elif path.suffix == ".csv":
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(row[k] for k in keys) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """The demo base with the test chat template saved beside it, its tokenizer, and the model (for SFTTrainer)."""
    directory = tmp_path_factory.mktemp("chat-base")
    shutil.copytree(demo_base_dir(), directory, dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(directory))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return str(directory), load_tokenizer(str(directory)), AutoModelForCausalLM.from_pretrained(str(directory))


def trained_spans(ids, labels, tokenizer):
    """The decoded runs of trained tokens."""
    spans, run = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE and run:
            spans.append(run)
            run = []
        elif label != IGNORE:
            run.append(token)
    return [tokenizer.decode(span) for span in spans + ([run] if run else [])]


CASES = {  # name: (file name, rows, --loss-on, trained spans expected)
    "messages": ("m.jsonl", [{"messages": TURNS}], "auto", [f"yes it is{EOS}\n", f"no{EOS}\n"]),
    "sharegpt": ("s.json", [{"conversations": SHAREGPT}], "auto", [f"yes it is{EOS}\n", f"no{EOS}\n"]),
    "prompt-completion": ("p.parquet", [{"prompt": "Q: hi", "completion": " A: yo"}], "auto", [f" A: yo{EOS}"]),
    "conversational prompt-completion": (
        "c.jsonl", [{"prompt": TURNS[:2], "completion": TURNS[2:3]}], "auto", [f"yes it is{EOS}\n"]),
    "text": ("t.csv", [{"text": "hello there"}], "auto", [f"hello there{EOS}"]),
    "messages, loss on all": ("a.jsonl", [{"messages": TURNS[1:3]}], "all", None),
    "llm-adapters (the recipe: all)": (
        "l.json", [{"instruction": "Say yes.", "input": "", "output": "yes"}], "auto", None),
    "llm-adapters, completion": (
        "l.json", [{"instruction": "Say yes.", "input": "", "output": "yes"}], "completion",
        [f"\n                yes{EOS}"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trl_trains_exactly_the_tokens_expected(case, chat_base, tmp_path):
    """Each format from its file, through TRL's own dataset preparation: the labels it builds put the loss on the
    assistant turns (every one), the completion or everything, and ``token_labels`` predicts them exactly."""
    _, tokenizer, model = chat_base
    name, rows, loss_on, expected = CASES[case]
    data = load_training_data(write(tmp_path / name, rows * 3), loss_on=loss_on)
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_length=256, report_to=[], use_cpu=True,
                       completion_only_loss=data.loss == "completion", assistant_only_loss=data.loss == "assistant")
    trainer = SFTTrainer(model, args=config, train_dataset=data.dataset, processing_class=tokenizer)
    prepared = trainer.train_dataset[0]
    ids, labels = token_labels(data.dataset[0], tokenizer, data.loss, training_chat_template(tokenizer, data.loss))
    assert (prepared["input_ids"], prepared["labels"]) == (ids, labels)
    first = 2 if name.endswith(".csv") else 1  # CSV rows are numbered by line, after the header
    assert len(trainer.train_dataset) == 3 and data.origins == [(str(tmp_path / name), first + n) for n in range(3)]
    if expected is None:  # the whole sequence
        assert labels == ids
    else:
        assert trained_spans(ids, labels, tokenizer) == expected


def test_formats_are_detected_and_fields_mapped(tmp_path):
    assert read_examples(write(tmp_path / "a.jsonl", [{"conversations": SHAREGPT}])).rows == [{"messages": TURNS}]
    mapped = write(tmp_path / "q.json", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(DataError, match="answer, question: map yours with --data-fields"):
        read_examples(mapped)
    fields = parse_fields("prompt=question,completion=answer")
    examples = read_examples(mapped, fields=fields)
    assert examples.format == "prompt-completion" and examples.rows == [{"prompt": "Q?", "completion": "A."}]
    with pytest.raises(DataError, match="not a field we read"):
        parse_fields("question=prompt")
    with pytest.raises(DataError, match="FIELD=COLUMN"):
        parse_fields("prompt")


def test_bad_rows_are_listed_by_number_and_skipped(tmp_path):
    rows = [
        {"messages": TURNS},                                                          # 1: fine
        {"messages": [{"role": "user", "content": "hi"}]},                            # 2: no assistant turn
        {"messages": [{"role": "bot", "content": "hi"}, TURNS[2]]},                   # 3: unknown role
        {"messages": [{"role": "user", "content": " "}, TURNS[2]]},                   # 4: empty content
        {"messages": [{"role": "user", "content": 7}, TURNS[2]]},                     # 5: not a string
        {"text": "a text row"},                                                       # 6: another format
        {"messages": TURNS[1:3]},                                                     # 7: fine
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    examples = read_examples(str(path))
    assert examples.numbers == [1, 7] and [n for n, _ in examples.skipped] == [2, 3, 4, 5, 6, 8]
    report = examples.report()
    for expected in ("row 2: no assistant turn", "row 3: turn 1: unknown role 'bot'", "row 4: turn 1: empty content",
                     "row 5: turn 1: content must be a string, got int", "row 6: a text row in a messages source",
                     "row 8: not valid JSON"):
        assert expected in report
    mixed = write(tmp_path / "pc.json", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
                                         {"prompt": TURNS[:2], "completion": TURNS[2:3]}])
    assert read_examples(mixed).skipped == [
        (3, "conversational prompt-completion row among prompt-completion rows (one source, one format)")]
    half = write(tmp_path / "h.json", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    assert read_examples(half).skipped == [(2, "missing 'completion' (prompt-completion format)")]
    with pytest.raises(DataError, match=r"no usable rows in .* \(read as text rows"):
        read_examples(write(tmp_path / "e.json", [{"text": ""}, {"text": 3}]))


def test_files_that_are_not_utf8_or_not_json_are_one_clear_error(tmp_path):
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"text": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 0xe9 on line 1 \(it looks like"):
        read_examples(str(latin))
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes('{"text": "x"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="is UTF-16 text, not UTF-8"):
        read_examples(str(utf16))
    broken = tmp_path / "b.json"
    broken.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match="not valid JSON .*line 2"):
        read_examples(str(broken))
    lines_as_json = tmp_path / "l.json"  # JSON lines saved as .json are read as JSON lines
    lines_as_json.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_examples(str(lines_as_json)).rows == [{"text": "a"}, {"text": "b"}]


def test_sources_are_concatenated_when_they_share_a_format(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"messages": TURNS}])
    b = write(tmp_path / "b.parquet", [{"conversations": SHAREGPT}] * 2)
    data = load_training_data(f"{a},{b}")
    assert len(data.dataset) == 3 and data.loss == "assistant" and data.origins[-1] == (b, 2)
    with pytest.raises(DataError, match="must share a format"):
        load_training_data(f"{a},{write(tmp_path / 't.csv', [{'text': 'x'}])}")


def test_loss_choices_follow_the_format():
    assert resolve_loss("conversation", "auto") == "assistant"
    assert resolve_loss("prompt-completion", "auto") == "completion"
    assert resolve_loss("text", "auto") == "all"
    assert resolve_loss("prompt-completion", "auto", llm_adapters=True) == "all"  # the recipe, unchanged
    assert resolve_loss("prompt-completion", "auto", True, llm_adapters=True) == "completion"
    with pytest.raises(UsageError, match="--loss-on assistant does not apply to text rows"):
        resolve_loss("text", "assistant")
    with pytest.raises(UsageError, match="disagree"):
        resolve_loss("prompt-completion", "all", True, llm_adapters=True)
    assert resolve_loss("conversation", "auto", True) == "assistant"  # --demo's --completion-only-loss on chats
    with pytest.raises(UsageError, match="pass --no-completion-only-loss"):
        resolve_loss("text", "auto", True)


def test_rows_whose_trained_part_is_cut_away_are_listed_and_an_empty_set_is_one_error(chat_base, tmp_path, capsys):
    _, tokenizer, _ = chat_base
    rows = [{"prompt": "short", "completion": " yes"}, {"prompt": "a much longer prompt " * 4, "completion": " no"}]
    data = load_training_data(write(tmp_path / "p.jsonl", rows))
    kept, report = fit_to_length(data, tokenizer, max_length=12)
    assert len(kept.dataset) == 1 and kept.origins == [(str(tmp_path / "p.jsonl"), 1)]
    assert [(number, start > 12) for _, number, start in report.dropped] == [(2, True)]
    assert "row 2: the trained part starts at token" in report.drop_report(12)
    # The case: the demo at a --max-length its prompts fill ends in one line, not a sampler traceback.
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--output-dir", str(tmp_path / "demo"), "--max-length", "40"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no usable rows: 256 rows skipped: --max-length 40 cuts away") and \
        "raise --max-length" in err[-1]


def test_conversations_without_a_chat_template_are_refused_naming_the_option(tmp_path, capsys):
    data = write(tmp_path / "m.jsonl", [{"messages": TURNS}])
    with pytest.raises(SystemExit):
        main(["--model", demo_base_dir(), "--data", data, "--output-dir", str(tmp_path / "o"), "--show-example", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: conversation rows need a chat template") and "--chat-template" in err[-1]


def test_show_example_marks_every_assistant_turn_and_exits(chat_base, tmp_path, capsys):
    directory, _, _ = chat_base
    data = write(tmp_path / "m.jsonl", [{"messages": TURNS[1:3]}, {"messages": TURNS}])
    main(["--model", directory, "--data", data, "--output-dir", str(tmp_path / "o"), "--show-example", "2"])
    out = capsys.readouterr().out
    assert "m.jsonl row 2 (messages rows, loss on assistant):\n<|im_start|>system\nBe brief." in out
    assert f"[[yes it is{EOS}\n]]" in out and f"[[no{EOS}\n]]" in out and out.split("\n---")[0].count("[[") == 2
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_a_conversation_file_trains_with_the_short_run_warnings_said_first(chat_base, tmp_path, capsys):
    """A user's own run: the warm-up and loss-mask warnings and the thread count come before training; the adapter
    records the format and the loss."""
    directory, _, _ = chat_base
    long_system = {"role": "system", "content": "You answer questions about texts, briefly and exactly. " * 3}
    rows = [{"messages": [long_system, {"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": "y" if i % 2 == 0 else "n"}]} for i in range(8)]
    out = tmp_path / "run"
    data = write(tmp_path / "m.jsonl", rows)
    main(["--model", directory, "--data", data, "--output-dir", str(out), "--device", "cpu",
          "--max-steps", "2", "--val-size", "0", "--batch-size", "4", "--logging-steps", "1", "--save-steps", "100"])
    err = capsys.readouterr().err
    assert "m.jsonl: 8 rows used, 0 skipped" in err and "cpu: 1 thread for this 128-wide model" in err
    assert "warning: --warmup-steps 100 is longer than the run (2 steps)" in err
    assert "warning: the loss is on " in err and "% of the tokens (24 of " in err  # "y", EOS, newline per row
    assert err.index("warning: the loss") < err.index("adapter saved to")
    with open(out / "adapter" / "perft_config.json") as handle:
        training = json.load(handle)["extra"]["training"]
    assert (training["data_format"], training["loss_on"]) == ("messages", "assistant")
