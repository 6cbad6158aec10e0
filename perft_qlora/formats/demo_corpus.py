"""The synthetic instruction corpus the shipped demo base model is pre-trained on, and the demo task it is not.

Every row is an LLM-Adapters row (``instruction``, ``input``, ``output``, ``answer``). The pre-training
families (``FAMILIES``) are short-answer skills over made-up words and two-digit numbers; the yes/no ones
answer like Commonsense170K (``the correct answer is true|false``). The demo task (``DEMO_FAMILY``, see
``perft_qlora/formats/demo_data.py``) asks a question the base model never saw, over the same kind of inputs: the
frozen base must read the question (attention) and the adapters must learn the new mapping.

Rows are rendered with both prompt templates that training and evaluation may use (``TEMPLATES``): the clean
LLM-Adapters text and the PERFT authors' released f-string bytes (16-space indents, whitespace-only lines).
They are written out here, not imported from ``perft_qlora.formats.prompts``, so the shipped weights do not change
when the project's default template does.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUMBERS = range(10, 100)
ANSWER_PREFIX = "the correct answer is"
YES_NO = "Answer format: true/false"


def word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def phrase(rng: random.Random) -> str:
    return " ".join(word(rng) for _ in range(rng.randint(2, 4)))


def yes_no(instruction: str, answer: bool, input: str = "") -> dict[str, str]:
    label = "true" if answer else "false"
    return {"instruction": instruction, "input": input, "output": f"{ANSWER_PREFIX} {label}", "answer": label}


def free(instruction: str, output: str, input: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input, "output": output, "answer": output}


def capitals(rng: random.Random) -> dict[str, str]:
    text = phrase(rng)
    upper = rng.random() < 0.5
    return yes_no(f"Is the following text written in capital letters? {YES_NO}", upper, text.upper() if upper else text)


def has_number(rng: random.Random) -> dict[str, str]:
    words = phrase(rng).split()
    number = rng.random() < 0.5
    if number:
        words.insert(rng.randrange(len(words) + 1), str(rng.choice(NUMBERS)))
    return yes_no(f"Does the following text contain a number? {YES_NO}", number, " ".join(words))


def repeat(rng: random.Random) -> dict[str, str]:
    text = phrase(rng)
    return free("Repeat the following text.", text, text)


def first_word(rng: random.Random) -> dict[str, str]:
    text = phrase(rng)
    return free("What is the first word of the following text?", text.split()[0], text)


FAMILIES: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "capitals": capitals, "has_number": has_number, "repeat": repeat, "first_word": first_word,
}
"""Pre-training task families: name -> row generator."""
WEIGHTS = {"capitals": 4, "has_number": 3, "repeat": 2, "first_word": 1}
"""How often each family is drawn (pre-training on two shared CPU cores is short: the yes/no skills come first)."""


def small_letters(rng: random.Random) -> dict[str, str]:
    """The demo task: the property the base reads (the case of the text), asked the other way round, in words
    it never saw. The base answers it as the question it knows, so it is wrong about every time."""
    text = phrase(rng)
    upper = rng.random() < 0.5
    return yes_no(f"Is the following text written in small letters? {YES_NO}", not upper,
                  text.upper() if upper else text)


DEMO_FAMILY = small_letters


# --- the two templates (LLM-Adapters' text; the released f-string bytes) ------------------------------------

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.")
_PAD = " " * 16


def alpaca(instruction: str, input: str, output: str) -> tuple[str, str]:
    """``(prompt, completion)`` in the clean LLM-Adapters template."""
    if input:
        return f"{_HEADER_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n", output
    return f"{_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n", output


def released_train(instruction: str, input: str, output: str) -> tuple[str, str]:
    """The released training f-string (blank lines hold 16 spaces; the no-input header keeps its ``# noqa``)."""
    if input:
        head = (f"{_HEADER_INPUT} \n\n{_PAD}### Instruction:\n{_PAD}{instruction}\n{_PAD}\n"
                f"{_PAD}### Input:\n{_PAD}{input}\n{_PAD}\n")
    else:
        head = f"{_HEADER}  # noqa: E501\n\n{_PAD}### Instruction:\n{_PAD}{instruction}\n{_PAD}\n"
    return f"{head}{_PAD}### Response:\n{_PAD}", output


def released_eval(instruction: str, input: str, output: str) -> tuple[str, str]:
    """The released evaluation f-string (truly empty blank lines)."""
    if input:
        head = (f"{_HEADER_INPUT} \n\n{_PAD}### Instruction:\n{_PAD}{instruction}\n\n"
                f"{_PAD}### Input:\n{_PAD}{input}\n\n")
    else:
        head = f"{_HEADER} \n\n{_PAD}### Instruction:\n{_PAD}{instruction}\n\n"
    return f"{head}{_PAD}### Response:\n{_PAD}", output


TEMPLATES: dict[str, Callable[[str, str, str], tuple[str, str]]] = {
    "alpaca": alpaca, "released_train": released_train, "released_eval": released_eval,
}


def pretraining_example(rng: random.Random) -> tuple[str, str]:
    """One ``(prompt, completion)`` pair: a random family, rendered with a random template."""
    names = sorted(FAMILIES)
    row = FAMILIES[rng.choices(names, [WEIGHTS[n] for n in names])[0]](rng)
    template = TEMPLATES[rng.choice(sorted(TEMPLATES))]
    return template(row["instruction"], row["input"], row["output"])


def pretraining_stream(seed: int):
    """An endless, seeded stream of pre-training ``(prompt, completion)`` pairs."""
    rng = random.Random(seed)
    while True:
        yield pretraining_example(rng)


def family_rows(family: Callable[[random.Random], dict[str, str]], count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct rows of one family (a held-out probe, or the demo task's files)."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < count:
        row = family(rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows
