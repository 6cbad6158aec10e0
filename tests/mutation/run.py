"""Plant each bug of ``mutations.py`` in a temporary copy of the package and check that its tests fail.

    python tests/mutation/run.py              # every mutation; exit 1 if any survives or cannot be planted
    python tests/mutation/run.py --jobs 2     # two at a time
    python tests/mutation/run.py --only entropy_sign --only perft_s_not_a_single_expert
    python tests/mutation/run.py --list

For every distinct test selection, the unmutated copy is run first (it must pass, or a "killed" mutation
would prove nothing). Each mutant then runs in its own copy, imported through PYTHONPATH and the working
directory (tests/conftest.py checks the copy is the one imported). A mutant is killed when pytest reports
failing tests (exit status 1); a collection error or crash is reported as broken, which also fails the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PACKAGE = os.path.join(REPO, "perft_qlora")
sys.path.insert(0, HERE)

from mutations import MUTATIONS, Mutation  # noqa: E402


class TargetNotFound(Exception):
    pass


def plant(mutation: Mutation, root: str) -> None:
    """Apply ``mutation`` to the package copy under ``root``; TargetNotFound unless every snippet occurs once."""
    path = os.path.join(root, "perft_qlora", mutation.module)
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    for old, new in mutation.edits:
        count = source.count(old)
        if count != 1:
            raise TargetNotFound(
                f"mutation target not found: {mutation.name}: perft_qlora/{mutation.module} holds {count} copies of "
                f"{old!r} (expected exactly 1); update tests/mutation/mutations.py to the refactored code"
            )
        source = source.replace(old, new)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(source)


def copy_package(mutation: Mutation | None) -> str:
    root = tempfile.mkdtemp(prefix="perft-mutant-")
    shutil.copytree(PACKAGE, os.path.join(root, "perft_qlora"), ignore=shutil.ignore_patterns("__pycache__"))
    if mutation is not None:
        try:
            plant(mutation, root)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    return root


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    return [os.path.join(REPO, a) if a.startswith("tests/") else a for a in tests]


def run_tests(root: str, tests: tuple[str, ...]) -> tuple[int, float, str]:
    """(pytest exit status, seconds, output tail) for ``tests`` against the package copy in ``root``."""
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "PERFT_QLORA_EXPECT_ROOT": root}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args(tests)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr)[-3000:]


def baseline(selections: list[tuple[str, ...]], jobs: int) -> list[str]:
    """Problems found running each test selection on the unmutated copy (it must pass)."""
    root = copy_package(None)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda tests: run_tests(root, tests), selections))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    problems = []
    for tests, (status, seconds, tail) in zip(selections, results):
        print(f"baseline {' '.join(tests)}: exit {status} in {seconds:.0f} s", flush=True)
        if status != 0:
            problems.append(f"baseline fails without any mutation: {' '.join(tests)}\n{tail}")
    return problems


def try_mutation(mutation: Mutation) -> tuple[str, str]:
    """(outcome, detail): outcome is killed, survived, broken or missing."""
    try:
        root = copy_package(mutation)
    except TargetNotFound as error:
        return "missing", str(error)
    try:
        status, seconds, tail = run_tests(root, mutation.tests)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    outcome = {0: "survived", 1: "killed"}.get(status, "broken")
    return outcome, f"{seconds:.0f} s" + ("" if outcome == "killed" else f" (pytest exit {status})\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutations")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs (when known green)")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(args.only) - names)
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:52} perft_qlora/{m.module:22} {' '.join(m.tests)}")
        return 0
    start = time.perf_counter()
    problems = [] if args.no_baseline else baseline(sorted({m.tests for m in chosen}), args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        for mutation, (outcome, detail) in zip(chosen, pool.map(try_mutation, chosen)):
            print(f"{outcome:9} {mutation.name}: {detail}", flush=True)
            if outcome != "killed":
                problems.append(f"{outcome}: {mutation.name}: {detail}")
    print(f"{len(chosen)} mutations, {len(problems)} problems, {time.perf_counter() - start:.0f} s in all")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
