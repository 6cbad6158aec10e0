"""Answer extraction: a table of tricky generations per task family, scored by the released scripts' rules."""

from __future__ import annotations

import pytest

from perft_qlora.evaluation.extract import (
    INVALID,
    extract_first_label,
    extract_first_letter,
    extract_last_number,
    label_pattern,
    labels_match,
    numbers_match,
    parse_number,
)
from perft_qlora.evaluation.tasks import TASKS

# (task, scored response, expected extraction) — commonsense: the first label match, case-sensitive.
LABEL_CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "the correct answer is True", INVALID),  # case-sensitive, as released
    ("boolq", "the correct answer is", INVALID),  # no answer generated
    ("boolq", "", INVALID),
    ("boolq", "the correct answer is false, not true", "false"),  # several candidates: the first wins
    ("boolq", "true or false? false", "true"),
    ("boolq", "the correct answer is untrue", "true"),  # no word boundary in the released pattern
    ("boolq", "the correct answer is yes", INVALID),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "the correct answer is solution 1", INVALID),  # a space breaks the label
    ("piqa", "the correct answer is solution3", INVALID),
    ("piqa", "solution2solution1", "solution2"),
    ("siqa", "the correct answer is answer3", "answer3"),
    ("siqa", "answer5 then answer1", "answer5"),
    ("siqa", "the correct answer is Answer2", INVALID),
    ("arc-e", "the correct answer is answer6", INVALID),
    ("arc-c", "the correct answer is answer10", "answer1"),  # prefix of a longer token still matches
    ("arc-c", "the correct answer is answer4.", "answer4"),
    ("obqa", "the correct answer is answer2\n\n### Instruction:", "answer2"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "the correct answer is ending5", INVALID),
    ("hellaswag", "the correct answer is ending2.", "ending2"),
    ("hellaswag", "endings: ending3 or ending1", "ending3"),
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "option1option2", "option1"),
    ("winogrande", "the correct answer is option 1", INVALID),
    ("demo", "the correct answer is false", "false"),
]

# (task, scored response, expected extraction, gold, correct) — numeric math: last number, within 0.001.
NUMBER_CASES = [
    ("gsm8k", "3 + 4 = 7. The answer is 7.", "7.", "7.0", True),
    ("gsm8k", "The answer is 1,234.", "1234.", "1234.0", True),  # thousands separator
    ("gsm8k", "He pays $1,234.50 in total", "1234.50", "1234.5", True),
    ("gsm8k", "no numbers here", INVALID, "5", False),
    ("gsm8k", "", INVALID, "0", False),
    ("gsm8k", "The answer is 60%.", "60", "60", True),
    ("gsm8k", "$ 12.", "12.", "12", True),
    ("gsm8k", "version 2.5.1", "1", "2.5", False),  # "2.5" then "1": the last number wins
    ("gsm8k", "1e3 apples", "3", "1000", False),  # no scientific notation in the pattern
    ("gsm8k", "12 , 000 people", "000", "12000", False),  # spaced comma: two numbers
    ("gsm8k", "-0", "-0", "0", True),
    ("svamp", "The temperature is -5 degrees", "-5", "-5.0", True),  # negative
    ("svamp", "from 10 to -3", "-3", "-3.0", True),
    ("svamp", "3 - 5 = -2", "-2", "-2.0", True),  # spaced minus is an operator, "-2" a negative
    ("svamp", "The answer is 7 apples and 3 pears", "3", "7", False),  # several candidates: the last wins
    ("svamp", "Half of 7 is 3.5", "3.5", "3.5", True),  # decimal
    ("addsub", "5-3=2", "2", "2.0", True),
    ("addsub", "answer 7, as shown in step 2", "2", "7.0", False),
    ("addsub", "The answer is 8\n\n### Instruction:\nTom has 3", "3", "8.0", False),  # runs on into a new question
    ("multiarith", "about 0.3333", "0.3333", "0.333", True),  # within 0.001
    ("multiarith", "about 0.335", "0.335", "0.333", False),  # 0.002 off
    ("multiarith", "x is 4.0011", "4.0011", "4", False),  # just over the tolerance
    ("singleeq", "x = 3.0005", "3.0005", "3", True),
    ("singleeq", "1,000,000 people", "1000000", "1000000.0", True),
    ("singleeq", "The answer is 2,500.", "2500.", "2,500", True),  # comma in the gold answer too
    ("singleeq", "x=-7.25", "-7.25", "-7.25", True),
]

# (scored response, expected extraction, gold, correct) — AQuA: the first capital A-E anywhere.
LETTER_CASES = [
    ("The answer is (C).", "C", "C", True),
    ("So x = 8. The answer is (A).", "A", "A", True),
    ("Answer: (C)", "A", "C", False),  # the released rule picks the A of "Answer"
    ("Dividing by 2 gives 4. The answer is (B).", "D", "B", False),
    ("Both B and D look right", "B", "D", False),
    ("(b)", INVALID, "B", False),  # lower case does not count
    ("the answer is e", INVALID, "E", False),
    ("the answer is (F)", INVALID, "F", False),
    ("", INVALID, "A", False),
    ("the answer is (E) not (A)", "E", "E", True),
]


@pytest.mark.parametrize("task_name, text, expected", LABEL_CASES)
def test_label_extraction(task_name, text, expected):
    task = TASKS[task_name]
    assert task.extract(text) == expected
    gold = expected if expected != INVALID else task.labels[0]
    assert task.is_correct(task.extract(text), gold) is (expected != INVALID)


@pytest.mark.parametrize("task_name, text, expected, gold, correct", NUMBER_CASES)
def test_number_extraction(task_name, text, expected, gold, correct):
    task = TASKS[task_name]
    assert task.extract(text) == expected
    assert task.is_correct(task.extract(text), gold) is correct


@pytest.mark.parametrize("text, expected, gold, correct", LETTER_CASES)
def test_aqua_letter_extraction(text, expected, gold, correct):
    task = TASKS["aqua"]
    assert task.extract(text) == expected
    assert task.is_correct(task.extract(text), gold) is correct


def test_invalid_never_matches_even_an_invalid_looking_gold():
    assert not labels_match(INVALID, INVALID)
    assert not numbers_match(INVALID, "0")
    assert TASKS["boolq"].is_correct(INVALID, "[invalid]") is False


def test_extractors_directly():
    assert extract_first_label("xx option2 option1", ("option1", "option2")) == "option2"
    assert extract_first_label("nothing", ("true", "false")) == INVALID
    assert extract_last_number("a 1 b -2.5 c") == "-2.5"
    assert extract_last_number("-") == INVALID
    assert extract_first_letter("xyz") == INVALID
    assert label_pattern(("a.b",)).search("axb") is None  # labels are literal, not regexes
    with pytest.raises(ValueError):
        label_pattern(())


@pytest.mark.parametrize("text, value", [("480.0", 480.0), (" 1,200 ", 1200.0), ("-3.5", -3.5), ("5.", 5.0),
                                         ("n/a", None), ("", None), ("inf", None), ("nan", None)])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_labels_match_strips_gold_whitespace():
    assert labels_match("true", " true\n")
    assert not labels_match("true", "false")
