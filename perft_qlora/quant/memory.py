"""Where a model's bytes are: NF4 values, their scales, and compute-dtype tensors, per kind of weight."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import bitsandbytes as bnb
import torch
from torch import nn

from .nf4 import NF4Weight
from .nf4_experts import NF4Experts

KINDS = ("experts", "linear", "embeddings", "lm_head", "router", "norms", "adapters", "other")


def _state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (scales, nested scales, code books)."""
    total = 0
    for value in (state.absmax, state.code, state.offset):
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    if state.state2 is not None:
        total += _state_bytes(state.state2)
    return total


def logical_numel(param: torch.Tensor) -> int:
    """Number of values a parameter stands for (a ``Params4bit`` counts its unpacked shape)."""
    state = getattr(param, "quant_state", None)
    if isinstance(param, bnb.nn.Params4bit) and state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def _kind(name: str, module: nn.Module, model: nn.Module) -> str:
    parts = name.split(".")
    if any(p.startswith(("perft_", "lora_")) for p in parts):  # PERFT blocks; peft LoRA (the baseline)
        return "adapters"
    if isinstance(module, (NF4Weight, NF4Experts)) or (parts and parts[-1] == "experts") or ".experts." in f".{name}.":
        return "experts"
    if module is model.get_output_embeddings():
        return "lm_head"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if type(module).__name__.endswith("TopKRouter") or (parts[-1] == "gate" and not isinstance(module, nn.Linear)):
        return "router"
    if "Norm" in type(module).__name__:
        return "norms"
    if isinstance(module, (bnb.nn.Linear4bit, nn.Linear)):
        return "linear"
    return "other"


@dataclass
class MemoryReport:
    nf4: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes of packed 4-bit values per kind."""
    scales: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes of NF4 block scales and code books per kind."""
    dense: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    """Bytes of unquantized tensors per kind and dtype."""

    @property
    def total(self) -> int:
        return sum(self.nf4.values()) + sum(self.scales.values()) + sum(sum(d.values()) for d in self.dense.values())

    def expert_fraction_4bit(self) -> float:
        """Share of the experts' bytes that are packed 4-bit values (the rest: scales, any dense copy)."""
        total = self.nf4["experts"] + self.scales["experts"] + sum(self.dense["experts"].values())
        return self.nf4["experts"] / total if total else 0.0

    def __str__(self) -> str:
        lines = [f"{'kind':<11}{'nf4':>12}{'scales':>12}  dense", "-" * 60]
        for kind in KINDS:
            dense = ", ".join(f"{dt} {format_bytes(n)}" for dt, n in sorted(self.dense[kind].items()))
            if self.nf4[kind] or self.scales[kind] or dense:
                lines.append(f"{kind:<11}{format_bytes(self.nf4[kind]):>12}{format_bytes(self.scales[kind]):>12}  {dense}")
        lines.append(f"total {format_bytes(self.total)}; experts {self.expert_fraction_4bit():.1%} packed 4-bit")
        return "\n".join(lines)


UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}


def format_bytes(n: int, unit: str | None = None, down_to: int = 1) -> str:
    """``n`` bytes with two decimals, in ``unit`` or else the largest unit of which ``n`` holds at least
    ``1/down_to`` (``down_to=10``: 0.10 GiB rather than 102.40 MiB); below a KiB, whole bytes. The package's one
    byte formatter (memory reports, the planner, load reports)."""
    if unit is not None:
        return f"{n / UNITS[unit]:.2f} {unit}"
    for name, size in UNITS.items():
        if n >= size // down_to:
            return f"{n / size:.2f} {name}"
    return f"{n:.0f} B"


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes of every parameter and buffer of ``model`` by kind: NF4 values, NF4 scales, dense by dtype."""
    report, seen = MemoryReport(), set()
    for name, module in model.named_modules():
        kind = _kind(name, module, model)
        if isinstance(module, NF4Weight):
            report.nf4[kind] += module.packed.numel()
            report.scales[kind] += sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n != "packed")
            seen.update(id(b) for b in module.buffers())
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if isinstance(tensor, bnb.nn.Params4bit) and getattr(tensor, "bnb_quantized", False):
                report.nf4[kind] += tensor.numel() * tensor.element_size()
                report.scales[kind] += _state_bytes(tensor.quant_state)
            else:
                report.dense[kind][str(tensor.dtype).replace("torch.", "")] += tensor.numel() * tensor.element_size()
    return report


def count_values(model: nn.Module) -> tuple[int, int]:
    """(all backbone values, expert values): parameters counted by their unpacked size, adapters excluded."""
    total, experts = 0, 0
    for name, module in model.named_modules():
        kind = _kind(name, module, model)
        if kind == "adapters":
            continue
        if isinstance(module, NF4Weight):
            values = module.numel
        else:
            values = sum(logical_numel(p) for p in module.parameters(recurse=False))
        total += values
        experts += values if kind == "experts" else 0
    return total, experts


def peak_memory_bytes() -> tuple[str, int]:
    """``("gpu", bytes)``: torch's peak CUDA allocation since the last reset, or ``("rss", bytes)``: the process's
    peak resident set on a machine without CUDA (Linux reports it in KiB)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.max_memory_allocated()
    import resource

    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
