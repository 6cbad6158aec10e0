"""Routing layouts shared by the references, the Triton launchers and the benchmark (torch only).

A top-K routing ``indices (T, K)`` names ``R = T*K`` (token, slot) pairs, the *rows*. Grouped kernels
walk the rows sorted by expert, without padding: :func:`sort_by_expert` gives the permutation and
the expert boundaries, :func:`tile_schedule` cuts each expert's rows into ``block_m``-row tiles. Both
run on the routing's device with no host synchronisation, so the launch grid is an upper bound and
programs past the last tile exit at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertSort(NamedTuple):
    """Rows sorted by expert; within an expert by token, then slot (the reference loop's order)."""

    order: torch.Tensor
    """(R,) int64 flat slot ``t*K + k`` of each sorted row."""
    tokens: torch.Tensor
    """(R,) int64 token of each sorted row, ``order // K``."""
    offsets: torch.Tensor
    """(E+1,) int64: the rows of expert ``e`` are ``offsets[e]:offsets[e+1]``."""


class TileSchedule(NamedTuple):
    """``block_m``-row tiles over the sorted rows, never straddling two experts."""

    expert: torch.Tensor
    """(n_max,) int32 expert of each tile, -1 past the last tile."""
    start: torch.Tensor
    """(n_max,) int32 first sorted row of each tile (its last is ``min(start+block_m, offsets[e+1]) - 1``)."""


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> ExpertSort:
    """Stable sort of the (token, slot) pairs of ``indices (T, K)`` by expert id in ``[0, num_experts)``."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be (tokens, top_k), got shape {tuple(indices.shape)}")
    flat = indices.reshape(-1)  # (R,)
    _, order = torch.sort(flat, stable=True)  # (R,)
    # scatter_add rather than bincount: bincount sizes its output from the data (a host sync on CUDA).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return ExpertSort(order, order // indices.shape[1], offsets)


def tile_schedule(offsets: torch.Tensor, num_rows: int, block_m: int) -> TileSchedule:
    """Tiles of at most ``block_m`` rows per expert; ``n_max = ceil(R / block_m) + min(E, R)`` entries.

    Each expert with ``c`` rows needs ``ceil(c / block_m) <= c / block_m + 1`` tiles, so ``n_max``
    bounds the count for any routing without reading it on the host.
    """
    num_experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]  # (E,)
    tiles = (counts + block_m - 1) // block_m  # (E,)
    ends = torch.cumsum(tiles, 0)  # (E,) inclusive
    n_max = max(1, -(-num_rows // block_m) + min(num_experts, num_rows))
    i = torch.arange(n_max, device=offsets.device)
    expert = torch.searchsorted(ends, i, right=True)  # (n_max,) first expert whose tiles end after i
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    start = offsets[e] + (i - (ends[e] - tiles[e])) * block_m
    return TileSchedule(torch.where(valid, expert, -1).to(torch.int32), torch.where(valid, start, 0).to(torch.int32))


def gate_matrix(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, M) float32 dense gates: ``G[t, j] = Σ_k weights[t, k] [indices[t, k] == j]`` (repeats add up)."""
    gates = torch.zeros(indices.shape[0], num_experts, dtype=torch.float32, device=indices.device)
    return gates.scatter_add_(1, indices, weights.float())
