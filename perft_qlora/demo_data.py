"""The embedded demo data set: a small, deterministic yes/no task in the LLM-Adapters format.

Each row asks whether a short made-up text is written in capital letters; the output reads like Commonsense170K's
(``the correct answer is true``), so the commonsense evaluation protocol scores it with the BoolQ label
pattern. The files ship in the package (``perft_qlora/data/demo/{train,test}.json``) so that
``python -m perft_qlora.train --demo`` needs no download; ``python -m perft_qlora.demo_data`` rewrites them
and a test checks the shipped files equal what this generator makes.
"""

from __future__ import annotations

import json
import os
import random
from importlib import resources

TRAIN_ROWS, TEST_ROWS = 256, 40
INSTRUCTION = "Is the following text written in capital letters? Answer format: true/false"


def demo_row(text: str) -> dict[str, str]:
    """One LLM-Adapters row: instruction, the text as input, Commonsense170K-style output and the bare answer."""
    answer = "true" if text.isupper() else "false"
    return {"instruction": INSTRUCTION, "input": text, "output": f"the correct answer is {answer}", "answer": answer}


def _phrase(rng: random.Random) -> str:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(4)]
    return " ".join(words)


def generate_demo_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` rows with no text in both; about half the texts are upper case.

    The answer shows in every token of the input, so even the demo's tiny random base model (whose frozen
    attention mixes positions almost uniformly) carries it to the answer position: the adapter can learn it.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < TRAIN_ROWS + TEST_ROWS:
        text = _phrase(rng)
        text = text.upper() if rng.random() < 0.5 else text
        if text.lower() not in seen:
            seen.add(text.lower())
            rows.append(demo_row(text))
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
