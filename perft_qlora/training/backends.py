"""Training backends: how activation checkpointing runs. ``default`` everywhere; ``unsloth`` on CUDA.

A backend is checked before any weight is loaded (so a missing GPU or package fails at once) and then
applied to the model after the trainer has set up checkpointing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PerftQloraError


class BackendUnavailableError(PerftQloraError, RuntimeError):
    """The requested backend cannot run on this machine."""


def _check_default() -> None:
    return None


def _apply_default(model) -> None:
    return None


def _check_unsloth() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "--backend unsloth needs a CUDA GPU (Unsloth cannot even be imported without one); "
            "use --backend default, optionally with --offload-activations"
        )
    if importlib.util.find_spec("unsloth") is None or importlib.util.find_spec("unsloth_zoo") is None:
        raise BackendUnavailableError("--backend unsloth needs Unsloth: pip install 'perft-qlora[unsloth]'")


def _apply_unsloth(model) -> None:
    """Swap the checkpoint function of every checkpointed decoder layer for Unsloth's offloaded one.

    Unsloth keeps each layer's input in pinned CPU memory and recomputes the layer in backward.
    ``_set_gradient_checkpointing`` is the hook transformers provides for a custom checkpoint function.
    """
    import unsloth  # noqa: F401  (sets up Unsloth's CUDA state)
    from unsloth_zoo.gradient_checkpointing import Unsloth_Offloaded_Gradient_Checkpointer

    def offloaded_checkpoint(function, hidden_states, *args, **kwargs):
        return Unsloth_Offloaded_Gradient_Checkpointer.apply(function, hidden_states, *args)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)


@dataclass(frozen=True)
class Backend:
    name: str
    check: Callable[[], None]
    """Raises BackendUnavailableError when the backend cannot run here."""
    apply: Callable[[object], None]
    """Applied to the model once the trainer exists (checkpointing already enabled)."""


BACKENDS = {
    "default": Backend("default", _check_default, _apply_default),
    "unsloth": Backend("unsloth", _check_unsloth, _apply_unsloth),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    backend.check()
    return backend
