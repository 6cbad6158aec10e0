"""The variant table: how many PEFT experts each variant has and which router strategy picks among them.

``build_adapter`` is the only reader of :class:`PerftConfig`; modules below it take plain arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import PerftConfig
from .lora_experts import LoRAExperts
from .routing import BaseRouterTap, DenseGate, LearnedTopKRouter


@dataclass(frozen=True)
class BlockFacts:
    """What a builder needs to know about the base MoE block it attaches to."""

    hidden_size: int
    num_experts: int
    """N, the base block's routed experts."""
    top_k: int
    """K, the base router's experts per token."""
    renormalizes: bool
    """Whether the base router renormalises its top-K weights."""
    gating: str = "softmax"
    """The base router's score function (``routing.GATING``)."""


@dataclass(frozen=True)
class Variant:
    num_experts: Callable[[PerftConfig, BlockFacts], int]
    """M for this variant."""
    router: Callable[[PerftConfig, BlockFacts, int, torch.dtype], nn.Module]
    """Builds the routing strategy given the config, the block, M and the dtype."""


def _perft_e_experts(config: PerftConfig, block: BlockFacts) -> int:
    if config.num_experts not in (None, block.num_experts):
        raise ValueError(
            f"perft_e pairs one PEFT expert with each base expert, so num_experts must equal N={block.num_experts} "
            f"(got {config.num_experts}); leave it unset to take N from the model."
        )
    return block.num_experts


VARIANTS: dict[str, Variant] = {
    "perft": Variant(
        num_experts=lambda c, b: c.num_experts,
        router=lambda c, b, m, dtype: LearnedTopKRouter(
            b.hidden_size, m, c.top_k, b.renormalizes, c.router_init_std, dtype, gating=b.gating
        ),
    ),
    "perft_e": Variant(num_experts=_perft_e_experts, router=lambda c, b, m, dtype: BaseRouterTap(b.top_k)),
    "perft_d": Variant(num_experts=lambda c, b: c.num_experts, router=lambda c, b, m, dtype: DenseGate(m)),
    "perft_s": Variant(num_experts=lambda c, b: 1, router=lambda c, b, m, dtype: DenseGate(1)),
}


def build_adapter(config: PerftConfig, block: BlockFacts, dtype: torch.dtype) -> tuple[nn.Module, LoRAExperts]:
    """(router strategy, expert bank) for one MoE block."""
    variant = VARIANTS[config.variant]
    m = variant.num_experts(config, block)
    router = variant.router(config, block, m, dtype)
    experts = LoRAExperts(
        num_experts=m, hidden_size=block.hidden_size, bottleneck=config.bottleneck, scaling=config.scaling,
        dropout=config.dropout, activation=config.activation, init_std=config.init_std, dtype=dtype,
    )
    return router, experts
