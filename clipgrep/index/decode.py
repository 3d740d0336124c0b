"""Decode image files into model inputs in worker processes, turning every failure into a skip reason.

``decode_images(paths, config)`` yields one ``Decoded`` per path, **in input order**: either
the float32 ``[3, H, W]`` array ``load_image`` makes, or a short reason the file was skipped
("truncated or corrupt image", "too many pixels (250 MP > 200 MP)", ...). It never raises for a
bad file and never waits forever on one:

- Decoding runs in a ``ProcessPoolExecutor`` started with "forkserver" (or "spawn"), never
  plain fork, because the parent runs onnxruntime threads and forking a threaded process can
  deadlock the child. ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: when a
  worker dies (a segfault in a C decoder) the executor fails the outstanding futures with
  ``BrokenProcessPool``, whereas ``Pool`` replaces the worker and leaves the lost task's result
  pending forever.
- At most ``lookahead`` paths are taken from the input and not yet yielded, so memory stays
  bounded (~600 KB a result) when the consumer, the encoder, is slower than the decoders.
- A broken pool is replaced; the files that were in flight are decoded again one at a time
  until the one that crashes the decoder is found and skipped as "decoder crashed". A file
  that decodes for longer than ``DecodeLimits.max_decode_seconds`` is skipped the same way,
  after its worker is killed.
- Results are identical with ``workers=0`` (in-process) and with workers: both run
  ``decode_file``, which applies the limits itself rather than relying on PIL's globals.
- Workers return the float32 arrays, not uint8 for the parent to normalise: measured on
  224x224, receiving float32 costs the parent ~0.3 ms more CPU per image than uint8, but
  normalising there would cost it ~0.9 ms, and the parent's CPU is the encoder's. Tasks are
  not chunked: a task's round trip (~0.3 ms) is under 1 % of a photo's decode (~40 ms).
- Only the formats in ``embed.formats.FORMATS`` are opened (an EPS named .jpg would otherwise
  run Ghostscript), and only regular files, opened without blocking (``regular_file``). HEIC/HEIF
  opens through pillow-heif when installed (the ``heif`` extra).
- Memory is bounded per decode: ``DecodeLimits.max_decoded_pixels`` caps what is decoded after
  the JPEG draft (PIL holds 4 bytes a pixel, twice over while turning an image upright), and
  ``preprocess`` never builds a resize larger than ``MAX_RESIZED_PIXELS``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import signal
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..embed.formats import NEEDS_HEIF, UnsupportedImageFormat, open_image
from ..embed.onnx import available_cpus
from ..embed.preprocess import ImageTooLarge, PreprocessConfig, load_image
from ..errors import ClipgrepError
from .regular_file import NOT_REGULAR, NotRegularFile, open_regular

# What a decode task returns: (pixels, None) or (None, skip reason). Plain tuples pickle cheaply.
Outcome = tuple[np.ndarray | None, str | None]

CRASHED = "decoder crashed"
CORRUPT = "truncated or corrupt image"

# Below this many paths, with workers left to the default, decode in-process: the first pool
# of a process costs 0.25-0.5 s (fork server start, measured on 2 busy cores), about what two
# workers save on 12-16 photos at ~45 ms of CPU each.
SMALL_JOB = 16
_START_TIMEOUT_S = 60.0  # a worker that has not started by then is not going to

# What PIL's plugins raise on malformed data besides OSError (parsers index, unpack and divide
# whatever the header claims).
_CORRUPT_DATA_ERRORS = (SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
                        KeyError, TypeError, ZeroDivisionError, OverflowError, NotImplementedError)


@dataclass(frozen=True)
class DecodeLimits:
    """Per-file limits; a file over any of them is skipped, not decoded."""

    max_pixels: int = 200_000_000  # width * height from the header; decompression-bomb guard
    # width * height actually decoded, after the JPEG draft: PIL holds 4 bytes a pixel, twice over
    # for an image turned upright or with alpha. Measured at 32 MP, shortest edge 224: a worker
    # peaks at 171 MB RSS (293 MB turned or RGBA). Takes 24 MP HEIC, PNG and TIFF; JPEGs far
    # larger decode at reduced size and never come near it.
    max_decoded_pixels: int = 32_000_000
    max_file_bytes: int = 1 << 30
    # Only enforceable in worker processes (workers > 0): an in-process decode cannot be interrupted.
    max_decode_seconds: float = 60.0


@dataclass(frozen=True)
class Decoded:
    """One input path's result: pixels when decoded, else a short human reason it was skipped."""

    index: int  # position of the path in the input sequence
    pixels: np.ndarray | None  # float32 [3, H, W]
    skip_reason: str | None


class SkipImage(Exception):
    """Raised inside decoding for a file that must be skipped; its message is the reason."""


def decode_images(
    paths: Iterable[str],
    config: PreprocessConfig,
    *,
    workers: int | None = None,
    lookahead: int = 64,
    draft: bool = True,
    limits: DecodeLimits = DecodeLimits(),
) -> Generator[Decoded, None, None]:
    """Decode ``paths`` for the image encoder; yields one ``Decoded`` per path, in input order.

    ``workers`` is the number of decode processes: ``None`` means one per CPU this process
    may run on (in-process for fewer than ``SMALL_JOB`` paths), ``0`` decodes in-process.
    ``paths`` may be any iterable and is read lazily, at most ``lookahead`` paths ahead of
    what has been yielded. ``close()`` it to stop early: that shuts the workers down.
    """
    if lookahead < 1:  # checked here, not at the first next(), hence no `yield` in this function
        raise ValueError(f"lookahead must be at least 1, got {lookahead}")
    count = _pool_size(paths, workers)
    outcomes = map_ordered(_DecodeTask(config, draft, limits), paths, workers=count,
                           lookahead=lookahead, timeout_s=limits.max_decode_seconds)
    return _numbered(outcomes)


def _numbered(outcomes: Generator[Outcome, None, None]) -> Generator[Decoded, None, None]:
    with contextlib.closing(outcomes):  # closing this closes the pool now, not whenever GC runs
        for index, (pixels, reason) in enumerate(outcomes):
            yield Decoded(index, pixels, reason)


def _pool_size(paths: Iterable[str], workers: int | None) -> int:
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (in-process) or more, got {workers}")
    known = len(paths) if isinstance(paths, Sized) else None
    if workers is None:
        if known is not None and known < SMALL_JOB:
            return 0
        workers = available_cpus()
    return workers if known is None else min(workers, known)


# --- one file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DecodeTask:
    """Picklable ``path -> Outcome`` for the pool: the config travels with each task (~300 bytes)."""

    config: PreprocessConfig
    draft: bool
    limits: DecodeLimits

    def __call__(self, path: str) -> Outcome:
        return decode_file(path, self.config, draft=self.draft, limits=self.limits)


def decode_file(path: str, config: PreprocessConfig, *, draft: bool = True,
                limits: DecodeLimits = DecodeLimits()) -> Outcome:
    """``(load_image's array, None)`` for a good file, ``(None, reason)`` for any other. Never raises."""
    try:
        with _open_regular(path, limits) as f:
            return _decode_stream(f, config, draft, limits), None
    except Exception as e:  # noqa: BLE001 - every failure of one file becomes its skip reason
        return None, classify_error(e)


def decode_bytes(data: bytes, config: PreprocessConfig, *, draft: bool = True,
                 limits: DecodeLimits = DecodeLimits()) -> Outcome:
    """``decode_file`` for a file's bytes fetched from elsewhere (an object store): the same
    checks and skip reasons, but no file-system ones. Never raises."""
    try:
        if not data:
            raise SkipImage("empty file")
        if len(data) > limits.max_file_bytes:
            raise SkipImage(f"file too large ({_bytes(len(data))} > {_bytes(limits.max_file_bytes)})")
        return _decode_stream(io.BytesIO(data), config, draft, limits), None
    except Exception as e:  # noqa: BLE001 - every failure of one file becomes its skip reason
        return None, classify_error(e)


def _decode_stream(f: BinaryIO, config: PreprocessConfig, draft: bool, limits: DecodeLimits) -> np.ndarray:
    with _strict_quiet_pil(limits):
        _check_image_header(f, limits)
        return load_image(f, config, draft=draft, max_pixels=limits.max_decoded_pixels)


@contextlib.contextmanager
def _open_regular(path: str, limits: DecodeLimits) -> Iterator[BinaryIO]:
    # The size checks use the fstat of the open file, so they apply to the file actually read.
    f, info = open_regular(path)
    with f:
        if info.st_size == 0:
            raise SkipImage("empty file")
        if info.st_size > limits.max_file_bytes:
            raise SkipImage(f"file too large ({_bytes(info.st_size)} > {_bytes(limits.max_file_bytes)})")
        yield f


@contextlib.contextmanager
def _strict_quiet_pil(limits: DecodeLimits) -> Iterator[None]:
    """PIL settings for one decode, whatever the process's globals say; restored afterwards.

    Truncated files must fail (LOAD_TRUNCATED_IMAGES pads them with grey); PIL's own bomb
    checks (which also run on GIF frames and TIFF tiles, not just the header) fire at twice
    our limit instead of its default; and its warnings (DecompressionBombWarning, palette
    transparency, "Corrupt EXIF data") are dropped, since a library must not print.
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = limits.max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_image_header(f: BinaryIO, limits: DecodeLimits) -> None:
    """Refuse, from the header alone, what must not be decoded; leaves ``f`` at its start."""
    try:
        with open_image(f) as im:  # parses the header only; pixels are decoded by load_image
            width, height = im.size
    finally:
        f.seek(0)
    if width * height > limits.max_pixels:  # Image.MAX_IMAGE_PIXELS semantics
        raise ImageTooLarge(width * height, limits.max_pixels)


def classify_error(exc: BaseException) -> str:
    """The short, human skip reason for an exception raised while opening or decoding a file."""
    if isinstance(exc, (SkipImage, UnsupportedImageFormat, ImageTooLarge)):
        return str(exc)
    if isinstance(exc, (NotRegularFile, IsADirectoryError)):
        return NOT_REGULAR
    if isinstance(exc, BrokenProcessPool):
        return CRASHED
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own check on a frame or tile
        return "too many pixels"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "vanished during indexing"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    if isinstance(exc, OSError) and exc.errno is not None:  # the OS refused: EIO, ELOOP, ENAMETOOLONG...
        return f"unreadable: {os.strerror(exc.errno).lower()}"
    if isinstance(exc, (OSError, *_CORRUPT_DATA_ERRORS)):  # PIL: "image file is truncated", "decoder error"
        return CORRUPT
    return f"decoder error ({type(exc).__name__})"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


# --- running tasks in worker processes -------------------------------------------------------


def map_ordered(
    task: Callable[[str], Outcome],
    items: Iterable[str],
    *,
    workers: int,
    lookahead: int,
    timeout_s: float | None = None,
) -> Generator[Outcome, None, None]:
    """``task(item)`` for each item, in order, in ``workers`` processes (0: in-process).

    ``task`` must be picklable and return an ``Outcome`` without raising. A task whose worker
    dies yields ``(None, "decoder crashed")``; one running longer than ``timeout_s`` (workers
    only) yields ``(None, "decoder timed out (> N s)")``. Public so tests can run crashing
    and sleeping tasks through the same machinery ``decode_images`` uses.
    """
    if workers < 0 or lookahead < 1:
        raise ValueError(f"need workers >= 0 and lookahead >= 1, got {workers} and {lookahead}")
    if workers == 0:
        return (task(item) for item in items)  # lazy too: one path taken per result
    return _OrderedPool(task, workers, timeout_s).run(items, lookahead)


@dataclass
class _Job:
    item: str
    future: Future[Outcome]
    outcome: Outcome | None = None  # set once known; the future is then no longer consulted


@dataclass
class _OrderedPool:
    """A ProcessPoolExecutor fed a bounded window of jobs, replaced whenever it breaks."""

    task: Callable[[str], Outcome]
    workers: int
    timeout_s: float | None
    _pool: ProcessPoolExecutor | None = None  # started by the first submit after a replacement
    window: deque[_Job] = field(default_factory=deque)

    def run(self, items: Iterable[str], lookahead: int) -> Generator[Outcome, None, None]:
        source = iter(items)
        try:
            while True:
                self._fill(source, lookahead)
                if not self.window:
                    return
                outcome = self._result(self.window[0])
                self.window.popleft()
                yield outcome  # refilling waits for the next request: the window stays <= lookahead
        finally:
            self._drop_pool()

    def _fill(self, source: Iterator[str], lookahead: int) -> None:
        while len(self.window) < lookahead:
            item = next(source, _END)
            if item is _END:
                return
            self.window.append(_Job(item, self._submit(item)))

    def _submit(self, item: str) -> Future[Outcome]:
        if self._pool is None:
            self._pool = _start_pool(self.workers)
        try:
            return self._pool.submit(self.task, item)
        except BrokenProcessPool as e:  # broke since the last result: handled like a job it took down
            future: Future[Outcome] = Future()
            future.set_exception(e)
            return future

    def _result(self, job: _Job) -> Outcome:
        if job.outcome is None:
            try:
                job.outcome = job.future.result(timeout=self.timeout_s)
            except BrokenProcessPool:
                self._find_culprit(self._settle())
            except FutureTimeout:
                job.outcome = (None, self._timed_out())
                self._kill_workers()  # fails the other jobs in flight; they did nothing wrong
                self._resubmit_on_new_pool(self._settle())
            except Exception as e:  # noqa: BLE001 - e.g. a result that failed to unpickle
                job.outcome = (None, classify_error(e))
        assert job.outcome is not None  # _find_culprit settles every lost job, this one first
        return job.outcome

    def _settle(self) -> list[_Job]:
        """After a break: keep the results that arrived; return the jobs the break took down."""
        pending = [j for j in self.window if j.outcome is None]
        wait_futures([j.future for j in pending])  # a broken executor fails them all promptly
        lost = []
        for job in pending:
            error = job.future.exception()
            if isinstance(error, BrokenProcessPool):
                lost.append(job)
            else:
                job.outcome = job.future.result() if error is None else (None, classify_error(error))
        return lost

    def _find_culprit(self, lost: list[_Job]) -> None:
        """A worker died on one of ``lost``: run them alone, in order, until one breaks the pool again.

        That one is skipped and the rest go back to running in parallel. A death that does
        not repeat (a worker killed from outside) costs one sequential pass and skips nothing.
        """
        self._drop_pool()
        for position, job in enumerate(lost):
            if self._run_alone(job):
                self._resubmit_on_new_pool(lost[position + 1:])
                return

    def _run_alone(self, job: _Job) -> bool:
        """Run ``job`` with nothing else in flight; True when it broke the pool (crash or timeout)."""
        job.future = self._submit(job.item)
        try:
            job.outcome = job.future.result(timeout=self.timeout_s)
        except BrokenProcessPool:
            job.outcome = (None, CRASHED)
            return True
        except FutureTimeout:
            job.outcome = (None, self._timed_out())
            self._kill_workers()
            return True
        except Exception as e:  # noqa: BLE001
            job.outcome = (None, classify_error(e))
        return False

    def _resubmit_on_new_pool(self, jobs: list[_Job]) -> None:
        self._drop_pool()
        for job in jobs:
            job.future = self._submit(job.item)

    def _drop_pool(self) -> None:
        if self._pool is not None:
            # Nothing more is wanted from these workers. Terminate them rather than let them finish:
            # a worker stuck in a decoder would otherwise hold up interpreter exit, which joins them.
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                if process.is_alive():
                    process.terminate()
            self._pool = None

    def _kill_workers(self) -> None:
        if self._pool is not None:
            _kill_workers(self._pool)

    def _timed_out(self) -> str:
        return f"decoder timed out (> {self.timeout_s:g} s)"


_END: Any = object()  # end of input; any str, even "", is an item


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers are known to start; raises ClipgrepError when they cannot.

    Without this check, workers that die while starting (an unguarded ``__main__`` re-run
    by spawn/forkserver, a broken environment) would look like a decoder crash on every
    file, and every file would be recorded as skipped.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_init_worker,
                               initargs=(_lifeline(),))
    try:
        pool.submit(os.getpid).result(timeout=_START_TIMEOUT_S)
    except (BrokenProcessPool, FutureTimeout, OSError) as e:
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise ClipgrepError(
            "image decoder processes failed to start",
            "a script that calls clipgrep must guard its entry point with `if __name__ == '__main__':`; "
            "or decode in-process with workers=0",
        ) from e
    return pool


def _mp_context() -> multiprocessing.context.BaseContext:
    # Never plain fork: the parent may have onnxruntime (or any) threads running, and a
    # forked child inherits their locks in whatever state they were in. The fork server is a
    # fresh, single-threaded interpreter started once; workers fork from it (a pool starts in
    # ~30 ms; with spawn every worker re-imports numpy and PIL, 0.6-1 s a pool). Preloading
    # this module makes those imports happen once, in the server; "__main__" (the default
    # preload) must stay, or every worker re-imports the main script (for the CLI,
    # clipgrep.cli and Typer). A process-wide setting, read when the fork server first starts.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


_lifeline_ends: tuple[Any, Any] | None = None


def _lifeline() -> Any:
    """The read end of a pipe whose write end only this process holds, for workers to watch.

    Workers are children of the fork server, not of this process, so nothing tells them when
    it dies (kill -9 left them, and the resource tracker, running for minutes). The kernel
    closes the write end however this process ends; the workers then read EOF and exit.
    """
    global _lifeline_ends
    if _lifeline_ends is None:
        _lifeline_ends = _mp_context().Pipe(duplex=False)
    return _lifeline_ends[0]


def _exit_with_parent(lifeline: Any) -> None:
    try:
        lifeline.recv_bytes()  # nothing is ever sent: this returns (EOFError) when the parent is gone
    except (EOFError, OSError):
        pass
    os._exit(0)


def _init_worker(lifeline: Any) -> None:
    threading.Thread(target=_exit_with_parent, args=(lifeline,), name="lifeline", daemon=True).start()
    # Ctrl-C reaches the whole process group; only the parent should act on it (it shuts the
    # pool down), rather than each worker dying mid-task and breaking the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # PIL logs a few errors (TIFF); with no handler configured, logging's last resort would
    # print them to the terminal from the worker.
    logging.getLogger("PIL").addHandler(logging.NullHandler())


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    # No public API before Python 3.14 (terminate_workers); _processes exists from 3.2 to 3.14.
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()


__all__ = [
    "CORRUPT", "CRASHED", "NEEDS_HEIF", "SMALL_JOB", "DecodeLimits", "Decoded", "Outcome", "SkipImage",
    "classify_error", "decode_bytes", "decode_file", "decode_images", "map_ordered",
]
