"""``python -m perft_qlora.bench <command> [options]``: one benchmark per command.

Add a command by adding a row to ``COMMANDS``: its module must define ``main(argv) -> int``. Errors end as
one ``error:`` line (``--debug`` for the traceback); ``kernels --smoke`` on a machine without CUDA sets
``TRITON_INTERPRET=1`` itself, before Triton is imported.
"""

from __future__ import annotations

import importlib
import os
import sys

from ..cli import error_path, quiet_library_notices

COMMANDS = {
    "kernels": ("perft_qlora.bench.kernels", "fused NF4 expert MLP and routed adapter vs grouped_mm baselines"),
    "load": ("perft_qlora.bench.load", "load time and host/device peaks: load_model vs HF's load_in_4bit and bf16 loads"),
    "train": ("perft_qlora.bench.train", "training tokens/s and memory: perft_qlora vs hf-qlora, hf-bf16, bnb-param4"),
    "generate": ("perft_qlora.bench.generate", "greedy decode tokens/s per kernel backend, 1 stream and a batch"),
    "gpu-check": ("perft_qlora.bench.gpu_check", "everything a GPU session measures, in one time-boxed run"),
}


def _usage() -> str:
    lines = ["usage: python -m perft_qlora.bench <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines + ["", "python -m perft_qlora.bench <command> --help for its options"])


def _interpret_triton_on_cpu(command: str, argv: list[str]) -> None:
    """``kernels --smoke`` without CUDA runs Triton's interpreter, which must be chosen before Triton is imported."""
    if command == "kernels" and "--smoke" in argv:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _interpret_triton_on_cpu(argv[0], argv[1:])
    quiet_library_notices()  # before the command's module imports bitsandbytes, which logs its notice then
    with error_path(debug, on_interrupt=lambda: "nothing was saved (results are written when a run finishes)"):
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
