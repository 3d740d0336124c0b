"""How the command line reads argv and writes help: the Click classes behind the Typer app.

- ``-h`` is ``--help`` on every command (grep, rg and fd users type it).
- Help and version text that cannot be written is handled like results
  (``cli_errors.output_failed``): ``--help | head`` exits 0, ``--help > /dev/full``
  is one line and 2. Click would exit 1 (grep's "no match") or crash.
- ``clipgrep search dog -0.5:cat``: a term with a negative weight starts with a
  dash, so Click would read it as options (``-0`` is ``--null``).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from .cli_errors import output_failed
from .query import has_negative_weight

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}  # inherited by every subcommand's context


@contextmanager
def _output_errors() -> Iterator[None]:
    """Commands handle their own errors (``handle_errors``); what reaches here is Click writing help."""
    try:
        yield
    except OSError as e:
        raise typer.Exit(output_failed(e)) from None
    except SystemExit as e:
        # Rich, which typer writes help with, meets a closed stdout pipe by pointing stdout at
        # /dev/null and exiting 1; nothing in clipgrep itself raises SystemExit.
        if e.code != 1:
            raise
        raise typer.Exit(output_failed(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)))) from None


class ClipgrepGroup(TyperGroup):
    """The root command: its help is written while making its context, every subcommand's while invoking."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _output_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _output_errors():
            return super().invoke(ctx)


class SearchCommand(TyperCommand):
    """``search``: negative-weight terms go behind ``--``, where Click takes every word as a term.

    Values of options are left alone (``--sub -0.5:cat`` already works), as is all after a ``--``.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        value_options = {opt for p in self.params if isinstance(p, TyperOption) and not p.is_flag
                         for opt in p.opts}
        return super().parse_args(ctx, negative_terms_last(args, value_options))


def negative_terms_last(args: list[str], value_options: set[str]) -> list[str]:
    """``["dog", "-0.5:cat", "-k", "3"]`` -> ``["dog", "-k", "3", "--", "-0.5:cat"]``.

    Terms only add up, so their order does not matter.
    """
    kept: list[str] = []
    terms: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            return [*kept, "--", *terms, *rest]
        if has_negative_weight(arg):
            terms.append(arg)
            continue
        kept.append(arg)
        if arg in value_options:  # its value, whatever it looks like
            value = next(rest, None)
            if value is not None:
                kept.append(value)
    return [*kept, "--", *terms] if terms else kept
