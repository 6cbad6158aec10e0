"""`python -m perft_qlora.export`: see perft_qlora/exporting/export.py."""

from .cli import run_command


def main(argv: list[str] | None = None):
    return run_command("perft_qlora.exporting.export", argv)


if __name__ == "__main__":
    main()
