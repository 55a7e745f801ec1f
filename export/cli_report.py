"""The tail every site-adaptation subcommand shares: run the step, print a typed error with its fix, write the
JSON report (also on failure, when the error carries one), exit with the error's code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NoReturn

import typer

from cadbcnn_runtime.errors import CadbcnnError
from cadbcnn_runtime.exits import exit_code_of


def run_reported(step: Callable[[], dict[str, Any]], report: Path | None) -> NoReturn:
    code = 0
    try:
        rep = step()
    except CadbcnnError as exc:
        rep = getattr(exc, "report", None)
        typer.echo(f"error: {exc}", err=True)
        code = exit_code_of(exc)
    if report and rep is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    raise typer.Exit(code)
