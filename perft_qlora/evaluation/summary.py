"""The evaluation summary: per-model, per-task accuracy, the settings that produced it, JSON and markdown.

``summary.json`` and ``results.md`` are rewritten atomically (``perft_qlora.atomic``) after every
finished task, so a reader never sees half a file and a stopped run still has its finished tasks summarized.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..atomic import write_text
from .extract import INVALID
from .tasks import GROUPS, TASKS

SUMMARY_NAME = "summary.json"
TABLE_NAME = "results.md"
RESUME_KEYS = ("model", "decoding")
"""Settings that must equal the previous run's for ``--resume`` to reuse its predictions."""


def score(records: list[dict], skipped_rows: int = 0) -> dict:
    """Accuracy of scored prediction records: ``accuracy`` (0..1), ``correct``, ``total``, ``invalid``."""
    correct = sum(bool(r["correct"]) for r in records)
    return {
        "accuracy": correct / len(records) if records else None,
        "correct": correct,
        "total": len(records),
        "invalid": sum(r["extracted"] == INVALID for r in records),
        "skipped_rows": skipped_rows,
    }


def averages(task_results: dict[str, dict]) -> dict[str, float]:
    """Unweighted means of per-task accuracy (as the paper averages): ``all`` and each group present."""
    accuracy = {task: r["accuracy"] for task, r in task_results.items() if r.get("accuracy") is not None}
    means = {"all": sum(accuracy.values()) / len(accuracy)} if accuracy else {}
    for group in ("commonsense", "math"):
        values = [accuracy[t] for t in GROUPS[group] if t in accuracy]
        if values:
            means[group] = sum(values) / len(values)
    return means


@dataclass
class Summary:
    settings: dict
    """Protocol and decoding, model path, adapter directories, tasks, test files, limit, batch size."""
    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    """``results[model_label][task] = score(...)``."""

    def add(self, model_label: str, task: str, result: dict) -> None:
        self.results.setdefault(model_label, {})[task] = result

    def to_dict(self) -> dict:
        return {
            **self.settings,
            "results": self.results,
            "averages": {label: averages(tasks) for label, tasks in self.results.items()},
        }

    def markdown(self) -> str:
        """A table with one row per model and one column per task (accuracy in %), then the averages."""
        tasks = list(dict.fromkeys(t for per_model in self.results.values() for t in per_model))
        tasks.sort(key=lambda t: list(TASKS).index(t) if t in TASKS else len(TASKS))
        groups = [g for g in ("commonsense", "math") if any(t in GROUPS[g] for t in tasks)]
        extra = [f"{g} avg" for g in groups] if len(groups) > 1 else []
        lines = [
            "| model | " + " | ".join([*tasks, *extra, "avg"]) + " |",
            "|---|" + "---:|" * (len(tasks) + len(extra) + 1),
        ]
        for label, per_model in self.results.items():
            means = averages(per_model)
            cells = [_percent(per_model.get(t, {}).get("accuracy")) for t in tasks]
            cells += [_percent(means.get(g)) for g in groups] if extra else []
            lines.append(f"| {label} | " + " | ".join([*cells, _percent(means.get("all"))]) + " |")
        counts = ", ".join(f"{t} {self._rows(t)}" for t in tasks)
        decoding = self.settings.get("decoding", {})
        beams = decoding.get("num_beams")
        lines += ["", f"Rows scored: {counts}. Protocol `{decoding.get('protocol')}`, {beams} beam(s)."]
        return "\n".join(lines) + "\n"

    def _rows(self, task: str) -> str:
        totals = sorted({per_model[task]["total"] for per_model in self.results.values() if task in per_model})
        return "/".join(str(n) for n in totals)

    def write(self, output_dir: str) -> None:
        write_text(os.path.join(output_dir, SUMMARY_NAME), json.dumps(self.to_dict(), indent=2) + "\n")
        write_text(os.path.join(output_dir, TABLE_NAME), self.markdown())


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def previous_summary(output_dir: str) -> dict | None:
    """The ``summary.json`` of an earlier run in ``output_dir``, or None."""
    path = os.path.join(output_dir, SUMMARY_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def resume_conflicts(previous: dict, settings: dict) -> list[str]:
    """Why the earlier run's predictions cannot be reused with ``settings`` (empty when they can)."""
    problems = [
        f"{key}: earlier run {previous.get(key)!r}, now {settings.get(key)!r}"
        for key in RESUME_KEYS
        if previous.get(key) != settings.get(key)
    ]
    before, now = previous.get("adapters", {}), settings.get("adapters", {})
    problems += [
        f"adapter {label!r}: earlier run {before[label]!r}, now {now[label]!r}"
        for label in sorted(set(before) & set(now))
        if before[label] != now[label]
    ]
    return problems
