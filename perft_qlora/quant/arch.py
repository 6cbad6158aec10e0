"""The registry of model families: where the MoE block lives, how its router gates, how checkpoints name
experts, which public config ships for it, its tiny test config and its benchmark shape.

One entry per model family. A family fits when, as in transformers 5's OLMoE, Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V3 and GLM-4.5, its sparse MoE block holds a top-K router returning ``(logits, weights, indices)`` and fused
gated-MLP experts called as ``experts(tokens, indices, weights)``; anything else the block does (Qwen2-MoE's
gated shared expert, DeepSeek's shared experts) runs untouched, because PERFT calls the whole base block. Then adding the family is
one more ``MoEArch`` in ``ARCHITECTURES`` (its tiny test config included). Families the planner accounts but the
loader does not serve are in ``PLANNED_ONLY``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..errors import PerftQloraError

CONFIG_DIR = Path(__file__).parent.parent / "configs"  # perft_qlora/configs


class UnsupportedArchitectureError(PerftQloraError):
    """The model family has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ShippedConfig:
    """A hub model's public config.json, shipped (no weights) as ``perft_qlora/configs/<name>.json``."""

    name: str
    """Short name: ``plan --model <name>`` (and ``bench --arch <name>`` where ``bench``), the file's stem."""
    hub_id: str
    """The hub model the file was written from (``plan --model`` takes it too)."""
    bench: bool = False
    """Whether ``bench`` writes random checkpoints at this config's shapes (``--arch <name>``)."""

    @property
    def path(self) -> Path:
        return CONFIG_DIR / f"{self.name}.json"


_GATED_MLP_KEYS = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")
"""The per-expert hub layout of OLMoE, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 (transformers' ``qwen2_moe`` converter)."""


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    """``config.model_type`` this entry describes."""
    moe_block: str = "mlp"
    """Attribute of each decoder layer holding the sparse MoE block."""
    router: str = "gate"
    """Attribute of the MoE block holding the top-K router (returns ``logits, weights, indices``)."""
    experts: str = "experts"
    """Attribute of the MoE block holding the fused experts (``gate_up_proj [N, 2I, H]``, ``down_proj [N, H, I]``)."""
    num_experts_attr: str = "num_experts"
    """Config attribute with N, the number of routed experts."""
    expert_checkpoint_keys: tuple[str, str, str] = _GATED_MLP_KEYS
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
    shipped: ShippedConfig | None = None
    """The public config the planner reads for this family (``perft_qlora/configs``), if one ships."""
    tiny: dict[str, Any] = field(default_factory=dict, hash=False)
    """Config values of the family's tiny test model over ``training/tiny.py``'s common ones (its MoE knobs)."""

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


_TINY_WIDE = dict(intermediate_size=128, head_dim=16)
"""The tiny dense MLP twice an expert's width (the real models' experts are narrower), per-head width set."""

_DEEPSEEK_MOE_TINY = dict(
    n_routed_experts=8, moe_intermediate_size=64, n_shared_experts=1, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, num_hidden_layers=3,
)
"""Moonlight's choices at tiny size: sigmoid + bias, 2 groups of 4 experts (1 kept), renormalised then scaled,
one shared expert, the first layer dense (GLM-4.5 makes the same)."""

_DEEPSEEK_V3 = MoEArch(
    model_type="deepseek_v3",
    num_experts_attr="n_routed_experts",
    shared_expert="shared_experts",
    gating="sigmoid",
    # No Switch loss on the frozen base router: DeepSeek balances by e_score_correction_bias, and TRL's
    # loss reads config.num_experts, which DeepseekV3Config does not have.
    base_balance_loss=False,
    shipped=ShippedConfig("moonlight-16b-a3b", "moonshotai/Moonlight-16B-A3B"),
    # MLA attention with its low-rank KV (no query compression).
    tiny=dict(
        **_TINY_WIDE, **_DEEPSEEK_MOE_TINY, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
    ),
)

ARCHITECTURES: dict[str, MoEArch] = {
    "olmoe": MoEArch(
        model_type="olmoe",
        shipped=ShippedConfig("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", bench=True),
        tiny=dict(num_experts=8),
    ),
    "mixtral": MoEArch(
        model_type="mixtral",
        num_experts_attr="num_local_experts",
        expert_checkpoint_keys=(
            "block_sparse_moe.experts.{e}.w1.weight",
            "block_sparse_moe.experts.{e}.w3.weight",
            "block_sparse_moe.experts.{e}.w2.weight",
        ),
        checkpoint_block_names=("block_sparse_moe",),
        recipe_aux_loss_coef=0.02,
        recipe_learning_rate=2e-5,
        shipped=ShippedConfig("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", bench=True),
        tiny=dict(num_local_experts=4),
    ),
    # Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-K, renormalised when norm_topk_prob (true in both).
    "qwen3_moe": MoEArch(
        model_type="qwen3_moe",
        shipped=ShippedConfig("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B"),
        # Qwen3-30B-A3B's choices: softmax top-K renormalised (norm_topk_prob), experts narrower than the dense MLP.
        tiny=dict(**_TINY_WIDE, num_experts=8, moe_intermediate_size=64, norm_topk_prob=True),
    ),
    # Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax top-K (not renormalised in the released configs)
    # plus a shared expert MLP scaled by sigmoid(shared_expert_gate(h)); the gate is a Linear(H, 1) kept in bf16.
    "qwen2_moe": MoEArch(
        model_type="qwen2_moe",
        shared_expert="shared_expert",
        keep_dense=("shared_expert_gate",),
        shipped=ShippedConfig("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B"),
        # Qwen1.5-MoE-A2.7B's: top-K weights not renormalised, a shared expert 4x an expert's width behind a
        # sigmoid gate.
        tiny=dict(
            **_TINY_WIDE, num_experts=8, moe_intermediate_size=64, shared_expert_intermediate_size=256,
            norm_topk_prob=False,
        ),
    ),
    # DeepSeek-V3 layout (Moonlight-16B-A3B; DeepSeek-V3/R1 themselves ship FP8 weights, refused by the loader):
    # sigmoid scores + e_score_correction_bias for the choice, group-limited top-K (n_group / topk_group),
    # renormalised, times routed_scaling_factor, all inside the float32 router; always-on shared experts; the
    # first first_k_dense_replace layers are dense MLPs (NF4 linears, no PERFT block).
    "deepseek_v3": _DEEPSEEK_V3,
    # GLM-4.5 / GLM-4.5-Air: DeepSeek-V3's router, shared experts and dense first layers, with GQA attention
    # (q/k/v biases); no shipped config.
    "glm4_moe": replace(
        _DEEPSEEK_V3,
        model_type="glm4_moe",
        shipped=None,
        tiny=dict(**_TINY_WIDE, **_DEEPSEEK_MOE_TINY, attention_bias=True),
    ),
}

PLANNED_ONLY: dict[str, ShippedConfig] = {
    # gpt-oss: a router and biased experts of other shapes than the block PERFT wraps, MXFP4 hub weights;
    # load_model refuses the family (not in ARCHITECTURES), the planner counts it by its generic rules.
    "gpt_oss": ShippedConfig("gpt-oss-20b", "openai/gpt-oss-20b"),
}
"""``model_type`` -> shipped config of the families ``plan`` accounts but ``load_model`` does not serve."""

SHIPPED_CONFIGS: dict[str, ShippedConfig] = {
    shipped.name: shipped
    for shipped in [*(arch.shipped for arch in ARCHITECTURES.values() if arch.shipped), *PLANNED_ONLY.values()]
}
"""Short name -> every shipped config (``plan --model all``), loadable families first."""


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
