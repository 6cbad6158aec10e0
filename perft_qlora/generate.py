"""`python -m perft_qlora.generate`: see perft_qlora/serving/generate.py."""

from .cli import run_command


def main(argv: list[str] | None = None):
    return run_command("perft_qlora.serving.generate", argv)


if __name__ == "__main__":
    main()
