"""The evaluation task table: the paper's 14 reasoning tasks (LLM-Adapters test sets) and the shipped demo task.

Each task names its decoding family (``commonsense``: pre-filled short answer, ``math``: free generation),
its answer rule (``label``: first match of the task's labels, ``number``: last number within 0.001,
``letter``: first capital A-E) and where its test file lives: ``<data-dir>/<directory>/test.json``, the
layout of LLM-Adapters' ``dataset/`` folder, which users download themselves. The extraction rules are in
``perft_qlora/evaluation/extract.py``; the decoding settings per family in ``perft_qlora/evaluation/protocol.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import PerftQloraError
from ..formats.demo_data import demo_data_path
from ..formats.records import DataError, RecordSet, read_records
from . import extract

ANSWER_LETTERS = ("A", "B", "C", "D", "E")


class TaskError(PerftQloraError):
    """An unknown task name, or a task whose test file cannot be found."""


@dataclass(frozen=True)
class AnswerRule:
    """How one kind of answer is extracted from a response and compared with the gold answer."""

    extract: Callable[[str, tuple[str, ...]], str]
    """``(response, labels) -> extracted text or extract.INVALID``."""
    matches: Callable[[str, str], bool]
    """``(extracted, gold) -> correct``."""
    gold_problem: Callable[[str, tuple[str, ...]], str | None]
    """``(gold, labels) -> None`` for a usable gold answer, else why not."""


def _label_gold_problem(gold: str, labels: tuple[str, ...]) -> str | None:
    return None if gold.strip() in labels else f"answer {gold!r} is not one of {'|'.join(labels)}"


def _number_gold_problem(gold: str, labels: tuple[str, ...]) -> str | None:
    return None if extract.parse_number(gold) is not None else f"answer {gold!r} is not a number"


def _last_number(text: str, labels: tuple[str, ...]) -> str:
    return extract.extract_last_number(text)


def _first_letter(text: str, labels: tuple[str, ...]) -> str:
    return extract.extract_first_letter(text)


ANSWER_RULES = {
    "label": AnswerRule(extract.extract_first_label, extract.labels_match, _label_gold_problem),
    "number": AnswerRule(_last_number, extract.numbers_match, _number_gold_problem),
    "letter": AnswerRule(_first_letter, extract.labels_match, _label_gold_problem),
}


@dataclass(frozen=True)
class Task:
    name: str
    """The name used on the command line and in results (lower case)."""
    family: str
    """``commonsense`` or ``math``: selects the decoding settings (``perft_qlora/evaluation/protocol.py``)."""
    answer: str
    """A key of ``ANSWER_RULES``: ``label``, ``number`` or ``letter``."""
    directory: str
    """The folder of its test file in LLM-Adapters' ``dataset/`` layout (``dataset/<directory>/test.json``)."""
    labels: tuple[str, ...] = ()
    """The answer labels, in the released scripts' pattern order (``label`` and ``letter`` tasks)."""
    test_rows: int | None = None
    """Rows in the released test set (for the record; a smaller file is accepted)."""
    source: str | None = field(default=None, compare=False)
    """A fixed test source that overrides the data directory (the shipped demo test set)."""
    rule: AnswerRule | None = field(default=None, compare=False)
    """An answer rule of its own instead of ``ANSWER_RULES[answer]`` (a user's test set, ``own_data.py``)."""
    match: str | None = None
    """The ``--match`` that built ``rule``."""

    def _rule(self) -> AnswerRule:
        return self.rule if self.rule is not None else ANSWER_RULES[self.answer]

    def extract(self, response: str) -> str:
        """The answer in ``response`` (the text after ``### Response:``), or ``extract.INVALID``."""
        return self._rule().extract(response, self.labels)

    def is_correct(self, extracted: str, gold: str) -> bool:
        return self._rule().matches(extracted, gold)

    def gold_problem(self, gold: str) -> str | None:
        """None when ``gold`` can be scored, else the reason (a malformed test row)."""
        return self._rule().gold_problem(gold, self.labels)

    def test_source(self, data_dir: str) -> str:
        """The default test file: the fixed source, or ``<data_dir>/<directory>/test.json``.

        When that exact folder is missing, a folder whose name differs only in case is used (``arc-easy``).
        """
        if self.source is not None:
            return self.source
        folder = os.path.join(data_dir, self.directory)
        if not os.path.isdir(folder) and os.path.isdir(data_dir):
            for entry in sorted(os.listdir(data_dir)):
                if entry.lower() == self.directory.lower():
                    folder = os.path.join(data_dir, entry)
                    break
        return os.path.join(folder, "test.json")


_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("boolq", "commonsense", "label", "boolq", ("true", "false"), 3270),
        Task("piqa", "commonsense", "label", "piqa", ("solution1", "solution2"), 1838),
        Task("siqa", "commonsense", "label", "social_i_qa", _ANSWERS, 1954),
        Task("hellaswag", "commonsense", "label", "hellaswag", tuple(f"ending{i}" for i in range(1, 5)), 10042),
        Task("winogrande", "commonsense", "label", "winogrande", ("option1", "option2"), 1267),
        Task("arc-e", "commonsense", "label", "ARC-Easy", _ANSWERS, 2376),
        Task("arc-c", "commonsense", "label", "ARC-Challenge", _ANSWERS, 1172),
        Task("obqa", "commonsense", "label", "openbookqa", _ANSWERS, 500),
        Task("addsub", "math", "number", "AddSub", (), 395),
        Task("multiarith", "math", "number", "MultiArith", (), 600),
        Task("singleeq", "math", "number", "SingleEq", (), 508),
        Task("gsm8k", "math", "number", "gsm8k", (), 1319),
        Task("aqua", "math", "letter", "AQuA", ANSWER_LETTERS, 254),
        Task("svamp", "math", "number", "SVAMP", (), 1000),
        # The shipped demo task ("is the text written in small letters?"), scored like BoolQ.
        Task("demo", "commonsense", "label", "demo", ("true", "false"), 40, source=demo_data_path("test")),
    )
}

GROUPS: dict[str, tuple[str, ...]] = {
    "commonsense": ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa"),
    "math": ("addsub", "multiarith", "singleeq", "gsm8k", "aqua", "svamp"),
}
GROUPS["all"] = GROUPS["commonsense"] + GROUPS["math"]

# LLM-Adapters' folder names are accepted as task names too ("ARC-Easy", "social_i_qa", "openbookqa").
_ALIASES = {task.directory.lower(): name for name, task in TASKS.items()}


def resolve_tasks(spec: str | list[str]) -> list[Task]:
    """Tasks from ``"boolq,piqa"`` / ``["commonsense", "gsm8k"]``: names, LLM-Adapters folder names or groups.

    Case-insensitive; order kept, duplicates dropped. Raises TaskError naming the unknown names.
    """
    parts = spec.split(",") if isinstance(spec, str) else [p for item in spec for p in item.split(",")]
    names: list[str] = []
    unknown: list[str] = []
    for part in (p.strip().lower() for p in parts):
        if not part:
            continue
        if part in GROUPS:
            names.extend(GROUPS[part])
        elif part in TASKS or part in _ALIASES:
            names.append(TASKS[part].name if part in TASKS else _ALIASES[part])
        else:
            unknown.append(part)
    if unknown:
        raise TaskError(
            f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or the groups {', '.join(GROUPS)}; "
            "for a test set of your own: --data NAME=FILE"
        )
    if not names:
        raise TaskError(f"no task given; choose from {', '.join(TASKS)} or the groups {', '.join(GROUPS)}")
    return [TASKS[name] for name in dict.fromkeys(names)]


@dataclass
class TestSet:
    """The usable rows of one task's test file; ``row`` indices in predictions are positions in ``rows``."""

    __test__ = False  # not a pytest class

    task: Task
    source: str
    rows: list[dict[str, str]]
    skipped: list[str]
    """One line per malformed row: why it was skipped and which row it was."""

    @classmethod
    def from_records(cls, task: Task, source: str, records: RecordSet) -> TestSet:
        """The rows of ``records`` that ``task`` can score; the others listed in ``skipped``. TaskError when none is."""
        skipped = [f"row {number}: {reason}" for number, reason in records.skipped]
        rows = []
        for position, row in enumerate(records.rows, 1):
            problem = task.gold_problem(row["answer"])
            if problem is None:
                rows.append(row)
            else:
                skipped.append(f"usable row {position} ({row['instruction'][:40]!r}...): {problem}")
        if not rows:
            raise TaskError(f"no scorable rows for {task.name} in {source}:\n" + "\n".join(skipped[:10]))
        return cls(task=task, source=source, rows=rows, skipped=skipped)

    def report(self, max_listed: int = 10) -> str:
        head = f"{self.task.name} ({self.source}): {len(self.rows)} rows used, {len(self.skipped)} skipped"
        lines = [f"  {line}" for line in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        return "\n".join([head, *lines])


def load_test_set(task: Task, source: str) -> TestSet:
    """Read ``source`` (a .json/.jsonl file or a ``datasets`` hub name, split ``test``) and drop malformed rows.

    Rows without an instruction or answer, and rows whose answer the task cannot score (``maybe`` for BoolQ,
    ``n/a`` for GSM8K), are skipped and listed. Raises TaskError for a missing file or no usable row.
    """
    looks_local = source.endswith((".json", ".jsonl")) or source.startswith((".", "/", "~"))
    if looks_local and not os.path.isfile(source):
        raise TaskError(
            f"test file for {task.name} not found: {source}. Expected the LLM-Adapters layout "
            f"<data-dir>/{task.directory}/test.json (download LLM-Adapters' dataset/ folder and pass --data-dir), "
            f"or pass --test-file {task.name}=PATH"
        )
    try:
        records = read_records(source, required=("instruction", "answer"), split="test")
    except DataError as error:
        raise TaskError(f"{task.name}: {error}") from error
    return TestSet.from_records(task, source, records)
