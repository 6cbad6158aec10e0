"""A user's own test set: ``evaluate --data [NAME=]FILE --match exact|contains|regex:PATTERN|choice[:A,B,...]``.

Each ``--data`` source becomes a task named ``NAME`` (default: the file's stem, ``qa.jsonl`` -> ``qa``) with an
answer rule built from ``--match``, and runs like the paper's tasks: the same prompts (the adapter's recorded
template or chat template), decoding (the free-generation ``math`` family: no pre-filled answer, 256 new
tokens unless ``--max-new-tokens``), ``predictions.jsonl`` and ``summary.json``. Rows are read by a reader
(``(source) -> RecordSet`` with ``instruction``, ``input`` and ``answer``): today LLM-Adapters rows
(``formats/records.py``); another format plugs in as another reader.

The matchers compare the scored response with the row's ``answer`` (both normalised: case folded, runs of
whitespace as one space, surrounding whitespace and a final ``.`` dropped):

- ``exact``: the whole response equals the answer;
- ``contains``: the answer occurs in the response;
- ``regex:PATTERN``: the first match of PATTERN in the response (its first group, if it has one) equals the answer;
- ``choice``: the first of the options (default the letters A-E, or ``choice:yes,no,maybe``) in the response,
  as a whole word, equals the answer; rows whose answer is not an option are skipped and listed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..formats.records import DataError, RecordSet, read_records
from .extract import INVALID
from .tasks import ANSWER_LETTERS, TASKS, AnswerRule, Task, TaskError, TestSet

OWN_FAMILY = "math"
"""The decoding family of own test sets: free generation, nothing pre-filled (``protocol.py``)."""
MATCHES = ("exact", "contains", "regex:PATTERN", "choice", "choice:A,B,...")


def normalize(text: str) -> str:
    """Case folded, whitespace runs as one space, stripped, a final period dropped."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def _whole(text: str, labels: tuple[str, ...]) -> str:
    return normalize(text) or INVALID


def _same(extracted: str, gold: str) -> bool:
    return extracted != INVALID and extracted == normalize(gold)


def _contains(extracted: str, gold: str) -> bool:
    return extracted != INVALID and normalize(gold) in extracted


def _any_gold(gold: str, labels: tuple[str, ...]) -> str | None:
    return None if gold.strip() else "the answer is empty"


def _regex_rule(pattern: re.Pattern) -> AnswerRule:
    def extract(text: str, labels: tuple[str, ...]) -> str:
        found = pattern.search(text)
        if found is None:
            return INVALID
        return normalize(found.group(1) if pattern.groups and found.group(1) is not None else found.group(0))

    return AnswerRule(extract, _same, _any_gold)


def _choice_rule(options: tuple[str, ...]) -> AnswerRule:
    # One-letter options are matched as capitals only (the article "a" is not answer A); words ignore case.
    parts = [re.escape(o) if len(o) == 1 else f"(?i:{re.escape(o)})" for o in options]
    pattern = re.compile(r"(?<!\w)(" + "|".join(parts) + r")(?!\w)")

    def extract(text: str, labels: tuple[str, ...]) -> str:
        found = pattern.search(text)
        return normalize(found.group(1)) if found else INVALID

    def gold_problem(gold: str, labels: tuple[str, ...]) -> str | None:
        ok = normalize(gold) in {normalize(o) for o in options}
        return None if ok else f"answer {gold!r} is not one of the choices {'|'.join(options)}"

    return AnswerRule(extract, _same, gold_problem)


@dataclass(frozen=True)
class Match:
    """A parsed ``--match``: its text (recorded in the summary) and the answer rule it builds."""

    spec: str
    rule: AnswerRule


def parse_match(spec: str) -> Match:
    """``--match`` -> :class:`Match`; a TaskError names the accepted forms."""
    kind, sep, argument = spec.partition(":")
    if kind == "exact" and not sep:
        return Match(spec, AnswerRule(_whole, _same, _any_gold))
    if kind == "contains" and not sep:
        return Match(spec, AnswerRule(_whole, _contains, _any_gold))
    if kind == "regex" and argument:
        try:
            return Match(spec, _regex_rule(re.compile(argument)))
        except re.error as error:
            raise TaskError(f"--match {spec}: not a valid regular expression ({error})") from error
    if kind == "choice":
        options = tuple(o.strip() for o in argument.split(",") if o.strip()) if sep else ANSWER_LETTERS
        if len(options) >= 2:
            return Match(spec, _choice_rule(options))
    raise TaskError(f"--match {spec!r} is not one of {' | '.join(MATCHES)}")


def split_data_spec(value: str) -> tuple[str, str]:
    """``NAME=FILE`` -> ``(name, FILE)``; a plain ``FILE`` is named after its stem. The name must not be one of the
    paper's tasks (their results would mix)."""
    name, sep, source = value.partition("=")
    if not sep or os.path.exists(value):
        name, source = os.path.splitext(os.path.basename(value))[0], value
    name, source = name.strip().lower(), source.strip()
    if not name or not source:
        raise TaskError(f"--data takes NAME=FILE or FILE, got {value!r}")
    if name in TASKS:
        raise TaskError(f"--data {value}: {name!r} is one of the built-in tasks; name the test set: "
                        f"--data NAME={source}")
    return name, source


def llm_adapters_rows(source: str) -> RecordSet:
    """The default reader: LLM-Adapters rows with ``instruction`` and ``answer`` (``formats/records.py``)."""
    return read_records(source, required=("instruction", "answer"), split="test")


def own_test_set(value: str, match: Match, reader: Callable[[str], RecordSet] = llm_adapters_rows) -> TestSet:
    """``--data`` ``value`` read with ``reader`` into a :class:`TestSet` scored by ``match``; rows whose answer the
    match cannot score are skipped and listed, as for the paper's tasks."""
    name, source = split_data_spec(value)
    if not os.path.isfile(source):
        raise TaskError(f"--data {value}: no such file {source}; pass a .json or .jsonl test file")
    task = Task(name, OWN_FAMILY, "own", "", source=source, rule=match.rule, match=match.spec)
    try:
        records = reader(source)
    except DataError as error:
        raise TaskError(f"{name}: {error}") from error
    return TestSet.from_records(task, source, records)
