"""The numbers of ``python -m perft_qlora.analyze``: geometry and token routing of a base model and its adapters.

:func:`analyze` returns one JSON-ready dict (the report's and the plots' only source): per layer, the base
router against its experts' key vectors, each adapter's PEFT router and down rows against both, a 2-D
projection of all of them, and (given texts) how real tokens are routed. Adapters are read from their
files for the geometry and attached one at a time (then detached) for the routing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..method.adapters import adapter_kind
from ..method.checkpoint import (
    WEIGHTS_NAME,
    AdapterError,
    fingerprint_mismatches,
    load_adapter,
    read_adapter_config,
    verify_adapter_files,
)
from ..method.model import detach_perft
from ..quant.arch import get_arch
from .geometry import (
    adapter_vectors,
    base_vectors,
    chance_abs_cosine,
    down_alignment,
    peft_router_alignment,
    project_2d,
    random_baseline,
    router_key_alignment,
)
from .token_routing import adapter_summary, base_summary, record_routing

FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    directory: str
    """Absolute path of the adapter directory."""
    metadata: dict
    """Its ``perft_config.json``."""

    @property
    def variant(self) -> str:
        return self.metadata["perft"]["variant"]

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, WEIGHTS_NAME)


def read_adapter_spec(name: str, directory: str, config) -> AdapterSpec:
    """Check ``directory`` holds a PERFT adapter trained for a base like ``config``; AdapterError otherwise."""
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter {name}: directory {directory} does not exist")
    if adapter_kind(directory) == "peft":
        raise AdapterError(f"adapter {name} ({directory}) is a peft LoRA adapter on attention: it has no PEFT "
                           "experts or router to place among the base experts; pass PERFT adapters only")
    metadata = read_adapter_config(directory)
    wrong = fingerprint_mismatches(metadata, config)
    if wrong:
        trained = ", ".join(f"{k}={v[0]!r}" for k, v in wrong.items())
        found = ", ".join(f"{k}={v[1]!r}" for k, v in wrong.items())
        raise AdapterError(f"adapter {name} ({directory}) was trained for another base model ({trained}); "
                           f"this base has {found}")
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise AdapterError(f"adapter {name}: {directory} has no {WEIGHTS_NAME}")
    verify_adapter_files(directory)  # complete, and the config's sizes are the tensors' (no report of false sizes)
    return AdapterSpec(name, os.path.abspath(directory), metadata)


def _layer_geometry(model, layer: int, adapters: list[AdapterSpec], keys: str, keys_per_expert: int,
                    projection: str, seed: int) -> dict:
    base = base_vectors(model, layer, keys, keys_per_expert, seed)
    n, s, _ = base.keys.shape
    groups = {"base router": base.router, "base keys": base.keys.reshape(n * s, -1)}
    experts = {"base router": list(range(n)), "base keys": [e for e in range(n) for _ in range(s)]}
    entry = {"base": router_key_alignment(base), "random": random_baseline(base, seed=seed), "key_rows": base.key_rows,
             "adapters": {}}
    for spec in adapters:
        vectors = adapter_vectors(spec.weights_path, layer)
        if vectors is None:  # the adapter skips this layer
            entry["adapters"][spec.name] = None
            continue
        m, db, _ = vectors.down.shape
        entry["adapters"][spec.name] = {
            "num_experts": m, "router": peft_router_alignment(vectors, base), "down": down_alignment(vectors, base)}
        if vectors.router is not None:
            groups[f"{spec.name} router"], experts[f"{spec.name} router"] = vectors.router, list(range(m))
        groups[f"{spec.name} down"] = vectors.down.reshape(m * db, -1)
        experts[f"{spec.name} down"] = [j for j in range(m) for _ in range(db)]
    entry["projection"] = {**project_2d(groups, projection, seed), "experts": experts}
    return entry


def _counterpart(spec: AdapterSpec, geometry: dict, num_base: int) -> list[int] | None:
    """Which base expert each PEFT expert stands for: itself (PERFT-E) or its nearest router vector (PERFT)."""
    if spec.variant == "perft_e":
        return list(range(num_base))
    router = (geometry["adapters"].get(spec.name) or {}).get("router")
    return router["nearest_base_expert"] if router else None


def _token_routing(model, texts: list[torch.Tensor], adapters: list[AdapterSpec], layers: list[int],
                   result: dict, log: Callable[[str], None]) -> None:
    num_base = result["num_experts"]
    log(f"routing {sum(len(t) for t in texts)} tokens through the base model")
    bare = record_routing(model, texts)
    for layer in layers:
        result["layers"][str(layer)]["routing"] = {"base": base_summary(bare[layer]["base"], num_base)}
    for spec in adapters:
        log(f"routing the tokens through adapter {spec.name}")
        load_adapter(model, spec.directory)
        try:
            recorded = record_routing(model, texts)
        finally:
            detach_perft(model)
        for layer in layers:
            entry = result["layers"][str(layer)]
            if "peft" not in recorded.get(layer, {}):
                entry["routing"][spec.name] = None
                continue
            m = entry["adapters"][spec.name]["num_experts"]
            entry["routing"][spec.name] = adapter_summary(
                recorded[layer], bare[layer]["base"], num_base, m, spec.variant,
                _counterpart(spec, entry, num_base))


def analyze(model, adapters: list[AdapterSpec], layers: list[int], texts: list[torch.Tensor] | None = None,
            keys: str = "gate", keys_per_expert: int = 32, projection: str = "pca", seed: int = 0,
            log: Callable[[str], None] = lambda message: None) -> dict:
    """Every number of the analysis of ``model`` (a base model without adapter) and ``adapters``.

    ``texts``: token ids, one (L,) tensor per text, to route (optional). See the module doc.
    """
    arch = get_arch(model.config)
    result = {
        "format_version": FORMAT_VERSION, "model": getattr(model.config, "_name_or_path", None),
        "model_type": arch.model_type, "hidden_size": model.config.hidden_size,
        "num_layers": model.config.num_hidden_layers, "num_experts": arch.num_experts(model.config),
        "top_k": arch.top_k(model.config),
        "settings": {"layers": layers, "keys": keys, "keys_per_expert": keys_per_expert, "projection": projection,
                     "seed": seed, "texts": len(texts) if texts else 0,
                     "tokens": int(sum(len(t) for t in texts)) if texts else 0},
        "chance_abs_cos": round(chance_abs_cosine(model.config.hidden_size), 6),
        "adapters": {s.name: {"directory": s.directory, "variant": s.variant, "perft": s.metadata["perft"],
                              "layers": s.metadata.get("layers")} for s in adapters},
        "layers": {},
    }
    for layer in layers:
        log(f"layer {layer}: dequantizing {keys} rows of {result['num_experts']} experts")
        result["layers"][str(layer)] = _layer_geometry(model, layer, adapters, keys, keys_per_expert, projection, seed)
    if texts:
        _token_routing(model, texts, adapters, layers, result, log)
    result["summary"] = summary_rows(result)
    return result


def summary_rows(result: dict) -> list[dict]:
    """One row per (layer, base or adapter): the headline numbers the report's table shows."""
    rows = []
    for layer, entry in result["layers"].items():
        routing = entry.get("routing", {})
        base = entry["base"]["summary"]
        rows.append({"layer": int(layer), "name": "base", "variant": "base",
                     "router_own_keys_cos": base["own_mean_cos"], "router_other_keys_cos": base["other_mean_cos"],
                     "nearest_key_is_own": base["nearest_key_is_own"],
                     "load_entropy": (routing.get("base") or {}).get("entropy")})
        chance = entry["random"]
        rows.append({"layer": int(layer), "name": "random", "variant": "random directions",
                     "router_nearest_base_cos": chance["nearest_base_cos"],
                     "down_router_abs_cos": chance["nearest_base_abs_cos"],
                     "down_keys_abs_cos": chance["nearest_key_abs_cos"]})
        for name, adapter in entry["adapters"].items():
            if adapter is None:
                continue
            tokens = routing.get(name) or {}
            router = adapter["router"]["summary"] if adapter["router"] else {}
            rows.append({
                "layer": int(layer), "name": name, "variant": result["adapters"][name]["variant"],
                "router_nearest_base_cos": router.get("mean_nearest_base_cos"),
                "down_router_abs_cos": adapter["down"]["summary"]["mean_max_abs_cos_router"],
                "down_keys_abs_cos": adapter["down"]["summary"]["mean_max_abs_cos_keys"],
                "load_entropy": tokens.get("entropy"), "agreement": tokens.get("agreement"),
                "agreement_if_independent": tokens.get("agreement_if_independent"),
                "nmi_top1": tokens.get("nmi_top1"), "base_topk_overlap_with_bare": tokens.get("base_topk_overlap_with_bare"),
            })
    return rows
