"""``perft-qlora <command> [options]``: the installed console script, one subcommand per ``python -m`` entry point.

    perft-qlora train --demo
    perft-qlora generate --model perft-demo/base --adapter perft-demo/adapter "Repeat the text." --input hello
    perft-qlora app --demo

Each subcommand runs the same ``main(argv)`` as its ``python -m`` module (``COMMANDS`` maps one to the other, by
module name, so nothing is imported before the command is chosen), behind :func:`cli.run_command`'s log filter.
``python -m perft_qlora <command>`` does the same.
"""

from __future__ import annotations

import sys

from .cli import run_command

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("perft_qlora.training.train", "fine-tune a PERFT (or LoRA) adapter on an NF4 MoE model"),
    "evaluate": ("perft_qlora.evaluation.evaluate", "score a base model and adapters on the paper's tasks"),
    "generate": ("perft_qlora.serving.generate", "answer an instruction in the adapter's prompt template"),
    "export": ("perft_qlora.exporting.export", "write base + adapter as a folder plain transformers opens"),
    "plan": ("perft_qlora.plan", "memory plan: weights, adapters, optimizer, activations, GPU fit"),
    "analyze": ("perft_qlora.analysis.analyze", "where the PEFT experts sit: cosines, maps, routing"),
    "bench": ("perft_qlora.bench.__main__", "benchmarks: kernels, load, train, generate, gpu-check"),
    "app": ("perft_qlora.app", "the Gradio app: base and adapters side by side (pip install 'perft-qlora[app]')"),
}
PROG = "perft-qlora"


def usage() -> str:
    lines = [f"usage: {PROG} <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines + ["", f"{PROG} <command> --help for its options (the same as python -m perft_qlora.<command>)"])


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named by ``argv[0]``; returns its exit status (0 when its ``main`` returns a value
    that is not one, e.g. evaluate's summary)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    result = run_command(COMMANDS[command][0], rest)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
