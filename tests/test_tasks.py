"""The task table, test-file layout and loading, and the evaluation protocols."""

from __future__ import annotations

import json
import os

import pytest

from perft_qlora.evaluation.extract import INVALID
from perft_qlora.evaluation.protocol import COMMONSENSE_PREFIX, PROTOCOLS, scored_response
from perft_qlora.evaluation.tasks import GROUPS, TASKS, TaskError, load_test_set, resolve_tasks
from perft_qlora.formats.demo_data import demo_data_path

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")

# The paper's tasks with their LLM-Adapters folder and released test-set size (../shared/docs/perft-method.md).
PAPER_TASKS = {
    "boolq": ("boolq", 3270), "piqa": ("piqa", 1838), "siqa": ("social_i_qa", 1954),
    "hellaswag": ("hellaswag", 10042), "winogrande": ("winogrande", 1267), "arc-e": ("ARC-Easy", 2376),
    "arc-c": ("ARC-Challenge", 1172), "obqa": ("openbookqa", 500), "addsub": ("AddSub", 395),
    "multiarith": ("MultiArith", 600), "singleeq": ("SingleEq", 508), "gsm8k": ("gsm8k", 1319),
    "aqua": ("AQuA", 254), "svamp": ("SVAMP", 1000),
}


def test_table_holds_the_paper_tasks_and_the_demo():
    assert set(TASKS) == set(PAPER_TASKS) | {"demo"}
    for name, (directory, rows) in PAPER_TASKS.items():
        assert (TASKS[name].directory, TASKS[name].test_rows) == (directory, rows)
    assert set(GROUPS["commonsense"]) | set(GROUPS["math"]) == set(PAPER_TASKS)
    assert len(GROUPS["commonsense"]) == 8 and len(GROUPS["math"]) == 6
    assert all(TASKS[t].family == "commonsense" for t in GROUPS["commonsense"])
    assert all(TASKS[t].family == "math" for t in GROUPS["math"])
    assert {TASKS[t].answer for t in GROUPS["math"]} == {"number", "letter"}
    assert TASKS["aqua"].answer == "letter" and TASKS["boolq"].labels == ("true", "false")
    for protocol in PROTOCOLS.values():
        assert {task.family for task in TASKS.values()} <= set(protocol.families)


@pytest.mark.parametrize("spec, expected", [
    ("boolq,piqa", ["boolq", "piqa"]),
    ("PIQA, boolq ,piqa", ["piqa", "boolq"]),  # case, spaces, duplicates
    ("ARC-Easy,social_i_qa,openbookqa", ["arc-e", "siqa", "obqa"]),  # LLM-Adapters folder names
    ("math", list(GROUPS["math"])),
    ("gsm8k,commonsense", ["gsm8k", *GROUPS["commonsense"]]),
    ("all", list(GROUPS["commonsense"] + GROUPS["math"])),
    (["demo", "aqua,svamp"], ["demo", "aqua", "svamp"]),
])
def test_resolve_tasks(spec, expected):
    assert [task.name for task in resolve_tasks(spec)] == expected


@pytest.mark.parametrize("spec, message", [("boolq,mmlu,xyz", "mmlu, xyz"), ("", "no task given"), (" , ", "no task")])
def test_resolve_tasks_rejects(spec, message):
    with pytest.raises(TaskError, match=message) as error:
        resolve_tasks(spec)
    assert "commonsense" in str(error.value)  # the message lists what can be chosen


def test_test_source_layout(tmp_path):
    assert TASKS["arc-c"].test_source("dataset") == os.path.join("dataset", "ARC-Challenge", "test.json")
    (tmp_path / "arc-easy").mkdir()  # a folder that differs only in case is found
    assert TASKS["arc-e"].test_source(str(tmp_path)) == os.path.join(str(tmp_path), "arc-easy", "test.json")
    assert TASKS["demo"].test_source("anything") == demo_data_path("test")


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_fixtures_follow_the_layout_and_outputs_score_as_gold(name):
    """Each fixture file sits where the table says, and its reference outputs extract to the gold answer."""
    task = TASKS[name]
    test_set = load_test_set(task, task.test_source(FIXTURES))
    assert test_set.source == os.path.join(FIXTURES, task.directory, "test.json")
    assert len(test_set.rows) >= 2
    for row in test_set.rows:
        extracted = task.extract(row["output"])
        assert extracted != INVALID and task.is_correct(extracted, row["answer"]), row


def test_malformed_rows_are_skipped_and_reported():
    test_set = load_test_set(TASKS["boolq"], TASKS["boolq"].test_source(FIXTURES))
    assert [row["answer"] for row in test_set.rows] == ["true", "false", "true"]
    assert len(test_set.skipped) == 2
    report = test_set.report()
    assert "3 rows used, 2 skipped" in report
    assert "row 3: missing or empty 'answer'" in report
    assert "'maybe' is not one of true|false" in report
    gsm8k = load_test_set(TASKS["gsm8k"], TASKS["gsm8k"].test_source(FIXTURES))
    assert len(gsm8k.rows) == 2 and "'n/a' is not a number" in gsm8k.report()


def test_demo_test_set_scores_its_own_outputs():
    test_set = load_test_set(TASKS["demo"], TASKS["demo"].test_source("unused"))
    assert len(test_set.rows) == TASKS["demo"].test_rows and not test_set.skipped
    assert {row["answer"] for row in test_set.rows} == {"true", "false"}
    assert all(TASKS["demo"].extract(row["output"]) == row["answer"] for row in test_set.rows)


def test_missing_and_unusable_test_files(tmp_path):
    with pytest.raises(TaskError, match=r"not found: .*ARC-Challenge.*test\.json.*--data-dir.*--test-file arc-c="):
        load_test_set(TASKS["arc-c"], TASKS["arc-c"].test_source(str(tmp_path)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "answer": "perhaps"}]))
    with pytest.raises(TaskError, match="no scorable rows for boolq"):
        load_test_set(TASKS["boolq"], str(bad))
    bad.write_text("{not json")
    with pytest.raises(TaskError, match="not valid JSON"):
        load_test_set(TASKS["boolq"], str(bad))


def test_jsonl_test_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"instruction": "2+2?", "answer": 4}) + "\nnot json\n")
    test_set = load_test_set(TASKS["gsm8k"], str(path))
    assert test_set.rows[0]["answer"] == "4" and test_set.skipped == ["row 2: not valid JSON (Expecting value)"]


def test_protocols_build_the_released_prompts():
    row = {"instruction": "Is ice cold?", "input": ""}
    perft, llm_adapters = PROTOCOLS["perft"].with_template("alpaca"), PROTOCOLS["llm-adapters"].with_template("alpaca")
    expected_end = "### Instruction:\nIs ice cold?\n\n### Response:\nthe correct answer is"
    assert perft.prompt("commonsense", row).endswith(expected_end)
    assert perft.prompt("math", row).endswith("### Response:\n")
    assert llm_adapters.prompt("commonsense", row).endswith("### Response:\n")
    assert (perft.decoding("commonsense").max_new_tokens, perft.decoding("math").max_new_tokens) == (4, 256)
    assert llm_adapters.decoding("commonsense").max_new_tokens == 32
    assert perft.num_beams == llm_adapters.num_beams == 4
    assert perft.with_beams(1).num_beams == 1 and perft.num_beams == 4
    assert perft.to_dict()["families"]["commonsense"]["response_prefix"] == COMMONSENSE_PREFIX
    prompt = perft.prompt("commonsense", {"instruction": "q", "input": "context"})
    assert "### Input:\ncontext" in prompt
    assert scored_response(prompt, " true</s>") == "the correct answer is true</s>"
    short = perft.with_max_new_tokens(6)
    assert {d.max_new_tokens for d in short.families.values()} == {6} and perft.decoding("math").max_new_tokens == 256
    assert short.decoding("commonsense").response_prefix == COMMONSENSE_PREFIX
    with pytest.raises(ValueError):
        perft.with_beams(0)
