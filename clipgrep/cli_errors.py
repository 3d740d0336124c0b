"""How every command turns errors into one stderr line and a grep-like exit code."""
from __future__ import annotations

import errno
import functools
import os
import re
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
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how LanceDB (Rust) quotes the errno it got


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
        except Exception as e:  # a bug, or a disk that is full or cannot be written: still one line
            if os.environ.get(DEBUG_ENV):
                raise
            render.error(storage_error(e) or ClipgrepError(
                f"internal error: {type(e).__name__}: {e}", f"rerun with {DEBUG_ENV}=1 for a traceback and report it"))
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


def storage_error(error: BaseException) -> ClipgrepError | None:
    """A full disk or an unwritable directory behind ``error`` (or what caused it), in the user's words.

    One place for every call site: Python's OSError carries the errno, LanceDB's errors quote
    it as "(os error N)" in their text, possibly as the cause of another exception.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            return _describe(seen.errno, seen.filename)
        match = _RUST_OS_ERROR.search(str(seen))
        if match and int(match.group(1)) in _STORAGE_ERRNOS:
            return _describe(int(match.group(1)), None)
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(code: int, filename: object) -> ClipgrepError:
    from .paths import home

    state = str(home())
    path = os.fsdecode(filename) if isinstance(filename, (str, bytes)) else state
    where = state if _inside(path, state) else path
    elsewhere = "or point CLIPGREP_HOME at another directory"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ClipgrepError(f"no space left on {_mount_point(where)}", f"free some space there, {elsewhere}")
    if code == errno.EROFS:
        return ClipgrepError(f"{where} is read-only", f"remount it read-write, {elsewhere}")
    return ClipgrepError(f"permission denied: {path}", f"make {where} writable for you, {elsewhere}")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
