"""``evaluate --data [NAME=]FILE --match ...``: a user's own test set, each matcher, the same summary and predictions."""

from __future__ import annotations

import json

import pytest

from perft_qlora.evaluation import evaluate, task_runner
from perft_qlora.evaluation.extract import INVALID
from perft_qlora.evaluation.own_data import normalize, parse_match, split_data_spec
from perft_qlora.evaluation.tasks import TaskError

CASES = [  # (match, response, gold, extracted, correct)
    ("exact", " Paris. ", "paris", "paris", True),
    ("exact", "Paris, France", "Paris", "paris, france", False),
    ("exact", "", "Paris", INVALID, False),
    ("contains", "It is Paris, France.", "paris", "it is paris, france", True),
    ("contains", "Lyon", "Paris", "lyon", False),
    ("regex:answer: (\\w+)", "so the answer: Blue!", "blue", "blue", True),
    ("regex:\\d+", "I count 12 sheep", "12", "12", True),
    ("regex:answer: (\\w+)", "no idea", "blue", INVALID, False),
    ("choice", "a guess: B, not A", "B", "b", True),
    ("choice", "all of them", "C", INVALID, False),  # "a" in "all" is not option A: whole words, capitals
    ("choice:yes,no,maybe", "Maybe, or no.", "maybe", "maybe", True),
]


@pytest.mark.parametrize("spec, response, gold, extracted, correct", CASES)
def test_matchers(spec, response, gold, extracted, correct):
    rule = parse_match(spec).rule
    found = rule.extract(response, ())
    assert found == extracted and rule.matches(found, gold) == correct


def test_choice_skips_rows_whose_answer_is_not_an_option_and_bad_specs_are_refused():
    rule = parse_match("choice").rule
    assert rule.gold_problem("B", ()) is None and "not one of the choices" in rule.gold_problem("F", ())
    for spec, message in [("regex:(", "not a valid regular expression"), ("fuzzy", "is not one of"),
                          ("choice:A", "is not one of"), ("exact:x", "is not one of")]:
        with pytest.raises(TaskError, match=message):
            parse_match(spec)
    assert normalize("  The  Answer. ") == "the answer"


def test_data_names(tmp_path):
    path = tmp_path / "my-qa.jsonl"
    path.write_text("")
    assert split_data_spec(str(path)) == ("my-qa", str(path))
    assert split_data_spec(f"Mine={path}") == ("mine", str(path))
    with pytest.raises(TaskError, match="built-in tasks"):
        split_data_spec(f"boolq={path}")


ROWS = [("Capital of France?", "", "Paris"), ("2+2?", "", "4"), ("Pick one", "A) red B) blue", "B"),
        ("Colour of the sky?", "", "blue"), ("Largest planet?", "", "Jupiter")]
ANSWERS = {"Capital of France?": "Paris.", "2+2?": "It is 4", "Pick one": "B", "Colour of the sky?": "answer: blue",
           "Largest planet?": "Saturn"}


@pytest.fixture
def own_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": i, "input": x, "answer": a}) + "\n" for i, x, a in ROWS))
    return path


@pytest.fixture
def scripted(monkeypatch):
    """No model: generation answers each instruction from ANSWERS (the prompt's released-template bytes)."""
    prompts = []

    def generate(model, tokenizer, batch, max_new_tokens, num_beams, **options):
        prompts.extend(batch)
        return [ANSWERS[p.split("### Instruction:\n")[1].split("\n")[0].strip()] for p in batch]

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(task_runner, "generate_batch", generate)
    return prompts


@pytest.mark.parametrize("match, correct", [("exact", [1, 0, 1, 0, 0]), ("contains", [1, 1, 1, 1, 0]),
                                           ("regex:(\\w+)\\W*$", [1, 1, 1, 1, 0])])
def test_own_test_set_is_scored_into_summary_and_predictions(own_file, scripted, tmp_path, match, correct):
    out = tmp_path / "eval"
    summary = evaluate.main(["--model", "tiny", "--data", str(own_file), "--match", match, "--output-dir", str(out)])
    assert summary["tasks"] == ["mine"] and summary["match"] == {"mine": match}  # no paper task unless --tasks
    assert summary["results"]["base"]["mine"]["correct"] == sum(correct) and summary["results"]["base"]["mine"]["total"] == 5
    assert summary["decoding"]["families"]["math"]["response_prefix"] == ""  # free generation, nothing pre-filled
    with open(out / "predictions.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["correct"] for r in records] == [bool(c) for c in correct] and records[0]["gold"] == "Paris"
    assert json.loads((out / "summary.json").read_text())["results"]["base"]["mine"]["total"] == 5
    assert "| mine |" in (out / "results.md").read_text()
    assert len(scripted) == 5


def test_choice_rows_not_among_the_options_are_listed(own_file, scripted, tmp_path, capsys):
    summary = evaluate.main(["--model", "tiny", "--data", f"quiz={own_file}", "--match", "choice", "--output-dir",
                             str(tmp_path / "eval")])
    assert summary["results"]["base"]["quiz"] == {**summary["results"]["base"]["quiz"], "total": 1, "correct": 1,
                                                 "skipped_rows": 4}
    assert "quiz (" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--match", "exact"], "--match scores a test file of your own"),
    (["--tasks", "mytask", "--test-file", "mytask=x.json"], "for a test set of your own: --data NAME=FILE"),
    (["--data", "missing.jsonl"], "no such file missing.jsonl"),
])
def test_bad_own_data_options_end_in_one_line_before_loading(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--model", "tiny", "--output-dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and message in err[0]
