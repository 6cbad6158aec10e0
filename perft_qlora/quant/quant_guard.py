"""Guard against bitsandbytes' CPU repacking of ``Linear4bit`` weights.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight into a CPU-only layout the
first time it runs an eval-mode, no-grad forward; that layout has no backward, so training afterwards
silently gets no gradient through the layer (and so none into the adapters below it). Each module reads
``support_avx512bf16_for_cpu`` at call time; setting it off on the instance keeps the trainable layout.
"""

from __future__ import annotations

import bitsandbytes as bnb
from torch import nn


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Turn the repacking off on every ``Linear4bit`` of ``model``; returns how many were guarded."""
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded
