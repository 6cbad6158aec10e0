"""How tokens pick PEFT experts: one small strategy per variant, all returning a ``Routing``.

``LearnedTopKRouter`` (PERFT) has its own gate; ``BaseRouterTap`` (PERFT-E) passes the frozen base
router's decision through; ``DenseGate`` (PERFT-D, PERFT-S) sends every token to every PEFT expert with
weight 1. Each declares ``experts_per_token`` and ``params_per_token`` for the activated-parameter count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    weights: torch.Tensor
    """(T, K) gate weight of each chosen PEFT expert."""
    indices: torch.Tensor
    """(T, K) int64 PEFT expert ids."""
    logits: torch.Tensor | None
    """(T, M) router logits when the router is trainable (for the balance loss), else None."""


GATING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: torch.softmax(logits, dim=-1),  # OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE
    "sigmoid": torch.sigmoid,  # DeepSeek-V3 (independent scores; no correction bias or groups for M PEFT experts)
}
"""Router score functions by name (``MoEArch.gating``): float32 (T, M) logits -> (T, M) scores."""


class LearnedTopKRouter(nn.Module):
    """PERFT's router: bias-free ``Linear(D, M)``, float32 scores by the base family's gating function,
    top-K', renormalised like the base router."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, init_std: float, dtype,
        gating: str = "softmax",
    ):
        super().__init__()
        if gating not in GATING:
            raise ValueError(f"unknown gating {gating!r}; known: {', '.join(GATING)}")
        self.num_experts, self.top_k, self.renormalize, self.gating = num_experts, top_k, renormalize, gating
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype).normal_(0.0, init_std))

    @property
    def experts_per_token(self) -> int:
        return self.top_k

    @property
    def params_per_token(self) -> int:
        return self.weight.numel()

    def forward(self, x: torch.Tensor, base_weights: torch.Tensor, base_indices: torch.Tensor) -> Routing:
        logits = F.linear(x.to(self.weight.dtype), self.weight)  # (T, M); float32 master weights take bf16 inputs
        scores = GATING[self.gating](logits.float())  # (T, M)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)  # (T, K'), (T, K')
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, indices, logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, gating={self.gating}, renormalize={self.renormalize}"


class BaseRouterTap(nn.Module):
    """PERFT-E: PEFT expert j follows base expert j, weighted by the frozen router's own top-K weights."""

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    @property
    def experts_per_token(self) -> int:
        return self.top_k

    params_per_token = 0

    def forward(self, x: torch.Tensor, base_weights: torch.Tensor, base_indices: torch.Tensor) -> Routing:
        return Routing(base_weights, base_indices, None)


class DenseGate(nn.Module):
    """PERFT-D / PERFT-S: every token uses all M PEFT experts, each with weight 1 (an unweighted sum)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    @property
    def experts_per_token(self) -> int:
        return self.num_experts

    params_per_token = 0

    def forward(self, x: torch.Tensor, base_weights: torch.Tensor, base_indices: torch.Tensor) -> Routing:
        num_tokens = x.shape[0]
        indices = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)  # (T, M)
        weights = torch.ones(num_tokens, self.num_experts, device=x.device, dtype=x.dtype)  # (T, M)
        return Routing(weights, indices, None)
