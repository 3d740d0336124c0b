"""How every command turns errors into one stderr line and a grep-like exit code."""
from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from . import render
from .errors import ClipgrepError

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes follow grep: 0 results, 1 no results, 2 error.
EXIT_NO_MATCH = 1
EXIT_ERROR = 2
DEBUG_ENV = "CLIPGREP_DEBUG"


def handle_errors(command: F) -> F:
    """Render a ClipgrepError as one stderr line with exit 2; tracebacks only with CLIPGREP_DEBUG=1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ClipgrepError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            render.error(e)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError as e:
            raise typer.Exit(output_failed(e)) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: still one line, with the way to see more
            if os.environ.get(DEBUG_ENV):
                raise
            render.error(ClipgrepError(f"internal error: {type(e).__name__}: {e}",
                                       f"rerun with {DEBUG_ENV}=1 for a traceback and report it"))
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def output_failed(error: OSError) -> int:
    """The exit code once stdout could not be written (results, help text, the final flush).

    The reader went away (`| head`): stop quietly with 0, as grep does. Anything
    else (`> /dev/full`, a full disk) is one line on stderr and 2.
    """
    render.abandon_stdout()
    if error.errno == errno.EPIPE:
        return 0
    try:
        render.error(render.output_error(error))
    except OSError:  # stderr is gone too: the exit code is all that is left
        pass
    return EXIT_ERROR
