"""Open a file for reading only if it is a regular file, without ever blocking on the open.

A photo folder can hold a FIFO or a link to a device under an image's name. Opening a FIFO
for reading blocks until a writer appears (forever, for an index run), and ``/dev/zero``
reads without end. The scanner only lists regular files, but a file can be swapped between
the scan and the read, so every reader (the decoder, the fingerprint, ``.clipgrepignore``)
opens through here: ``O_NONBLOCK`` so the open itself returns at once, then ``fstat`` on the
descriptor, so the check applies to the file that is actually read, not to whatever the path
names a moment later.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

NOT_REGULAR = "not a regular file"


class NotRegularFile(OSError):
    """The path names a FIFO, device, socket or directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EINVAL, NOT_REGULAR, os.fspath(path))


def open_regular(path: str | os.PathLike[str]) -> tuple[BinaryIO, os.stat_result]:
    """``path`` opened for binary reading, and its ``fstat``; raises ``NotRegularFile`` or the open's OSError.

    ``O_NONBLOCK`` changes nothing for a regular file's reads.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path)
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise
