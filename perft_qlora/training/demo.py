"""The quick start: ``python -m perft_qlora.train --demo`` takes the shipped base from chance to the demo task.

The base is the small pre-trained OLMoE shipped in ``perft_qlora/data/demo_base/`` (``perft_qlora.training.demo_base``),
copied to ``<output-dir>/base/`` so that the evaluation and app commands find it beside the adapter. The task
(``perft_qlora.formats.demo_data``) is one the base was never trained on. After training, the base and the adapter
are scored on the shipped held-out rows (``perft_qlora/data/demo/test.json``) the way ``python -m
perft_qlora.evaluate --tasks demo --greedy`` scores them, and a before/after table is printed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from ..evaluation.generate import generate_batch
from ..evaluation.protocol import PROTOCOLS, Protocol
from ..evaluation.tasks import TASKS
from ..formats.chat_templates import ChatTemplate
from ..formats.demo_corpus import YES_NO
from ..formats.demo_data import demo_data_path
from ..formats.records import read_records
from .demo_base import MANIFEST, demo_base_dir
from .distributed import is_main_process
from .train_options import TrainOptions, demo_base_path

VARIANT_LABELS = {"perft": "PERFT", "perft_e": "PERFT-E", "perft_d": "PERFT-D", "perft_s": "PERFT-S", "lora": "LoRA"}
GREEDY = PROTOCOLS["perft"].with_beams(1)
DEMO_QUESTION = f"Is the following text written in small letters? {YES_NO}"
"""The demo task's instruction (``formats.demo_corpus.small_letters``), for the generate command printed after training."""


def prepare_demo_base(output_dir: str) -> str:
    """Copy the shipped base model into ``<output_dir>/base`` (a few MB) and return that directory."""
    target = demo_base_path(output_dir)
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(demo_base_dir()):
        if name != MANIFEST:
            shutil.copyfile(os.path.join(demo_base_dir(), name), os.path.join(target, name))
    return target


def demo_rows(limit: int | None = None) -> list[dict]:
    rows = read_records(demo_data_path("test")).rows
    return rows[:limit] if limit else rows


def held_out_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 20,
                      protocol: Protocol = GREEDY) -> tuple[float, list[str]]:
    """``(accuracy, responses)`` on ``rows``: the evaluator's demo prompts, greedy, its answer extraction
    (``protocol``: ``GREEDY`` through a chat template for a run with ``--chat-template``)."""
    task, decoding = TASKS["demo"], protocol.decoding("commonsense")
    correct, responses = 0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [protocol.prompt(task.family, row) for row in chunk]
        generated = generate_batch(model, tokenizer, prompts, decoding.max_new_tokens, **protocol.generate_options())
        for prompt, text, row in zip(prompts, generated, chunk):
            response = protocol.scored_response(prompt, text, task.family)
            responses.append(response)
            correct += task.is_correct(task.extract(response), row["answer"].strip())
    return correct / len(rows), responses


@dataclass
class DemoReport:
    base_accuracy: float
    adapter_accuracy: float
    rows: int
    trainable: int
    seconds: float
    base_dir: str
    adapter_dir: str
    variant: str = "perft"

    def table(self) -> str:
        adapter = f"base + {VARIANT_LABELS.get(self.variant, self.variant)} adapter (after)"
        lines = [
            f"| demo task, {self.rows} held-out rows | accuracy |", "|---|---:|",
            f"| base model (NF4, before)            | {100 * self.base_accuracy:5.1f}% |",
            f"| {adapter:<35} | {100 * self.adapter_accuracy:5.1f}% |",
        ]
        return "\n".join(lines) + (
            f"\nchance: 50.0% (true/false); trainable parameters: {self.trainable:,}; "
            f"time: {self.seconds:.0f} s (load, train, score)\nadapter: {self.adapter_dir}\nbase:    {self.base_dir}"
        )

    def next_commands(self, output_dir: str) -> str:
        """Commands that work from this directory whatever it is (module names, not the clone's file paths)."""
        return (
            "next:\n"
            f"  python -m perft_qlora.generate --model {self.base_dir} --adapter {self.adapter_dir} "
            f"{shlex.quote(DEMO_QUESTION)} --input 'hello world'\n"
            f"  python -m perft_qlora.evaluate --model {self.base_dir} --adapter {self.adapter_dir} --tasks demo "
            f"--output-dir {os.path.join(output_dir, 'eval')}\n"
            f"  python -m perft_qlora.app --demo --demo-dir {output_dir}   # the app (apps/compare.py in a clone)"
        )


def run_demo(options: TrainOptions, train) -> DemoReport:
    """``train(options)`` (``perft_qlora.training.train.run``) on the demo, then score base and adapter; prints the
    report."""
    from ..quant.loader import load_model

    if not options.device.startswith("cuda"):
        # The demo's matrices are 128 wide: a second thread gains little, and on a CPU shared with other
        # jobs OpenMP's spinning threads made the run over 6x slower (400+ s against 55 s with one thread).
        torch.set_num_threads(1)
    start = time.perf_counter()
    trainer = train(options)
    model = trainer.model.eval()
    model.config.output_router_logits = False  # training's balance loss is not computed while generating
    rows = demo_rows()
    chat = ChatTemplate.from_record(trainer.run_metadata)  # --chat-template: both scored through it, as evaluate does
    protocol = GREEDY if chat is None else GREEDY.with_chat(chat, trainer.processing_class)
    adapter_accuracy, _ = held_out_accuracy(model, trainer.processing_class, rows, protocol=protocol)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base, tokenizer = load_model(options.model, device=options.device, progress=False)
    base_accuracy, _ = held_out_accuracy(base, tokenizer, rows, protocol=protocol)
    report = DemoReport(base_accuracy, adapter_accuracy, len(rows), trainable, time.perf_counter() - start,
                        options.model, os.path.join(options.output_dir, "adapter"), options.variant)
    if is_main_process():  # every rank runs this under accelerate launch
        print("\n" + report.table() + "\n\n" + report.next_commands(options.output_dir), file=sys.stderr)
    return report
