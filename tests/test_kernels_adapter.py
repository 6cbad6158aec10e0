"""Routed adapter: dense and sorted Triton formulations vs the reference, forward and backward.

Gradients of x, down, up and the gate weights are all checked. Without CUDA the kernels run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); its bf16 ``tl.dot`` is wrong, so
CPU runs use float32 / float16 and the ``gpu`` twins bf16. Accuracy: flash-attention's rule
(kernels/accuracy.py), kernel error vs float64 truth at most 2x the same-dtype reference's,
and the reference's own error bounded against the largest true value.
"""

from __future__ import annotations

import pytest
import torch

from perft_qlora.kernels import pick_formulation, routed_adapter
from perft_qlora.kernels.accuracy import assert_flash_rule
from perft_qlora.kernels.dispatch import _act_module
from perft_qlora.kernels.triton_adapter_dense import DenseBlocks
from perft_qlora.kernels.triton_adapter_sorted import SortedBlocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTH = 200  # D: not a multiple of the 64-wide D blocks below
BLOCKS = {"dense": DenseBlocks(t=16, d=64), "sorted": SortedBlocks(m=16, d=64)}


def _routing(case: str, tokens: int, experts: int, top_k: int, g: torch.Generator):
    """(weights (T, K) float32, indices (T, K) int64)."""
    if case == "random_with_empty_expert":  # expert 1 never chosen
        pool = torch.tensor([e for e in range(experts) if e != 1])
        idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(tokens)])
    elif case == "all_to_one_expert":
        idx = torch.full((tokens, top_k), experts - 1)
    elif case == "k_equals_e":
        idx = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)])
    elif case == "ties":  # tied router probabilities: equal weights, top-K breaks the tie
        probs = torch.softmax(torch.randint(0, 2, (tokens, experts), generator=g).float(), dim=-1)
        weights, idx = torch.topk(probs, top_k, dim=-1)
        return weights, idx
    else:
        raise ValueError(case)
    return torch.rand(tokens, top_k, generator=g) + 0.1, idx


def _loop_truth(x, down, up, weights, indices, act, scaling):
    """``out[t] = Σ_k w[t,k] · s · up_j act(down_j x_t)``, one (token, slot) at a time: shares no code with the
    reference or the kernels (no sort, no grouping), so a bug in their common routing layout cannot hide."""
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for k in range(indices.shape[1]):
            j = int(indices[t, k])
            row = row + weights[t, k] * scaling * (up[j] @ act(down[j] @ x[t]))
        rows.append(row)
    return torch.stack(rows)


def _run(monkeypatch, backend, inputs, dout, dtype, activation, formulation="auto", blocks=None):
    """(out, dx, ddown, dup, dweights) of one backend, inputs cast to ``dtype`` (weights stay float32)."""
    monkeypatch.setenv("PERFT_QLORA_KERNELS", backend)
    x, down, up, weights, indices = inputs
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (x, down, up)]  # fresh leaves
    w = weights.detach().to(torch.float64 if backend == "truth" else weights.dtype).clone().requires_grad_(True)
    if backend == "truth":
        out = _loop_truth(*leaves, w, indices, _act_module(activation) if activation else (lambda h: h), scaling=1.5)
    else:
        out = routed_adapter(*leaves, w, indices, activation=activation, scaling=1.5, formulation=formulation, blocks=blocks)
    out.backward(dout.to(out.dtype))
    return (out, *(t.grad for t in leaves), w.grad)


def _check(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation, dtype, blocks, seed=0, backend="triton"):
    g = torch.Generator().manual_seed(seed)
    weights, indices = _routing(case, tokens, experts, top_k, g)
    x = torch.randn(tokens, WIDTH, generator=g)
    down = torch.randn(experts, bottleneck, WIDTH, generator=g) * WIDTH**-0.5
    up = torch.randn(experts, WIDTH, bottleneck, generator=g) * bottleneck**-0.5
    dout = torch.randn(tokens, WIDTH, generator=g).to(DEVICE)
    inputs = tuple(t.to(DEVICE) for t in (x, down, up, weights, indices))
    truth = _run(monkeypatch, "truth", inputs, dout, torch.float64, activation)
    reference = _run(monkeypatch, "reference", inputs, dout, dtype, activation)
    kernel = _run(monkeypatch, backend, inputs, dout, dtype, activation, formulation, blocks)
    for name, k, r, t in zip(("out", "dx", "ddown", "dup", "dweights"), kernel, reference, truth):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        assert_flash_rule(f"{formulation}/{case}/{name}", k, r, t, dtype=dtype)


CASES = [  # (routing, tokens, M, K, DB, activation)
    ("random_with_empty_expert", 37, 5, 2, 12, None),
    ("all_to_one_expert", 23, 4, 1, 16, "silu"),
    ("random_with_empty_expert", 1, 6, 3, 8, "gelu"),  # a single token
    ("k_equals_e", 9, 3, 3, 20, "relu"),
    ("ties", 17, 6, 2, 8, None),
]


@pytest.mark.parametrize("formulation", ["dense", "sorted"])
@pytest.mark.parametrize("case,tokens,experts,top_k,bottleneck,activation", CASES)
def test_matches_reference_fp32_interpreter(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation):
    _check(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation, torch.float32, BLOCKS[formulation])


@pytest.mark.parametrize("formulation", ["dense", "sorted"])
def test_matches_reference_fp16_default_blocks(monkeypatch, formulation):
    _check(monkeypatch, formulation, "random_with_empty_expert", 41, 4, 2, 16, "silu", torch.float16, None, seed=1)


@pytest.mark.parametrize("formulation, experts, bottleneck", [("dense", 8, 16), ("sorted", 3, 100)])
def test_sm8x_tiles_match_the_reference(monkeypatch, formulation, experts, bottleneck):
    """The tiles only sm_80/86/89 launch (``*_TILES_SM80``: 16 tokens at P = 128, 16 rows at PDB = 128)."""
    from perft_qlora.kernels.triton_adapter_dense import DENSE_TILES_SM80
    from perft_qlora.kernels.triton_adapter_sorted import SORTED_TILES_SM80

    blocks = DENSE_TILES_SM80[128] if formulation == "dense" else SORTED_TILES_SM80[128]
    _check(monkeypatch, formulation, "random_with_empty_expert", 21, experts, 2, bottleneck, "silu", torch.float32, blocks, seed=5)


def test_formulation_by_shape():
    assert pick_formulation(4, 16) == "dense"  # PERFT Top2/4 DB=16: 64 hidden columns
    assert pick_formulation(8, 16) == "dense"  # PERFT-E on Mixtral, DB=16
    assert pick_formulation(1, 64) == "dense"  # PERFT-S
    assert pick_formulation(64, 8) == "sorted"  # PERFT-E on OLMoE: 512 columns, 8 of 64 experts used
    assert pick_formulation(17, 15) == "dense"  # 255 columns pad to 256: still one register tile
    assert pick_formulation(16, 17) == "sorted"  # 272 -> 512 columns


@pytest.mark.parametrize("formulation", ["dense", "sorted"])
def test_no_grad_forward_saves_no_hidden_activations(monkeypatch, formulation):
    """Generation runs the adapters under no_grad with parameters that require grad: nothing may be stored."""
    from perft_qlora.kernels import ops

    name = f"{formulation}_forward"
    saves, original = [], getattr(ops, name)

    def spy(*args):
        out, hidden = original(*args)
        saves.append(hidden.numel())
        return out, hidden

    monkeypatch.setattr(ops, name, spy)
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "triton")
    g = torch.Generator().manual_seed(4)
    weights, indices = _routing("random_with_empty_expert", 7, 4, 2, g)
    x = torch.randn(7, WIDTH, generator=g).to(DEVICE)
    down = (torch.randn(4, 8, WIDTH, generator=g) * 0.1).to(DEVICE).requires_grad_(True)
    up = (torch.randn(4, WIDTH, 8, generator=g) * 0.1).to(DEVICE).requires_grad_(True)
    args = (x, down, up, weights.to(DEVICE), indices.to(DEVICE))
    with torch.no_grad():
        out = routed_adapter(*args, formulation=formulation, blocks=BLOCKS[formulation])
    assert saves == [0] and not out.requires_grad
    routed_adapter(*args, formulation=formulation, blocks=BLOCKS[formulation])
    assert saves[-1] > 0  # with a backward to serve, the spy sees the store


@pytest.mark.gpu
@pytest.mark.parametrize("formulation", ["dense", "sorted"])
@pytest.mark.parametrize("case,tokens,experts,top_k,bottleneck,activation", CASES + [("random_with_empty_expert", 3000, 8, 2, 16, None)])
def test_matches_reference_bf16_gpu(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation):
    _check(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation, torch.bfloat16, None)
