"""The checkpoint ``--resume`` continues from, checked before any model weight is read: its trainer state parses,
its pickled files (optimizer, scheduler, RNG state) hold tensors and no code, and its adapter fits both its own
header and this run (the base model's ``config.json``, ``--variant``, ``--bottleneck`` and the other adapter
options). Each failure is one :class:`~perft_qlora.errors.UsageError` naming the file and the fix.

:func:`load_tensor_file` is also how the trainer reads those pickles, so a file swapped after this check still
ends as one line, never with torch's advice to load it with ``weights_only=False`` (which would run its code).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re

import torch

from ..errors import PerftQloraError, UsageError
from ..method.adapters import adapter_kind
from ..method.checkpoint import CONFIG_NAME, LEGACY_CONFIG_NAME, verify_adapter_files
from ..method.config import PerftConfig

TRAINER_STATE_NAME = "trainer_state.json"
PICKLED = ("optimizer.pt", "scheduler.pt", "rng_state*.pth")
"""The Trainer's pickled files in a checkpoint (``training_args.bin`` is never read back on resume)."""
_OPTION_OF_FIELD = {"variant": "--variant", "num_experts": "--num-experts", "top_k": "--top-k",
                    "bottleneck": "--bottleneck", "alpha": "--alpha", "activation": "--activation",
                    "dropout": "--adapter-dropout", "router_aux_loss_coef": "--aux-loss-coef", "layers": "--layers"}


def _start_over(checkpoint: str) -> str:
    return (f"resume from an earlier checkpoint (--resume <its directory>), or delete {os.path.basename(checkpoint)} "
            "and run again with --resume, or start over with --overwrite")


def load_tensor_file(path: str, fix: str = "delete the file and resume from an earlier checkpoint"):
    """``torch.load(path, weights_only=True)`` with numpy's RNG types allowed (as the Trainer reads them); a file
    that holds code is refused and a damaged one reported, each as one UsageError ending with ``fix``."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's text advises weights_only=False: never repeat it
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" (it would call {found.group(1)})" if found else ""
        raise UsageError(f"{path} holds code, not tensors{what}: refused; it was not written by this trainer, so "
                         f"{fix}") from None
    except Exception as error:  # truncated zip, not a torch file: torch raises EOFError, RuntimeError, IndexError...
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise UsageError(f"{path} is damaged ({detail}); {fix}") from None


def check_trainer_state(checkpoint: str) -> None:
    """``trainer_state.json`` (when there is one) parses into the Trainer's ``TrainerState``."""
    from transformers import TrainerState

    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        if not isinstance(state, dict):
            raise TypeError(f"a JSON {type(state).__name__}, not an object")
        TrainerState(**state)
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"{path} is damaged ({str(error)[:120]}); {_start_over(checkpoint)}") from error


def check_pickles(checkpoint: str) -> None:
    """Each pickled file of the checkpoint loads as tensors only (:func:`load_tensor_file`)."""
    for pattern in PICKLED:
        for path in sorted(glob.glob(os.path.join(checkpoint, pattern))):
            load_tensor_file(path, _start_over(checkpoint))


def check_checkpoint_adapter(checkpoint: str, base_config, perft_config: PerftConfig | None) -> None:
    """The checkpoint's adapter: the same kind as this run's, its files consistent (header against config), its
    base the ``--model`` given, and its PERFT config the one this run's options make."""
    if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in (CONFIG_NAME, LEGACY_CONFIG_NAME)):
        return  # an incomplete checkpoint: which one to resume from is resolve_resume's decision
    try:
        kind = adapter_kind(checkpoint)
    except PerftQloraError as error:
        raise UsageError(f"{error}; {_start_over(checkpoint)}") from error
    if (kind == "peft") != (perft_config is None):
        trained = "--variant lora" if kind == "peft" else "a PERFT variant"
        raise UsageError(f"{checkpoint} was trained with {trained}; resume with the options it was trained with, "
                         "or start over with --overwrite (or another --output-dir)")
    if kind == "peft":
        return  # peft checks its LoRA's fit when it loads it
    metadata = verify_adapter_files(checkpoint, base_config)
    saved = PerftConfig.from_dict(metadata["perft"]).to_dict()
    wanted = perft_config.to_dict()
    changed = [f"{_OPTION_OF_FIELD.get(key, key)} {saved[key]} -> {wanted[key]}" for key in saved
               if saved[key] != wanted.get(key)]
    if changed:
        raise UsageError(f"{checkpoint} was trained with other adapter options than this run's ({', '.join(changed)}); "
                         "resume with the options it was trained with, or start over with --overwrite (or another "
                         "--output-dir)")


def check_resume_checkpoint(checkpoint: str, base_config, perft_config: PerftConfig | None) -> None:
    """Everything above, before the model loads (``train.run``)."""
    check_trainer_state(checkpoint)
    check_pickles(checkpoint)
    check_checkpoint_adapter(checkpoint, base_config, perft_config)
