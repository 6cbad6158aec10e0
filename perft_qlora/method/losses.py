"""The PERFT router's Switch-style balance loss, added to the model's loss by a forward hook.

``M · Σ_j f_j · P_j`` over all layers' PERFT router logits, computed by transformers' own
``load_balancing_loss_func`` (the one the base model uses for its router), padding excluded.
"""

from __future__ import annotations

import torch
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from .layer import PerftMoEBlock


def _trainable_routings(model):
    """(router, routing) of every PERFT block whose router is trainable, from the latest forward."""
    return [
        (m.perft_router, m.last_routing)
        for m in model.modules()
        if isinstance(m, PerftMoEBlock) and m.last_routing is not None and m.last_routing.logits is not None
    ]


def perft_router_logits(model) -> list[torch.Tensor]:
    """(T, M) logits of every trainable PERFT router from the latest forward."""
    return [routing.logits for _, routing in _trainable_routings(model)]


def perft_balance_loss(model, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The unweighted balance loss of the latest forward, or None when no router is trainable."""
    routings = _trainable_routings(model)
    if not routings:
        return None
    router = routings[0][0]
    logits = tuple(routing.logits for _, routing in routings)
    if attention_mask is not None and attention_mask.dim() == 2:
        # Cached decoding (generate): the mask spans past + new tokens, the router logits only the new ones.
        new_tokens = logits[0].shape[0] // attention_mask.shape[0]
        attention_mask = attention_mask[:, -new_tokens:]
    return load_balancing_loss_func(logits, router.num_experts, router.top_k, attention_mask)


class BalanceLossHook:
    """Forward hook for the top-level model: ``loss += coef * balance_loss`` and ``perft_aux_loss`` in the output."""

    def __init__(self, coef: float):
        self.coef = coef

    def __call__(self, model, args, kwargs, output):
        if not hasattr(output, "logits"):
            return output
        aux = perft_balance_loss(model, kwargs.get("attention_mask"))
        if aux is None:
            return output
        output["perft_aux_loss"] = aux
        if getattr(output, "loss", None) is not None and self.coef:
            output["loss"] = output.loss + self.coef * aux.to(output.loss.device)
        return output
