"""Every Triton kernel builds for the GPU as the runtime builds it, spills nothing, and stays in its budget.

The interpreter tests run the kernels' math but not the GPU compiler, which rejects things the
interpreter accepts (layouts, dtypes in tl.dot, early returns). ``kernels.compile_check`` runs the real
compiler down to a cubin with Triton's bundled ptxas (sm_90, bf16, the runtime's divisibility
attributes, every tile of the tile tables, NESTED both ways, every activation) in a subprocess without
TRITON_INTERPRET, and measures registers, stack, shared memory and the K-loop's instruction count.
The budget (``fixtures/kernel_compile_budget.json``) is the measurement recorded with the current
code: a change that makes a kernel spill, or its inner loop or shared memory grow, fails here. With
another Triton version the code differs somewhat, so only spills and a 25% growth fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BUDGET = Path(__file__).parent / "fixtures" / "kernel_compile_budget.json"


@pytest.mark.slow
def test_every_kernel_builds_without_spills_within_its_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, set to silence its warning
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "perft_qlora.kernels.compile_check", "--arch", "90", "--json", str(out)],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # 1: a spill; else a build error
    measured = json.loads(out.read_text())
    budget = json.loads(BUDGET.read_text())
    rows = {r["label"]: r for r in measured["rows"]}
    assert set(rows) == {r["label"] for r in budget["rows"]}, "a tile config was added or removed: re-record the budget"
    slack = 1.0 if measured["triton"] == budget["triton"] else 1.25
    for limit in budget["rows"]:
        row = rows[limit["label"]]
        assert row["stack"] == 0 and row["local"] == 0, row
        assert row["k_loop_instructions"] > 0, f"{row['label']}: no MMA loop found in the PTX"
        for key in ("k_loop_instructions", "shared"):
            assert row[key] <= limit[key] * slack, f"{row['label']}: {key} {row[key]} > budget {limit[key]}"


def test_kloop_metrics_reads_a_ptx_loop():
    from perft_qlora.kernels.compile_check import kloop_metrics

    ptx = """
\tld.global.b8 { %rs1 }, [ %rd1 + 0 ];
$L__BB0_2:
\t.loc 1 2 3
\t@%p1 ld.global.v2.b32 { %r1, %r2 }, [ %rd2 + 0 ];
\tcp.async.cg.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x10, %r4;
\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r5}, %rd4, %rd5, %p2, 1, 1, 0, 0;
\t@%p3 bra \t$L__BB0_2;
\tret;
"""
    assert kloop_metrics(ptx) == dict(k_loop_instructions=4, k_loop_loads={"8": 1, "16": 1})
