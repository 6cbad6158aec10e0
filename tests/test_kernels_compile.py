"""Every Triton kernel builds for the GPU (sm_90, bf16, default tiles) on a CPU-only machine.

The interpreter tests run the kernels' math but not the GPU compiler, which rejects things the
interpreter accepts (layouts, dtypes in tl.dot, early returns). ``kernels.compile_check`` runs the
real compiler down to a cubin with Triton's bundled ptxas, in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, set to silence its warning
    result = subprocess.run(
        [sys.executable, "-m", "perft_qlora.kernels.compile_check", "--arch", "90"],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    built = [line for line in result.stdout.splitlines() if line.startswith("sm_90")]
    assert len(built) == 10, result.stdout
