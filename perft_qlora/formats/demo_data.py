"""The demo task's data set: a small, deterministic yes/no task in the LLM-Adapters format.

Each row asks whether a short made-up text is written in small letters (``perft_qlora.formats.demo_corpus.DEMO_FAMILY``).
The shipped base model (``perft_qlora/data/demo_base/``) was pre-trained on the opposite question (capital
letters) and never saw this one: it reads the text through its frozen attention and answers the question it
knows, so it is wrong almost every time; a PERFT adapter must learn the new mapping. Outputs read like
Commonsense170K's (``the correct answer is true``), so the commonsense evaluation protocol scores them with
the BoolQ label pattern. The files ship in the package (``perft_qlora/data/demo/{train,test}.json``);
``python -m perft_qlora.formats.demo_data`` rewrites them and a test checks the shipped files equal what this makes.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from .demo_corpus import DEMO_FAMILY, family_rows

TRAIN_ROWS, TEST_ROWS = 256, 40


def generate_demo_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` rows with no (instruction, input) in both; about half the texts are upper case."""
    rows = family_rows(DEMO_FAMILY, TRAIN_ROWS + TEST_ROWS, seed)
    return rows[:TRAIN_ROWS], rows[TRAIN_ROWS:]


def demo_data_path(split: str) -> str:
    """Path of the shipped ``train`` or ``test`` file."""
    if split not in ("train", "test"):
        raise ValueError(f"demo split must be 'train' or 'test', not {split!r}")
    return str(resources.files("perft_qlora") / "data" / "demo" / f"{split}.json")


def main() -> None:
    train, test = generate_demo_rows()
    for split, rows in (("train", train), ("test", test)):
        path = demo_data_path(split)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
            handle.write("\n")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
