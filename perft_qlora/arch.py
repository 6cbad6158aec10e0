"""Per-architecture facts: where the MoE block lives, how its router gates, how checkpoints name experts.

One entry per model family. Adding a family (Qwen2-MoE, Qwen3-MoE, ...) is one more ``MoEArch`` in
``ARCHITECTURES`` whose MoE block computes ``experts(h, *router(h)[2:0:-1])`` as OLMoE's and Mixtral's do.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


class UnsupportedArchitectureError(ValueError):
    """The model family has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    """``config.model_type`` this entry describes."""
    moe_block: str
    """Attribute of each decoder layer holding the sparse MoE block."""
    router: str
    """Attribute of the MoE block holding the top-K router (returns ``logits, weights, indices``)."""
    experts: str
    """Attribute of the MoE block holding the fused experts (``gate_up_proj [N, 2I, H]``, ``down_proj [N, H, I]``)."""
    num_experts_attr: str
    """Config attribute with N, the number of routed experts."""
    expert_checkpoint_keys: tuple[str, str, str]
    """Per-expert checkpoint keys (gate, up, down) under a layer prefix, ``{e}`` being the expert index."""
    checkpoint_block_names: tuple[str, ...] = ()
    """Other names the MoE block has in checkpoints (Mixtral's hub files say ``block_sparse_moe``)."""
    recipe_aux_loss_coef: float = 0.01
    """Balance-loss coefficient of the authors' released recipe for this family."""
    recipe_learning_rate: float = 1e-5
    """Learning rate of the authors' released recipe for this family."""

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_attr))

    def top_k(self, config: PretrainedConfig) -> int:
        return int(config.num_experts_per_tok)

    def renormalizes_top_k(self, config: PretrainedConfig) -> bool:
        """Whether the base router renormalises its top-K weights (PERFT's router copies this choice)."""
        if self.model_type == "mixtral":
            return True
        return bool(getattr(config, "norm_topk_prob", False))


ARCHITECTURES: dict[str, MoEArch] = {
    "olmoe": MoEArch(
        model_type="olmoe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="num_experts",
        expert_checkpoint_keys=(
            "mlp.experts.{e}.gate_proj.weight",
            "mlp.experts.{e}.up_proj.weight",
            "mlp.experts.{e}.down_proj.weight",
        ),
        recipe_aux_loss_coef=0.01,
        recipe_learning_rate=1e-5,
    ),
    "mixtral": MoEArch(
        model_type="mixtral",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="num_local_experts",
        expert_checkpoint_keys=(
            "block_sparse_moe.experts.{e}.w1.weight",
            "block_sparse_moe.experts.{e}.w3.weight",
            "block_sparse_moe.experts.{e}.w2.weight",
        ),
        checkpoint_block_names=("block_sparse_moe",),
        recipe_aux_loss_coef=0.02,
        recipe_learning_rate=2e-5,
    ),
}


def get_arch(config: PretrainedConfig) -> MoEArch:
    """The :class:`MoEArch` for ``config``, or a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"perft_qlora does not support model_type={model_type!r}; supported: {supported}. "
            "Adding a family is one MoEArch entry in perft_qlora/arch.py."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model) -> list:
    """The decoder layers of a ``*ForCausalLM`` model (``model.model.layers``), also inside a peft ``PeftModel``."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    backbone = getattr(model, "model", model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no `model.layers`; not a decoder-only MoE LM.")
    return list(layers)
