"""Core-API demo on a tiny built-in OLMoE-shaped model: no download, no GPU, under a minute on a laptop CPU.

    python -m perft_qlora.demo [--out perft-demo] [--variant perft] [--steps 60]

Writes a tiny random checkpoint, loads it with every big weight in NF4, attaches a PERFT adapter, takes a
few AdamW steps on a deterministic copy task (the loss falls), saves the adapter, reloads it into a fresh
NF4 model and checks the outputs match. The full training entry point with TRL's SFTTrainer is
``python -m perft_qlora.train`` (tracked in its own issue).
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from tqdm.auto import tqdm

from . import PerftConfig, attach_perft, load_adapter, load_model, memory_report, parameter_report, save_adapter
from .tiny import save_tiny_model

VARIANT_DEFAULTS = {
    "perft": dict(num_experts=4, top_k=2),
    "perft_e": {},
    "perft_d": dict(num_experts=2),
    "perft_s": {},
}


def copy_task(tokenizer, num_rows: int, seed: int = 0) -> list[str]:
    """Rows like ``"abc-abc"``: the second half repeats the first, so a model can learn it."""
    rng = random.Random(seed)
    letters = "abcdefgh"
    rows = []
    for _ in range(num_rows):
        word = "".join(rng.choice(letters) for _ in range(6))
        rows.append(f"{word}={word}{tokenizer.eos_token}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="perft-demo", help="output directory (default: %(default)s)")
    parser.add_argument("--variant", default="perft", choices=sorted(VARIANT_DEFAULTS), help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    base_dir = save_tiny_model(os.path.join(args.out, "tiny-olmoe"), "olmoe")
    model, tokenizer = load_model(base_dir, device="cpu", progress=False)
    print(memory_report(model))
    attach_perft(model, PerftConfig(variant=args.variant, bottleneck=8, dropout=0.0, **VARIANT_DEFAULTS[args.variant]))
    print(parameter_report(model))

    batch = tokenizer(copy_task(tokenizer, 16), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    losses = []
    for _ in (bar := tqdm(range(args.steps), desc=f"training {args.variant}")):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    adapter_dir = save_adapter(model, os.path.join(args.out, "adapter"))
    fresh, _ = load_model(base_dir, device="cpu", progress=False)
    load_adapter(fresh, adapter_dir)
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, fresh(**batch).logits)
    print(f"adapter saved to {adapter_dir}; reloaded outputs identical: {same}")
    if not same or losses[-1] >= losses[0]:
        raise SystemExit("demo failed: the loss did not fall or the reloaded adapter differs")


if __name__ == "__main__":
    main()
