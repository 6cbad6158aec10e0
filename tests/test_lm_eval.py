"""lm-evaluation-harness on an exported folder: a local task (the demo rows, the adapter's prompt template,
greedy, the first label) scores exactly as perft_qlora's evaluation does, row by row. No downloads."""

from __future__ import annotations

import json

import pytest
import torch

from perft_qlora import load_adapter, load_model
from perft_qlora.export import main as export_main
from perft_qlora.exporting.lm_eval_task import write_lm_eval_task
from perft_qlora.training.demo import demo_rows, held_out_accuracy
from perft_qlora.training.demo_base import demo_base_dir

lm_eval = pytest.importorskip("lm_eval")  # the [eval] extra; CI installs it

ROWS = 12


def test_lm_eval_agrees_with_perft_qlora_evaluate(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    from test_export import make_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = demo_base_dir()
        # small enough that the base's true / false answers survive, large enough to change some of them
        adapter = make_adapter(base, str(tmp_path / "adapter"), "perft", template="released", seed=2, scale=0.05)
        out = str(tmp_path / "exported")
        export_main(["--model", base, "--adapter", adapter, "--out", out, "--dtype", "float32", "--dequantized"])
        rows = demo_rows(ROWS)
        model, tokenizer = load_model(base, device="cpu", dtype=torch.float32, progress=False)  # NF4, as evaluate
        load_adapter(model, adapter)
        accuracy, responses = held_out_accuracy(model, tokenizer, rows, batch_size=1)

        write_lm_eval_task(rows, str(tmp_path / "tasks"), template="released")
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32", tasks=["perft_demo"],
            device="cpu", batch_size=1, task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            log_samples=True,
        )
    finally:
        torch.set_num_threads(threads)
    samples = sorted(results["samples"]["perft_demo"], key=lambda sample: sample["doc_id"])
    assert len(samples) == ROWS
    with open(tmp_path / "tasks" / "perft_demo.jsonl") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle]
    assert [sample["arguments"][0][0] for sample in samples] == prompts  # lm-eval sends our prompts unchanged
    from perft_qlora.evaluation.tasks import TASKS

    ours = [TASKS["demo"].extract(response) for response in responses]
    theirs = [sample["filtered_resps"][0] for sample in samples]
    assert theirs == ours, (theirs, ours)  # the regex filter's fallback is evaluate's INVALID, "[invalid]"
    assert results["results"]["perft_demo"]["exact_match,extract"] == pytest.approx(accuracy)
    assert {"true", "false"} <= set(ours), ours  # both answers occur: agreeing is not agreeing on "[invalid]"
