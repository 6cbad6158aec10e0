"""Saved adapters of either kind, attached to and detached from one loaded base model.

``perft``: a PERFT adapter written by :func:`save_adapter` (``format_version`` in its config). ``peft``: a peft
adapter such as the LoRA baseline written by ``python -m perft_qlora.train --variant lora`` (``peft_type`` in
its config). Evaluation and the app switch between them on one NF4 base without reloading it.
"""

from __future__ import annotations

from .checkpoint import AdapterError, load_adapter, read_adapter_config, read_config_json
from .model import detach_perft


def adapter_kind(directory: str) -> str:
    """``"perft"`` or ``"peft"``, from the directory's ``adapter_config.json``; AdapterError otherwise."""
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
