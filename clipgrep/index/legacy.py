"""The state files of clipgrep versions before the LanceDB ``roots``/``runs`` tables and skip rows.

``state.json`` (roots, files, runs), ``skipped-<index_id>.json`` (skip notes) and
``snapshots/<index_id>.DIRTY`` (the snapshot may lag its table). ``protocol.recover`` imports
them into the store once and then deletes them; nothing else reads or writes them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..store import Skipped, Tracked

STATE_FILE = "state.json"
_SKIPPED_PREFIX = "skipped-"


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def load_state(index_dir: Path) -> dict[str, Any]:
    state = _read_json(index_dir / STATE_FILE, {})
    return state if isinstance(state, dict) else {}


def load_tracked(index_dir: Path) -> tuple[dict[str, Tracked], dict[str, Tracked]]:
    """The remembered root directories and files of ``state.json``, by path."""
    from .roots import tracked_from_json

    state = load_state(index_dir)
    roots, files = state.get("roots", {}), state.get("files", {})
    if isinstance(roots, list):  # the first format: a list of paths, where a file was a root too
        from ..embed.formats import IMAGE_EXTENSIONS

        legacy = [p for p in roots if isinstance(p, str)]
        files = {p: {} for p in legacy if os.path.isfile(p) or (
            not os.path.exists(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)}
        roots = {p: {} for p in legacy if p not in files}
    return tracked_from_json(roots), tracked_from_json(files)


def runs(index_dir: Path) -> dict[str, dict[str, Any]]:
    found = load_state(index_dir).get("runs", {})
    return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}


def skip_files(index_dir: Path) -> dict[str, Path]:
    """The ``skipped-<index_id>.json`` files, by index id."""
    return {p.name[len(_SKIPPED_PREFIX):-len(".json")]: p for p in index_dir.glob(f"{_SKIPPED_PREFIX}*.json")}


def load_skipped(path: Path) -> dict[str, Skipped]:
    raw = _read_json(path, {})
    if not isinstance(raw, dict):
        return {}
    return {p: Skipped(p, *v) for p, v in raw.items() if isinstance(v, list) and len(v) == 3}


def dirty_markers(index_dir: Path) -> dict[str, Path]:
    """The DIRTY markers, by index id."""
    return {p.name[:-len(".DIRTY")]: p for p in (index_dir / "snapshots").glob("*.DIRTY")}
