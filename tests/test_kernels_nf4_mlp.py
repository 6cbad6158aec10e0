"""NF4 grouped expert MLP: Triton kernels vs the reference, forward and backward, awkward routings.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported). The interpreter's bf16 ``tl.dot`` is wrong, so CPU runs use float32 and float16;
the ``gpu`` twins run bf16. Accuracy follows flash-attention's rule (kernels/accuracy.py): error vs a
float64 truth at most 2x that of the PyTorch reference in the same dtype,
and the reference's own error bounded against the largest true value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perft_qlora.kernels import nf4_expert_mlp
from perft_qlora.kernels.accuracy import assert_flash_rule
from perft_qlora.kernels.triton_nf4_mlp import NF4Blocks
from perft_qlora.quant.nf4 import NF4Weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Blocks that divide none of the sizes below (H = 192, I = 192): every tail mask is exercised.
AWKWARD = NF4Blocks(m=16, n=128, k=128)


def _routing(case: str, tokens: int, experts: int, top_k: int, g: torch.Generator):
    """(weights (T, K) float32, indices (T, K) int64) for a named routing case."""
    if case == "random_with_empty_expert":  # expert 1 never chosen
        pool = torch.tensor([e for e in range(experts) if e != 1])
        idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(tokens)])
    elif case == "all_to_one_expert":
        idx = torch.full((tokens, top_k), 2)
    elif case == "k_equals_e":
        idx = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)])
    elif case == "ties":  # tied router logits: top-K breaks ties, weights are equal
        logits = torch.randint(0, 2, (tokens, experts), generator=g).float()
        idx = torch.topk(logits, top_k, dim=-1).indices
        return torch.full((tokens, top_k), 1.0 / top_k), idx
    else:
        raise ValueError(case)
    return torch.rand(tokens, top_k, generator=g) + 0.1, idx


def _experts(experts, hidden, inter, double_quant, g):
    gate_up = NF4Weight.quantize(torch.randn(experts, 2 * inter, hidden, generator=g) * 0.08, double_quant=double_quant)
    down = NF4Weight.quantize(torch.randn(experts, hidden, inter, generator=g) * 0.08, double_quant=double_quant)
    return gate_up.to(DEVICE), down.to(DEVICE)


def _run(monkeypatch, backend, x, gate_up, down, weights, indices, dout, dtype, blocks=None):
    """(out, dx, dweights) of one backend in ``dtype`` (weights stay float32, as Mixtral's router)."""
    monkeypatch.setenv("PERFT_QLORA_KERNELS", backend)
    x = x.detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf: grads never accumulate across runs
    w = weights.detach().clone().requires_grad_(True)
    out = nf4_expert_mlp(x, gate_up, down, w, indices, "silu", blocks=blocks)
    out.backward(dout.to(out.dtype))
    return out, x.grad, w.grad


def _truth(x, gate_up, down, weights, indices, dout):
    """Float64 ground truth from whole dequantized weights (an independent dense computation)."""
    x = x.double().requires_grad_(True)
    w = weights.double().requires_grad_(True)
    w_gu, w_d = gate_up.dequantize().double(), down.dequantize().double()
    out = torch.zeros_like(x)
    for e in range(w_gu.shape[0]):
        token, slot = torch.where(indices == e)
        g, u = (x[token] @ w_gu[e].t()).chunk(2, dim=-1)
        out = out.index_add(0, token, (F.silu(g) * u) @ w_d[e].t() * w[token, slot, None])
    out.backward(dout.double())
    return out, x.grad, w.grad


def _check(monkeypatch, case, tokens, top_k, dtype, double_quant, blocks, seed=0, experts=5, hidden=192, inter=192):
    g = torch.Generator().manual_seed(seed)
    gate_up, down = _experts(experts, hidden, inter, double_quant, g)
    weights, indices = _routing(case, tokens, experts, top_k, g)
    x, dout = torch.randn(tokens, hidden, generator=g), torch.randn(tokens, hidden, generator=g)
    weights, indices, x, dout = (t.to(DEVICE) for t in (weights, indices, x, dout))
    truth = _truth(x, gate_up, down, weights, indices, dout)
    reference = _run(monkeypatch, "reference", x, gate_up, down, weights, indices, dout, dtype)
    kernel = _run(monkeypatch, "triton", x, gate_up, down, weights, indices, dout, dtype, blocks)
    for name, k, r, t in zip(("out", "dx", "dweights"), kernel, reference, truth):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        assert_flash_rule(f"{case}/{name}", k, r, t, dtype=dtype)


CASES = [  # (routing, tokens, top_k)
    ("random_with_empty_expert", 37, 3),
    ("all_to_one_expert", 21, 1),
    ("random_with_empty_expert", 1, 2),  # a single token
    ("k_equals_e", 6, 5),
    ("ties", 19, 2),
]


@pytest.mark.parametrize("case,tokens,top_k", CASES)
def test_matches_reference_fp32_interpreter(monkeypatch, case, tokens, top_k):
    _check(monkeypatch, case, tokens, top_k, torch.float32, double_quant=True, blocks=AWKWARD)


def test_matches_reference_fp16_plain_absmax_default_blocks(monkeypatch):
    _check(monkeypatch, "random_with_empty_expert", 29, 2, torch.float16, double_quant=False, blocks=None, seed=1)


def test_matches_reference_largest_table_tile_fp32(monkeypatch):
    """The m=128 training tile of NF4_TILES (BN = BK = 64 < H = I = 192: tails in N and K)."""
    from perft_qlora.kernels.triton_nf4_mlp import NF4_TILES

    _check(monkeypatch, "random_with_empty_expert", 41, 3, torch.float32, double_quant=True, blocks=NF4_TILES[None], seed=3)


def _spy_on_stores(monkeypatch):
    """Record (store_ab flag, stored pre-activation values) of every fused gate/up forward."""
    from perft_qlora.kernels import ops

    stores, original = [], ops.gate_up_forward

    def spy(x, sort, sched, gate_up, act, store_ab, blocks):
        h, ab = original(x, sort, sched, gate_up, act, store_ab, blocks)
        stores.append((store_ab, ab.numel()))
        return h, ab

    monkeypatch.setattr(ops, "gate_up_forward", spy)
    return stores


def test_no_grad_forward_stores_no_preactivations_and_matches(monkeypatch):
    g = torch.Generator().manual_seed(2)
    gate_up, down = _experts(3, 128, 64, True, g)
    weights, indices = _routing("random_with_empty_expert", 9, 3, 2, g)
    # Inputs that would need gradients under grad mode (as the hidden states and router weights do in training).
    x = torch.randn(9, 128, generator=g).to(DEVICE).requires_grad_(True)
    weights, indices = weights.to(DEVICE).requires_grad_(True), indices.to(DEVICE)
    stores = _spy_on_stores(monkeypatch)
    with torch.no_grad():
        monkeypatch.setenv("PERFT_QLORA_KERNELS", "reference")
        reference = nf4_expert_mlp(x, gate_up, down, weights, indices, "silu")
        monkeypatch.setenv("PERFT_QLORA_KERNELS", "triton")
        kernel = nf4_expert_mlp(x, gate_up, down, weights, indices, "silu")
    assert not kernel.requires_grad
    assert stores == [(False, 0)], stores  # one kernel call, nothing kept for a backward that cannot come
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)  # fp32 vs fp32: summation order only
    # The spy sees stores when there is a backward to serve: the check above can fail.
    nf4_expert_mlp(x, gate_up, down, weights, indices, "silu")
    assert stores[-1] == (True, 9 * 2 * 2 * 64)  # R = T*K rows of [gate | up]


# Split-K down projection (decode tiles, long K). I = 192 with BK = 128 and 3 slices: slices of 128
# (whole BK steps), so slice 1 holds K's 64-wide tail and slice 2 starts past I (empty: stores zeros).
SPLIT_EMPTY_LAST = NF4Blocks(m=16, n=128, k=128, split_k=3)


def _spy_on_down(monkeypatch):
    """Record which down-projection launcher ran, in order: 'splitk', 'rows(trans_w=...)', 'down_bwd'."""
    from perft_qlora.kernels import ops

    calls, splitk, rows, down_bwd = [], ops.down_forward_splitk, ops.rows_matmul, ops.down_backward

    def spy_splitk(*args, **kwargs):
        calls.append("splitk")
        return splitk(*args, **kwargs)

    def spy_rows(*args, **kwargs):
        calls.append(f"rows(trans_w={kwargs['trans_w']})")
        return rows(*args, **kwargs)

    def spy_bwd(*args, **kwargs):
        calls.append("down_bwd")
        return down_bwd(*args, **kwargs)

    monkeypatch.setattr(ops, "down_forward_splitk", spy_splitk)
    monkeypatch.setattr(ops, "rows_matmul", spy_rows)
    monkeypatch.setattr(ops, "down_backward", spy_bwd)
    return calls


@pytest.mark.parametrize("case,tokens,top_k", CASES)
def test_split_k_matches_reference_fp32_interpreter(monkeypatch, case, tokens, top_k):
    """Forward through the split-K down projection; backward still takes the unsplit kernels."""
    calls = _spy_on_down(monkeypatch)
    _check(monkeypatch, case, tokens, top_k, torch.float32, double_quant=True, blocks=SPLIT_EMPTY_LAST, seed=4)
    assert calls == ["splitk", "down_bwd", "rows(trans_w=False)"], calls


def test_split_k_matches_reference_fp16_plain_absmax(monkeypatch):
    """fp16, plain absmax, BK = 64 and 5 slices of 64 over I = 192: slices 3 and 4 are empty."""
    calls = _spy_on_down(monkeypatch)
    blocks = NF4Blocks(m=32, n=64, k=64, split_k=5)
    _check(monkeypatch, "random_with_empty_expert", 23, 2, torch.float16, double_quant=False, blocks=blocks, seed=5)
    assert calls == ["splitk", "down_bwd", "rows(trans_w=False)"], calls


def test_split_k_partials_sum_to_the_unsplit_rows_and_empty_slices_are_zero():
    """The launcher's (S, R, H) float32 partials: empty slices are written as zeros, the sum is the unsplit y."""
    from perft_qlora.kernels.sorting import sort_by_expert, tile_schedule
    from perft_qlora.kernels.triton_nf4_mlp import down_forward_splitk, rows_matmul

    g = torch.Generator().manual_seed(6)
    _, down = _experts(4, 192, 192, True, g)
    weights, indices = _routing("random_with_empty_expert", 11, 4, 2, g)
    sort = sort_by_expert(indices.to(DEVICE), 4)
    sched = tile_schedule(sort.offsets, 22, SPLIT_EMPTY_LAST.m)
    h = torch.randn(22, 192, generator=g).to(DEVICE)
    row_w = weights.reshape(-1)[sort.order.cpu()].float().to(DEVICE)
    parts = down_forward_splitk(h, sort, sched, down, row_w, SPLIT_EMPTY_LAST)
    assert parts.shape == (3, 22, 192) and parts.dtype == torch.float32
    assert torch.equal(parts[2], torch.zeros_like(parts[2])) and parts[1].abs().amax() > 0  # slice 1: K's tail
    whole = rows_matmul(h, sort, sched, down, trans_w=True, row_scale=row_w, blocks=SPLIT_EMPTY_LAST)
    torch.testing.assert_close(parts.sum(0), whole, rtol=1e-5, atol=1e-5)


def test_split_k_is_chosen_for_mixtral_decode_only():
    """The tile table splits the down projection at decode tiles with a long K: Mixtral at the benchmark's 1 and
    16 tokens (what ``bench kernels`` times), not OLMoE (I = 1024) and not training batches."""
    from perft_qlora.bench.kernels import SHAPES
    from perft_qlora.kernels.triton_nf4_mlp import SPLIT_K_MIN_INNER, default_nf4_blocks

    mixtral, olmoe = SHAPES["mixtral"], SHAPES["olmoe"]
    assert mixtral["inter"] >= SPLIT_K_MIN_INNER > olmoe["inter"]
    for tokens in (1, 16):
        assert default_nf4_blocks(tokens * mixtral["top_k"], mixtral["experts"], mixtral["inter"]).split_k > 1
        assert default_nf4_blocks(tokens * olmoe["top_k"], olmoe["experts"], olmoe["inter"]).split_k == 1
    for tokens in (512, 4096):
        assert default_nf4_blocks(tokens * mixtral["top_k"], mixtral["experts"], mixtral["inter"]).split_k == 1


def test_default_blocks_take_the_split_path_at_decode(monkeypatch):
    """blocks=None at a decode shape with I >= SPLIT_K_MIN_INNER runs the split-K launcher (small H keeps it quick)."""
    from perft_qlora.kernels import triton_nf4_mlp

    monkeypatch.setattr(triton_nf4_mlp, "SPLIT_K_MIN_INNER", 192)
    calls = _spy_on_down(monkeypatch)
    _check(monkeypatch, "random_with_empty_expert", 3, 2, torch.float32, double_quant=True, blocks=None, seed=7)
    assert calls == ["splitk", "down_bwd", "rows(trans_w=False)"], calls


@pytest.mark.gpu
@pytest.mark.parametrize("case,tokens,top_k", CASES + [("random_with_empty_expert", 1000, 3)])
def test_matches_reference_bf16_gpu(monkeypatch, case, tokens, top_k):
    _check(monkeypatch, case, tokens, top_k, torch.bfloat16, double_quant=True, blocks=None)
