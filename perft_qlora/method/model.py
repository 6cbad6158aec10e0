"""``attach_perft``: put a routed PEFT block beside every selected MoE block of a model, on the instance.

Nothing is patched at class level: each selected decoder layer's MoE block is replaced by a
:class:`PerftMoEBlock` holding the original block, and one forward hook on the top-level model adds the
PERFT balance loss to ``output.loss``. Only the new modules' parameters are trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..quant.arch import decoder_layers, get_arch
from ..quant.memory import count_values
from ..quant.quant_guard import disable_cpu_weight_repacking
from .config import PerftConfig
from .layer import PerftMoEBlock
from .losses import BalanceLossHook
from .variants import BlockFacts, build_adapter

logger = logging.getLogger(__name__)


def iter_perft_blocks(model) -> Iterator[tuple[int, PerftMoEBlock]]:
    """(layer index, block) for every attached PERFT block."""
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, get_arch(model.config).moe_block)
        if isinstance(block, PerftMoEBlock):
            yield i, block


def attach_perft(model, config: PerftConfig, dtype: torch.dtype | None = None):
    """Attach trainable PERFT blocks (``config``) to ``model`` in place and return it.

    ``dtype`` of the adapters defaults to the base router's dtype (bf16 for ``load_model``'s models).
    Raises if PERFT is already attached, a layer index is out of range, or the model family is unsupported.
    """
    arch = get_arch(model.config)
    layers = decoder_layers(model)
    if getattr(model, "perft_config", None) is not None:
        raise ValueError("this model already has PERFT blocks attached; load a fresh base model to attach another")
    moe_layers = arch.moe_layers(model)
    selected = moe_layers if config.layers is None else config.layers
    bad = [i for i in selected if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    dense = [i for i in selected if i not in moe_layers]
    if dense:
        raise ValueError(f"layers {dense} are dense MLP layers without experts; PERFT attaches to MoE layers {moe_layers}")
    if getattr(model.config, "router_jitter_noise", 0.0):
        raise ValueError("router_jitter_noise > 0 is not supported: PERFT blocks call the base router directly")
    facts = BlockFacts(
        hidden_size=model.config.hidden_size, num_experts=arch.num_experts(model.config),
        top_k=arch.top_k(model.config), renormalizes=arch.renormalizes_top_k(model.config), gating=arch.gating,
    )
    model.requires_grad_(False)
    for i in selected:
        base = getattr(layers[i], arch.moe_block)
        router_weight = getattr(base, arch.router).weight
        device, adapter_dtype = router_weight.device, dtype or router_weight.dtype
        router, experts = build_adapter(config, facts, adapter_dtype)
        block = PerftMoEBlock(base, arch.experts, router.to(device), experts.to(device))
        block.train(base.training)  # new modules start in training mode; follow the model's
        setattr(layers[i], arch.moe_block, block)
    model.perft_config = config
    model.perft_hook = model.register_forward_hook(BalanceLossHook(balance_loss_coef(model)), with_kwargs=True)
    disable_cpu_weight_repacking(model)
    logger.info("%s", parameter_report(model))
    return model


def balance_loss_coef(model) -> float:
    """Weight of the PERFT router's balance loss: the config's, or the architecture's recipe value."""
    config: PerftConfig = model.perft_config
    if config.router_aux_loss_coef is not None:
        return config.router_aux_loss_coef
    return get_arch(model.config).recipe_aux_loss_coef


def detach_perft(model):
    """Remove every PERFT block and the balance-loss hook, restoring the base MoE blocks; returns the model."""
    arch = get_arch(model.config)
    layers = decoder_layers(model)
    for i, block in list(iter_perft_blocks(model)):
        setattr(layers[i], arch.moe_block, block.base)
    hook = getattr(model, "perft_hook", None)
    if hook is not None:
        hook.remove()
    model.perft_hook = None
    model.perft_config = None
    return model


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    """Trainable parameters (adapters and PERFT routers)."""
    trainable_per_token: int
    """Trainable parameters a token activates (chosen PEFT experts + the router), summed over layers."""
    backbone: int
    """Backbone parameters, counting quantized weights by their original number of values."""
    backbone_per_token: int
    """Backbone parameters a token activates (K of N experts per MoE layer, everything else)."""
    dense_layers: tuple[int, ...] = ()
    """Decoder layers with a dense MLP instead of experts (DeepSeek's first layers): no PERFT block there."""

    @property
    def activated_ratio(self) -> float:
        return self.trainable_per_token / self.backbone_per_token

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} ({self.trainable / self.backbone:.4%} of {self.backbone:,}); "
            f"activated per token {self.trainable_per_token:,} "
            f"({self.activated_ratio:.4%} of the backbone's {self.backbone_per_token:,})"
            + (f"; dense MLP layers {list(self.dense_layers)} have no PERFT block" if self.dense_layers else "")
        )


def parameter_report(model) -> ParameterReport:
    """Trainable and activated parameter counts, as the paper reports them (PERFT or a dense baseline like LoRA)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = list(iter_perft_blocks(model))
    trainable_per_token = sum(
        b.perft_router.experts_per_token * b.perft_experts.params_per_expert + b.perft_router.params_per_token
        for _, b in blocks
    ) if blocks else trainable  # MoE-agnostic adapters (the LoRA baseline) are dense: every token uses all of them
    arch = get_arch(model.config)
    n, k = arch.num_experts(model.config), arch.top_k(model.config)
    backbone, experts = count_values(model)
    moe_layers = set(arch.moe_layers(model))
    dense = tuple(i for i in range(len(decoder_layers(model))) if i not in moe_layers)
    return ParameterReport(trainable, trainable_per_token, backbone, backbone - experts * (n - k) // n, dense)
