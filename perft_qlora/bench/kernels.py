"""``python -m perft_qlora.bench kernels``: the fused kernels against grouped_mm baselines on real layer shapes.

For each model layer shape (OLMoE, Mixtral) and token count, on one routed problem (random router,
top-K), times forward and input-gradient backward of:

- ``nf4-triton``: the fused NF4 grouped expert MLP (``kernels.ops.NF4ExpertMLPFunction``);
- ``nf4-grouped``: the ``grouped`` backend (``kernels.grouped``): bitsandbytes dequantizes the experts
  (only the rows' experts when rows < experts), ``grouped_mm``, dequantized again in backward;
- ``bf16-grouped_mm``: bf16 experts already in memory, ``grouped_mm`` for gate_up and down;
- ``bnb-dequant+grouped_mm``: bitsandbytes dequantizes each whole NF4 tensor to bf16 on every access
  (forward and again in backward), then ``grouped_mm``: what ``replace_parameter_4bit`` does today;

and forward+backward of the routed adapter (PERFT Top2/4 DB=16, PERFT-E DB=8) in both Triton
formulations and the reference, as a share of the NF4 MoE layer's forward+backward. Every row also
gives the peak extra memory of one call and the error against the bf16 baseline (or the reference).
``--smoke`` runs tiny shapes (on CPU with TRITON_INTERPRET=1) to test this script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from ..atomic import write_text
from ..cli import HelpFormatter
from ..errors import UsageError
from ..kernels import (
    backend_choices,
    grouped_nf4_expert_mlp,
    grouped_routed_adapter,
    kernel_policy,
    ops,
    pick_formulation,
    routed_adapter_reference,
    sort_by_expert,
)
from ..kernels.grouped import grouped_mm
from ..quant.nf4 import NF4Weight

SHAPES = {  # experts E, hidden H, intermediate I, top-K
    "olmoe": dict(experts=64, hidden=2048, inter=1024, top_k=8),
    "mixtral": dict(experts=8, hidden=4096, inter=14336, top_k=2),
    "smoke": dict(experts=4, hidden=128, inter=128, top_k=2),
}
ADAPTERS = {  # name -> (M, K or None for the base top-K, DB)
    "PERFT Top2/4 DB=16": (4, 2, 16),
    "PERFT-E DB=8": (None, None, 8),
}


def _time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench on CUDA; elsewhere (smoke runs) one wall-clock run."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _peak_mib(fn, device: torch.device) -> float | None:
    """Peak memory allocated during one ``fn()`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a[rows of e] @ w[e]`` for sorted rows: ``F.grouped_mm`` (torch 2.13 runs it on CPU too)."""
    return grouped_mm(a, w, offsets)


class _DequantGroupedLinear(torch.autograd.Function):
    """``a @ W_e^T`` with the whole NF4 tensor dequantized by bitsandbytes in forward and again in backward."""

    @staticmethod
    def forward(ctx, a, weight: NF4Weight, offsets):
        ctx.weight, ctx.offsets = weight, offsets
        return _grouped_mm(a, weight.dequantize().to(a.dtype).transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad):
        return _grouped_mm(grad, ctx.weight.dequantize().to(grad.dtype), ctx.offsets), None, None


def _baseline_moe(x, gate_up, down, weights, indices, linear):
    """Sorted tokens -> grouped gate_up -> silu gate -> grouped down -> routing weight -> index_add (T, H)."""
    sort = sort_by_expert(indices, gate_up.shape[0])
    xs = x[sort.tokens]  # (R, H)
    gate, up = linear(xs, gate_up, sort.offsets).chunk(2, dim=-1)  # (R, I) x2
    y = linear(F.silu(gate) * up, down, sort.offsets)  # (R, H)
    y = y * weights.reshape(-1)[sort.order, None].to(y.dtype)
    return torch.zeros_like(x).index_add(0, sort.tokens, y)


def _problem(shape: dict, tokens: int, device, dtype, seed: int = 0):
    """Random NF4 experts (quantized one expert at a time), tokens, and a softmax top-K routing."""
    g = torch.Generator(device=device).manual_seed(seed)
    e, h, i, k = shape["experts"], shape["hidden"], shape["inter"], shape["top_k"]

    def experts(out_f, in_f):
        return (torch.randn(out_f, in_f, generator=g, device=device, dtype=dtype) * in_f**-0.5 for _ in range(e))

    gate_up = NF4Weight.from_experts(experts(2 * i, h))
    down = NF4Weight.from_experts(experts(h, i))
    x = torch.randn(tokens, h, generator=g, device=device, dtype=dtype)
    probs = torch.softmax(torch.randn(tokens, e, generator=g, device=device), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    return gate_up, down, x, weights, indices


def _mlp_methods(gate_up, down):
    bf16 = (gate_up.dequantize(), down.dequantize())  # the bf16 baseline keeps these resident
    return {
        "nf4-triton": lambda x, w, i: ops.NF4ExpertMLPFunction.apply(x, w, i, gate_up, down, "silu", None),
        "nf4-grouped": lambda x, w, i: grouped_nf4_expert_mlp(x, gate_up, down, w, i, F.silu),
        "bf16-grouped_mm": lambda x, w, i: _baseline_moe(
            x, *bf16, w, i, lambda a, wt, o: _grouped_mm(a, wt.transpose(1, 2), o)
        ),
        "bnb-dequant+grouped_mm": lambda x, w, i: _baseline_moe(x, gate_up, down, w, i, _DequantGroupedLinear.apply),
    }


def _mlp_passes(fn, x, weights, indices) -> dict:
    """Inference forward; training forward (saves for backward); input-gradient backward (retained graph)."""
    xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = fn(xg, wg, indices)
    dout = torch.randn_like(out)
    return {
        "forward": lambda: fn(x, weights, indices),
        "forward(train)": lambda: fn(xg, wg, indices),
        "backward(dx)": lambda: torch.autograd.grad(out, (xg, wg), dout, retain_graph=True),
    }


def bench_mlp(model: str, tokens: int, device, dtype) -> list[dict]:
    shape = SHAPES[model]
    gate_up, down, x, weights, indices = _problem(shape, tokens, device, dtype)
    flops = 6 * tokens * shape["top_k"] * shape["hidden"] * shape["inter"]  # per pass
    rows, outputs = [], {}
    for method, fn in _mlp_methods(gate_up, down).items():
        with torch.no_grad():
            outputs[method] = fn(x, weights, indices)
        for name, run in _mlp_passes(fn, x, weights, indices).items():
            with torch.no_grad() if name == "forward" else torch.enable_grad():
                ms = _time_ms(run, device)
                peak = _peak_mib(run, device)
            rows.append(dict(part="mlp", model=model, tokens=tokens, method=method, passes=name, ms=ms,
                             tflops=flops / ms / 1e9, peak_mib=peak))
    reference = outputs["bf16-grouped_mm"].float()
    for row in rows:
        row["rel_err"] = ((outputs[row["method"]].float() - reference).abs().max() / reference.abs().max()).item()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    for row in rows:
        for base, key in (("bf16-grouped_mm", "vs_bf16"), ("bnb-dequant+grouped_mm", "vs_bnb")):
            match = [r for r in rows if r["method"] == base and r["passes"] == row["passes"]]
            row[key] = row["ms"] / match[0]["ms"] if match else None


def _adapter_methods(tokens: int, hidden: int, m: int, k: int, db: int, device, dtype) -> dict:
    """Closures over one random adapter problem: the reference and each Triton formulation that fits."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype, requires_grad=True)
    down = (torch.randn(m, db, hidden, generator=g, device=device, dtype=dtype) * hidden**-0.5).requires_grad_(True)
    up = (torch.randn(m, hidden, db, generator=g, device=device, dtype=dtype) * db**-0.5).requires_grad_(True)
    weights, indices = torch.topk(torch.softmax(torch.randn(tokens, m, generator=g, device=device), -1), k, dim=-1)
    args = (x, down, up, weights.requires_grad_(True), indices)
    methods = {
        "reference": lambda: routed_adapter_reference(*args, scaling=2.0),
        "triton-sorted": lambda: ops.SortedRoutedAdapterFunction.apply(*args, "identity", 2.0, None),
        "grouped-sorted": lambda: grouped_routed_adapter(*args, None, 2.0, "sorted"),
    }
    if pick_formulation(m, db) == "dense":
        methods["triton-dense"] = lambda: ops.DenseRoutedAdapterFunction.apply(*args, "identity", 2.0, None)
        methods["grouped-dense"] = lambda: grouped_routed_adapter(*args, None, 2.0, "dense")
    return methods


def bench_adapter(model: str, tokens: int, moe_ms: float, device, dtype) -> list[dict]:
    """Forward+backward of each adapter configuration; ``share`` = its time over the NF4 MoE layer's."""
    shape = SHAPES[model]
    rows = []
    for name, (m, k, db) in ADAPTERS.items():
        methods = _adapter_methods(tokens, shape["hidden"], m or shape["experts"], k or shape["top_k"], db, device, dtype)
        expected = methods["reference"]().detach().float()
        for method, fn in methods.items():
            err = ((fn().detach().float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
            dout = torch.randn(tokens, shape["hidden"], device=device, dtype=dtype)

            def step(fn=fn, dout=dout):
                fn().backward(dout)

            ms = _time_ms(step, device)
            rows.append(dict(part="adapter", model=model, tokens=tokens, method=f"{name}: {method}",
                             passes="forward+backward", ms=ms, share=ms / moe_ms, rel_err=err,
                             peak_mib=_peak_mib(step, device)))
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[dict], header: str) -> str:
    columns = "| part | model | tokens | method | pass | ms | TFLOP/s | vs bf16 | vs bnb | share of MoE | peak MiB | rel. err |"
    lines = [header, "", columns, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['part']} | {r['model']} | {r['tokens']} | {r['method']} | {r['passes']} | {r['ms']:.4g} | "
            f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('vs_bf16'), '.2f')} | {_fmt(r.get('vs_bnb'), '.2f')} | "
            f"{_fmt(r.get('share'), '.1%')} | {_fmt(r.get('peak_mib'), '.0f')} | {r['rel_err']:.2e} |"
        )
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perft_qlora.bench kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--models", default="olmoe,mixtral", help="comma-separated layer shapes: olmoe, mixtral")
    parser.add_argument("--tokens", default="1,16,512,4096", help="comma-separated token counts (before top-K)")
    parser.add_argument("--parts", default="mlp,adapter", help="mlp, adapter or both")
    parser.add_argument("--out", help="also write the rows as JSON here, atomically (default: print only)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes to check this script; on a CPU it sets TRITON_INTERPRET=1 itself")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise UsageError("the kernel benchmark needs a CUDA GPU; --smoke checks this script on CPU (TRITON_INTERPRET=1)")
    if device.type != "cuda":
        from ..kernels.triton_common import INTERPRETED

        if not INTERPRETED:
            raise UsageError("--smoke on CPU runs Triton's interpreter: TRITON_INTERPRET=1 python -m perft_qlora.bench kernels --smoke")
    models = ["smoke"] if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise UsageError(f"unknown model shape(s) {unknown}: choose from olmoe, mixtral")
    tokens = [7] if args.smoke else [int(t) for t in args.tokens.split(",")]
    dtype = torch.float32 if device.type != "cuda" else torch.bfloat16  # interpreter: no bf16 tl.dot
    rows = []
    for model in models:
        for t in tokens:
            mlp = bench_mlp(model, t, device, dtype)
            rows += mlp if "mlp" in args.parts else []
            if "adapter" in args.parts:
                moe_ms = sum(r["ms"] for r in mlp if r["method"] == "nf4-triton" and r["passes"] != "forward")
                rows += bench_adapter(model, t, moe_ms, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: not a benchmark)"
    header = f"device: {name}; torch {torch.__version__}; dtype {dtype}"
    print(render(rows, header))
    if args.out:
        record = dict(device=name, torch=torch.__version__, requested_backend=os.environ.get("PERFT_QLORA_KERNELS", "auto"),
                      backend_choices=backend_choices(), kernel_policy=kernel_policy(device), rows=rows)
        write_text(args.out, json.dumps(record, indent=1))
    return 0
