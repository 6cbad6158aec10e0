"""The mutation check (tests/mutation/): every planted bug still has its target, and every one is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "mutation"))

from mutate import TargetNotFound, copy_package, plant
from mutations import MUTATIONS


def test_every_mutation_target_is_in_the_code_exactly_once():
    """Fast: a refactor that moves a planted-bug line shows up here as 'mutation target not found'."""
    root = copy_package(None)
    try:
        for mutation in MUTATIONS:
            path = os.path.join(root, "perft_qlora", mutation.module)
            with open(path, encoding="utf-8") as handle:
                original = handle.read()
            plant(mutation, root)
            with open(path, encoding="utf-8") as handle:
                assert handle.read() != original, mutation.name
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(original)
            for test in mutation.tests:
                assert not test.startswith("tests/") or os.path.exists(os.path.join(os.path.dirname(HERE), test)), test
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)


def test_a_missing_target_is_a_loud_error(tmp_path):
    (tmp_path / "perft_qlora" / "method").mkdir(parents=True)
    (tmp_path / "perft_qlora" / "method" / "losses.py").write_text("refactored away\n")
    with pytest.raises(TargetNotFound, match="mutation target not found: balance_loss_counts_padding"):
        plant(MUTATIONS[0], str(tmp_path))


@pytest.mark.slow
def test_no_planted_bug_survives():
    """Runs tests/mutation/mutate.py on every mutant; see README's Tests section for its duration.

    Without the unmutated baseline runs: the rest of the suite runs those same tests.
    """
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "mutation", "mutate.py"), "--jobs", "2", "--no-baseline"],
        check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"{len(MUTATIONS)} mutations, 0 problems" in done.stdout
