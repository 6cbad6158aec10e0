"""Batched text generation shared by the evaluator and the app.

``generate_batch`` pads on the left (so every prompt ends where generation starts), decodes with beam search
or greedily (never sampling), and returns only the text after each prompt.
"""

from __future__ import annotations

import torch


def generate_batch(
    model, tokenizer, prompts: list[str], max_new_tokens: int, num_beams: int = 1, *,
    eos_token_id: int | list[int] | None = None, add_special_tokens: bool = True,
) -> list[str]:
    """Continue each of ``prompts``; returns one decoded continuation per prompt, special tokens removed.

    Args:
        model: a causal LM (e.g. from ``load_model``, with or without an attached adapter).
        tokenizer: its tokenizer; its padding side is set to ``left`` for the call and restored after.
        max_new_tokens: tokens generated after the longest prompt.
        num_beams: beam-search width; 1 is greedy decoding.
        eos_token_id: the token(s) to stop on (default: the model's generation config), e.g. a chat template's
            end-of-turn token.
        add_special_tokens: False for prompts rendered by a chat template, which writes its own.
    """
    if not prompts:
        return []
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {max_new_tokens} and {num_beams}")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token; set tokenizer.pad_token")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True,
                          add_special_tokens=add_special_tokens).to(model.device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        sequences = model.generate(
            input_ids=batch["input_ids"],  # (B, L), left-padded
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=pad_token_id,
            **({"eos_token_id": eos_token_id} if eos_token_id is not None else {}),
        )  # (B, L + new), the best beam per prompt
    new_tokens = sequences[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
