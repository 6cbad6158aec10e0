"""The LLM-Adapters (Alpaca-style) prompt template, shared by training, evaluation and the app.

The released PERFT code indents these lines inside an f-string; we use the clean template (see
../shared/docs/perft-method.md and README "Data format").
"""

from __future__ import annotations

RESPONSE_MARKER = "### Response:"

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, input: str = "", response: str = "") -> str:
    """The full template text; ``response`` is what follows ``### Response:\\n`` (empty for generation).

    With a non-empty ``input`` the header names it and an ``### Input:`` section is added.
    """
    if input and input.strip():
        head = f"{_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    else:
        head = f"{_HEADER}\n\n### Instruction:\n{instruction}\n\n"
    return f"{head}{RESPONSE_MARKER}\n{response}"


def response_text(generated: str) -> str:
    """The text after the last ``### Response:`` (how the released evaluation scores a generation)."""
    return generated.rsplit(RESPONSE_MARKER, 1)[-1].strip()
