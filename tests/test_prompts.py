"""Prompt bytes against the released scripts, written here as the escaped string literals those f-strings
produce (AGI-Edgerunners/LLM-Adapters finetune.py 91770aba, evaluate.py 32e03afa,
commomsense_evaluate.py e0efdc0e; the PERFT scripts copy them), so the test does not share the code's
construction."""

from __future__ import annotations

import pytest

from perft_qlora.evaluation.protocol import COMMONSENSE_PREFIX, PROTOCOLS
from perft_qlora.formats.prompts import TEMPLATES, TemplateError, get_template, response_text
from perft_qlora.formats.records import RecordSet
from perft_qlora.training.data import to_prompt_completion

HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
HEAD_IN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

CASES = [  # (template, use, instruction, input, response, expected bytes)
    ("released", "train", "Add 1 and 2.", "", "3",
     HEAD + "  \n\n                ### Instruction:\n                Add 1 and 2.\n                \n"
     "                ### Response:\n                3"),
    ("released", "train", "Add.", "1 and 2", "3",
     HEAD_IN + " \n\n                ### Instruction:\n                Add.\n                \n"
     "                ### Input:\n                1 and 2\n                \n                ### Response:\n                3"),
    ("released", "train", "Add 1 and 2.", "", "",  # the prompt half of a prompt/completion example
     HEAD + "  \n\n                ### Instruction:\n                Add 1 and 2.\n                \n"
     "                ### Response:\n                "),
    ("released", "train", "Say it.", "  ", "ok",  # the released test is `if input:`, so whitespace counts
     HEAD_IN + " \n\n                ### Instruction:\n                Say it.\n                \n"
     "                ### Input:\n                  \n                \n                ### Response:\n                ok"),
    ("released", "eval", "Is ice cold?", "", "",
     HEAD + " \n\n                ### Instruction:\n                Is ice cold?\n\n                ### Response:\n                "),
    ("released", "eval", "Add.", "1 and 2", "",
     HEAD_IN + "\n\n                ### Instruction:\n                Add.\n\n                ### Input:\n"
     "                1 and 2\n\n                ### Response:\n                "),
    ("alpaca", "train", "Add 1 and 2.", "", "3",
     HEAD + "\n\n### Instruction:\nAdd 1 and 2.\n\n### Response:\n3"),
    ("alpaca", "train", "Add.", "1 and 2", "3",
     HEAD_IN + "\n\n### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n3"),
    ("alpaca", "eval", "Is ice cold?", "", "",
     HEAD + "\n\n### Instruction:\nIs ice cold?\n\n### Response:\n"),
    ("alpaca", "eval", "Add.", "1 and 2", "",
     HEAD_IN + "\n\n### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n"),
    ("alpaca", "eval", "Say it.", "  ", "",  # alpaca: a blank input is no input
     HEAD + "\n\n### Instruction:\nSay it.\n\n### Response:\n"),
]


@pytest.mark.parametrize("template, use, instruction, input, response, expected", CASES)
def test_template_bytes(template, use, instruction, input, response, expected):
    render = getattr(get_template(template), use)
    assert render(instruction, input, response) == expected


PREFIX_CASES = [  # (protocol, template, family, expected prompt)
    ("perft", "released", "commonsense",
     HEAD + " \n\n                ### Instruction:\n                Is ice cold?\n\n                ### Response:\n"
     "                the correct answer is"),
    ("perft", "released", "math",
     HEAD + " \n\n                ### Instruction:\n                Is ice cold?\n\n                ### Response:\n                "),
    ("llm-adapters", "released", "commonsense",
     HEAD + " \n\n                ### Instruction:\n                Is ice cold?\n\n                ### Response:\n                "),
    ("perft", "alpaca", "commonsense",
     HEAD + "\n\n### Instruction:\nIs ice cold?\n\n### Response:\nthe correct answer is"),
]


@pytest.mark.parametrize("protocol, template, family, expected", PREFIX_CASES)
def test_protocol_prompt_with_response_prefix(protocol, template, family, expected):
    chosen = PROTOCOLS[protocol].with_template(template)
    assert chosen.prompt(family, {"instruction": "Is ice cold?", "input": ""}) == expected
    assert PROTOCOLS[protocol].template == "released"  # the default


def test_training_example_is_the_released_text_byte_for_byte():
    rows = [{"instruction": "Add 1 and 2.", "input": "", "output": "3", "answer": "3"},
            {"instruction": "Add.", "input": "1 and 2", "output": "3", "answer": "3"}]
    dataset = to_prompt_completion(RecordSet(source="mem", rows=rows))  # the default template: released
    assert [row["prompt"] + row["completion"] for row in dataset] == [CASES[0][5], CASES[1][5]]


@pytest.mark.parametrize("template", ["released", "alpaca"])
def test_tokenized_prompt_is_a_prefix_of_prompt_plus_completion(template):
    """TRL drops a prompt's end that tokenizes differently inside prompt + completion (16 spaces merge with the
    answer's first word in a byte-level BPE): the split must fall where no token straddles it."""
    from transformers import AutoTokenizer

    from perft_qlora.training.demo_base import demo_base_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    rows = [{"instruction": "Is the text written in small letters? abc def", "input": "", "output": "the correct answer is true"},
            {"instruction": "Repeat.", "input": "Hello there", "output": "Hello there"}]
    for row in to_prompt_completion(RecordSet(source="mem", rows=rows), template):
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        full = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False).input_ids
        assert full[: len(prompt)] == prompt, template


def test_scored_response_split_first_vs_last():
    generated = "solution1\n\n### Response:\nsolution2"
    prompt = TEMPLATES["released"].eval("Which?", "", "")
    assert PROTOCOLS["llm-adapters"].scored_response(prompt, generated) == "solution1"  # split(...)[1]
    assert PROTOCOLS["perft"].scored_response(prompt, generated) == "solution2"  # the last one
    prefixed = PROTOCOLS["perft"].prompt("commonsense", {"instruction": "Which?", "input": ""})
    assert PROTOCOLS["perft"].scored_response(prefixed, " true") == f"{COMMONSENSE_PREFIX} true"
    assert response_text("no marker here", "first") == "no marker here"


def test_unknown_template_is_an_error():
    with pytest.raises(TemplateError, match="unknown prompt template 'chatml'"):
        PROTOCOLS["perft"].with_template("chatml")
