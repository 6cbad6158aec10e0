"""The PERFT balance loss excludes padding, and the routing statistics logged beside it, on hand-made routings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perft_qlora import PerftConfig, attach_perft, iter_perft_blocks, perft_balance_loss, routing_stats
from perft_qlora.method.routing import Routing
from perft_qlora.training.distributed import routing_log  # what the trainer logs


def switch_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``M · Σ_j f_j P_j`` over (T, M) logits, written out from the method description (float64)."""
    probs = torch.softmax(logits.double(), dim=-1)
    m = probs.shape[-1]
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, m).sum(1).double()  # (T, M)
    return m * (chosen.mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_balance_loss_counts_only_the_unpadded_tokens(tiny_nf4, arch):
    model, tokenizer = tiny_nf4(arch)
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0), dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as in batched generation ...
    mask[0, -4:] = 0  # ... and right padding, as in training batches
    ids[mask == 0] = tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    logits = [block.last_routing.logits for _, block in iter_perft_blocks(model)]  # (24, 4) per layer
    keep = mask.reshape(-1).bool()
    expected = switch_loss(torch.cat([layer[keep] for layer in logits]), top_k=2)
    everything = switch_loss(torch.cat(logits), top_k=2)
    assert abs(expected - everything) > 1e-3  # padding moves the loss: the check below can fail
    torch.testing.assert_close(out.perft_aux_loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(perft_balance_loss(model, mask).double(), expected, rtol=1e-5, atol=1e-6)


def _hand_made_routing(model, indices_per_layer: dict[int, list[list[int]]]) -> None:
    """Give each PERFT block a last routing with the given (T, K) expert ids and weights 0.25 / 0.75 per token."""
    for layer, block in iter_perft_blocks(model):
        indices = torch.tensor(indices_per_layer[layer])
        weights = torch.tensor([[0.25, 0.75]]).expand(indices.shape[0], -1)
        block.last_routing = Routing(weights, indices, torch.zeros(indices.shape[0], 4))


def test_routing_statistics_on_hand_made_shares(tiny_nf4):
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2))
    _hand_made_routing(model, {
        0: [[0, 1], [0, 2], [0, 3], [0, 1]],  # shares 1/2, 1/4, 1/8, 1/8 of the 8 (token, slot) assignments
        1: [[2, 2], [2, 2], [2, 2], [2, 2]],  # everything on expert 2
    })
    stats = routing_stats(model)
    assert stats[0]["expert_fraction"] == pytest.approx([0.5, 0.25, 0.125, 0.125])
    assert stats[1]["expert_fraction"] == pytest.approx([0.0, 0.0, 1.0, 0.0])
    assert stats[0]["mean_gate_weight"] == pytest.approx(0.5)
    logs = routing_log(model)
    # imbalance = M · max share; entropy = -Σ p ln p / ln M, worked out by hand:
    # layer 0: 4 · 1/2 = 2; (1/2 ln 2 + 1/4 · 2 ln 2 + 2 · 1/8 · 3 ln 2) / (2 ln 2) = (1/2 + 1/2 + 3/4) / 2 = 7/8.
    assert logs["routing/L0_imbalance"] == pytest.approx(2.0)
    assert logs["routing/L0_entropy"] == pytest.approx(0.875)
    assert logs["routing/L1_imbalance"] == pytest.approx(4.0)  # all on one expert: the worst, M
    assert logs["routing/L1_entropy"] == pytest.approx(0.0)


def test_routing_statistics_of_a_perfectly_balanced_routing(tiny_nf4):
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2))
    balanced = [[0, 1], [2, 3], [3, 0], [1, 2], [0, 2], [1, 3]]  # each expert 3 of 12
    _hand_made_routing(model, {0: balanced, 1: balanced[:2]})
    logs = routing_log(model)
    for layer in (0, 1):
        assert logs[f"routing/L{layer}_imbalance"] == pytest.approx(1.0)
        assert logs[f"routing/L{layer}_entropy"] == pytest.approx(1.0)
    assert math.isclose(sum(routing_stats(model)[0]["expert_fraction"]), 1.0)
