"""Tiny models of every registered family (OLMoE, Mixtral, Qwen3-MoE, Qwen2-MoE, DeepSeek-V3, GLM-4.5) and a
byte-level tokenizer, built locally (no download).

Used by the tests (``--demo`` uses the pre-trained base of ``perft_qlora.training.demo_base``). Sizes are multiples
of 64 so that every weight is a whole number of NF4 blocks per row, as in the real models.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ..quant.arch import ARCHITECTURES

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
WORD_TOKENS = ("true", "false")
"""Whole-word tokens, so that a yes/no answer is one decision (one token), not a spelling."""


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer: 256 byte tokens, end-of-text, padding, then ``true`` and ``false``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1]
    )
    tokenizer.add_tokens(list(WORD_TOKENS))
    return tokenizer


def tiny_config(arch: str = "olmoe", **overrides):
    """A small config of the given family with the real structure (fused experts, top-K router).

    The family's own knobs are its registry entry's ``tiny`` values (``quant/arch.py``); ``intermediate_size``
    is the dense MLP's width.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    vocab = 256 + len(SPECIAL_TOKENS) + len(WORD_TOKENS)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_experts_per_tok=2, eos_token_id=256,
        bos_token_id=256, pad_token_id=257, tie_word_embeddings=False,
    )
    return AutoConfig.for_model(arch, **{**common, **ARCHITECTURES[arch].tiny, **overrides})


def save_tiny_model(directory: str, arch: str = "olmoe", seed: int = 0, dtype=torch.bfloat16, **overrides) -> str:
    """Write a randomly initialised tiny model and its tokenizer to ``directory`` with ``save_pretrained``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    # Router weights start at zero in OLMoE's init; give them values so routing is not a tie everywhere.
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # dense MLP layers (mlp_only_layers) have no router
                layer.mlp.gate.weight.normal_(0.0, 0.5)
            if hasattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias"):  # DeepSeek: starts at zero
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    return directory
