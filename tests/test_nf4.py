"""NF4 storage: bitsandbytes-compatible bytes, per-expert dequantization, and the experts module."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch

from perft_qlora.kernels import dequantize_nf4_reference
from perft_qlora.quant.nf4 import NF4Weight
from perft_qlora.quant.nf4_experts import NF4Experts


def _experts(num_experts, out_features, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, out_features, in_features, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(3, 40, 64), (5, 96, 128), (2, 8, 8)])
def test_bytes_match_bitsandbytes_whole_tensor_quantization(shape, double_quant):
    w = _experts(*shape)
    nf4 = NF4Weight.quantize(w, double_quant=double_quant)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(nf4.packed, packed)
    assert torch.equal(nf4.absmax, state.absmax)
    if double_quant:
        assert torch.equal(nf4.absmax2, state.state2.absmax)
        assert torch.equal(nf4.offset, state.offset)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_bitsandbytes_and_per_expert_slices(double_quant):
    # 40x64 experts: 40 blocks each, so nested 256-blocks straddle expert boundaries.
    w = _experts(7, 40, 64, seed=1)
    nf4 = NF4Weight.quantize(w, double_quant=double_quant)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = bnbF.dequantize_4bit(packed, state)
    assert torch.equal(nf4.dequantize(), expected)
    for e in range(7):
        assert torch.equal(nf4.dequantize_expert(e), expected[e])


def test_reference_dequantizer_matches_bitsandbytes_where_rows_are_whole_blocks():
    w = _experts(2, 64, 128, seed=2)
    nf4 = NF4Weight.quantize(w, double_quant=False)
    ref = dequantize_nf4_reference(nf4.packed, nf4.absmax, nf4.code, tuple(w.shape), torch.bfloat16)
    assert torch.equal(ref, nf4.dequantize())


def test_rows_that_are_not_whole_blocks_dequantize_correctly():
    # bitsandbytes' CPU kernel is wrong here (see NF4Weight.dequantize_expert); we use the flat-block reference.
    w = _experts(3, 40, 48, seed=3)
    nf4 = NF4Weight.quantize(w, double_quant=True)
    err = max((nf4.dequantize_expert(e).float() - w[e].float()).abs().mean().item() for e in range(3))
    scale = w.float().abs().mean().item()
    assert err < 0.15 * scale  # NF4 mean abs error is ~8-10% of the mean magnitude for Gaussian weights


def test_quantization_error_is_in_the_nf4_range():
    w = _experts(4, 64, 64, seed=4)
    deq = NF4Weight.quantize(w).dequantize().float()
    rel = (deq - w.float()).norm() / w.float().norm()
    assert 0.02 < rel < 0.15


def test_from_experts_rejects_mixed_shapes_and_empty_input():
    with pytest.raises(ValueError, match="shapes differ"):
        NF4Weight.from_experts([torch.randn(8, 8), torch.randn(8, 16)])
    with pytest.raises(ValueError, match="no expert"):
        NF4Weight.from_experts([])


def _gated_mlp_loop(x, gate_up, down, idx, weights):
    """Per-token loop reference of a top-K gated-MLP MoE over dense expert weights."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k].item()
            g, u = (x[t].float() @ gate_up[e].float().t()).chunk(2)
            out[t] += weights[t, k].float() * (torch.nn.functional.silu(g) * u) @ down[e].float().t()
    return out


def test_nf4_experts_forward_matches_loop_over_dequantized_weights_and_grads_reach_input():
    torch.manual_seed(0)
    n, hidden, inter, tokens, k = 6, 64, 64, 13, 2
    w_gate_up, w_down = _experts(n, 2 * inter, hidden, seed=5), _experts(n, hidden, inter, seed=6)
    gate_up, down = NF4Weight.quantize(w_gate_up), NF4Weight.quantize(w_down)
    experts = NF4Experts(gate_up, down, "silu")
    x = torch.randn(tokens, hidden, dtype=torch.float32, requires_grad=True)
    idx = torch.stack([torch.randperm(n - 1)[:k] for _ in range(tokens)])  # expert n-1 gets no token
    weights = torch.softmax(torch.randn(tokens, k), dim=-1)
    out = experts(x, idx, weights)
    dense_gate_up, dense_down = _bitsandbytes_round_trip(w_gate_up), _bitsandbytes_round_trip(w_down)
    ref = _gated_mlp_loop(x.detach(), dense_gate_up, dense_down, idx, weights)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    x_ref = x.detach().clone().requires_grad_(True)
    (out * torch.linspace(-1, 1, hidden)).sum().backward()
    dense_out = _dense_gated_mlp(x_ref, dense_gate_up.float(), dense_down.float(), idx, weights)
    (dense_out * torch.linspace(-1, 1, hidden)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    assert not list(experts.parameters())


def _bitsandbytes_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The expected dense weights, from bitsandbytes alone (quantize + dequantize the fused tensor), in float32.

    Rows are whole 64-value blocks here: bitsandbytes' CPU dequantize is wrong otherwise (see NF4Weight).
    """
    # bf16 values are exact in float32: the same bytes as quantizing the bf16 tensor, dequantized without rounding.
    packed, state = bnbF.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbF.dequantize_4bit(packed, state)


def _dense_gated_mlp(x, gate_up, down, idx, weights):
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(idx == e)
        g, u = (x[token] @ gate_up[e].t()).chunk(2, dim=-1)
        out = out.index_add(0, token, ((torch.nn.functional.silu(g) * u) @ down[e].t()) * weights[token, slot, None])
    return out
