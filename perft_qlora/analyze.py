"""`python -m perft_qlora.analyze`: see perft_qlora/analysis/analyze.py."""

from .cli import run_command


def main(argv: list[str] | None = None):
    return run_command("perft_qlora.analysis.analyze", argv)


if __name__ == "__main__":
    main()
