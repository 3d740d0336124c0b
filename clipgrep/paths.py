"""Where clipgrep keeps its state (``$CLIPGREP_HOME`` or the platform data dir) and its caches."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CLIPGREP_HOME"


def home() -> Path:
    """The root of all clipgrep state (models, indexes).

    ``CLIPGREP_HOME`` relocates everything, e.g. onto a bigger disk or a tmp dir in tests.
    """
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path  # small, pure Python; imported lazily anyway

    return user_data_path("clipgrep", appauthor=False)


def models_dir() -> Path:
    return home() / "models"


def index_dir() -> Path:
    """The LanceDB database (one table per index id: Bundle.index_id), snapshots and index state."""
    return home() / "index"


def snapshot_dir(index_id: str) -> Path:
    return index_dir() / "snapshots" / index_id


def index_lock_file() -> Path:
    """Held by every writer of the index (index, forget, models remove): see index/lock.py."""
    return index_dir() / ".lock"


def onnx_cache_dir() -> Path:
    """Optimised ONNX sessions, one entry per model file, onnxruntime version and CPU (embed/onnx.py)."""
    return cache_dir() / "onnx"


def cache_dir() -> Path:
    """Derived files that can be rebuilt at any time (optimised ONNX graphs, thumbnails).

    The platform cache dir (``~/.cache/clipgrep`` on Linux), so backups and disk-usage
    tools treat them as caches; ``$CLIPGREP_HOME/cache`` when ``CLIPGREP_HOME`` is set,
    so that one variable still relocates (and isolates) everything.
    """
    if os.environ.get(HOME_ENV):
        return home() / "cache"
    from platformdirs import user_cache_path

    return user_cache_path("clipgrep", appauthor=False)
