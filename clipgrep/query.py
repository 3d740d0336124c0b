"""Query syntax: what each search term means. Stdlib only, so the CLI can read argv with it.

A term is ``[WEIGHT:]TEXT`` or ``[WEIGHT:]IMAGE``: ``"2:golden retriever"``,
``-0.5:cat``, ``pool.jpg``; ``text:`` forces text, a leading backslash keeps a
literal ``N:`` (``"\\12:30 train"``).
"""
from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ClipgrepError

# "2:dog", "-0.5:cat", "+1.5:sea"; a backslash before the number keeps it literal ("\12:30 train").
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.*)$", re.DOTALL)
TEXT_PREFIX = "text:"


@dataclass(frozen=True)
class QueryTerm:
    weight: float
    text: str | None = None
    image: Path | None = None

    def describe(self) -> str:
        return f"{self.weight:g} x {'image ' + str(self.image) if self.image else repr(self.text)}"


def has_negative_weight(raw: str) -> bool:
    """``-0.5:cat``: a term, although it starts with a dash like an option."""
    return raw.startswith("-") and _WEIGHT.match(raw) is not None


def parse_term(raw: str, sign: float = 1.0) -> QueryTerm:
    """One query term: optional ``WEIGHT:`` prefix, then an image path or text.

    An existing regular file is an image query; prefix ``text:`` to search for text
    that happens to name a file. Anything else is text, however long or odd.
    """
    weight = 1.0
    match = _WEIGHT.match(raw)
    if match:
        weight, raw = float(match.group(1)), match.group(2)
        if not math.isfinite(weight):  # a 400-digit weight parses as inf and would turn every score into nan
            raise ClipgrepError(f"the weight {match.group(1)[:20]}... is too large",
                                "use a weight like 2 or -0.5; only the ratios between weights matter")
    elif raw.startswith("\\"):
        raw = raw[1:]
    weight *= sign
    if raw.startswith(TEXT_PREFIX):
        return QueryTerm(weight, text=raw[len(TEXT_PREFIX):])
    image = _regular_file(raw)
    if image is not None:
        return QueryTerm(weight, image=image)
    return QueryTerm(weight, text=raw)


def _regular_file(raw: str) -> Path | None:
    """The absolute path ``raw`` names if it is an existing regular file (as the scanner stores paths).

    Any text can reach here: a caption longer than a file name, a NUL byte, a FIFO
    or device named like an image. None of them is an image query.
    """
    if not raw:
        return None
    try:
        path = os.path.abspath(os.path.expanduser(raw))
        return Path(path) if stat.S_ISREG(os.stat(path).st_mode) else None
    except (OSError, ValueError):  # ENAMETOOLONG, ENOENT, EACCES...; ValueError: an embedded NUL
        return None


def parse_query(queries: Sequence[str], add: Sequence[str] = (), sub: Sequence[str] = ()) -> list[QueryTerm]:
    terms = [parse_term(q) for q in queries] + [parse_term(q) for q in add] + [parse_term(q, -1.0) for q in sub]
    if not terms:
        raise ClipgrepError("no query given", 'pass some text, e.g. clipgrep search "a red bicycle"')
    if not any(t.weight for t in terms):
        raise ClipgrepError("all query weights are zero", "give at least one term a non-zero weight")
    return terms
