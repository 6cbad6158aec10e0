"""Each benchmark setup in a fresh process, so that one setup's memory peaks and caches never reach another's.

``bench train`` and ``bench load`` re-run themselves as ``python -m perft_qlora.bench COMMAND ... --only SETUP``
and read the one JSON line the child prints.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_each_in_own_process(command: str, argv: list[str], setups: list[str]) -> list[dict]:
    """One result row per setup: the child's last JSON line, or ``{"setup", "error"}`` with its last stderr line."""
    forwarded = without_out(argv)
    rows = []
    for setup in setups:
        done = subprocess.run([sys.executable, "-m", "perft_qlora.bench", command, *forwarded, "--only", setup],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            rows.append({"setup": setup, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]})
        else:
            rows.append(json.loads(lines[-1]))
    return rows


def without_out(argv: list[str]) -> list[str]:
    """``argv`` without ``--out FILE`` / ``--out=FILE`` (only the parent writes the JSON)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--out":
            skip = True
        elif not item.startswith("--out="):
            kept.append(item)
    return kept
