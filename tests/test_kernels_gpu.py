"""GPU checks at real layer shapes (marked ``gpu``: skipped without CUDA; ``bench gpu-check`` runs them first).

- an OLMoE layer (E=64, H=2048, I=1024, T=256, K=8) and a Mixtral slice (E=2, H=4096, I=14336; T=16 takes
  the split-K down projection) through
  every backend in bf16, forward and backward, against a float32 truth (flash-attention's rule: at most
  2x the bf16 reference's error);
- the routed adapter at the kernels' widest tiles (dense P=256, sorted PDB=128) the same way;
- determinism: two runs of the deterministic paths give identical bits;
- a CUDA graph of one decode step (T=1) replays to the eager result, per backend.
The CPU twins of these are the interpreter/grouped tests in test_kernels_{nf4_mlp,adapter,grouped}.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perft_qlora.kernels import nf4_expert_mlp, routed_adapter
from perft_qlora.kernels.accuracy import assert_flash_rule
from perft_qlora.quant.nf4 import NF4Weight

pytestmark = pytest.mark.gpu
BACKENDS = ("grouped", "triton")


def _layer(experts, hidden, inter, tokens, top_k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def weights(out_f, in_f):
        return (torch.randn(out_f, in_f, generator=g, device="cuda", dtype=torch.bfloat16) * in_f**-0.5 for _ in range(experts))

    gate_up, down = NF4Weight.from_experts(weights(2 * inter, hidden)), NF4Weight.from_experts(weights(hidden, inter))
    x = torch.randn(tokens, hidden, generator=g, device="cuda")
    probs = torch.softmax(torch.randn(tokens, experts, generator=g, device="cuda"), -1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    return gate_up, down, x, w, idx, torch.randn(tokens, hidden, generator=g, device="cuda")


def _mlp(monkeypatch, backend, layer, dtype=torch.bfloat16):
    gate_up, down, x, w, idx, dout = layer
    monkeypatch.setenv("PERFT_QLORA_KERNELS", backend)
    x = x.to(dtype).requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = nf4_expert_mlp(x, gate_up, down, w, idx, "silu")
    out.backward(dout.to(out.dtype))
    return out.detach(), x.grad, w.grad


def _mlp_truth(layer):
    gate_up, down, x, w, idx, dout = layer
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel():
            g, u = (x[token] @ gate_up.dequantize()[e].float().t()).chunk(2, dim=-1)
            out = out.index_add(0, token, (F.silu(g) * u) @ down.dequantize()[e].float().t() * w[token, slot, None])
    out.backward(dout)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [dict(experts=64, hidden=2048, inter=1024, tokens=256, top_k=8),
                                   dict(experts=2, hidden=4096, inter=14336, tokens=64, top_k=2),
                                   dict(experts=2, hidden=4096, inter=14336, tokens=16, top_k=2)],  # split-K down fwd
                         ids=["olmoe", "mixtral", "mixtral-decode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_mlp_real_shapes_bf16(monkeypatch, shape, backend):
    layer = _layer(**shape)
    truth, reference = _mlp_truth(layer), _mlp(monkeypatch, "reference", layer)
    got = _mlp(monkeypatch, backend, layer)
    for name, k, r, t in zip(("out", "dx", "dweights"), got, reference, truth):
        assert_flash_rule(f"{backend}/{name}", k, r, t)


@pytest.mark.parametrize("experts,bottleneck,formulation", [(16, 16, "dense"), (8, 128, "sorted")], ids=["P256", "PDB128"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_widest_tiles_bf16(monkeypatch, backend, experts, bottleneck, formulation):
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens, width = 512, 2048
    x = torch.randn(tokens, width, generator=g, device="cuda")
    down = torch.randn(experts, bottleneck, width, generator=g, device="cuda") * width**-0.5
    up = torch.randn(experts, width, bottleneck, generator=g, device="cuda") * bottleneck**-0.5
    w, idx = torch.topk(torch.softmax(torch.randn(tokens, experts, generator=g, device="cuda"), -1), 2, dim=-1)
    dout = torch.randn(tokens, width, generator=g, device="cuda")

    def run(name, dtype):
        monkeypatch.setenv("PERFT_QLORA_KERNELS", name)
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, down, up)]
        out = routed_adapter(*leaves, w, idx, activation="silu", scaling=2.0, formulation=formulation)
        out.backward(dout.to(dtype))
        return (out.detach(), *(t.grad for t in leaves))

    truth, reference, got = run("reference", torch.float32), run("reference", torch.bfloat16), run(backend, torch.bfloat16)
    for name, k, r, t in zip(("out", "dx", "ddown", "dup"), got, reference, truth):
        assert_flash_rule(f"{backend}/{formulation}/{name}", k, r, t)


@pytest.mark.parametrize("shape", [dict(experts=64, hidden=2048, inter=1024, tokens=256, top_k=8),
                                   dict(experts=2, hidden=4096, inter=14336, tokens=16, top_k=2)],  # split-K down fwd
                         ids=["olmoe", "mixtral-decode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_mlp_is_deterministic(monkeypatch, backend, shape):
    layer = _layer(**shape, seed=2)
    first, second = _mlp(monkeypatch, backend, layer), _mlp(monkeypatch, backend, layer)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_captures_in_a_cuda_graph(monkeypatch, backend):
    """One token through the NF4 experts and a routed adapter: no host sync, so a CUDA graph replays it."""
    monkeypatch.setenv("PERFT_QLORA_KERNELS", backend)
    gate_up, down, x, w, idx, _ = _layer(experts=64, hidden=2048, inter=1024, tokens=1, top_k=8, seed=3)
    x = x.bfloat16()
    a_down = torch.randn(4, 16, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    a_up = torch.randn(4, 2048, 16, device="cuda", dtype=torch.bfloat16) * 0.02
    a_w, a_idx = torch.rand(1, 2, device="cuda"), torch.tensor([[0, 3]], device="cuda")

    def step():
        return nf4_expert_mlp(x, gate_up, down, w, idx, "silu") + routed_adapter(x, a_down, a_up, a_w, a_idx, "silu", 2.0)

    with torch.no_grad():
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up outside the capture (kernel compilation, allocator)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, eager)
