"""Routing layouts, the backend switch, and training through the kernels on a tiny model.

Kernel runs on CPU use Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in float32:
the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from perft_qlora import PerftConfig, attach_perft, load_model
from perft_qlora.kernels import (
    dispatch,
    gate_matrix,
    nf4_expert_mlp,
    nf4_expert_mlp_reference,
    routed_adapter,
    routed_adapter_reference,
    sort_by_expert,
    tile_schedule,
)
from perft_qlora.quant.nf4 import NF4Weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter


def test_sort_by_expert_orders_rows_stably_with_offsets():
    indices = torch.tensor([[2, 0], [0, 2], [2, 3], [0, 0]])
    sort = sort_by_expert(indices, num_experts=5)
    flat = indices.reshape(-1)
    assert sort.order.tolist() == [1, 2, 6, 7, 0, 3, 4, 5]  # expert, then token, then slot
    assert torch.equal(sort.tokens, sort.order // 2)
    assert sort.offsets.tolist() == [0, 4, 4, 7, 8, 8]  # experts 1 and 4 are empty
    for e in range(5):
        assert (flat[sort.order[sort.offsets[e] : sort.offsets[e + 1]]] == e).all()


@pytest.mark.parametrize("block_m", [1, 3, 16])
def test_tile_schedule_covers_every_row_once_within_one_expert(block_m):
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 7, (23, 3), generator=g)
    indices[:, 0] = 6  # one crowded expert; others may be empty
    sort = sort_by_expert(indices, 7)
    sched = tile_schedule(sort.offsets, 69, block_m)
    assert sched.expert.numel() == -(-69 // block_m) + 7  # the host-sync-free upper bound
    covered = []
    for e, start in zip(sched.expert.tolist(), sched.start.tolist()):
        if e < 0:
            continue
        stop = min(start + block_m, int(sort.offsets[e + 1]))
        assert int(sort.offsets[e]) <= start < stop  # tiles never straddle experts and are not empty
        covered.extend(range(start, stop))
    assert sorted(covered) == list(range(69))


def test_gate_matrix_adds_repeated_experts():
    gates = gate_matrix(torch.tensor([[0.5, 0.25], [1.0, 2.0]]), torch.tensor([[1, 1], [0, 2]]), 3)
    assert gates.tolist() == [[0.0, 0.75, 0.0], [1.0, 0.0, 2.0]]


def _adapter_inputs(tokens=5, experts=3, bottleneck=4, width=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g)
    down, up = torch.randn(experts, bottleneck, width, generator=g), torch.randn(experts, width, bottleneck, generator=g)
    weights, indices = torch.rand(tokens, 2, generator=g), torch.randint(0, experts, (tokens, 2), generator=g)
    return x, down, up, weights, indices


def test_unknown_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="PERFT_QLORA_KERNELS='cuda' is not a backend"):
        routed_adapter(*_adapter_inputs())


def test_auto_on_cpu_is_the_reference_bit_for_bit(monkeypatch):
    monkeypatch.delenv("PERFT_QLORA_KERNELS", raising=False)
    inputs = _adapter_inputs()
    assert torch.equal(routed_adapter(*inputs, scaling=2.0), routed_adapter_reference(*inputs, scaling=2.0))
    assert dispatch.select_backend("op", inputs[0], None) == "reference"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        routed_adapter(*_adapter_inputs())


def test_forced_triton_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'perft-qlora\[triton\]'"):
        routed_adapter(*_adapter_inputs())


def test_unsupported_calls_fall_back_under_auto_and_fail_clearly_when_forced(monkeypatch):
    x, down, up, weights, indices = _adapter_inputs()
    monkeypatch.setenv("PERFT_QLORA_KERNELS", "triton")
    with pytest.raises(ValueError, match="activation .* is not None or one of"):
        routed_adapter(x, down, up, weights, indices, activation=torch.tanh)
    with pytest.raises(ValueError, match="wider than the dense kernel"):
        routed_adapter(x, down.repeat(1, 80, 1), up.repeat(1, 1, 80), weights, indices, formulation="dense")
    gate_up = NF4Weight.quantize(torch.randn(2, 64, 96), double_quant=False)  # rows of 96: not whole 64-blocks
    down_nf4 = NF4Weight.quantize(torch.randn(2, 96, 32), double_quant=False)
    h, w, i = torch.randn(3, 96), torch.rand(3, 1), torch.randint(0, 2, (3, 1))
    with pytest.raises(ValueError, match="not whole 64-value NF4 blocks"):
        nf4_expert_mlp(h, gate_up, down_nf4, w, i, "silu")
    monkeypatch.delenv("PERFT_QLORA_KERNELS")
    expected = nf4_expert_mlp_reference(h, gate_up, down_nf4, w, i, torch.nn.functional.silu)
    assert torch.equal(nf4_expert_mlp(h, gate_up, down_nf4, w, i, "silu"), expected)


# the policy per card (the capability query faked: the rules, not the kernels) ----------------------------

DIMS = "E64xH2048xI1024"
POLICY = [  # capability -> auto's backend with Triton installed and no measured entry
    ((8, 0), "triton"),  # A100: grouped_mm is a per-group loop with a host sync
    ((8, 6), "triton"),  # RTX 3090, A6000
    ((8, 9), "triton"),  # RTX 4090, L40S
    ((9, 0), "grouped"),  # H100: the fused grouped_mm
    ((10, 0), "grouped"),  # B200: fused too (torch 2.13: capability major 9 or 10)
    ((12, 0), "triton"),  # RTX 5090: not fused
    ((7, 5), "grouped"),  # T4: below the kernels' sm_80
]


def _fake_card(monkeypatch, capability, triton=True):
    monkeypatch.setattr(dispatch, "device_capability", lambda device: capability)
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: triton)
    monkeypatch.setattr(dispatch, "_WARNED", set())


@pytest.mark.parametrize("capability, expected", POLICY)
def test_auto_on_cuda_decides_by_capability(monkeypatch, capability, expected):
    _fake_card(monkeypatch, capability)
    x = torch.empty(512, 8, dtype=torch.bfloat16)
    backend, reason = dispatch._auto_cuda("nf4_expert_mlp", x, None, None, DIMS)
    assert (backend, f"sm_{capability[0]}{capability[1]}" in reason) == (expected, True), reason
    assert dispatch._auto_cuda("routed_adapter", x, None, None, "M4xDB16xD2048")[0] == expected
    assert dispatch.kernel_policy(torch.device("cuda"))["auto"] == expected
    # a call the kernels cannot take goes to grouped on every card; one grouped cannot take, to triton from sm_80 on
    assert dispatch._auto_cuda("nf4_expert_mlp", x, "activation tanh", None, DIMS)[0] == "grouped"
    fallback = "triton" if capability >= (8, 0) else "reference"
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, "odd widths", DIMS)[0] == fallback


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9)])
def test_pre_hopper_without_triton_takes_grouped_and_says_so_once(monkeypatch, capability):
    _fake_card(monkeypatch, capability, triton=False)
    x = torch.empty(512, 8, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"triton is not installed.*per-group loop.*pip install"):
        backend, reason = dispatch._auto_cuda("nf4_expert_mlp", x, None, None, DIMS)
    assert backend == "grouped" and "not installed" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert dispatch._auto_cuda("routed_adapter", x, None, None, DIMS)[0] == "grouped"
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, "odd widths", DIMS)[0] == "reference"
    assert dispatch.kernel_policy(torch.device("cuda"))["auto"] == "grouped"


def test_hopper_without_triton_is_silent(monkeypatch):
    _fake_card(monkeypatch, (9, 0), triton=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch._auto_cuda("nf4_expert_mlp", torch.empty(8, 8, dtype=torch.bfloat16), None, None, DIMS)[0] == "grouped"


def test_the_measured_table_overrides_the_capability_default(monkeypatch):
    x = torch.empty(4096, 8, dtype=torch.bfloat16)
    _fake_card(monkeypatch, (8, 6))
    monkeypatch.setitem(dispatch.measured.MEASURED, ("sm_86", "nf4_expert_mlp", f"{DIMS}/large"), "grouped")
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, None, DIMS) == ("grouped", f"measured faster than triton on sm_86 for {DIMS}/large")
    assert dispatch._auto_cuda("nf4_expert_mlp", x[:8], None, None, DIMS)[0] == "triton"  # decode: no entry
    _fake_card(monkeypatch, (9, 0))
    monkeypatch.setitem(dispatch.measured.MEASURED, ("sm_90", "nf4_expert_mlp", f"{DIMS}/large"), "triton")
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, None, DIMS)[0] == "triton"
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)  # an entry Triton cannot honour: the default
    assert dispatch._auto_cuda("nf4_expert_mlp", x, None, None, DIMS)[0] == "grouped"


@pytest.mark.parametrize("capability", [(8, 6), (9, 0)])
@pytest.mark.parametrize("forced", ["grouped", "triton", "reference"])
def test_a_forced_backend_ignores_the_capability(monkeypatch, capability, forced):
    _fake_card(monkeypatch, capability)
    monkeypatch.setenv("PERFT_QLORA_KERNELS", forced)
    monkeypatch.setattr(dispatch, "_check_interpreter", lambda op: None)  # CPU tensors stand in for the GPU's
    assert dispatch.select_backend("op-forced", torch.empty(4, 8, dtype=torch.bfloat16), None, None, DIMS) == forced
    assert dispatch.backend_choices()["op-forced"] == f"{forced} (PERFT_QLORA_KERNELS={forced})"


def test_tile_tables_follow_the_capability():
    from perft_qlora.kernels.triton_adapter_dense import DENSE_TILES, DENSE_TILES_SM80, default_dense_blocks
    from perft_qlora.kernels.triton_adapter_sorted import SORTED_TILES, SORTED_TILES_SM80, default_sorted_blocks
    from perft_qlora.kernels.triton_nf4_mlp import NF4_TILES, NF4_TILES_SM80, default_nf4_blocks

    for capability in [(8, 0), (8, 6), (8, 9)]:
        assert default_nf4_blocks(4096 * 8, 64, 1024, capability) == NF4_TILES_SM80[None] != NF4_TILES[None]
        assert default_dense_blocks(128, capability) == DENSE_TILES_SM80[128] != DENSE_TILES[128]
        assert default_sorted_blocks(128, capability) == SORTED_TILES_SM80[128] != SORTED_TILES[128]
    for capability in [(9, 0), (10, 0), None]:  # None: CPU (the interpreter)
        assert default_nf4_blocks(4096 * 8, 64, 1024, capability) == NF4_TILES[None]
        assert default_dense_blocks(128, capability) == DENSE_TILES[128]
        assert default_sorted_blocks(128, capability) == SORTED_TILES[128]


def test_mismatched_routing_shapes_are_refused():
    x, down, up, weights, indices = _adapter_inputs()
    with pytest.raises(ValueError, match="routing must be weights and indices of shape"):
        routed_adapter(x, down, up, weights[:, :1], indices)


def test_package_imports_and_runs_without_triton():
    script = textwrap.dedent(
        """
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoTriton())
        import os, torch
        from perft_qlora.method.lora_experts import LoRAExperts
        bank = LoRAExperts(3, 16, 4, 2.0, 0.0, "silu", 0.1, torch.float32)
        out = bank(torch.randn(5, 16), torch.rand(5, 2), torch.randint(0, 3, (5, 2)))
        assert out.shape == (5, 16)
        os.environ["PERFT_QLORA_KERNELS"] = "triton"
        try:
            bank(torch.randn(5, 16), torch.rand(5, 2), torch.randint(0, 3, (5, 2)))
        except RuntimeError as error:
            assert "pip install" in str(error), error
        else:
            raise AssertionError("forced triton without triton did not raise")
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PERFT_QLORA_KERNELS", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("config", [dict(variant="perft", num_experts=4, top_k=2), dict(variant="perft_e", bottleneck=64)])
def test_training_step_through_the_kernels_matches_the_reference(monkeypatch, tiny_checkpoint, token_batch, config):
    """The whole tiny OLMoE (NF4 experts + PERFT) in float32: loss and adapter grads, triton vs reference.

    ``perft`` (M*DB = 64) takes the dense adapter kernel, ``perft_e`` with DB=64 (8*64 = 512) the sorted one.
    Tolerance: both runs are float32 and differ only in summation order (rtol 1e-4 over two layers).
    """
    ids, mask = (t.to(DEVICE) for t in token_batch)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PERFT_QLORA_KERNELS", backend)
        model, _ = load_model(tiny_checkpoint("olmoe"), device=DEVICE, dtype=torch.float32, progress=False)
        attach_perft(model, PerftConfig(dropout=0.0, **config))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.2)
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[backend] = (loss.detach(), grads)
    (ref_loss, ref_grads), (k_loss, k_grads) = results["reference"], results["triton"]
    torch.testing.assert_close(k_loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == k_grads.keys() and len(ref_grads) > 0
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name  # every adapter parameter gets a gradient
        torch.testing.assert_close(k_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)
