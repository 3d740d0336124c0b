"""``clipgrep status``: what is indexed, with which model, and how healthy the index is."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paths import index_dir, snapshot_dir

if TYPE_CHECKING:
    from .store import Skipped


def disk_bytes(path: Path) -> int:
    """Bytes of the files under directory ``path`` (links not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def index_status(model: str | None = None) -> dict[str, Any]:
    """Roots (with their excludes), files, model, row count, skipped count, size on disk, last run,
    how search searches."""
    from .ann import search_mode
    from .errors import ModelNotFound
    from .index.freshness import current_snapshot, skipped_in
    from .index.roots import RootSet
    from .models import default_model_name, load_model
    from .store import last_run

    directory = index_dir()
    name = model or default_model_name()
    tracked = RootSet.load(directory)
    excludes = {path: list(root.excludes) for path, root in sorted(tracked.roots.items()) if root.excludes}
    info: dict[str, Any] = {"index": str(directory), "roots": sorted(tracked.roots), "excludes": excludes,
                            "files": sorted(tracked.files), "model": name}
    try:
        bundle = load_model(name, auto_install=False)
    except ModelNotFound:
        info["rows"] = 0
        info["note"] = f"model {name} is not installed yet; clipgrep index adds it"
        return info
    snapshot = current_snapshot(snapshot_dir(bundle.index_id))
    run = last_run(directory, bundle.index_id) or {}
    info.update({
        "bundle_id": bundle.bundle_id,
        "rows": len(snapshot) if snapshot is not None else 0,
        "skipped": len(skipped_in(snapshot)) if snapshot is not None else 0,
        "disk_bytes": disk_bytes(directory) if directory.exists() else 0,
        "last_run": run.get("finished", "never"),
        "search": search_mode(snapshot),  # exact, or approximate above ann.EXACT_MAX_ROWS rows
    })
    return info


def skipped_files(model: str | None = None) -> list[Skipped]:
    """The files that index runs of ``model`` skipped and will not retry until they change, by path."""
    from .errors import ModelNotFound
    from .index.freshness import current_snapshot, skipped_in
    from .models import load_model

    try:
        bundle = load_model(model, auto_install=False)
    except ModelNotFound:
        if model:
            raise
        return []  # the default model, not added yet: nothing was ever skipped
    snapshot = current_snapshot(snapshot_dir(bundle.index_id))  # its skip notes are the table's
    return sorted(skipped_in(snapshot).values(), key=lambda s: s.path) if snapshot is not None else []
