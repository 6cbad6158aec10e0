"""Random-weight checkpoints at the real architectures' shapes, written like ``save_pretrained`` (no download).

Speed and memory do not depend on the weights' values, so the training benchmark loads these through
``load_model`` exactly as a user loads a hub checkpoint. The writer never holds more than one decoder layer:
the model is built on ``meta`` to list tensor names and shapes, then each layer's tensors are drawn and
written as their own safetensors shard with a ``model.safetensors.index.json`` (a full-size Mixtral would
not fit in RAM otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

from ..training.tiny import build_byte_tokenizer, tiny_config

# The published configurations (allenai/OLMoE-1B-7B-0924, mistralai/Mixtral-8x7B-v0.1), shapes only.
ARCHES = {
    "olmoe-1b-7b": lambda: OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
        rope_theta=10000.0, clip_qkv=None, tie_word_embeddings=False,
    ),
    "mixtral-8x7b": lambda: MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6, tie_word_embeddings=False,
    ),
    "tiny": lambda: tiny_config("olmoe"),
}


def arch_config(arch: str, num_layers: int | None = None):
    """The config of ``arch`` (a key of ``ARCHES``), optionally cut to ``num_layers`` decoder layers."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    config = ARCHES[arch]()
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    return config


CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "perft_qlora", "bench")
"""The benchmarks' default ``--cache-dir``: random checkpoints are written there once and reused."""


def cached_checkpoint(arch: str, num_layers: int | None = None, cache_dir: str = CACHE_DIR,
                      progress: bool = True) -> str:
    """The random checkpoint of ``arch`` (cut to ``num_layers``) in ``cache_dir/<arch>[-<N>l]``, written if absent."""
    name = arch + (f"-{num_layers}l" if num_layers else "")
    return write_random_checkpoint(arch_config(arch, num_layers), os.path.join(cache_dir, name), progress=progress)


def _layer_of(name: str) -> str:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return f"layer{int(match.group(1)):03d}" if match else "other"


def _draw(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 0.5 if name.endswith("gate.weight") else 0.02  # routers get spread logits, as trained ones have
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)


def write_random_checkpoint(config, directory: str, seed: int = 0, progress: bool = True) -> str:
    """Write a random bf16 checkpoint of ``config`` into ``directory`` (sharded by layer) and a byte tokenizer.

    Reuses ``directory`` when it already holds a complete checkpoint of the same config.
    """
    fingerprint = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    marker = os.path.join(directory, "random-checkpoint.json")
    if os.path.isfile(marker) and json.load(open(marker)).get("fingerprint") == fingerprint:
        return directory
    os.makedirs(directory, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(_layer_of(name), []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for group in tqdm(sorted(groups), desc="writing random checkpoint", disable=not progress):
        shard = f"model-{group}.safetensors"
        save_file({name: _draw(name, shapes[name], generator) for name in groups[group]},
                  os.path.join(directory, shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in groups[group]})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    config.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    with open(marker, "w") as handle:
        json.dump({"fingerprint": fingerprint, "seed": seed}, handle)
    return directory
