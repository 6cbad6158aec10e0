"""Answer extraction and scoring for the reasoning tasks: pure functions, no I/O.

The rules are those of the released PERFT / LLM-Adapters evaluation scripts (../shared/docs/perft-method.md,
"Evaluation in the released scripts"), kept bit-for-bit, quirks included, so that numbers are comparable:

- commonsense: the *first* match of the task's label pattern, case-sensitive (``True`` is not ``true``);
- numeric math: commas removed, every ``-?\\d+\\.?\\d*`` found, the *last* one taken; correct when within 0.001
  of the gold number;
- AQuA: the *first* capital A-E anywhere in the response (so ``Answer: C`` extracts the ``A`` of ``Answer``).

Each extractor returns the extracted text or :data:`INVALID` when nothing matches; an ``INVALID`` answer is
never correct. Which rule a task uses lives in the task table (``perft_qlora/evaluation/tasks.py``), not here.
"""

from __future__ import annotations

import math
import re

INVALID = "[invalid]"
"""What an extractor returns when the generation holds no answer (lm-eval's ``fallback``); never correct."""

NUMBER_PATTERN = re.compile(r"-?\d+\.?\d*")
"""The released scripts' number pattern: optional minus, digits, optional point and decimals."""

LETTER_PATTERN = re.compile(r"A|B|C|D|E")
"""AQuA's choice letters, matched anywhere (no word boundary), as the released scripts do."""

NUMBER_TOLERANCE = 0.001
"""A numeric answer is correct when ``|predicted - gold| <= NUMBER_TOLERANCE``."""


def label_pattern(labels: tuple[str, ...]) -> re.Pattern:
    """``label1|label2|...`` in the given order (the released scripts' alternation)."""
    if not labels:
        raise ValueError("a label pattern needs at least one label")
    return re.compile("|".join(re.escape(label) for label in labels))


def extract_first_label(text: str, labels: tuple[str, ...]) -> str:
    """The first occurrence of any of ``labels`` in ``text`` (case-sensitive), or ``INVALID``."""
    match = label_pattern(labels).search(text)
    return match.group(0) if match else INVALID


def extract_last_number(text: str) -> str:
    """The last number in ``text`` after removing commas (``"1,234.5"`` -> ``"1234.5"``), or ``INVALID``."""
    found = NUMBER_PATTERN.findall(text.replace(",", ""))
    return found[-1] if found else INVALID


def extract_first_letter(text: str) -> str:
    """The first capital A-E in ``text``, or ``INVALID``."""
    match = LETTER_PATTERN.search(text)
    return match.group(0) if match else INVALID


def parse_number(text: str) -> float | None:
    """``text`` as a finite float (commas and surrounding spaces ignored), or None when it is not a number."""
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numbers_match(predicted: str, gold: str, tolerance: float = NUMBER_TOLERANCE) -> bool:
    """True when both parse as numbers within ``tolerance`` of each other; ``INVALID`` never matches."""
    if predicted == INVALID:
        return False
    value, target = parse_number(predicted), parse_number(gold)
    return value is not None and target is not None and abs(value - target) <= tolerance


def labels_match(predicted: str, gold: str) -> bool:
    """Exact string equality, as the released scripts compare labels; ``INVALID`` never matches."""
    return predicted != INVALID and predicted == gold.strip()
