"""The one error type users see.

Library code raises these; only the CLI edge renders them (one line on stderr)
and picks the exit code. Nothing below ``cli`` prints or exits.
"""
from __future__ import annotations


class ClipgrepError(Exception):
    """A problem the user can fix: ``message`` says what went wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class BundleError(ClipgrepError):
    """A model bundle is missing, incomplete, tampered with or of an unknown format."""


class ModelNotFound(ClipgrepError):
    """No installed model has the requested name."""


class ConversionError(ClipgrepError):
    """An open_clip model could not be loaded, exported or failed its parity gate."""


class NeedsExtra(ClipgrepError):
    """An optional dependency (torch, open_clip) is needed for this command."""


def first_line(error: BaseException) -> str:
    """The first line of a third-party exception's text (or its type), for a one-line message."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
