"""Rows of any training format (``detect.py``), validated into the examples TRL's ``SFTTrainer`` reads as they are.

A row becomes ``{"messages": [...]}`` (``messages`` and ``sharegpt``: ShareGPT's ``from``/``value`` and roles
``human``/``gpt`` mapped to ``role``/``content`` and ``user``/``assistant``), ``{"prompt", "completion"}`` (strings
or message lists) or ``{"text"}``; nothing is rendered here: TRL applies the chat template and masks the loss.
LLM-Adapters rows stay ``records.py`` rows (``training/data.py`` renders them with a prompt template).

A row that cannot be used is skipped and listed with its number and the reason: not an object, a field of the
wrong type, empty content, an unknown role, a conversation without an assistant turn, or a row in another
format than the rest of its source (one source, one format).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .detect import FORMAT_FIELDS, detect_format, rename, row_format
from .records import RecordSet, validate_row
from .sources import DataError, Unparsable, read_source

MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {**MESSAGE_ROLES, "human": "user", "gpt": "assistant"}


def clean_turns(turns, roles: dict[str, str], need_assistant: bool = True) -> tuple[list | None, str | None]:
    """``(turns as {"role", "content"}, None)`` or ``(None, reason)``; ``role``/``from`` and ``content``/``value``
    are both read."""
    if not isinstance(turns, list) or not turns:
        return None, f"expected a non-empty list of turns, got {type(turns).__name__ if turns else 'an empty list'}"
    cleaned = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return None, f"turn {number} is a {type(turn).__name__}, not an object with role and content"
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in roles:
            return None, f"turn {number}: unknown role {role!r}; use {', '.join(roles)}"
        if not isinstance(content, str):
            return None, f"turn {number}: content must be a string, got {type(content).__name__}"
        if not content.strip():
            return None, f"turn {number}: empty content"
        cleaned.append({"role": roles[role], "content": content})
    if need_assistant and not any(turn["role"] == "assistant" for turn in cleaned):
        return None, "no assistant turn (nothing to train on)"
    return cleaned, None


def _prompt_completion(prompt, completion) -> tuple[dict | None, str | None]:
    if isinstance(prompt, str) and isinstance(completion, str):
        empty = [name for name, value in (("prompt", prompt), ("completion", completion)) if not value.strip()]
        if empty:
            return None, f"empty {' and '.join(repr(name) for name in empty)}"
        return {"prompt": prompt, "completion": completion}, None
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_turns, reason = clean_turns(prompt, MESSAGE_ROLES, need_assistant=False)
        if reason:
            return None, f"prompt {reason}"
        completion_turns, reason = clean_turns(completion, MESSAGE_ROLES)
        if reason:
            return None, f"completion {reason}"
        return {"prompt": prompt_turns, "completion": completion_turns}, None
    return None, (f"'prompt' and 'completion' must both be strings or both message lists, got "
                  f"{type(prompt).__name__} and {type(completion).__name__}")


def to_example(row: dict, data_format: str) -> tuple[dict | None, str | None]:
    """``(example, None)`` or ``(None, reason)`` for a row in ``data_format`` (see module doc)."""
    if data_format == "llm-adapters":
        return validate_row(row, ("instruction", "output"))
    if data_format in ("messages", "sharegpt"):
        key, roles = ("messages", MESSAGE_ROLES) if data_format == "messages" else ("conversations", SHAREGPT_ROLES)
        turns, reason = clean_turns(row[key], roles)
        return ({"messages": turns}, None) if reason is None else (None, reason)
    if data_format == "prompt-completion":
        return _prompt_completion(row["prompt"], row["completion"])
    text = row["text"]
    if not isinstance(text, str):
        return None, f"field 'text' must be a string, got {type(text).__name__}"
    return ({"text": text}, None) if text.strip() else (None, "empty 'text'")


def example_shape(example: dict) -> str:
    """``conversation``, ``prompt-completion``, ``conversational prompt-completion``, ``text`` or ``llm-adapters``."""
    if "messages" in example:
        return "conversation"
    if "prompt" in example:
        return "conversational prompt-completion" if isinstance(example["prompt"], list) else "prompt-completion"
    return "text" if "text" in example else "llm-adapters"


@dataclass
class ExampleSet(RecordSet):
    """A source's usable examples (``rows``), their row numbers (``numbers``), its format and the rows skipped."""

    format: str = ""
    numbers: list[int] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return example_shape(self.rows[0])


def _missing(row, data_format: str) -> str:
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    missing = [name for name in FORMAT_FIELDS[data_format] if row.get(name) is None]
    return f"missing {', '.join(repr(name) for name in missing)} ({data_format} format)"


def read_examples(source: str, data_format: str = "auto", fields: dict[str, str] | None = None,
                  split: str = "train", config: str | None = None) -> ExampleSet:
    """A source's rows (``sources.read_source``), renamed by ``fields`` (``detect.parse_fields``), validated."""
    raw = [(number, rename(row, fields or {})) for number, row in read_source(source, split, config)]
    parsed = [row for _, row in raw if not isinstance(row, Unparsable)]
    chosen = data_format
    if data_format == "auto":  # no row parsed: every line is listed as not JSON under the default format
        chosen = detect_format(source, parsed) if parsed else "llm-adapters"
    examples = ExampleSet(source=source, rows=[], format=chosen)
    for number, row in raw:
        if isinstance(row, Unparsable):
            example, reason = None, row.reason
        elif row_format(row, chosen) not in (chosen, None):
            example, reason = None, f"a {row_format(row)} row in a {chosen} source (one source, one format)"
        elif chosen == "llm-adapters" or _has_fields(row, chosen):
            example, reason = to_example(row, chosen)  # LLM-Adapters rows: records.py's checks and reasons
        else:
            example, reason = None, _missing(row, chosen)
        if reason is None:
            examples.rows.append(example)
            examples.numbers.append(number)
        else:
            examples.skipped.append((number, reason))
    _keep_one_shape(examples)
    if not examples.rows:
        raise DataError(f"no usable rows in {source} (read as {chosen} rows; see --data-format, --data-fields):\n"
                        f"{examples.report()}")
    return examples


def _has_fields(row, data_format: str) -> bool:
    """Whether ``row`` has every field of ``data_format``, none of them null."""
    return isinstance(row, dict) and all(row.get(name) is not None for name in FORMAT_FIELDS[data_format])


def _keep_one_shape(examples: ExampleSet) -> None:
    """Prompt/completion rows as strings and as message lists do not mix: the most common shape stays."""
    shapes = [example_shape(example) for example in examples.rows]
    if len(set(shapes)) < 2:
        return
    keep = max(dict.fromkeys(shapes), key=shapes.count)
    kept = [(number, ex, shape) for number, ex, shape in zip(examples.numbers, examples.rows, shapes)]
    examples.rows = [ex for _, ex, shape in kept if shape == keep]
    examples.numbers = [number for number, _, shape in kept if shape == keep]
    for number, _, shape in kept:
        if shape != keep:
            examples.skipped.append((number, f"{shape} row among {keep} rows (one source, one format)"))
    examples.skipped.sort()
