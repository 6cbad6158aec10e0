"""``PerftConfig``: the knobs of a routed PEFT adapter, validated once; read only by ``variants.build_adapter``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

VariantName = Literal["perft", "perft_e", "perft_d", "perft_s"]
ACTIVATIONS = (None, "silu", "gelu", "relu")
DEFAULT_NUM_EXPERTS = 4
"""M where a perft / perft_d run names none (train's and the planner's ``--num-experts`` default)."""
DEFAULT_TOP_K = 2
"""K' where a perft run names none (train's and the planner's ``--top-k`` default)."""


@dataclass
class PerftConfig:
    variant: VariantName = "perft"
    """perft (own top-K' router), perft_e (reuse the base router, M = N), perft_d (M always-on), perft_s (one shared)."""
    num_experts: int | None = None
    """M, the number of PEFT experts. Required for perft / perft_d; perft_e takes N from the model; perft_s is 1."""
    top_k: int | None = None
    """K', PEFT experts per token (perft only)."""
    bottleneck: int = 16
    """DB, each PEFT expert's bottleneck width (LoRA rank)."""
    alpha: float | None = None
    """LoRA-style alpha; the expert output is scaled by alpha / bottleneck. Default 2 * bottleneck (the authors')."""
    activation: str | None = None
    """Activation between down- and up-projection: None (LoRA-style, the default), silu, gelu or relu."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    router_aux_loss_coef: float | None = None
    """Weight of the PERFT router's balance loss; default the architecture's recipe value (0.01 OLMoE, 0.02 Mixtral)."""
    layers: list[int] | None = None
    """Decoder layers that get an adapter; None means every MoE layer."""
    init_std: float | None = None
    """Std of the down-projection init; default sqrt(2 / bottleneck) as in the authors' code. Up-projections start at 0."""
    router_init_std: float = 0.02
    """Std of the PERFT router init."""

    def __post_init__(self) -> None:
        if self.variant not in ("perft", "perft_e", "perft_d", "perft_s"):
            raise ValueError(f"variant must be one of perft, perft_e, perft_d, perft_s; got {self.variant!r}")
        if self.variant in ("perft", "perft_d") and (self.num_experts is None or self.num_experts < 1):
            raise ValueError(f"{self.variant} needs num_experts (M) >= 1, got {self.num_experts}")
        if self.variant == "perft":
            if self.top_k is None or not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"perft needs 1 <= top_k (K') <= num_experts (M={self.num_experts}); got {self.top_k}")
        elif self.top_k is not None:
            raise ValueError(f"top_k applies to variant 'perft' only; {self.variant} routes {self._routing_phrase()}")
        if self.variant == "perft_s" and self.num_experts not in (None, 1):
            raise ValueError(f"perft_s has exactly one shared expert; got num_experts={self.num_experts}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck (DB) must be >= 1, got {self.bottleneck}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
        if self.alpha is None:
            self.alpha = 2.0 * self.bottleneck
        if self.init_std is None:
            self.init_std = (2.0 / self.bottleneck) ** 0.5

    def _routing_phrase(self) -> str:
        return {"perft_e": "with the base router's top-K", "perft_d": "to all M experts", "perft_s": "to its one expert"}[
            self.variant
        ]

    @property
    def scaling(self) -> float:
        return self.alpha / self.bottleneck

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PerftConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PerftConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def default_shape(variant: str, num_experts: int | None, top_k: int | None) -> tuple[int | None, int | None]:
    """``(num_experts, top_k)`` with :data:`DEFAULT_NUM_EXPERTS` / :data:`DEFAULT_TOP_K` filled in where
    ``variant`` takes the knob and none was given; every other value passes through unchanged."""
    if variant in ("perft", "perft_d") and num_experts is None:
        num_experts = DEFAULT_NUM_EXPERTS
    if variant == "perft" and top_k is None:
        top_k = DEFAULT_TOP_K
    return num_experts, top_k


__all__ = ["PerftConfig", "ACTIVATIONS", "DEFAULT_NUM_EXPERTS", "DEFAULT_TOP_K", "default_shape"]
