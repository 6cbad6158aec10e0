"""``python -m perft_qlora.bench kernels``: the dispatcher and a smoke run of the harness (CPU, interpreter).

The smoke run checks that the benchmark script runs end to end and that every method computes the same
layer (errors below); its timings are interpreter timings and mean nothing.
"""

from __future__ import annotations

import json

import torch

from perft_qlora.bench.__main__ import COMMANDS, main


def test_dispatcher_lists_commands_and_refuses_unknown_ones(capsys):
    assert main([]) == 2
    assert "kernels" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert set(COMMANDS) >= {"kernels"}


def test_kernels_smoke_run_writes_every_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["kernels", "--smoke", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "not a benchmark" in table
    record = json.loads(out.read_text())
    assert "backend_choices" in record and "requested_backend" in record
    policy = record["kernel_policy"]  # what auto prefers on this card, next to what it chose per op
    assert policy["capability"].startswith("sm_") if torch.cuda.is_available() else policy == dict(device="cpu", auto="reference")
    rows = record["rows"]
    methods = {(r["part"], r["method"].split(": ")[-1], r["passes"]) for r in rows}
    for method in ("nf4-triton", "nf4-grouped", "bf16-grouped_mm", "bnb-dequant+grouped_mm"):
        for passes in ("forward", "forward(train)", "backward(dx)"):
            assert ("mlp", method, passes) in methods
    for method in ("reference", "triton-sorted", "triton-dense", "grouped-sorted", "grouped-dense"):
        assert ("adapter", method, "forward+backward") in methods
    # CPU: float32 everywhere, so methods agree to float32 rounding. CUDA: bf16, whose 8-bit mantissa
    # (4e-3 per rounding) through two GEMMs allows ~1e-2 between two bf16 implementations.
    bound = 2e-2 if torch.cuda.is_available() else 1e-5
    assert all(r["rel_err"] < bound for r in rows), [(r["method"], r["rel_err"]) for r in rows]
    assert all(r["ms"] > 0 for r in rows)
