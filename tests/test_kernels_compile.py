"""Every Triton kernel builds for each target card as the runtime builds it, spills nothing, fits the card's
limits and stays in its budget.

The interpreter tests run the kernels' math but not the GPU compiler, which rejects things the
interpreter accepts (layouts, dtypes in tl.dot, early returns). ``kernels.compile_check`` runs the real
compiler down to a cubin with Triton's bundled ptxas (bf16, the runtime's divisibility attributes, every
tile of the target's tile tables, NESTED both ways, every activation) in a subprocess without
TRITON_INTERPRET, and measures registers, stack, shared memory and the K-loop's instruction count.

Targets: sm_90 (H100) and sm_80 (A100) are built in full. sm_86 (RTX 3090, A6000) and sm_89 (RTX 4090,
L40S) use sm_80's tile tables, so Triton emits the same shared-memory layout (asserted on the builds made)
and sm_80's numbers are checked against their 99 KiB. ptxas allocates registers per target: in the recorded
budget (all four targets built in full by ``python -m perft_qlora.kernels.compile_check``) sm_86 and sm_89
give identical numbers for all 64 builds, from 77 fewer to 24 more registers than sm_80. So only the builds
at ``NEAR_CAP`` registers or more on sm_80 (63 below the 255 cap) are built for sm_86 and sm_89 here,
which keeps the test near two targets' compile time instead of four.

The budget (``fixtures/kernel_compile_budget.json``) is the measurement recorded with the current code: a
change that makes a kernel spill, or its inner loop or shared memory grow, fails here. With another Triton
version the code differs somewhat, so only spills, the cards' limits and a 25% growth fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BUDGET = Path(__file__).parent / "fixtures" / "kernel_compile_budget.json"
NEAR_CAP = 192
"""sm_80 register count from which a build is also compiled for sm_86 and sm_89 (255 - 192 = 63 > 24)."""


def _compile(tmp_path: Path, name: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, set to silence its warning
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "perft_qlora.kernels.compile_check", "--jobs", "2", "--json", str(out), *args],
        capture_output=True, text=True, env=env, check=False, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # 1: over a card's limit; else a build error
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_kernel_builds_for_every_card_without_spills_within_its_budget(tmp_path):
    from perft_qlora.kernels.targets import TARGETS

    full = _compile(tmp_path, "full", "--arch", "90,80")
    near_cap = sorted(r["label"] for r in full["targets"]["80"] if r["regs"] >= NEAR_CAP)
    assert near_cap, "no sm_80 build near the register cap: lower NEAR_CAP or drop the subset"
    (tmp_path / "labels.txt").write_text("\n".join(near_cap))
    subset = _compile(tmp_path, "subset", "--arch", "86,89", "--labels", str(tmp_path / "labels.txt"))
    measured = {**full["targets"], **subset["targets"]}
    sm80 = {r["label"]: r for r in full["targets"]["80"]}
    for arch in ("86", "89"):
        assert sorted(r["label"] for r in measured[arch]) == near_cap
        for row in measured[arch]:
            assert row["shared"] == sm80[row["label"]]["shared"], (arch, row["label"])  # one layout across sm_8x
        limit = TARGETS[int(arch)].shared_per_block
        assert all(r["shared"] <= limit for r in sm80.values()), [r["label"] for r in sm80.values() if r["shared"] > limit]

    budget = json.loads(BUDGET.read_text())
    slack = 1.0 if full["triton"] == budget["triton"] else 1.25
    for arch, rows in measured.items():
        limits = {r["label"]: r for r in budget["targets"][arch]}
        labels = {r["label"] for r in rows}
        if arch in full["targets"]:
            assert labels == set(limits), f"sm_{arch}: a tile config was added or removed: re-record the budget"
        for row in rows:
            assert row["stack"] == 0 and row["local"] == 0 and not row["over"], (arch, row)
            assert row["k_loop_instructions"] > 0, f"sm_{arch} {row['label']}: no MMA loop found in the PTX"
            for key in ("k_loop_instructions", "shared"):
                limit = limits[row["label"]][key]
                assert row[key] <= limit * slack, f"sm_{arch} {row['label']}: {key} {row[key]} > budget {limit}"


def test_each_card_gets_its_tile_table_and_its_limits():
    from perft_qlora.kernels.compile_check import builds
    from perft_qlora.kernels.targets import TARGETS, over_limits

    labels = {arch: {b.label for b in builds(arch)} for arch in TARGETS}
    assert labels[80] == labels[86] == labels[89] != labels[90]
    assert len(labels[80]) == len(labels[90])  # same builds, some with other tiles
    only_sm80 = sorted(labels[80] - labels[90])
    assert any("m128n64k64w8s2" in x for x in only_sm80) and any("P128 t16" in x for x in only_sm80)
    assert any("PDB128 m16" in x for x in only_sm80)
    row = dict(regs=200, stack=0, local=0, shared=120 * 1024)  # fits an H100 and an A100, not an RTX 3090
    assert over_limits(row, TARGETS[90], 256) == over_limits(row, TARGETS[80], 256) == []
    assert "shared memory" in over_limits(row, TARGETS[86], 256)[0]
    assert "spills" in over_limits(dict(row, shared=0, stack=8), TARGETS[90], 256)[0]
    assert "registers" in over_limits(dict(row, shared=0, regs=255), TARGETS[90], 512)[0]  # 255 x 512 > 64K


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
