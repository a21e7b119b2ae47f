"""Rendering for people (rich) and machines (--json); exit codes; one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

# Exit codes that mean something, shared by every command.
EXIT_OK = 0
EXIT_FAILED = 1  # a check failed / the job failed
EXIT_USAGE = 2  # bad input
EXIT_MISSING_WEIGHTS = 3
EXIT_INTERRUPTED = 130

console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """A failure the user can fix: printed as one line of what went wrong and one of how to fix it."""

    def __init__(self, message: str, fix: str = "", exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.exit_code = exit_code


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: str, fix: str = "") -> None:
    # soft_wrap: never break a path or a command at the console width (it must stay copy-pasteable)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if fix:
        err_console.print(f"[bold]fix:[/] {fix}", highlight=False, soft_wrap=True)


@contextmanager
def friendly_errors(debug: bool) -> Iterator[None]:
    """Turn UserError (and, without --debug, any exception) into a one-line message and an exit code."""
    try:
        yield
    except UserError as exc:
        print_error(exc.message, exc.fix)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print_error("interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (SystemExit, Exception) as exc:
        if isinstance(exc, SystemExit) or debug:
            raise
        print_error(f"{type(exc).__name__}: {exc}", "rerun with --debug for the full traceback")
        raise SystemExit(EXIT_FAILED) from None


def run_friendly(fn: Callable[[], int | None], debug: bool) -> None:
    with friendly_errors(debug):
        code = fn() or EXIT_OK
    raise SystemExit(code)
