"""A bank of named adapters over one frozen base model, switched in place (hot swap).

Each adapter is read and checked once, at registration; a PERFT adapter's tensors are kept in memory and
copied onto a fresh attachment when it is activated (no file read, no base reload). A peft adapter (the LoRA
baseline) is re-read from its directory when activated: its files are small and peft owns its layers.
Not thread-safe: the caller serialises ``register`` and ``activate`` (``serving.chat.ChatModel`` holds a lock).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .adapters import adapter_kind, attach_saved_adapter, detach_adapter, training_record
from .checkpoint import (
    AdapterError,
    adapter_parameters,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    read_config_json,
)
from .config import PerftConfig
from .model import ParameterReport, attach_perft, parameter_report


@dataclass
class BankedAdapter:
    directory: str
    config: PerftConfig | None
    """None for a peft adapter (the LoRA baseline), which is re-read from ``directory`` when activated."""
    state: dict[str, torch.Tensor] | None
    metadata: dict
    report: ParameterReport

    @property
    def variant(self) -> str:
        return self.config.variant if self.config is not None else f"peft {self.metadata.get('peft_type', '?').lower()}"

    @property
    def knobs(self) -> dict:
        if self.config is not None:
            return self.config.to_dict()
        return {k: self.metadata.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}


class AdapterBank:
    """``model`` with at most one of the registered adapters on it; ``active`` names it (None: the bare base)."""

    def __init__(self, model):
        if getattr(model, "perft_config", None) is not None or hasattr(model, "peft_config"):
            raise AdapterError("pass the base model without an adapter attached; register adapters by name instead")
        self.model = model
        self.entries: dict[str, BankedAdapter] = {}
        self.active: str | None = None
        self.base_report = parameter_report(model)

    def register(self, name: str, directory: str) -> BankedAdapter:
        """Check ``directory`` against the base and keep it under ``name`` (leaves the bare base on the model)."""
        if name in self.entries:
            raise AdapterError(f"adapter name {name!r} is already registered; pick another NAME in NAME=DIR")
        self.detach()
        try:
            entry = self._peft_entry(directory) if adapter_kind(directory) == "peft" else self._perft_entry(directory)
        except OSError as err:
            raise AdapterError(f"cannot read adapter {directory}: {err}") from err
        finally:
            self.detach()
        self.entries[name] = entry
        return entry

    def _perft_entry(self, directory: str) -> BankedAdapter:
        """Load a PERFT adapter once and keep a copy of its tensors."""
        metadata = read_adapter_config(directory)
        load_adapter(self.model, directory)
        state = {k: v.clone() for k, v in adapter_state_dict(self.model).items()}
        return BankedAdapter(directory, dataclasses.replace(self.model.perft_config), state, metadata,
                             parameter_report(self.model))

    def _peft_entry(self, directory: str) -> BankedAdapter:
        """Check a peft adapter fits the base (attach, count its LoRA values, detach)."""
        adapted = attach_saved_adapter(self.model, directory)
        try:
            values = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
        finally:
            self.model = detach_adapter(adapted)
        base = self.base_report
        report = ParameterReport(values, values, base.backbone, base.backbone_per_token)  # LoRA is dense per token
        metadata = {**read_config_json(directory), "extra": {"training": training_record(directory)}}
        return BankedAdapter(directory, None, None, metadata, report)

    def detach(self) -> None:
        """The bare base model again."""
        if getattr(self.model, "perft_config", None) is not None or hasattr(self.model, "peft_config"):
            self.model = detach_adapter(self.model)
        self.active = None

    def activate(self, name: str | None) -> None:
        """Put registered adapter ``name`` (None: none) on the model."""
        if name == self.active:
            return
        entry = self.entries[name] if name is not None else None
        self.detach()
        if entry is not None and entry.config is None:  # peft: re-read its (small) files
            self.model = attach_saved_adapter(self.model, entry.directory)
        elif entry is not None:
            dtype = next(iter(entry.state.values())).dtype  # as load_adapter attached it (bf16 or fp32 masters)
            attach_perft(self.model, entry.config, dtype=dtype)
            with torch.no_grad():
                for key, param in adapter_parameters(self.model).items():
                    param.copy_(entry.state[key])
        self.active = name
