"""Plant each bug of ``mutations.py`` in a temporary copy of the package and check that its tests fail.

    python tests/mutation/mutate.py              # every mutation; exit 1 if any survives or cannot be planted
    python tests/mutation/mutate.py --jobs 2     # two at a time
    python tests/mutation/mutate.py --only entropy_sign --only perft_s_not_a_single_expert
    python tests/mutation/mutate.py --list

For every distinct test selection, the unmutated copy is run first (it must pass, or a "killed" mutation
would prove nothing). Each mutant then runs in its own copy, imported through PYTHONPATH and the working
directory (tests/conftest.py checks the copy is the one imported). Runs are forked from this process after
it has imported torch, transformers, trl and bitsandbytes once (POSIX only), which saves ~15 s per run.
A mutant is killed when pytest reports failing tests (exit status 1); a collection error or crash is
reported as broken, which also fails the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PACKAGE = os.path.join(REPO, "perft_qlora")
sys.path.insert(0, HERE)

from mutations import MUTATIONS, Mutation


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
    return ["-q", "-x", "-p", "no:cacheprovider", *(os.path.join(REPO, a) if a.startswith("tests/") else a for a in tests)]


def preload() -> None:
    """Import the heavy third-party libraries once; every forked run then starts in about a second.

    perft_qlora itself is never imported here, so each child imports its own (mutated) copy.
    """
    import importlib

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before triton is imported
    for name in ("accelerate", "bitsandbytes", "pytest", "trl", "transformers.models.mixtral.modeling_mixtral",
                 "transformers.models.olmoe.modeling_olmoe"):
        importlib.import_module(name)


def start_run(root: str, tests: tuple[str, ...], log: str) -> int:
    """Fork a child that runs pytest on ``tests`` against the package copy in ``root``; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 3
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.chdir(root)
        sys.path.insert(0, root)
        os.environ.update(PYTHONPATH=root, OMP_NUM_THREADS="1", PERFT_QLORA_EXPECT_ROOT=root)
        import pytest

        status = int(pytest.main(pytest_args(tests)))
    except BaseException:  # noqa: BLE001 - the child reports any failure and exits
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_all(jobs: list[tuple[str, tuple[str, ...]]], parallel: int) -> list[tuple[int, float, str]]:
    """(pytest exit status, seconds, output tail) of each (package root, tests) job, ``parallel`` at a time."""
    results: dict[int, tuple[int, float, str]] = {}
    running: dict[int, tuple[int, float, str]] = {}  # pid -> (job index, start time, log path)
    pending = list(enumerate(jobs))
    logs = tempfile.mkdtemp(prefix="perft-mutant-logs-")
    try:
        while pending or running:
            while pending and len(running) < parallel:
                index, (root, tests) = pending.pop(0)
                log = os.path.join(logs, f"{index}.log")
                running[start_run(root, tests, log)] = (index, time.perf_counter(), log)
            pid, wait_status = os.wait()
            index, started, log = running.pop(pid)
            with open(log, encoding="utf-8", errors="replace") as handle:
                tail = handle.read()[-3000:]
            results[index] = (os.waitstatus_to_exitcode(wait_status), time.perf_counter() - started, tail)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return [results[i] for i in range(len(jobs))]


def baseline(selections: list[tuple[str, ...]], parallel: int) -> list[str]:
    """Problems found running each test selection on the unmutated copy (it must pass)."""
    root = copy_package(None)
    try:
        results = run_all([(root, tests) for tests in selections], parallel)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    problems = []
    for tests, (status, seconds, tail) in zip(selections, results):
        print(f"baseline  {' '.join(tests)}: exit {status} in {seconds:.0f} s", flush=True)
        if status != 0:
            problems.append(f"baseline fails without any mutation: {' '.join(tests)}\n{tail}")
    return problems


def try_mutations(chosen: list[Mutation], parallel: int) -> list[tuple[str, str]]:
    """(outcome, detail) per mutation: outcome is killed, survived, broken or missing."""
    outcomes: dict[str, tuple[str, str]] = {}
    roots: dict[str, str] = {}
    try:
        for mutation in chosen:
            try:
                roots[mutation.name] = copy_package(mutation)
            except TargetNotFound as error:
                outcomes[mutation.name] = ("missing", str(error))
        planted = [m for m in chosen if m.name in roots]
        for mutation, (status, seconds, tail) in zip(planted, run_all([(roots[m.name], m.tests) for m in planted], parallel)):
            outcome = {0: "survived", 1: "killed"}.get(status, "broken")
            outcomes[mutation.name] = (outcome, f"{seconds:.0f} s" + ("" if outcome == "killed" else f" (pytest exit {status})\n{tail}"))
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    return [outcomes[m.name] for m in chosen]


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
    preload()
    problems = [] if args.no_baseline else baseline(sorted({m.tests for m in chosen}), args.jobs)
    for mutation, (outcome, detail) in zip(chosen, try_mutations(chosen, args.jobs)):
        print(f"{outcome:9} {mutation.name}: {detail}", flush=True)
        if outcome != "killed":
            problems.append(f"{outcome}: {mutation.name}: {detail}")
    print(f"{len(chosen)} mutations, {len(problems)} problems, {time.perf_counter() - start:.0f} s in all")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
