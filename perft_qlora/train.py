"""`python -m perft_qlora.train`: see perft_qlora/training/train.py."""

from .cli import run_command


def main(argv: list[str] | None = None):
    return run_command("perft_qlora.training.train", argv)


if __name__ == "__main__":
    main()
