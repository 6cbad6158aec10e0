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
from functools import partial

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..quant.arch import ARCHITECTURES, MoEArch
from ..training.tiny import build_byte_tokenizer, tiny_config

SHAPE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "num_experts_per_tok", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
)
"""What a random checkpoint takes from a shipped config, with the family's expert count; the rest stays default."""


def shipped_shape(arch: MoEArch):
    """``arch``'s shipped config (``perft_qlora/configs``) cut to its shapes."""
    data = json.loads(arch.shipped.path.read_text())
    return AutoConfig.for_model(arch.model_type, **{key: data[key] for key in (*SHAPE_KEYS, arch.num_experts_attr)})


ARCHES = {
    **{a.shipped.name: partial(shipped_shape, a) for a in ARCHITECTURES.values() if a.shipped and a.shipped.bench},
    "tiny": partial(tiny_config, "olmoe"),
}
"""``--arch`` -> its config: the registry's benchmarked shipped configs (public shapes), and a tiny OLMoE."""


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
