"""The ``grouped`` backend (bitsandbytes dequantize + ``grouped_mm``) vs the reference, forward and backward.

torch 2.13's ``grouped_mm`` runs on CPU, so these tests run the very code path CUDA runs (no stand-in),
in float32 and bfloat16 (no Triton interpreter involved: bf16 is fine here). Accuracy: flash-attention's
rule (kernels/accuracy.py) against a float64 truth. Also: the backend switch's ``auto`` rules on CUDA
(measured table, fallbacks) and the Triton-raises-falls-back-to-grouped path.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_kernels_adapter import _check as check_adapter
from test_kernels_nf4_mlp import _experts, _routing, _run, _truth

from perft_qlora.kernels import backend_choices, dequantize_experts, dispatch, measured
from perft_qlora.kernels.accuracy import assert_flash_rule
from perft_qlora.method.lora_experts import LoRAExperts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_mlp(monkeypatch, case, tokens, top_k, dtype, double_quant, experts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up, down = _experts(experts, 192, 136, double_quant, g)  # I = 136: 2I and I not tile multiples
    weights, indices = _routing(case, tokens, experts, top_k, g)
    x, dout = torch.randn(tokens, 192, generator=g), torch.randn(tokens, 192, generator=g)
    weights, indices, x, dout = (t.to(DEVICE) for t in (weights, indices, x, dout))
    truth = _truth(x, gate_up, down, weights, indices, dout)
    reference = _run(monkeypatch, "reference", x, gate_up, down, weights, indices, dout, dtype)
    grouped = _run(monkeypatch, "grouped", x, gate_up, down, weights, indices, dout, dtype)
    for name, k, r, t in zip(("out", "dx", "dweights"), grouped, reference, truth):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        assert_flash_rule(f"grouped/{case}/{name}", k, r, t)
    assert backend_choices()["nf4_expert_mlp"].startswith("grouped")


@pytest.mark.parametrize(
    "case,tokens,top_k,dtype,double_quant",
    [
        ("random_with_empty_expert", 37, 3, torch.float32, True),
        ("all_to_one_expert", 21, 1, torch.bfloat16, False),
        ("random_with_empty_expert", 1, 2, torch.float32, True),  # rows < experts: per-row dequantization
        ("k_equals_e", 6, 5, torch.bfloat16, True),
        ("ties", 2, 2, torch.float16, False),  # 4 rows < 5 experts, repeated experts across rows
    ],
)
def test_grouped_nf4_mlp_matches_reference(monkeypatch, case, tokens, top_k, dtype, double_quant):
    _check_mlp(monkeypatch, case, tokens, top_k, dtype, double_quant)


def test_dequantize_listed_experts_matches_whole_tensor():
    g = torch.Generator().manual_seed(3)
    gate_up, _ = _experts(4, 128, 64, True, g)
    whole = dequantize_experts(gate_up, torch.float32)
    listed = dequantize_experts(gate_up, torch.float32, torch.tensor([3, 0, 3], device=DEVICE))
    assert torch.equal(whole, gate_up.dequantize())
    assert torch.equal(listed, whole[[3, 0, 3]])


@pytest.mark.parametrize("formulation", ["dense", "sorted"])
@pytest.mark.parametrize(
    "case,tokens,experts,top_k,bottleneck,activation",
    [("random_with_empty_expert", 37, 5, 2, 12, None), ("k_equals_e", 9, 3, 3, 20, "gelu"), ("ties", 1, 6, 2, 8, "silu")],
)
def test_grouped_adapter_matches_reference(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation):
    """DB = 12, 20: not 16-byte rows in bf16, so the sorted path pads the bottleneck."""
    for dtype in (torch.float32, torch.bfloat16):
        check_adapter(monkeypatch, formulation, case, tokens, experts, top_k, bottleneck, activation, dtype, None, backend="grouped")


def test_lora_experts_fp32_masters_get_fp32_grads_through_grouped(monkeypatch):
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "grouped")
    bank = LoRAExperts(6, 64, 12, 2.0, 0.0, "silu", 0.1, torch.float32).to(DEVICE)
    torch.nn.init.normal_(bank.up, std=0.1)
    x = torch.randn(11, 64, device=DEVICE)
    weights, indices = torch.rand(11, 2, device=DEVICE), torch.randint(0, 6, (11, 2), device=DEVICE)
    bank(x, weights, indices).square().sum().backward()
    grads = (bank.down.grad, bank.up.grad)
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "reference")
    bank.zero_grad()
    bank(x, weights, indices).square().sum().backward()
    for got, want in zip(grads, (bank.down.grad, bank.up.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# the backend switch on CUDA (capability faked: the rules, not the kernels) ----------------------------


def test_auto_on_cuda_is_grouped_unless_the_measured_table_says_triton(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: True)
    x = torch.empty(4096, 8, dtype=torch.bfloat16)
    dims = "E64xH2048xI1024"
    backend, reason = dispatch._auto_cuda("nf4_expert_mlp", x, None, None, dims)
    assert backend == "grouped" and "no measured entry" in reason
    monkeypatch.setitem(measured.MEASURED, ("sm_90", "nf4_expert_mlp", f"{dims}/large"), "triton")
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, None, dims)[0] == "triton"
    assert dispatch._auto_cuda("nf4_expert_mlp", x[:1], None, None, dims)[0] == "grouped"  # decode: no entry
    assert dispatch._auto_cuda("nf4_expert_mlp", x, "activation tanh", None, dims)[0] == "grouped"
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, "odd widths", "other")[0] == "triton"
    assert dispatch._auto_cuda("nf4_expert_mlp", x, "no", "odd widths", dims)[0] == "reference"
    with caplog.at_level(logging.INFO, logger="perft_qlora.kernels"):
        for _ in range(3):
            dispatch._record("op-x", "grouped", "why")
    assert sum("op-x: grouped backend (why)" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert backend_choices()["op-x"] == "grouped (why)"


def test_measured_table_ships_empty():
    assert measured.MEASURED == {}


def test_a_raising_triton_kernel_falls_back_to_grouped_under_auto(monkeypatch):
    def broken():
        raise RuntimeError("PassManager::run failed")

    monkeypatch.delenv("PERFT_QLORA_KERNELS", raising=False)
    with pytest.warns(UserWarning, match="falling back to grouped"):
        assert dispatch._run_triton("op-y", broken, lambda: "grouped result") == "grouped result"
    assert backend_choices()["op-y"].startswith("grouped (triton raised RuntimeError")
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "triton")  # forced: the error surfaces
    with pytest.raises(RuntimeError, match="PassManager"):
        dispatch._run_triton("op-y", broken, lambda: "grouped result")


def test_forced_grouped_refuses_rows_grouped_mm_cannot_take(monkeypatch):
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "grouped")
    x = torch.randn(3, 36, dtype=torch.bfloat16)  # 72-byte rows: not a 16-byte multiple
    with pytest.raises(ValueError, match="multiples of 8"):
        dispatch.routed_adapter(x, torch.randn(2, 4, 36), torch.randn(2, 36, 4), torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.long))
