"""Values of train's options checked before anything loads: the ``--config`` file (it parses; each value has its
option's type) and every numeric option's range (:data:`NUMBER_RULES`, one table). Each failure is a
:class:`~perft_qlora.errors.UsageError` naming the option and the fix. The option parsers of comma lists live
here too, as the config file's values go through them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

from ..errors import UsageError


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _config_value(key: str, value, action: argparse.Action, path: str):
    """A ``--config`` value as the option would have parsed it from the command line; a wrong type is a
    UsageError naming the key and what it takes (argparse applies ``type=`` to command-line strings only)."""
    def wrong(what: str) -> UsageError:
        return UsageError(f"{key} in {path} is {value!r}; it takes {what} (see --help for --{key.replace('_', '-')})")

    if value is None:
        return None
    if action.nargs == 0:  # a flag: store_true or --x/--no-x
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if action.nargs == "?" and isinstance(value, bool):  # --resume: true is the bare flag, false leaves it out
        return action.const if value else None
    if action.type in (int_list, str_list):
        if isinstance(value, str):
            value = action.type(value)
        item = int if action.type is int_list else str
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise wrong("a list of integers (or \"0,1\")" if item is int else "a list of names (or \"a,b\")")
        return value
    if isinstance(value, (list, dict, bool)):
        raise wrong({int: "an integer", float: "a number"}.get(action.type, "a single value"))
    if action.type is int and isinstance(value, float):
        raise wrong("an integer")
    text = value if isinstance(value, str) else str(value)
    try:
        value = action.type(text) if action.type is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise wrong({int: "an integer", float: "a number"}.get(action.type, "a value of its type")) from None
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """The option values in a ``--config`` file (YAML or JSON), each as the command line would have parsed it;
    a file that does not parse, an unknown key or a value of the wrong type is one UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                         "save it as UTF-8") from error
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except ValueError as error:  # json.JSONDecodeError
        raise UsageError(f"config file {path} is not valid JSON ({error}); fix it or write it as YAML") from error
    except Exception as error:  # yaml.YAMLError and its subclasses; yaml is imported only for YAML files
        if not type(error).__module__.startswith("yaml"):
            raise
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"config file {path} is not valid YAML{at} ({problem}); fix the file (keys as the "
                         "options, e.g. `bottleneck: 8`)") from error
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of option names to values")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown option(s) in {path}: {', '.join(unknown)}; see --help for the names")
    return {key: _config_value(key, value, known[key], path) for key, value in values.items()}


# Every numeric option with the range it must lie in, checked in one place (check_numbers) before anything loads:
# values that argparse accepts but torch, TRL or the Trainer would reject with a traceback (a NaN or negative
# learning rate, --batch-size 0, --max-length 0), or silently misread. None (an option left out) always passes.
# --num-experts, --top-k and --bottleneck are PerftConfig's (make_perft_config), which names them the same way.
NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "gpu_memory_limit": (lambda v: v > 0, "a positive number of GiB"),
    "alpha": (lambda v: v > 0, "a number > 0"),
    "adapter_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "aux_loss_coef": (lambda v: v >= 0, "a number >= 0"),
    "base_aux_loss_coef": (lambda v: v >= 0, "a number >= 0"),
    "val_size": (lambda v: v >= 0, ">= 0"),
    "max_length": (lambda v: v >= 1, ">= 1 (tokens per example)"),
    "epochs": (lambda v: v > 0, "a number > 0"),
    "max_steps": (lambda v: v >= 1 or v == -1, ">= 1, or -1 to run --epochs"),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "global_batch_size": (lambda v: v >= 1, ">= 1"),
    "grad_accum": (lambda v: v >= 1, ">= 1"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "logging_steps": (lambda v: v >= 1, ">= 1"),
    "eval_steps": (lambda v: v >= 1, ">= 1"),
    "save_steps": (lambda v: v >= 1, ">= 1"),
    "save_total_limit": (lambda v: v >= 1, ">= 1"),
    "cpu_threads": (lambda v: v >= 1, ">= 1"),
    "show_example": (lambda v: v >= 1, ">= 1 (1 = the first usable row)"),
}


def check_numbers(options) -> None:
    """Each :data:`NUMBER_RULES` option of ``options`` (the parsed namespace or a :class:`TrainOptions`) finite
    and in its range; else a UsageError naming the option, the range and the value."""
    for name, (holds, phrase) in NUMBER_RULES.items():
        value = getattr(options, name)
        if value is None:
            continue
        if not math.isfinite(value) or not holds(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {phrase}, got {value}; pass such a value, or "
                             "leave the option out for its default (see --help)")
