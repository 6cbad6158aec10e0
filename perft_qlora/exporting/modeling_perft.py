"""PERFT for plain transformers: a base MoE family's model with routed PEFT experts beside its MoE blocks.

Written into every folder that ``python -m perft_qlora.export`` makes and named by its ``config.json``
(``auto_map``), so ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds the model
with nothing but torch and transformers installed. Each ``Perft<Family>ForCausalLM`` is the family's own
transformers class; after it is built, every MoE block named in ``config.perft["layers"]`` gets two modules,
``perft_router`` and ``perft_experts``, and two instance hooks: one reads the top-K decision the base block
hands its experts, the other adds ``Σ_j G_j(h) Δ_j(h)`` to the block's output:

- ``perft``: a learned bias-free ``Linear(D, M)`` router, float32 scores by the family's gating (softmax, or
  sigmoid for DeepSeek-V3 / GLM-4.5), top-K', renormalised when the family's router renormalises;
- ``perft_e``: PEFT expert j follows base expert j, with the base router's own top-K weights;
- ``perft_d`` / ``perft_s``: every token uses all M experts (one for PERFT-S), each with weight 1.

Each expert is ``Δ_j(u) = scaling · up_j act(down_j u)`` (no activation unless ``config.perft["activation"]``).
This file is a copy of ``perft_qlora/exporting/modeling_perft.py`` and computes what the package's
``perft_qlora.method`` modules compute in evaluation (no dropout), one PEFT expert at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.activations import ACT2FN

GATING = {"softmax": lambda logits: torch.softmax(logits, dim=-1), "sigmoid": torch.sigmoid}
"""Router score functions by name: float32 (T, M) logits -> (T, M) scores."""


class PerftTopKRouter(nn.Module):
    """PERFT's learned router: ``Linear(D, M)`` without bias, the family's gating in float32, top-K'."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, gating: str):
        super().__init__()
        self.top_k, self.renormalize, self.gating = top_k, renormalize, gating
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x, base_weights, base_indices):
        logits = F.linear(x.to(self.weight.dtype), self.weight)  # (T, M)
        scores = GATING[self.gating](logits.float())
        weights, indices = torch.topk(scores, self.top_k, dim=-1)  # (T, K'), (T, K')
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices


class PerftBaseRouterTap(nn.Module):
    """PERFT-E: the base router's top-K weights and expert ids, passed through."""

    def forward(self, x, base_weights, base_indices):
        return base_weights, base_indices


class PerftDenseGate(nn.Module):
    """PERFT-D / PERFT-S: all M experts, weight 1 each."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x, base_weights, base_indices):
        indices = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)  # (T, M)
        return torch.ones(x.shape[0], self.num_experts, device=x.device, dtype=x.dtype), indices


class PerftExperts(nn.Module):
    """M bottleneck experts: ``down`` (M, DB, D), ``up`` (M, D, DB)."""

    def __init__(self, num_experts: int, hidden_size: int, bottleneck: int, scaling: float, activation):
        super().__init__()
        self.scaling = scaling
        self.down = nn.Parameter(torch.zeros(num_experts, bottleneck, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size, bottleneck))
        self.activation = ACT2FN[activation] if activation else None

    def forward(self, x, weights, indices):
        """(T, D) tokens, (T, K) weights and expert ids -> (T, D) weighted sum of the chosen experts."""
        dtype = x.dtype if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else self.down.dtype
        x = x.to(dtype)
        down, up = self.down.to(dtype), self.up.to(dtype)
        out = torch.zeros_like(x)
        for expert in range(down.shape[0]):
            token, slot = (indices == expert).nonzero(as_tuple=True)  # (n,), (n,) in (token, slot) order
            if token.numel() == 0:
                continue
            hidden = x[token] @ down[expert].t()  # (n, DB)
            if self.activation is not None:
                hidden = self.activation(hidden)
            delta = (hidden @ up[expert].t()) * self.scaling  # (n, D)
            delta = delta * weights[token, slot, None].to(delta.dtype)
            out = out.index_add(0, token, delta.to(out.dtype))
        return out


class _PerftHooks:
    """The two hooks of one MoE block: the experts' call is read, the block's output gets the PERFT sum."""

    def __init__(self, block: nn.Module, experts_attr: str):
        self.block, self.seen = block, []
        getattr(block, experts_attr).register_forward_pre_hook(self.capture, with_kwargs=True)
        block.register_forward_hook(self.add_delta, with_kwargs=True)

    def capture(self, _module, args, kwargs):
        indices = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        self.seen.append((weights, indices))

    def add_delta(self, _module, args, kwargs, output):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        seen, self.seen = self.seen, []
        if len(seen) != 1:
            raise RuntimeError(f"the MoE block called its experts {len(seen)} times; PERFT expects exactly once")
        base_weights, base_indices = seen[0]
        batch, seq, hidden = hidden_states.shape
        h = hidden_states.reshape(-1, hidden)  # (T, D)
        weights, indices = self.block.perft_router(h, base_weights, base_indices)
        delta = self.block.perft_experts(h, weights, indices)  # (T, D)
        return output + delta.reshape(batch, seq, hidden).to(output.dtype)


def add_perft_blocks(model, perft: dict) -> None:
    """Give each MoE block of ``perft["layers"]`` its PERFT router, experts and hooks (see the module doc)."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    for i in perft["layers"]:
        block = getattr(layers[i], perft["moe_block"])
        variant, m = perft["variant"], perft["num_experts"]
        if variant == "perft":
            router = PerftTopKRouter(hidden, m, perft["top_k"], perft["renormalize"], perft["gating"])
        elif variant == "perft_e":
            router = PerftBaseRouterTap()
        elif variant in ("perft_d", "perft_s"):
            router = PerftDenseGate(m)
        else:
            raise ValueError(f"unknown PERFT variant {variant!r} in config.perft")
        block.perft_router = router
        block.perft_experts = PerftExperts(m, hidden, perft["bottleneck"], perft["scaling"], perft["activation"])
        block.perft_hooks = _PerftHooks(block, perft["experts"])


class PerftMixin:
    """Builds the family's model, then adds the PERFT blocks ``config.perft`` describes."""

    def __init__(self, config):
        super().__init__(config)
        add_perft_blocks(self, config.perft)


class PerftOlmoeConfig(OlmoeConfig):
    """OLMoE's config; ``perft`` holds the adapter's knobs."""


class PerftOlmoeForCausalLM(PerftMixin, OlmoeForCausalLM):
    config_class = PerftOlmoeConfig


class PerftMixtralConfig(MixtralConfig):
    """Mixtral's config; ``perft`` holds the adapter's knobs."""


class PerftMixtralForCausalLM(PerftMixin, MixtralForCausalLM):
    config_class = PerftMixtralConfig


class PerftQwen3MoeConfig(Qwen3MoeConfig):
    """Qwen3-MoE's config; ``perft`` holds the adapter's knobs."""


class PerftQwen3MoeForCausalLM(PerftMixin, Qwen3MoeForCausalLM):
    config_class = PerftQwen3MoeConfig


class PerftQwen2MoeConfig(Qwen2MoeConfig):
    """Qwen2-MoE's config; ``perft`` holds the adapter's knobs."""


class PerftQwen2MoeForCausalLM(PerftMixin, Qwen2MoeForCausalLM):
    config_class = PerftQwen2MoeConfig


class PerftDeepseekV3Config(DeepseekV3Config):
    """DeepSeek-V3's config; ``perft`` holds the adapter's knobs."""


class PerftDeepseekV3ForCausalLM(PerftMixin, DeepseekV3ForCausalLM):
    config_class = PerftDeepseekV3Config


class PerftGlm4MoeConfig(Glm4MoeConfig):
    """GLM-4.5's config; ``perft`` holds the adapter's knobs."""


class PerftGlm4MoeForCausalLM(PerftMixin, Glm4MoeForCausalLM):
    config_class = PerftGlm4MoeConfig


CLASSES = {
    "olmoe": ("PerftOlmoeConfig", "PerftOlmoeForCausalLM"),
    "mixtral": ("PerftMixtralConfig", "PerftMixtralForCausalLM"),
    "qwen3_moe": ("PerftQwen3MoeConfig", "PerftQwen3MoeForCausalLM"),
    "qwen2_moe": ("PerftQwen2MoeConfig", "PerftQwen2MoeForCausalLM"),
    "deepseek_v3": ("PerftDeepseekV3Config", "PerftDeepseekV3ForCausalLM"),
    "glm4_moe": ("PerftGlm4MoeConfig", "PerftGlm4MoeForCausalLM"),
}
"""``model_type`` -> (config class, model class) names, for ``config.json``'s ``auto_map``."""
