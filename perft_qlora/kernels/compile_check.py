"""Build every Triton kernel as the runtime does, for each CUDA target, without a GPU, and measure the code.

``python -m perft_qlora.kernels.compile_check [--arch 80,86,89,90] [--jobs 2] [--json PATH]``

The interpreter (the CPU tests) accepts programs the GPU compiler rejects, and the reverse. This runs
the real compiler (Triton -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the bf16
specialisation of every kernel, with what the runtime adds at a real layer shape: the 16-byte
divisibility attribute on every pointer and on the layer sizes (all multiples of 16 in OLMoE and
Mixtral; they change the code: wider loads, fewer masks). Per target (``targets.TARGETS``: sm_80, sm_86,
sm_89, sm_90) it builds every tile configuration of that target's tile tables (``NF4_TILE_TABLES``,
``DENSE_TILE_TABLES``, ``SORTED_TILE_TABLES``, decode tiles included), the NF4 kernels with plain and
double-quantized absmax, and every activation. Per build it reports, from the cubin (``cuobjdump
-res-usage``) and the PTX: registers, stack/local bytes (any is a spill), shared memory, the instruction
count of the inner loop that holds the MMAs (the K-loop; the largest such loop), and the global loads in it
by width in bytes (``ld.global`` and ``cp.async``); and checks it against the target's limits (spills,
255 registers per thread, the register file per block, shared memory per block). A CPU measurement of the
generated code, not a timing. Run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import NamedTuple

from .targets import TARGETS, over_limits, tile_family

KINDS = {  # argument name -> Triton type of the bf16 specialisation
    "*bf16": "x a h dout h_out ab_out y ab dab down up out dx ddown dup",
    "*fp32": "y_part row_scale row_w gates hpre dgc dh ddown_part dup_part hs dhs dw dx32 out32 dw_part wc wa2 wc2 wo",
    "*i64": "tokens order offsets",
    "*i32": "sched_e sched_s",
    "*u8": "wp wa",
    "i32": "H I stride_x stride_d KA N OUT IN T D DB M span KSPAN slots",
    "fp32": "scaling",
}
ARG_TYPES = {name: kind for kind, names in KINDS.items() for name in names.split()}
DIVISIBLE_INTS = {"H", "I", "stride_x", "stride_d", "KA", "N", "OUT", "IN", "D", "KSPAN"}
"""Integer arguments that are multiples of 16 at every real layer shape (KSPAN: whole BK steps): the runtime
marks them so."""
ACTS = ("silu", "relu", "gelu")


class Build(NamedTuple):
    label: str
    fn: object
    constexprs: dict
    warps: int
    stages: int


def _nf4_builds(family: int) -> list[Build]:
    from . import triton_nf4_mlp as mlp

    builds = []
    for bound, b in mlp.NF4_TILE_TABLES[family].items():
        tile = f"m{b.m}n{b.n}k{b.k}w{b.warps}s{b.stages}"
        for nested in (True, False):
            tiles = dict(NESTED=nested, QB=64, PREC="tf32", BM=b.m, BN=b.n, BK=b.k)
            tag = f"{tile}{'' if nested else ' plain'}"
            builds += [
                Build(f"nf4 gate_up fwd {tag}", mlp._gate_up_fwd_kernel, dict(ACT="silu", STORE_AB=True, **tiles), b.warps, b.stages),
                Build(f"nf4 down fwd {tag}", mlp._rows_matmul_kernel, dict(TRANS_W=True, SCALE=True, **tiles), b.warps, b.stages),
                Build(f"nf4 gate_up bwd {tag}", mlp._rows_matmul_kernel, dict(TRANS_W=False, SCALE=False, **tiles), b.warps, b.stages),
                Build(f"nf4 down bwd {tag}", mlp._down_bwd_kernel, dict(ACT="silu", **tiles), b.warps, b.stages),
            ]
            if b.split_k > 1:  # the decode tiles' split-K down projection (forward only)
                builds.append(Build(f"nf4 down fwd splitk{b.split_k} {tag}", mlp._down_fwd_splitk_kernel, tiles,
                                    b.warps, b.stages))
        if bound is None:  # the other activations change the epilogue only: built at the largest tile
            for act in ACTS[1:]:
                builds.append(Build(f"nf4 gate_up fwd {tile} {act}", mlp._gate_up_fwd_kernel,
                                    dict(tiles, ACT=act, STORE_AB=False, NESTED=True), b.warps, b.stages))
                builds.append(Build(f"nf4 down bwd {tile} {act}", mlp._down_bwd_kernel, dict(tiles, ACT=act, NESTED=True),
                                    b.warps, b.stages))
    return builds


def _adapter_builds(family: int) -> list[Build]:
    from . import triton_adapter_dense as dense
    from . import triton_adapter_sorted as srt

    builds = []
    for width, b in dense.DENSE_TILE_TABLES[family].items():
        tiles = dict(PREC="tf32", BT=b.t, BD=b.d, P=width)
        acts = ACTS + ("identity",) if width == max(dense.DENSE_TILES) else ("silu",)
        for act in acts:
            tag = f"P{width} t{b.t}d{b.d}w{b.warps}s{b.stages} {act}"
            builds += [
                Build(f"dense fwd {tag}", dense._dense_fwd_kernel, dict(ACT=act, SAVE_H=True, **tiles), b.warps, b.stages),
                Build(f"dense bwd dx {tag}", dense._dense_bwd_dx_kernel, dict(ACT=act, **tiles), b.warps, b.stages),
                Build(f"dense bwd dw {tag}", dense._dense_bwd_dw_kernel, dict(ACT=act, **tiles), b.warps, b.stages),
            ]
    for width, b in srt.SORTED_TILE_TABLES[family].items():
        tiles = dict(PREC="tf32", BM=b.m, BD=b.d, PDB=width)
        tag = f"PDB{width} m{b.m}d{b.d}w{b.warps}s{b.stages} silu"
        builds += [
            Build(f"sorted fwd {tag}", srt._sorted_fwd_kernel, dict(ACT="silu", SAVE_H=True, **tiles), b.warps, b.stages),
            Build(f"sorted bwd dx {tag}", srt._sorted_bwd_dx_kernel, dict(ACT="silu", **tiles), b.warps, b.stages),
            Build(f"sorted bwd dw {tag}", srt._sorted_bwd_dw_kernel, dict(ACT="silu", **tiles), b.warps, b.stages),
        ]
    return builds


def builds(arch: int = 90) -> list[Build]:
    """Every kernel specialisation the runtime can launch on ``arch`` (bf16), one per tile table entry and variant."""
    family = tile_family((arch // 10, arch % 10))
    return _nf4_builds(family) + _adapter_builds(family)


# measurements --------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(@!?%\w+\s+)?[a-z][\w.]*[\s;]")
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_LOAD_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "b32": 4, "u32": 4, "f32": 4, "b64": 8, "u64": 8, "f64": 8}


def _load_bytes(line: str) -> int | None:
    """Bytes moved per thread by one global load instruction (None when the line is not one)."""
    op = line.split()[0] if not line.lstrip().startswith("@") else line.split()[1]
    if op.startswith("ld.global"):
        parts = op.split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        return vector * _LOAD_WIDTH.get(parts[-1], 0)
    if op.startswith("cp.async.c") and ".shared.global" in op:
        match = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", line)
        return int(match[1], 0) if match else None
    return None


def kloop_metrics(ptx: str) -> dict:
    """``k_loop_instructions`` and ``k_loop_loads`` ({bytes: count}) of the largest loop holding an MMA.

    A loop is a label and the last branch back to it; its instructions are the lines between that are
    not labels, directives (``.loc``) or comments.
    """
    lines = ptx.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    back_edges: dict[str, int] = {}
    for j, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m[1] in labels and labels[m[1]] < j:
            back_edges[m[1]] = j
    best = dict(k_loop_instructions=0, k_loop_loads={})
    for label, end in back_edges.items():
        body = [s for s in lines[labels[label] + 1 : end + 1] if _INSTRUCTION.match(s) and not s.lstrip().startswith(".")]
        if not any("mma" in s for s in body) or len(body) <= best["k_loop_instructions"]:
            continue
        loads = Counter(b for b in map(_load_bytes, body) if b)
        best = dict(k_loop_instructions=len(body), k_loop_loads={str(k): v for k, v in sorted(loads.items())})
    return best


def resource_usage(cubin: bytes) -> dict:
    """``{"regs", "stack", "local"}`` from the cuobjdump bundled with Triton (empty when it is not there)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        result = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=False)
    fields = dict(f.split(":", 1) for line in result.stdout.splitlines() if "REG:" in line for f in line.split() if ":" in f)
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]))


def compile_build(build: Build, arch: int):
    """The compiled kernel of one build, with the runtime's divisibility attributes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = build.fn.arg_names
    signature = {n: "constexpr" if n in build.constexprs else ARG_TYPES[n] for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n not in build.constexprs and (signature[n].startswith("*") or n in DIVISIBLE_INTS)
    }
    source = ASTSource(build.fn, signature, constexprs=build.constexprs, attrs=attrs)
    options = dict(num_warps=build.warps, num_stages=build.stages)
    try:
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:
        raise RuntimeError(f"{build.label} ({build.fn.__name__}) does not compile for sm_{arch}: {error}") from error


def _measure_one(arch: int, index: int) -> dict:
    """Compile and measure build ``index`` of ``builds(arch)`` (a pool job: builds are rebuilt, not pickled)."""
    build = builds(arch)[index]
    compiled = compile_build(build, arch)
    row = dict(label=build.label, kernel=build.fn.__name__, warps=build.warps, shared=compiled.metadata.shared)
    row.update(resource_usage(compiled.asm.get("cubin", b"")))
    row.update(kloop_metrics(compiled.asm["ptx"]))
    row["over"] = over_limits(row, TARGETS[arch], 32 * build.warps)
    return row


def measure_all(archs=(90,), match: str | None = None, labels: set[str] | None = None, jobs: int = 1) -> dict[int, list[dict]]:
    """``{arch: rows}``: every build per target (label containing ``match`` / in ``labels``, if given), measured.

    ``jobs`` > 1 compiles in that many processes. Raises on a compile failure.
    """
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("unset TRITON_INTERPRET: the compile check needs JIT kernels, not interpreted ones")
    unknown = [a for a in archs if a not in TARGETS]
    if unknown:
        raise ValueError(f"no limits recorded for sm_{unknown[0]}: choose from {sorted(TARGETS)}")
    work = [(arch, i) for arch in archs for i, b in enumerate(builds(arch))
            if (match is None or match in b.label) and (labels is None or b.label in labels)]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_measure_one, *zip(*work))) if work else []
    else:
        rows = [_measure_one(arch, i) for arch, i in work]
    result: dict[int, list[dict]] = {arch: [] for arch in archs}
    for (arch, _), row in zip(work, rows):
        result[arch].append(row)
    return result


def spills(row: dict) -> bool:
    return row.get("stack", 0) > 0 or row.get("local", 0) > 0


def _arch_list(text: str) -> list[int]:
    return [int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perft_qlora.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=_arch_list, default=sorted(TARGETS),
                        help="comma-separated compute capabilities, e.g. 86 (RTX 3090) or 80,90 (default: all of %(default)s)")
    parser.add_argument("--match", help="only builds whose label contains this text")
    parser.add_argument("--labels", help="a file of build labels, one per line: only these builds")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)
    import triton

    labels = None
    if args.labels:
        with open(args.labels) as handle:
            labels = {line.strip() for line in handle if line.strip()}
    result = measure_all(args.arch, args.match, labels, max(1, args.jobs))
    for arch, rows in result.items():
        for r in rows:
            loads = " ".join(f"{k}B:{v}" for k, v in r["k_loop_loads"].items())
            print(f"sm_{arch}  {r['label']:<46} regs {r.get('regs', '?'):>3}  stack {r.get('stack', '?')}  "
                  f"shared {r['shared'] / 1024:5.1f} KiB  k-loop {r['k_loop_instructions']:>4} instr  loads {loads}")
    if args.json:
        limits = {str(a): TARGETS[a]._asdict() for a in result}
        record = dict(triton=triton.__version__, limits=limits, targets={str(a): rows for a, rows in result.items()})
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(tmp, args.json)
    bad = [f"sm_{arch} {r['label']}: {'; '.join(r['over'])}" for arch, rows in result.items() for r in rows if r["over"]]
    if bad:
        print("over a target's limits:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
