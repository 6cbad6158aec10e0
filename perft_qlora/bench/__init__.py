"""Benchmarks: ``python -m perft_qlora.bench <command> [options]`` (commands in ``__main__.COMMANDS``)."""
