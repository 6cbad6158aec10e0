"""A base model's ``config.json``, read before any weight: is it there, and is it a supported MoE family.

Train, evaluate and the app call :func:`model_config` before loading, so a wrong ``--model`` ends as one
:class:`~perft_qlora.errors.UsageError` naming the problem and the fix.
"""

from __future__ import annotations

import json
import os

from ..errors import UsageError
from .arch import ARCHITECTURES, get_arch


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a directory here rather than a hub id (exists, or is spelt like a path)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def _is_adapter_folder(path: str) -> bool:
    """A PERFT adapter (``perft_config.json``; ``adapter_config.json`` before the rename) or a peft one."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("perft_config.json", "adapter_config.json"))


def model_config(name: str, revision: str | None = None):
    """The base model's ``PretrainedConfig``, read from ``config.json`` only, for a supported MoE family."""
    from transformers import AutoConfig

    if is_local_path(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise UsageError(f"--model {name}: no such directory; pass a save_pretrained directory or a hub name")
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path) and _is_adapter_folder(path):
            raise UsageError(f"{name} is an adapter folder, not a base model: pass it as --adapter and the model it was "
                             "trained on as --model (its README.md names it)")
        if not os.path.isfile(config_path):
            raise UsageError(f"no config.json in {name}; --model must be a save_pretrained directory of an OLMoE or "
                             "Mixtral checkpoint (or a hub name)")
        try:
            with open(config_path, encoding="utf-8") as handle:
                model_type = json.load(handle).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise UsageError(f"{config_path} is not a JSON object ({error}); the checkpoint is damaged") from error
        if model_type not in ARCHITECTURES:
            raise UsageError(f"{name} is a {model_type!r} model, not a supported mixture-of-experts family "
                             f"({', '.join(sorted(ARCHITECTURES))}); pass an OLMoE or Mixtral checkpoint")
        name = path
    config = AutoConfig.from_pretrained(name, revision=revision)
    get_arch(config)  # a hub model of an unsupported family fails here, before any weight
    return config
