"""``python -m perft_qlora.bench <command> [options]``: one benchmark per command.

Add a command by adding a row to ``COMMANDS``: its module must define ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "kernels": ("perft_qlora.bench.kernels", "fused NF4 expert MLP and routed adapter vs grouped_mm baselines"),
    "train": ("perft_qlora.bench.train", "training tokens/s and memory: perft_qlora vs hf-qlora, hf-bf16, bnb-param4"),
    "generate": ("perft_qlora.bench.generate", "greedy decode tokens/s per kernel backend, 1 stream and a batch"),
    "gpu-check": ("perft_qlora.bench.gpu_check", "everything a GPU session measures, in one time-boxed run"),
}


def _usage() -> str:
    lines = ["usage: python -m perft_qlora.bench <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines + ["", "python -m perft_qlora.bench <command> --help for its options"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
