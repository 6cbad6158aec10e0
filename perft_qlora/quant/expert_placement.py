"""``ExpertPlacement``: which MoE layers keep their NF4 experts on the compute device and which are offloaded.

``load_model(offload_experts=..., expert_budget_gib=...)`` and ``plan --gpu-memory`` decide the same way, from the
byte counts of :mod:`~perft_qlora.quant.footprint` (exact: they equal what the loader allocates):

- ``none``: every layer resident;
- ``all``: every MoE layer's experts offloaded to host memory, streamed through two staging buffers;
- ``auto``: as many layers resident as ``budget`` bytes allow, counting the two staging buffers (each one
  layer's experts) whenever at least one layer is offloaded; with no budget, every layer resident.

The offloaded layers are spread evenly over the MoE layers (every fourth one when a quarter streams), so the
copy of the next streamed layer overlaps the compute of the resident layers before it as well as of the
streamed layer itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .arch import decoder_layers
from .nf4 import NF4Weight, nf4_bytes, scale_bytes

logger = logging.getLogger(__name__)

OFFLOAD_CHOICES = ("none", "all", "auto")
STAGING_BUFFERS = 2


@dataclass(frozen=True)
class ExpertPlacement:
    layer_bytes: tuple[int, ...]
    """NF4 expert bytes (values, scales, code books) of every decoder layer; 0 for a dense layer."""
    offloaded: tuple[int, ...]
    """Decoder-layer indices whose experts live in host memory."""

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.layer_bytes) if n)

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(i for i in self.moe_layers if i not in self.offloaded)

    @property
    def staging_bytes(self) -> int:
        """The two compute buffers (zero when nothing is offloaded)."""
        if not self.offloaded:
            return 0
        return min(STAGING_BUFFERS, len(self.offloaded)) * max(self.layer_bytes[i] for i in self.offloaded)

    @property
    def device_bytes(self) -> int:
        """Expert bytes on the compute device: resident layers plus the staging buffers."""
        return sum(self.layer_bytes[i] for i in self.resident) + self.staging_bytes

    @property
    def host_bytes(self) -> int:
        """Expert bytes in host memory (pinned on CUDA)."""
        return sum(self.layer_bytes[i] for i in self.offloaded)


def spread(moe_layers: tuple[int, ...], count: int) -> tuple[int, ...]:
    """``count`` of ``moe_layers`` spread evenly (the last layer of each group of ``len / count``)."""
    n = len(moe_layers)
    return tuple(moe_layers[((i + 1) * n) // count - 1] for i in range(count)) if count else ()


def place_experts(layer_bytes: list[int] | tuple[int, ...], mode: str = "auto",
                  budget: int | None = None) -> ExpertPlacement:
    """The placement for ``mode`` (``OFFLOAD_CHOICES``) given each layer's expert bytes and, for ``auto``, the
    bytes the experts may take on the compute device (resident layers + staging buffers)."""
    if mode not in OFFLOAD_CHOICES:
        raise ValueError(f"offload_experts must be one of {', '.join(OFFLOAD_CHOICES)}, got {mode!r}")
    layer_bytes = tuple(int(n) for n in layer_bytes)
    moe = tuple(i for i, n in enumerate(layer_bytes) if n)
    if mode == "none" or (mode == "auto" and budget is None):
        return ExpertPlacement(layer_bytes, ())
    if mode == "all":
        return ExpertPlacement(layer_bytes, moe)
    if budget < 0:
        raise ValueError(f"the expert budget must be >= 0 bytes, got {budget}")
    for count in range(len(moe) + 1):
        placement = ExpertPlacement(layer_bytes, spread(moe, count))
        if placement.device_bytes <= budget:
            return placement
    return ExpertPlacement(layer_bytes, moe)  # even all offloaded needs more than the budget (the staging buffers)


def expert_layer_bytes(model, double_quant: bool = True) -> list[int]:
    """NF4 expert bytes of each decoder layer of a (``meta``) model, as the loader stores them: the fused 3-D
    expert tensors' packed values and scales (``footprint.py`` counts them by the same formulas)."""
    sizes = []
    for layer in decoder_layers(model):
        total = 0
        for name, module in layer.named_modules():
            if name.rpartition(".")[2] != "experts":
                continue
            for param in module.parameters(recurse=False):
                if param.dim() == 3:
                    total += nf4_bytes(param.numel()) + scale_bytes(param.numel(), double_quant)
        sizes.append(total)
    return sizes


def move_home(weight: NF4Weight, pin: bool) -> bool:
    """Move an ``NF4Weight``'s tensors to host memory, page-locked when ``pin``; False when pinning failed
    (the tensors then stay pageable: host-to-device copies are synchronous and slower)."""
    pinned = True
    for name, tensor in list(weight._buffers.items()):
        host = tensor.to("cpu")
        if pin:
            try:
                host = host.pin_memory()
            except RuntimeError:
                pinned = False
        weight._buffers[name] = host
    return pinned
