"""The project's error types, at the bottom of the package: every package's errors derive from
:class:`PerftQloraError`, so the entry points' one error path (``cli.error_path``) catches them all without
knowing the packages above it.

A ``PerftQloraError`` is caused by the user's input (an option, a file, a directory, a model of another
family) and its message names the problem and the fix. Raise one of these instead of ``SystemExit("error: …")``.
"""

from __future__ import annotations


class PerftQloraError(ValueError):
    """A problem with the user's input or machine, reported as one ``error: <what and the fix>`` line."""


class UsageError(PerftQloraError):
    """A bad option value, file or directory found before any model loads; the message names the fix."""
