"""Where clipgrep keeps its state: ``$CLIPGREP_HOME`` or the platform data dir."""
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
    """The LanceDB database (one table per bundle_id), snapshots and index state."""
    return home() / "index"


def snapshot_dir(bundle_id: str) -> Path:
    return index_dir() / "snapshots" / bundle_id


def cache_dir() -> Path:
    """Disposable data (thumbnails): the platform cache dir, or ``$CLIPGREP_HOME/cache`` when that is set."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser() / "cache"
    from platformdirs import user_cache_path

    return user_cache_path("clipgrep", appauthor=False)
