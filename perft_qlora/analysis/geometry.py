"""Where the experts sit: router expert vectors, expert key memory vectors, PEFT router and down vectors.

Per MoE layer: the base router's expert vectors (rows of its gate, ``(N, D)``), a sample of each base
expert's key memory vectors (rows of its gate or up projection, the directions its neurons respond to,
dequantized from NF4 one expert at a time), and, per adapter, its PEFT router's vectors (``(M, D)``,
PERFT only) and its experts' down-projection rows (``(M, DB, D)``, what each PEFT expert reads). The
summaries are cosine similarities; :func:`project_2d` places every vector in one 2-D picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..quant.arch import decoder_layers, get_arch
from ..quant.nf4 import NF4Weight


@dataclass
class BaseVectors:
    router: torch.Tensor
    """(N, D) float32 base router expert vectors."""
    keys: torch.Tensor
    """(N, S, D) float32 sampled key memory vectors of each base expert."""
    key_rows: list[int]
    """The S sampled row indices (the same for every expert) within the gate (or up) half."""


@dataclass
class AdapterVectors:
    router: torch.Tensor | None
    """(M, D) float32 PEFT router vectors, or None when the variant has no trainable router."""
    down: torch.Tensor
    """(M, DB, D) float32 down-projection rows of each PEFT expert."""


def base_vectors(model, layer: int, keys: str = "gate", keys_per_expert: int = 32, seed: int = 0) -> BaseVectors:
    """The base router's rows and ``keys_per_expert`` rows of each expert's ``keys`` projection in ``layer``.

    ``keys`` is ``"gate"`` (the first half of the fused ``gate_up_proj``, the rows behind the activation)
    or ``"up"``. NF4 experts are dequantized one expert at a time; only the sampled rows are kept.
    """
    arch = get_arch(model.config)
    block = getattr(decoder_layers(model)[layer], arch.moe_block)
    block = getattr(block, "base", block)  # a PERFT-wrapped block keeps the original as .base
    router = getattr(block, arch.router).weight.detach().float().cpu()
    gate_up = getattr(block, arch.experts).gate_up_proj
    num_experts, two_i, _ = gate_up.shape
    half = two_i // 2
    count = min(keys_per_expert, half)
    rows = torch.randperm(half, generator=torch.Generator().manual_seed(seed + layer))[:count].sort().values
    offset = 0 if keys == "gate" else half
    sampled = []
    for e in range(num_experts):
        weight = gate_up.dequantize_expert(e, torch.float32) if isinstance(gate_up, NF4Weight) else gate_up[e]
        sampled.append(weight[rows + offset].detach().float().cpu())  # (S, D)
        del weight
    return BaseVectors(router, torch.stack(sampled), rows.tolist())


def adapter_vectors(weights_path: str, layer: int) -> AdapterVectors | None:
    """The PEFT router and down rows of ``layer`` read from a saved adapter file; None if it skips the layer."""
    with safe_open(weights_path, framework="pt") as f:
        names = set(f.keys())
        down_key, router_key = f"layers.{layer}.perft_experts.down", f"layers.{layer}.perft_router.weight"
        if down_key not in names:
            return None
        router = f.get_tensor(router_key).float() if router_key in names else None
        return AdapterVectors(router, f.get_tensor(down_key).float())


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) cosine similarity of every row of ``a`` (A, D) with every row of ``b`` (B, D)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def chance_abs_cosine(dim: int) -> float:
    """E|cos| of two independent random directions in ``dim`` dimensions (about sqrt(2 / (pi dim)))."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def _rounded(values) -> list:
    return [round(float(v), 6) for v in values]


def router_key_alignment(base: BaseVectors) -> dict:
    """How each base router vector lines up with its own expert's key vectors and with the others'.

    Per base expert e: ``own_mean_cos`` (mean cosine with e's sampled keys), ``other_mean_cos`` (with the
    other experts' keys), ``nearest_key_expert`` / ``nearest_key_cos`` (the expert owning the single key
    vector most similar to the router vector, and that cosine).
    """
    n, s, _ = base.keys.shape
    cos = cosine_matrix(base.router, base.keys.reshape(n * s, -1)).reshape(n, n, s)  # (router e, keys of e', S)
    per_expert = cos.mean(-1)  # (N, N)
    own = per_expert.diagonal()
    other = (per_expert.sum(-1) - own) / max(n - 1, 1)
    best_cos, best = cos.reshape(n, n * s).max(-1)
    nearest = best // s
    return {
        "own_mean_cos": _rounded(own), "other_mean_cos": _rounded(other),
        "nearest_key_expert": nearest.tolist(), "nearest_key_cos": _rounded(best_cos),
        "summary": {
            "own_mean_cos": round(float(own.mean()), 6), "other_mean_cos": round(float(other.mean()), 6),
            "nearest_key_is_own": round(float((nearest == torch.arange(n)).float().mean()), 6),
        },
    }


def peft_router_alignment(adapter: AdapterVectors, base: BaseVectors) -> dict | None:
    """Each PEFT router vector's nearest base router vector (signed cosine: logits keep their sign)."""
    if adapter.router is None:
        return None
    cos = cosine_matrix(adapter.router, base.router)  # (M, N)
    best_cos, best = cos.max(-1)
    n, s, _ = base.keys.shape
    key_cos, key_best = cosine_matrix(adapter.router, base.keys.reshape(n * s, -1)).max(-1)
    return {
        "nearest_base_expert": best.tolist(), "nearest_base_cos": _rounded(best_cos),
        "nearest_key_expert": (key_best // s).tolist(), "nearest_key_cos": _rounded(key_cos),
        "cos_to_base_router": [_rounded(row) for row in cos],
        "summary": {"mean_nearest_base_cos": round(float(best_cos.mean()), 6),
                    "mean_nearest_key_cos": round(float(key_cos.mean()), 6)},
    }


def down_alignment(adapter: AdapterVectors, base: BaseVectors) -> dict:
    """Each PEFT expert's down rows against the base router vectors and the key vectors.

    Down rows are defined up to sign (flip a row of ``down`` and the matching column of ``up``: same
    expert), so these use |cos|. Per PEFT expert j: ``nearest_base_expert`` / ``max_abs_cos_router`` (the
    base router vector closest to any of j's rows), ``mean_max_abs_cos_router`` (mean over j's rows of
    the closest |cos|), ``mean_max_abs_cos_keys`` (same against the key vectors), and with a PEFT router,
    ``own_router_abs_cos`` (mean |cos| of j's rows with j's own router vector).
    """
    m, db, d = adapter.down.shape
    rows = adapter.down.reshape(m * db, d)
    to_router = cosine_matrix(rows, base.router).abs().reshape(m, db, -1)  # (M, DB, N)
    per_row, per_row_expert = to_router.max(-1)  # (M, DB)
    best_row = per_row.argmax(-1)  # (M,)
    nearest = per_row_expert.gather(1, best_row[:, None]).squeeze(1)
    n, s, _ = base.keys.shape
    to_keys = cosine_matrix(rows, base.keys.reshape(n * s, d)).abs().max(-1).values.reshape(m, db)
    out = {
        "nearest_base_expert": nearest.tolist(), "max_abs_cos_router": _rounded(per_row.max(-1).values),
        "mean_max_abs_cos_router": _rounded(per_row.mean(-1)), "mean_max_abs_cos_keys": _rounded(to_keys.mean(-1)),
    }
    summary = {"mean_max_abs_cos_router": round(float(per_row.mean()), 6),
               "mean_max_abs_cos_keys": round(float(to_keys.mean()), 6)}
    if adapter.router is not None:
        own = torch.stack([cosine_matrix(adapter.down[j], adapter.router[j : j + 1]).abs().mean() for j in range(m)])
        out["own_router_abs_cos"] = _rounded(own)
        summary["own_router_abs_cos"] = round(float(own.mean()), 6)
    out["summary"] = summary
    return out


def random_baseline(base: BaseVectors, samples: int = 1000, seed: int = 0) -> dict:
    """What the "nearest" summaries give for random directions (Gaussian, ``samples`` of them) against this
    layer's own base vectors: the level to compare PEFT vectors with, since a maximum over N is never 0."""
    n, s, d = base.keys.shape
    queries = torch.randn(samples, d, generator=torch.Generator().manual_seed(seed))
    to_router = cosine_matrix(queries, base.router)  # (samples, N)
    to_keys = cosine_matrix(queries, base.keys.reshape(n * s, d)).abs().max(-1).values
    return {"samples": samples, "nearest_base_cos": round(float(to_router.max(-1).values.mean()), 6),
            "nearest_base_abs_cos": round(float(to_router.abs().max(-1).values.mean()), 6),
            "nearest_key_abs_cos": round(float(to_keys.mean()), 6)}


def project_2d(groups: dict[str, torch.Tensor], method: str = "pca", seed: int = 0) -> dict:
    """One 2-D map of every row of every group (``name -> (R, D)``), on unit-length rows (directions).

    ``pca``: the two leading principal components (SVD of the centred rows). ``umap``: as the PERFT
    authors' script, PCA to the fewest components explaining 50% of the variance (at least 2, at most
    50), then UMAP with the cosine metric (needs ``umap-learn``). Returns ``{"method", "explained_variance"
    (the PCA share of each plotted axis, or of the PCA step for UMAP), "points": {name: [[x, y], ...]}}``.
    """
    names = list(groups)
    x = torch.cat([torch.nn.functional.normalize(groups[k].float(), dim=-1) for k in names])
    x = x - x.mean(0)
    u, sv, vh = torch.linalg.svd(x.double(), full_matrices=False)
    signs = torch.sign(vh[torch.arange(vh.shape[0]), vh.abs().argmax(1)])  # fix each axis' sign: reproducible
    ratio = sv**2 / (sv**2).sum().clamp_min(1e-30)
    if method == "pca":
        coords = (u[:, :2] * sv[:2] * signs[:2]).float()
        explained = ratio[:2]
    elif method == "umap":
        import umap

        k = int(min(max(2, int((ratio.cumsum(0) < 0.5).sum()) + 1), 50, x.shape[0] - 1, x.shape[1]))
        reduced = (u[:, :k] * sv[:k]).float().numpy()
        coords = torch.from_numpy(umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(reduced))
        explained = ratio[:k].sum().reshape(1)
    else:
        raise ValueError(f"unknown projection {method!r}; use 'pca' or 'umap'")
    points, start = {}, 0
    for name in names:
        rows = groups[name].shape[0]
        points[name] = [[round(float(a), 5), round(float(b), 5)] for a, b in coords[start : start + rows].tolist()]
        start += rows
    return {"method": method, "explained_variance": _rounded(explained), "points": points}
