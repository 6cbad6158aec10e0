"""``python -m perft_qlora.bench gpu-check --smoke``: the GPU session's one command, run on CPU at tiny shapes.

The smoke run executes every stage the GPU run has (pytest -m gpu, bench kernels under the Triton
interpreter, bench train, bench generate) with tiny shapes, so the script cannot rot between GPU
sessions. Its timings mean nothing; what is checked is that every stage ran and every output was written.
Also: the measured backend table is derived correctly from kernel timings.
"""

from __future__ import annotations

import json
import os
import runpy

import pytest

from perft_qlora.bench import gpu_check


@pytest.mark.slow
def test_smoke_run_writes_every_output(tmp_path):
    out = tmp_path / "gpu-check"
    code = gpu_check.main(["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    summary = json.loads((out / "gpu-check.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses == {"pytest-gpu": "ok", "kernels": "ok", "train-olmoe-grouped": "ok", "train-olmoe-offload": "ok",
                        "generate": "ok"}, [
        (s["name"], s.get("tail", "")[-1500:]) for s in summary["stages"] if s["status"] != "ok"]
    assert code == 0
    assert summary["env"]["packages"]["torch"] and "missing" in summary["env"]
    kernels = next(s for s in summary["stages"] if s["name"] == "kernels")["result"]
    assert "backend_choices" in kernels and {r["method"] for r in kernels["rows"]} >= {"nf4-grouped", "nf4-triton"}
    generate = next(s for s in summary["stages"] if s["name"] == "generate")["result"]
    assert {r["backend"] for r in generate["rows"]} == {"grouped", "reference"}
    assert all(r["tokens_per_s"] > 0 for r in generate["rows"])
    offload = next(s for s in summary["stages"] if s["name"] == "train-olmoe-offload")["result"]["results"][0]
    assert offload["offloaded_layers"] == 4, offload  # the stage streams every layer of the 4-layer cut
    block = (out / "benchmarks.md").read_text()
    for title in ("#### kernels", "#### train-olmoe-grouped", "#### generate"):
        assert title in block
    table = runpy.run_path(str(out / "measured.py"))["MEASURED"]
    assert isinstance(table, dict) and all(v in ("triton", "grouped") for v in table.values())


def test_pytest_stages_find_the_tests_from_any_directory_and_say_when_there_are_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone's root
    for smoke in (True, False):
        tests = [a for s in gpu_check.stages(str(tmp_path), smoke, str(tmp_path)) if s.name.endswith("gpu") for a in s.argv
                 if "tests" in a]
        assert tests and all(os.path.isabs(a) and os.path.exists(a) for a in tests), tests
    monkeypatch.setattr(gpu_check, "TESTS_DIR", str(tmp_path / "site-packages" / "tests"))  # an installed wheel
    stage = gpu_check.stages(str(tmp_path), True, str(tmp_path))[0]
    record = gpu_check.run_stage(stage, str(tmp_path), 5)
    assert record["status"] == "no-tests" and "an installed wheel has none" in record["tail"]


def test_measured_table_gives_triton_only_where_it_won_every_token_count():
    rows = []
    for tokens, triton_ms, grouped_ms in ((1, 1.0, 2.0), (16, 1.0, 2.0), (512, 3.0, 2.0), (4096, 1.0, 2.0)):
        for method, ms in (("nf4-triton", triton_ms), ("nf4-grouped", grouped_ms)):
            for passes in ("forward", "forward(train)", "backward(dx)"):
                rows.append(dict(part="mlp", model="olmoe", tokens=tokens, method=method, passes=passes, ms=ms))
        rows.append(dict(part="adapter", model="olmoe", tokens=tokens, method="PERFT Top2/4 DB=16: triton-dense",
                         passes="forward+backward", ms=5.0))
        rows.append(dict(part="adapter", model="olmoe", tokens=tokens, method="PERFT Top2/4 DB=16: grouped-dense",
                         passes="forward+backward", ms=1.0))
    table = gpu_check.measured_table(dict(rows=rows), "sm_90")
    mlp = "E64xH2048xI1024"
    assert table[("sm_90", "nf4_expert_mlp", f"{mlp}/decode")] == "triton"  # 1 and 16 tokens: both won
    assert table[("sm_90", "nf4_expert_mlp", f"{mlp}/small")] == "grouped"
    assert table[("sm_90", "nf4_expert_mlp", f"{mlp}/large")] == "triton"
    assert table[("sm_90", "routed_adapter", "M4xDB16xD2048/large")] == "grouped"


def test_measured_file_round_trips(tmp_path):
    table = {("sm_90", "nf4_expert_mlp", "E64xH2048xI1024/large"): "triton"}
    gpu_check.write_measured(str(tmp_path / "measured.py"), table, "H200, torch 2.13")
    assert runpy.run_path(str(tmp_path / "measured.py"))["MEASURED"] == table
