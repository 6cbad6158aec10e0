"""Per-architecture facts: where the MoE block lives, how its router gates, how checkpoints name experts.

One entry per model family. A family fits when, as in transformers 5's OLMoE, Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V3 and GLM-4.5, its sparse MoE block holds a top-K router returning ``(logits, weights, indices)`` and fused
gated-MLP experts called as ``experts(tokens, indices, weights)``; anything else the block does (Qwen2-MoE's
gated shared expert, DeepSeek's shared experts) runs untouched, because PERFT calls the whole base block. Then adding the family is
one more ``MoEArch`` in ``ARCHITECTURES`` (and a tiny config in ``tiny.py`` for its tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from ..errors import PerftQloraError


class UnsupportedArchitectureError(PerftQloraError):
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
    shared_expert: str | None = None
    """Attribute of the MoE block holding an always-on shared expert MLP (its linears load as NF4), if any."""
    keep_dense: tuple[str, ...] = ()
    """Names of ``nn.Linear`` modules kept in the compute dtype, not NF4 (Qwen2-MoE's 1-output shared-expert gate)."""
    gating: str = "softmax"
    """The router's score function (a key of ``routing.GATING``); PERFT's learned router uses the same."""
    recipe_aux_loss_coef: float = 0.01
    """Balance-loss coefficient of the authors' released recipe (OLMoE, Mixtral); other families take OLMoE's."""
    recipe_learning_rate: float = 1e-5
    """Learning rate of the authors' released recipe (OLMoE, Mixtral); other families take OLMoE's."""
    base_balance_loss: bool = True
    """Whether training adds the base router's Switch balance loss (DeepSeek-V3 balances with its score bias)."""

    @property
    def base_aux_loss_coef(self) -> float:
        """Default weight of the base router's balance loss in training: the recipe's, or 0 where it does not apply."""
        return self.recipe_aux_loss_coef if self.base_balance_loss else 0.0

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_attr))

    def top_k(self, config: PretrainedConfig) -> int:
        return int(config.num_experts_per_tok)

    def renormalizes_top_k(self, config: PretrainedConfig) -> bool:
        """Whether the base router renormalises its top-K weights (PERFT's router copies this choice)."""
        if self.model_type == "mixtral":
            return True
        return bool(getattr(config, "norm_topk_prob", False))

    def is_moe_block(self, block) -> bool:
        """Whether a decoder layer's ``moe_block`` is sparse (families may keep some layers as dense MLPs)."""
        block = block.base if hasattr(block, "perft_router") else block  # an attached PerftMoEBlock
        return hasattr(block, self.router) and hasattr(block, self.experts)

    def moe_layers(self, model) -> list[int]:
        """Indices of the decoder layers whose block is a sparse MoE block (PERFT attaches to these only)."""
        return [i for i, layer in enumerate(decoder_layers(model)) if self.is_moe_block(getattr(layer, self.moe_block))]


_GATED_MLP_KEYS = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")
"""The per-expert hub layout of OLMoE, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 (transformers' ``qwen2_moe`` converter)."""

ARCHITECTURES: dict[str, MoEArch] = {
    "olmoe": MoEArch(
        model_type="olmoe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="num_experts",
        expert_checkpoint_keys=_GATED_MLP_KEYS,
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
    # Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-K, renormalised when norm_topk_prob (true in both).
    "qwen3_moe": MoEArch(
        model_type="qwen3_moe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="num_experts",
        expert_checkpoint_keys=_GATED_MLP_KEYS,
    ),
    # Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax top-K (not renormalised in the released configs)
    # plus a shared expert MLP scaled by sigmoid(shared_expert_gate(h)); the gate is a Linear(H, 1) kept in bf16.
    "qwen2_moe": MoEArch(
        model_type="qwen2_moe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="num_experts",
        expert_checkpoint_keys=_GATED_MLP_KEYS,
        shared_expert="shared_expert",
        keep_dense=("shared_expert_gate",),
    ),
    # DeepSeek-V3 layout (Moonlight-16B-A3B; DeepSeek-V3/R1 themselves ship FP8 weights, refused by the loader):
    # sigmoid scores + e_score_correction_bias for the choice, group-limited top-K (n_group / topk_group),
    # renormalised, times routed_scaling_factor, all inside the float32 router; always-on shared experts; the
    # first first_k_dense_replace layers are dense MLPs (NF4 linears, no PERFT block).
    "deepseek_v3": MoEArch(
        model_type="deepseek_v3",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="n_routed_experts",
        expert_checkpoint_keys=_GATED_MLP_KEYS,
        shared_expert="shared_experts",
        gating="sigmoid",
        # No Switch loss on the frozen base router: DeepSeek balances by e_score_correction_bias, and TRL's
        # loss reads config.num_experts, which DeepseekV3Config does not have.
        base_balance_loss=False,
    ),
    # GLM-4.5 / GLM-4.5-Air: DeepSeek-V3's router, shared experts and dense first layers, with GQA attention.
    "glm4_moe": MoEArch(
        model_type="glm4_moe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        num_experts_attr="n_routed_experts",
        expert_checkpoint_keys=_GATED_MLP_KEYS,
        shared_expert="shared_experts",
        gating="sigmoid",
        base_balance_loss=False,
    ),
}


def get_arch(config: PretrainedConfig) -> MoEArch:
    """The :class:`MoEArch` for ``config``, or a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"perft_qlora does not support model_type={model_type!r}; supported: {supported}. "
            "Adding a family is one MoEArch entry in perft_qlora/quant/arch.py."
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
