"""The one error path of every command-line entry point (train, evaluate, bench, the app).

- The project's error types and the library errors a user's input can cause (missing files, unreadable
  safetensors, a hub name that does not resolve, out of memory) end as one line, ``error: <what and the fix>``,
  and exit status 1. ``--debug`` or ``PERFT_QLORA_DEBUG=1`` re-raises them with the traceback instead.
- Ctrl-C ends as one line saying what was saved and how to resume (exit status 130).
- Either line is printed after every open progress bar is closed (``close_progress_bars``), so it is the last line.
- ``quiet_library_notices()``, called by each ``python -m`` entry point's ``main()`` before it imports the
  command (and so bitsandbytes), filters bitsandbytes' import-time notice "Failed to load CPU gemm_4bit_forward
  from kernels-community ..." (an optional CPU kernel package; the fallback it uses is what we test against)
  at its source logger. Library users importing ``perft_qlora`` see bitsandbytes' logging unchanged.
- The options every command shares: ``HelpFormatter``, ``positive_int``, ``add_debug_option``.

This module sits at the bottom of the package beside ``errors.py``: it imports nothing else from it, and
the error path catches :class:`~perft_qlora.errors.PerftQloraError`, the base of every package's errors.

Usage in a command::

    def main(argv=None):
        args = parse_args(argv)
        with error_path(args.debug, on_interrupt=lambda: "nothing was saved"):
            ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from .errors import PerftQloraError

DEBUG_ENV = "PERFT_QLORA_DEBUG"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_NOTICE)


def quiet_library_notices() -> None:
    """Drop bitsandbytes' kernels-community notice (idempotent); must run before bitsandbytes is imported."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())


def run_command(module: str, argv: list[str] | None = None):
    """A ``python -m`` entry point's ``main``: quiet the notice above, then import ``module`` and call its
    ``main(argv)`` (imported here, after the filter, because bitsandbytes logs its notice when first imported)."""
    import importlib

    quiet_library_notices()
    return importlib.import_module(module).main(argv)


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default stated once: ``(default: X)`` is added unless the help text states it
    already or there is none (None, a plain flag); descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """``type=`` for options that count something (rows, beams, tokens): an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_debug_option(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input or machine rather than by a bug: ours, and the libraries' for a file
    that cannot be read and a device out of memory (torch and safetensors imported here, when an error is
    being handled, so that ``--help`` and the planner stay light)."""
    import torch
    from safetensors import SafetensorError

    return (PerftQloraError, SafetensorError, OSError, torch.OutOfMemoryError)


def one_line(error: BaseException) -> str:
    """The error's message on one line, with a fix for the library errors that carry none."""
    import torch

    text = "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    if isinstance(error, torch.OutOfMemoryError):
        return f"out of memory ({text[:200]}); lower --batch-size or --max-length, or use a larger GPU"
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename is None:
        return text  # e.g. transformers' "not a valid model identifier": the message names the fix
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or text}: {error.filename}"
    return text


def close_progress_bars() -> None:
    """Close every open tqdm bar (training's, the loader's), so that the line printed next starts on a line of its
    own and stays the last one: a bar left open is redrawn after it when it is garbage-collected. tqdm is looked
    up, not imported: a command that drew no bar has none to close."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        with suppress(Exception):  # a bar that cannot redraw must not hide the error being reported
            bar.close()


@contextmanager
def error_path(debug: bool = False, on_interrupt: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn expected errors into ``error: …`` + exit 1 and Ctrl-C into one line + exit 130 (see module doc)."""
    try:
        yield
    except KeyboardInterrupt:
        if debug_requested(debug):
            raise
        saved = on_interrupt() if on_interrupt is not None else "nothing was saved"
        close_progress_bars()
        print(f"\ninterrupted: {saved}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug_requested(debug) or not isinstance(error, _expected_errors()):
            raise
        close_progress_bars()  # the error is the last line, not glued to a bar that is then redrawn
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
