"""`python -m perft_qlora.evaluate`: see perft_qlora/evaluation/evaluate.py."""

from .cli import run_command


def main(argv: list[str] | None = None):
    return run_command("perft_qlora.evaluation.evaluate", argv)


if __name__ == "__main__":
    main()
