"""Exit codes of every cadbcnn command, in one place.

| code | meaning |
|---:|---|
| 0 | done |
| 1 | partial results: some input files could not be read (their rows say why; everything else was written) |
| 2 | usage or input error — bad arguments, missing files, a model or output that cannot be used — refused, as far
|   | as it can be known, before any work |
| 3 | a gate failed: an artifact did not pass a check it must pass (``GateError``, with its report) |
| 130 | interrupted (finished work is kept) |

Commands wrap themselves in ``cli_errors``; library code only raises typed errors (``cadbcnn_runtime.errors``).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

from .errors import CadbcnnError, GateError

F = TypeVar("F", bound=Callable)

OK, PARTIAL, USAGE, GATE, INTERRUPTED = 0, 1, 2, 3, 130


def exit_code_of(exc: CadbcnnError) -> int:
    """A typed error's exit code; a per-file error that stopped a whole command is a usage/input error (2)."""
    return USAGE if exc.exit_code == PARTIAL else exc.exit_code


def cli_errors(fn: F) -> F:
    """Command decorator: a ``CadbcnnError`` becomes ``error: …`` on stderr and its exit code (a ``GateError``'s
    report is printed first). Anything else is a bug and keeps its traceback."""
    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CadbcnnError as exc:
            if isinstance(exc, GateError) and exc.report:
                typer.echo(exc.report)
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exit_code_of(exc)) from None

    return wrapper  # type: ignore[return-value]
