"""Saved adapters of either kind, attached to and detached from one loaded base model.

``perft``: a PERFT adapter written by :func:`save_adapter` (``format_version`` in its config). ``peft``: a peft
adapter such as the LoRA baseline written by ``python -m perft_qlora.train --variant lora`` (``peft_type`` in
its config). Evaluation and the app switch between them on one NF4 base without reloading it.
"""

from __future__ import annotations

import json
import os

from ..atomic import write_json
from .checkpoint import AdapterError, load_adapter, read_adapter_config, read_config_json
from .model import detach_perft

TRAINING_NAME = "perft_qlora_training.json"
"""Beside a peft adapter written by ``train --variant lora``: what the run recorded (prompt template, data, base
model, step), which peft's ``adapter_config.json`` has no field for. A PERFT adapter keeps the same record in
its own config (``extra.training``)."""


def recorded_training(adapter_config: dict) -> dict:
    """The training record inside a PERFT adapter's ``perft_config.json`` (``extra.training``); {} if none."""
    return (adapter_config.get("extra") or {}).get("training") or {}


def training_record(directory: str) -> dict:
    """What ``python -m perft_qlora.train`` recorded about the adapter in ``directory``; {} when nothing was."""
    if adapter_kind(directory) == "perft":
        return recorded_training(read_adapter_config(directory))
    path = os.path.join(directory, TRAINING_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is corrupt: {err}") from err
    return (record.get("training") or {}) if isinstance(record, dict) else {}


def write_training_record(directory: str, training: dict) -> None:
    """Write :data:`TRAINING_NAME` into a peft adapter's ``directory`` (atomically: temporary file, rename)."""
    write_json(os.path.join(directory, TRAINING_NAME), {"training": training}, default=str)


def adapter_kind(directory: str) -> str:
    """``"perft"`` or ``"peft"``, from the directory's config (``perft_config.json``, or ``adapter_config.json``:
    peft's, or a PERFT adapter saved before the rename); AdapterError otherwise."""
    config = read_config_json(directory)
    if isinstance(config, dict) and "peft_type" in config:
        return "peft"
    read_adapter_config(directory)  # raises with the precise reason (format version, corruption)
    return "perft"


def attach_saved_adapter(model, directory: str):
    """Attach the adapter in ``directory``; returns the model to call (a ``PeftModel`` for peft adapters)."""
    if adapter_kind(directory) == "perft":
        return load_adapter(model, directory)
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, directory, is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise AdapterError(f"peft adapter {directory} does not fit this model: {error}") from error


def detach_adapter(model):
    """Remove whatever adapter ``model`` carries; returns the bare base model (weights untouched)."""
    if hasattr(model, "unload") and hasattr(model, "peft_config"):
        return model.unload()  # peft: drops the LoRA layers without merging them
    return detach_perft(model)


def split_adapter_spec(value: str) -> tuple[str, str]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; a plain ``DIR`` is named after its folder. The one reading of
    ``--adapter`` for evaluate, analyze and the app."""
    name, sep, directory = value.partition("=")
    if not sep:
        name, directory = os.path.basename(os.path.normpath(value)), value
    name, directory = name.strip(), os.path.expanduser(directory.strip())
    if not name or not directory:
        raise AdapterError(f"--adapter takes NAME=DIR or DIR (e.g. perft=runs/perft-olmoe), got {value!r}")
    return name, directory


def named_adapters(values: list[str], reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """``--adapter`` values -> ``{name: directory}`` in order; names unique and none of ``reserved`` (the
    command's own rows or columns, e.g. the base model's)."""
    adapters: dict[str, str] = {}
    for value in values:
        name, directory = split_adapter_spec(value)
        if name in adapters or name in reserved:
            raise AdapterError(f"adapter name {name!r} is used twice or is reserved; name them: --adapter NAME=DIR")
        adapters[name] = directory
    return adapters
