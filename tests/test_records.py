"""LLM-Adapters rows: validation and reporting, the prompt template, the SFT data set, the shipped demo data."""

import json

import pytest

from perft_qlora.formats.demo_data import demo_data_path, generate_demo_rows
from perft_qlora.formats.prompts import RESPONSE_MARKER, format_prompt, response_text
from perft_qlora.formats.records import DataError, read_records
from perft_qlora.training.data import split_validation, to_prompt_completion


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def test_malformed_rows_are_skipped_and_reported_with_row_numbers(tmp_path):
    rows = [
        {"instruction": "ok", "input": "", "output": "fine", "answer": "a"},
        {"instruction": "", "output": "x"},                      # 2: empty instruction
        ["not", "an", "object"],                                  # 3: wrong type
        {"instruction": "q", "input": 5, "output": "z"},         # 4: input not a string
        {"instruction": "q", "output": "   "},                   # 5: blank output
        {"instruction": "also ok", "output": "y", "answer": 7},  # numeric answer is accepted
    ]
    records = read_records(_write(tmp_path / "d.json", rows))
    assert [r["instruction"] for r in records.rows] == ["ok", "also ok"]
    assert records.rows[1]["answer"] == "7" and records.rows[1]["input"] == ""
    assert [n for n, _ in records.skipped] == [2, 3, 4, 5]
    report = records.report()
    assert "2 rows used, 4 skipped" in report
    assert "row 4: field 'input' must be a string" in report and "row 5: missing or empty 'output'" in report


def test_jsonl_rows_are_numbered_by_line_and_bad_json_is_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{broken\n{"instruction": "c"}\n')
    records = read_records(str(path))
    assert len(records.rows) == 1
    assert [n for n, _ in records.skipped] == [3, 4]
    assert "not valid JSON" in records.skipped[0][1]


def test_required_fields_follow_the_use(tmp_path):
    path = _write(tmp_path / "t.json", [{"instruction": "q", "answer": "true"}, {"instruction": "q", "output": "o"}])
    assert len(read_records(path, required=("instruction", "answer")).rows) == 1
    assert len(read_records(path, required=("instruction", "output")).rows) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"instruction": "", "output": ""}], "no usable rows"),
        ({"rows": []}, "expected a list of objects"),
    ],
)
def test_unusable_sources_are_clear_errors(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read_records(_write(tmp_path / "bad.json", content))


def test_missing_file_and_wrong_type_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.json"))
    other = tmp_path / "d.csv"
    other.write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(str(other))
    with pytest.raises(DataError, match="is a directory"):
        read_records(str(tmp_path))


def test_prompt_template_matches_llm_adapters():
    plain = format_prompt("Add 1 and 2.")
    assert plain.startswith("Below is an instruction that describes a task. Write a response")
    assert plain.endswith("### Instruction:\nAdd 1 and 2.\n\n### Response:\n")
    with_input = format_prompt("Add.", "1 and 2", "3")
    assert "paired with an input" in with_input and "### Input:\n1 and 2\n\n### Response:\n3" in with_input
    assert format_prompt("x", "   ") == format_prompt("x")  # a blank input is no input
    assert response_text(format_prompt("q", response="the correct answer is true ")) == "the correct answer is true"
    assert response_text(f"echo {RESPONSE_MARKER} a {RESPONSE_MARKER} b") == "b"


def test_prompt_completion_dataset_and_validation_split(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    dataset = to_prompt_completion(read_records(_write(tmp_path / "d.json", rows)), "alpaca")
    assert dataset[3]["prompt"] + dataset[3]["completion"] == format_prompt("q3", response="a3")
    assert dataset[3]["completion"] == "\na3"  # the split falls right after "### Response:"
    train, val = split_validation(dataset, 3)
    assert len(train) == 7 and len(val) == 3
    assert set(train["completion"]).isdisjoint(val["completion"])
    again_train, _ = split_validation(dataset, 3)
    assert again_train["completion"] == train["completion"]  # seeded: the same split every time
    assert split_validation(dataset, 0) == (dataset, None)
    with pytest.raises(DataError, match="leaves no training rows"):
        split_validation(dataset, 10)


def test_shipped_demo_data_is_what_the_generator_makes():
    train, test = generate_demo_rows()
    for split, rows in (("train", train), ("test", test)):
        with open(demo_data_path(split)) as handle:
            assert json.load(handle) == rows
    texts = lambda rows: {r["input"].lower() for r in rows}  # noqa: E731
    assert texts(train).isdisjoint(texts(test))
    for row in train + test:
        assert row["answer"] == ("false" if row["input"].isupper() else "true")  # written in small letters?
        assert row["output"] == f"the correct answer is {row['answer']}"
    assert 0.35 < sum(r["answer"] == "true" for r in train) / len(train) < 0.65
