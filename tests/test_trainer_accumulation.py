"""In training, the PERFT balance-loss term reaches backward as ``coef · LB / grad_accum`` per micro-batch.

The term is recomputed here from the PERFT routers' outputs (forward hooks) with the batch's
padding mask, independently of ``losses.py``, and compared with what the Trainer backpropagates.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from trl import SFTTrainer

from perft_qlora import iter_perft_blocks
from perft_qlora.training.train import run
from perft_qlora.training.train_options import parse_args
from perft_qlora.training.trainer import PerftSFTTrainer


def masked_switch_loss(logits: list[torch.Tensor], mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """``M · Σ_j f_j P_j`` over the real (mask 1) tokens of every layer's (T, M) logits, in float64."""
    keep = mask.reshape(-1).bool()
    probs = torch.softmax(torch.cat([layer[keep] for layer in logits]).double(), dim=-1)
    m = probs.shape[-1]
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, m).sum(1).double()
    return m * (chosen.mean(0) * probs.mean(0)).sum()


def test_balance_loss_term_is_divided_by_the_accumulation_steps(tmp_path, monkeypatch):
    steps = []  # one dict per training micro-batch
    parent_loss, perft_loss, backward = SFTTrainer.compute_loss, PerftSFTTrainer.compute_loss, Accelerator.backward

    def spy_parent(self, model, inputs, *args, **kwargs):
        result = parent_loss(self, model, inputs, *args, **kwargs)
        if model.training:
            steps[-1]["without_aux"] = result.detach().double()
        return result

    def spy_perft(self, model, inputs, *args, **kwargs):
        if not model.training:
            return perft_loss(self, model, inputs, *args, **kwargs)
        steps.append({"logits": []})
        hooks = [b.perft_router.register_forward_hook(lambda _m, _a, out: steps[-1]["logits"].append(out.logits.detach()))
                 for _, b in iter_perft_blocks(model)]
        try:
            result = perft_loss(self, model, inputs, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        steps[-1].update(total=result.detach().double(), mask=inputs["attention_mask"], coef=self.perft_aux_loss_coef)
        return result

    def spy_backward(self, loss, **kwargs):
        steps[-1]["backward"] = loss.detach().double()
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", spy_parent)
    monkeypatch.setattr(PerftSFTTrainer, "compute_loss", spy_perft)
    monkeypatch.setattr(Accelerator, "backward", spy_backward)
    # Rows of very different lengths, so every micro-batch of two is heavily padded.
    rows = [{"instruction": "Is the following text written in capital letters? " + "ABC DEF " * (1 + 12 * i),
             "output": "the correct answer is true"} for i in range(8)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    run(parse_args([
        "--demo", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--grad-accum", "2", "--val-size", "0",
        "--batch-size", "2", "--max-length", "1024", "--logging-steps", "1", "--save-steps", "100",
        "--warmup-steps", "0", "--no-gradient-checkpointing",
    ]))
    assert len(steps) == 2  # one optimizer step = two micro-batches
    for step in steps:
        assert step["coef"] == pytest.approx(0.01)
        assert len(step["logits"]) == 4  # each of the demo base's 4 layers' PERFT routers ran once in this forward
        assert (step["mask"] == 0).any()  # the batch holds padding, which the term must ignore
        aux = masked_switch_loss(step["logits"], step["mask"], top_k=2)
        with_padding = masked_switch_loss(step["logits"], torch.ones_like(step["mask"]), top_k=2)
        # enough padding that counting it would fail the check below (rtol 1e-4), with a margin of 3
        assert abs(with_padding - aux) > 3e-4 * aux
        # The share of the backpropagated loss that is not the parent's: however the Trainer scales the
        # parent's loss for accumulation, the balance term must arrive as coef * LB / 2.
        scale = step["backward"] / step["total"]
        aux_share = step["backward"] - scale * step["without_aux"]
        torch.testing.assert_close(aux_share, step["coef"] * aux / 2, rtol=1e-4, atol=1e-7)
