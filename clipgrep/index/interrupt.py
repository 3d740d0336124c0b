"""Ctrl-C and SIGTERM during an index run: stop at the next image and keep the work done.

``stop_on_signals()`` turns SIGINT and SIGTERM into a flag that the run polls. The run then
commits what it has encoded, publishes the snapshot and raises ``IndexInterrupted``, so the
work done is kept and searchable and a rerun resumes. A second signal acts as it would have
without this (the first may take a while to honour, e.g. during compaction).
Signals can be caught only in the main thread; elsewhere the flag simply never rises.

Example::

    with stop_on_signals() as stop:
        for item in work:
            if stop.signum is not None:
                break
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import IndexReport
    from .imported import ImportReport

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class IndexInterrupted(KeyboardInterrupt):
    """An index run or import stopped by a signal after committing its work; ``report`` says what
    it did and ``kept`` how many images it committed (new, changed, moved, copied or imported).

    A KeyboardInterrupt, so that code that handles Ctrl-C around ``update_index`` still does.
    """

    def __init__(self, signum: int, report: IndexReport | ImportReport, kept: int) -> None:
        super().__init__(f"index run interrupted by signal {signum}")
        self.signum = signum
        self.report = report
        self.kept = kept


@dataclass
class StopRequest:
    signum: int | None = None  # the first SIGINT/SIGTERM received, if any


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record SIGINT/SIGTERM in the yielded ``StopRequest`` for the ``with`` block."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: object) -> None:
        if request.signum is None:
            request.signum = signum
            return
        # Asked twice: stop the way it would have stopped (None: a handler not set from Python).
        signal.signal(signum, previous[signum] or signal.SIG_DFL)
        signal.raise_signal(signum)

    for signum in SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield request
    finally:
        for caught, old in previous.items():
            signal.signal(caught, old)
