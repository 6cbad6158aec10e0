"""Run one model over one task's test set: prompt -> generate_batch -> extract -> score, row by row on disk.

Rows already in the prediction store (an earlier, stopped run) are skipped; every new row is written as soon
as its batch is decoded.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .generate import generate_batch
from .predictions import PredictionStore
from .protocol import Protocol
from .summary import score
from .tasks import TestSet


def run_task(
    model,
    tokenizer,
    model_label: str,
    test_set: TestSet,
    protocol: Protocol,
    store: PredictionStore,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict:
    """Evaluate the first ``limit`` usable rows (all when None); returns ``summary.score`` of those rows."""
    task = test_set.task
    rows = test_set.rows[:limit] if limit else test_set.rows
    todo = [i for i in range(len(rows)) if not store.has(model_label, task.name, i)]
    decoding = protocol.decoding(task.family)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"{model_label} / {task.name}", unit="row")
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            prompts = [protocol.prompt(task.family, rows[i]) for i in chunk]
            generated = generate_batch(model, tokenizer, prompts, decoding.max_new_tokens, protocol.num_beams,
                                       **protocol.generate_options())
            for i, prompt, text in zip(chunk, prompts, generated):
                response = protocol.scored_response(prompt, text, task.family)
                extracted = task.extract(response)
                gold = rows[i]["answer"].strip()
                store.add({
                    "model": model_label, "task": task.name, "row": i, "prompt": prompt, "generated": text,
                    "response": response, "extracted": extracted, "gold": gold,
                    "correct": task.is_correct(extracted, gold),
                })
            bar.update(len(chunk))
            done = store.records(model_label, task.name, len(rows))
            bar.set_postfix(acc=f"{sum(r['correct'] for r in done) / len(done):.3f}")
    finally:
        bar.close()
    return score(store.records(model_label, task.name, len(rows)), skipped_rows=len(test_set.skipped))
