"""How real tokens are routed: every layer's base-router and PEFT-router choices over a set of texts.

:func:`record_routing` hooks the router instances (``method.recorder.RouterRecorder``, removed afterwards),
runs the texts one at a time (no padding to mask) and returns the choices per layer;
:func:`base_summary` and :func:`adapter_summary` turn them into JSON-ready numbers with ``stats.py``.
"""

from __future__ import annotations

import torch

from ..method.recorder import RouterRecorder
from ..method.stats import (
    agreement,
    co_occurrence,
    expert_shares,
    imbalance,
    normalized_entropy,
    normalized_mutual_information,
    topk_overlap,
)

ROUTED_VARIANTS = ("perft", "perft_e")
"""Variants whose PEFT experts are chosen per token; the others run all of them for every token."""


@torch.no_grad()
def record_routing(model, token_ids: list[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {"base": (T, K) ids, ["peft": (T, K') ids, "peft_weights": (T, K')]}}`` over every text.

    ``token_ids``: one (L,) tensor per text; T is their total length.
    """
    device = next(model.parameters()).device
    with RouterRecorder(model) as recorder:
        for ids in token_ids:
            model(input_ids=ids[None].to(device))
    out = {}
    for i, calls in recorder.base.items():
        out[i] = {"base": RouterRecorder.indices(calls)}
        if recorder.peft.get(i):
            out[i]["peft"] = RouterRecorder.indices(recorder.peft[i])
            out[i]["peft_weights"] = RouterRecorder.weights(recorder.peft[i])
    return out


def _rounded(values) -> list:
    return [round(float(v), 6) for v in values]


def base_summary(base_indices: torch.Tensor, num_experts: int) -> dict:
    """Load of the bare base model's router in one layer: shares per expert, entropy, imbalance."""
    shares = expert_shares(base_indices, num_experts)
    return {"load": _rounded(shares), "entropy": round(normalized_entropy(shares), 6),
            "imbalance": round(imbalance(shares), 6)}


def adapter_summary(recorded: dict[str, torch.Tensor], bare_base: torch.Tensor, num_base: int, num_peft: int,
                    variant: str, counterpart: list[int] | None) -> dict:
    """One layer's routing with an adapter attached.

    ``peft_load`` / ``entropy`` / ``imbalance``: the PEFT experts' load; ``base_load``: the base router's load
    with the adapter on; ``base_topk_overlap_with_bare``: how much of the base router's top-K survived the
    adapters of earlier layers (1.0: unchanged). Routed variants only: ``agreement`` (share of tokens whose
    PEFT top-1 expert's counterpart base expert is in the base top-K; ``counterpart`` maps PEFT to base
    experts), ``agreement_if_independent`` (the same if the two routers chose independently, from their
    loads), ``nmi_top1`` (normalized mutual information of the two top-1 choices) and ``top1_joint``
    ((M, N) share of tokens per pair of top-1 choices).
    """
    peft, weights, base = recorded["peft"], recorded["peft_weights"], recorded["base"]
    shares = expert_shares(peft, num_peft)
    base_shares = expert_shares(base, num_base)
    out = {
        "peft_load": _rounded(shares), "entropy": round(normalized_entropy(shares), 6),
        "imbalance": round(imbalance(shares), 6), "mean_gate_weight": round(float(weights.mean()), 6),
        "base_load": _rounded(base_shares), "base_topk_overlap_with_bare": round(topk_overlap(base, bare_base), 6),
        "agreement": None, "agreement_if_independent": None, "nmi_top1": None, "top1_joint": None,
    }
    if variant not in ROUTED_VARIANTS or counterpart is None:
        return out
    order = weights.argsort(dim=-1, descending=True)[:, :1]
    peft_top1 = peft.gather(1, order).squeeze(1)  # (T,)
    base_top1 = base[:, 0]  # transformers' top-K returns the heaviest first
    joint = co_occurrence(peft_top1, base_top1, num_peft, num_base)
    top1_shares = expert_shares(peft_top1, num_peft)
    k = base.shape[1]
    independent = sum(float(top1_shares[j]) * min(1.0, k * float(base_shares[c])) for j, c in enumerate(counterpart))
    out.update({
        "agreement": round(agreement(peft_top1, base, counterpart), 6),
        "agreement_if_independent": round(independent, 6),
        "nmi_top1": round(normalized_mutual_information(joint), 6),
        "top1_joint": [_rounded(row) for row in joint],
    })
    return out
