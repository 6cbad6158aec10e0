"""Compile every Triton kernel for a CUDA target without a GPU: ``python -m perft_qlora.kernels.compile_check``.

The interpreter (the CPU tests) accepts programs the GPU compiler rejects, and the reverse; this
runs the real compiler (Triton -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the bf16
specialisation and default tiles of each kernel, so a kernel that would not build on the GPU fails
in CI. It must run with ``TRITON_INTERPRET`` unset (the kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

KINDS = {  # argument name -> Triton type of the bf16 specialisation
    "*bf16": "x a dout h_out ab_out y ab dab down up out dx ddown dup",
    "*fp32": "row_scale row_w gates hpre dgc dh ddown_part dup_part hs dhs dw dx32 out32 dw_part wc wa2 wc2 wo",
    "*i64": "tokens order offsets",
    "*i32": "sched_e sched_s",
    "*u8": "wp wa",
    "i32": "H I stride_x stride_d KA N OUT IN T D DB M span",
    "fp32": "scaling",
}
ARG_TYPES = {name: kind for kind, names in KINDS.items() for name in names.split()}


def _kernels():
    """(label, jit function, constexprs, blocks) for the largest default tiles of every kernel variant."""
    from . import triton_adapter_dense as dense
    from . import triton_adapter_sorted as srt
    from . import triton_nf4_mlp as mlp

    nf4 = mlp.default_nf4_blocks(num_rows=4096 * 8, num_experts=64)  # a training batch: m = 64
    d = dense.default_dense_blocks(256)
    s = srt.default_sorted_blocks(128)
    tiles = dict(NESTED=True, QB=64, PREC="tf32", BM=nf4.m, BN=nf4.n, BK=nf4.k)
    dense_tiles = dict(PREC="tf32", BT=d.t, BD=d.d, P=256)
    sorted_tiles = dict(PREC="tf32", BM=s.m, BD=s.d, PDB=128)
    return [
        ("nf4 gate_up forward", mlp._gate_up_fwd_kernel, dict(ACT="silu", STORE_AB=True, **tiles), nf4),
        ("nf4 down forward", mlp._rows_matmul_kernel, dict(TRANS_W=True, SCALE=True, **tiles), nf4),
        ("nf4 gate_up backward", mlp._rows_matmul_kernel, dict(TRANS_W=False, SCALE=False, **tiles), nf4),
        ("nf4 down backward", mlp._down_bwd_kernel, dict(ACT="silu", **tiles), nf4),
        ("dense forward", dense._dense_fwd_kernel, dict(ACT="gelu", SAVE_H=True, **dense_tiles), d),
        ("dense backward dx", dense._dense_bwd_dx_kernel, dict(ACT="identity", **dense_tiles), d),
        ("dense backward dw", dense._dense_bwd_dw_kernel, dict(ACT="silu", **dense_tiles), d),
        ("sorted forward", srt._sorted_fwd_kernel, dict(ACT="relu", SAVE_H=True, **sorted_tiles), s),
        ("sorted backward dx", srt._sorted_bwd_dx_kernel, dict(ACT="gelu", **sorted_tiles), s),
        ("sorted backward dw", srt._sorted_bwd_dw_kernel, dict(ACT="relu", **sorted_tiles), s),
    ]


def _resource_usage(cubin: bytes) -> str:
    """``REG:n STACK:n`` from the cuobjdump bundled with Triton, or '' when it is not there."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        result = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=False)
    fields = [f for line in result.stdout.splitlines() if "REG:" in line for f in line.split()]
    return " ".join(f for f in fields if f.startswith(("REG:", "STACK:")))


def compile_all(arch: int = 90, labels: list[str] | None = None) -> list[tuple[str, int, str]]:
    """Compile the kernels for ``sm_{arch}``: (label, shared memory bytes, register use). Raises on a failure."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("unset TRITON_INTERPRET: the compile check needs JIT kernels, not interpreted ones")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for label, fn, constexprs, blocks in _kernels():
        if labels and label not in labels:
            continue
        signature = {name: "constexpr" if name in constexprs else ARG_TYPES[name] for name in fn.arg_names}
        source = ASTSource(fn, signature, constexprs=constexprs)
        options = dict(num_warps=blocks.warps, num_stages=blocks.stages)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:
            raise RuntimeError(f"{label} ({fn.__name__}) does not compile for sm_{arch}: {error}") from error
        results.append((label, compiled.metadata.shared, _resource_usage(compiled.asm.get("cubin", b""))))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perft_qlora.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 (A100) or 90 (H100)")
    args = parser.parse_args(argv)
    for label, shared, usage in compile_all(args.arch):
        print(f"sm_{args.arch}  {label:<22} shared memory {shared / 1024:5.1f} KiB  {usage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
