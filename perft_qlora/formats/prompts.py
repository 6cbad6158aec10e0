"""Prompt templates shared by training, evaluation and the app: ``released`` (default) and ``alpaca``.

``released`` renders the exact bytes of the authors' released scripts. The PERFT code derives from
AGI-Edgerunners/LLM-Adapters, whose ``generate_prompt`` functions write the Alpaca template inside an
indented f-string (checked against LLM-Adapters ``finetune.py`` at 91770aba, ``evaluate.py`` at 32e03afa
and ``commomsense_evaluate.py`` at e0efdc0e). So their bytes carry 16 spaces before every section line and
the response, and *training and evaluation differ*:

- training (``finetune.py``): one space after "request." with an input, two without; the lines between
  sections hold 16 spaces;
- evaluation (``evaluate.py`` / ``commomsense_evaluate.py``): a space after "request." only without an
  input; the lines between sections are empty; the prompt ends with 16 spaces after ``### Response:\\n``.

Input sections follow the released truthiness test (any non-empty ``input``, even whitespace, adds one).
``alpaca`` is the clean Alpaca text (no indents; a blank input is no input), the same for both uses.
An adapter records its template (``perft_config.json``: ``extra.training.template``), and evaluation and
the app default to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PerftQloraError

RESPONSE_MARKER = "### Response:"

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_INDENT = " " * 16


def format_prompt(instruction: str, input: str = "", response: str = "") -> str:
    """The clean Alpaca text (``alpaca`` template); ``response`` follows ``### Response:\\n``.

    With a non-blank ``input`` the header names it and an ``### Input:`` section is added.
    """
    if input and input.strip():
        head = f"{_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    else:
        head = f"{_HEADER}\n\n### Instruction:\n{instruction}\n\n"
    return f"{head}{RESPONSE_MARKER}\n{response}"


def _released_sections(header: str, sections: list[tuple[str, str]], gap: str) -> str:
    """``header``, then each ``### Name:`` line and its text indented by 16 spaces, sections joined by ``gap``."""
    body = gap.join(f"{_INDENT}### {name}:\n{_INDENT}{text}" for name, text in sections)
    return f"{header}\n\n{body}"


def released_train_prompt(instruction: str, input: str = "", response: str = "") -> str:
    """LLM-Adapters / PERFT ``finetune.py`` bytes; ``response`` is the training output (empty: the prompt part)."""
    gap = f"\n{_INDENT}\n"  # whitespace-only line between sections
    if input:
        sections = [("Instruction", instruction), ("Input", input), ("Response", response)]
        return _released_sections(_HEADER_WITH_INPUT + " ", sections, gap)
    return _released_sections(_HEADER + "  ", [("Instruction", instruction), ("Response", response)], gap)


def released_eval_prompt(instruction: str, input: str = "", response: str = "") -> str:
    """LLM-Adapters / PERFT evaluation bytes; ``response`` is placed after the trailing 16 spaces (a prefix)."""
    if input:
        sections = [("Instruction", instruction), ("Input", input), ("Response", response)]
        return _released_sections(_HEADER_WITH_INPUT, sections, "\n\n")
    return _released_sections(_HEADER + " ", [("Instruction", instruction), ("Response", response)], "\n\n")


@dataclass(frozen=True)
class Template:
    name: str
    train: Callable[[str, str, str], str]
    """``(instruction, input, response) -> text`` as the model sees it in training."""
    eval: Callable[[str, str, str], str]
    """``(instruction, input, response_prefix) -> prompt`` for generation."""


TEMPLATES: dict[str, Template] = {
    "released": Template("released", released_train_prompt, released_eval_prompt),
    "alpaca": Template("alpaca", format_prompt, format_prompt),
}
DEFAULT_TEMPLATE = "released"


class TemplateError(PerftQloraError):
    """An unknown template name."""


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise TemplateError(f"unknown prompt template {name!r}; use one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def response_text(generated: str, split: str = "last") -> str:
    """The text after ``### Response:``: the ``last`` one (PERFT's scoring) or the ``first`` (LLM-Adapters'
    ``output.split("### Response:")[1]``), stripped."""
    if split == "first":
        parts = generated.split(RESPONSE_MARKER)
        return (parts[1] if len(parts) > 1 else parts[0]).strip()
    return generated.rsplit(RESPONSE_MARKER, 1)[-1].strip()
