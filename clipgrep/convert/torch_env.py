"""Importing torch and open_clip for conversion and training, and nothing else.

This is the only module that imports open_clip. Runtime code (index, search)
never reaches it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from types import ModuleType

from ..errors import NeedsExtra

_INSTALL_HINT = "install the conversion extra: pip install 'clipgrep[convert]' -c constraints.txt"


def import_torch() -> ModuleType:
    try:
        import torch
    except ImportError:
        raise NeedsExtra("this command needs torch, which is not installed", _INSTALL_HINT) from None
    return torch


_torchvision_schemas: object = None


def _import_torchvision(torch: ModuleType) -> None:
    """Import torchvision even when its C extension cannot load.

    PyPI only serves CUDA builds of torchvision; with a CPU torch its ``_C.so``
    fails to load, and torchvision then crashes on import because the fake
    kernels for ``nms``/``qnms`` are registered unguarded. Defining those two
    operator schemas first lets the import finish; only torchvision's C++ ops
    (nms, roi_align, decode_jpeg) stay unavailable, and open_clip uses none.

    Still needed wherever torch is a CPU build but torchvision came from PyPI: a
    mirror that serves only a CPU torch (this project's CI), or a user who installed
    CPU torch first and then ``clipgrep[convert]`` from PyPI. With both from PyTorch's
    CPU index (the README's commands, ``make test``) the first import succeeds and
    this does nothing.
    """
    try:
        import torchvision

        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    except ImportError:
        return  # open_clip reports a missing torchvision itself
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        lib.define(schema)
    global _torchvision_schemas
    _torchvision_schemas = lib  # the schemas live only as long as this object
    import torchvision  # noqa: F401


def import_open_clip() -> ModuleType:
    """Return the ``open_clip`` module, importing torch and torchvision safely first."""
    loaded = sys.modules.get("open_clip")
    if loaded is not None:  # (a None entry means the import is blocked: fall through to the error)
        return loaded
    torch = import_torch()
    _import_torchvision(torch)
    try:
        import open_clip
    except ImportError:
        raise NeedsExtra("this command needs open_clip_torch, which is not installed", _INSTALL_HINT) from None
    return open_clip


@contextlib.contextmanager
def quiet_open_clip_logging() -> Iterator[None]:
    """open_clip logs "Loaded ... config", "initialized randomly" and the like to the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
