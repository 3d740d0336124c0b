"""Small JSON state beside the LanceDB tables: remembered roots and files, last runs, skipped files.

Written atomically (temp file + rename) and only under the index lock.
Paths may hold surrogate escapes (non-UTF-8 names); JSON's \\u escapes keep them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Skipped:
    path: str
    size: int
    mtime_ns: int
    reason: str


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def load_state(index_dir: Path) -> dict[str, Any]:
    state = _read_json(index_dir / STATE_FILE, {})
    return state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class Tracked:
    """A remembered root directory, with the excludes given for it, or a remembered image file.

    ``device`` is the ``st_dev`` it had when last indexed: a different one means another drive,
    or none (an empty mount point), is there now.
    """

    path: str
    excludes: tuple[str, ...] = ()
    device: int | None = None


def load_tracked(index_dir: Path) -> tuple[dict[str, Tracked], dict[str, Tracked]]:
    """The remembered root directories and files, by path."""
    state = load_state(index_dir)
    roots, files = state.get("roots", {}), state.get("files", {})
    if isinstance(roots, list):  # the first format: a list of paths, where a file was a root too
        from ..embed.formats import IMAGE_EXTENSIONS

        legacy = [p for p in roots if isinstance(p, str)]
        files = {p: {} for p in legacy if os.path.isfile(p) or (
            not os.path.exists(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)}
        roots = {p: {} for p in legacy if p not in files}
    return _tracked(roots), _tracked(files)


def _tracked(raw: Any) -> dict[str, Tracked]:
    if not isinstance(raw, dict):
        return {}
    out = {}
    for path, info in raw.items():
        info = info if isinstance(info, dict) else {}
        excludes = tuple(p for p in info.get("excludes", ()) if isinstance(p, str))
        device = info.get("device")
        out[path] = Tracked(path, excludes, device if isinstance(device, int) else None)
    return out


def save_tracked(index_dir: Path, roots: dict[str, Tracked], files: dict[str, Tracked]) -> None:
    state = load_state(index_dir)
    state["roots"] = {p: _info(roots[p]) for p in sorted(roots)}
    state["files"] = {p: _info(files[p]) for p in sorted(files)}
    write_json_atomic(index_dir / STATE_FILE, state)


def _info(tracked: Tracked) -> dict[str, Any]:
    info: dict[str, Any] = {"excludes": list(tracked.excludes)} if tracked.excludes else {}
    if tracked.device is not None:
        info["device"] = tracked.device
    return info


def remembered_roots(index_dir: Path) -> list[str]:
    """The remembered root directories (not the remembered files)."""
    return sorted(load_tracked(index_dir)[0])


def record_run(index_dir: Path, bundle_id: str, summary: dict[str, Any]) -> None:
    state = load_state(index_dir)
    state.setdefault("runs", {})[bundle_id] = summary
    write_json_atomic(index_dir / STATE_FILE, state)


def last_run(index_dir: Path, bundle_id: str) -> dict[str, Any] | None:
    return load_state(index_dir).get("runs", {}).get(bundle_id)


def _skipped_path(index_dir: Path, bundle_id: str) -> Path:
    return index_dir / f"skipped-{bundle_id}.json"


def load_skipped(index_dir: Path, bundle_id: str) -> dict[str, Skipped]:
    raw = _read_json(_skipped_path(index_dir, bundle_id), {})
    return {p: Skipped(p, *v) for p, v in raw.items()} if isinstance(raw, dict) else {}


def save_skipped(index_dir: Path, bundle_id: str, skipped: dict[str, Skipped]) -> None:
    write_json_atomic(_skipped_path(index_dir, bundle_id),
                      {s.path: [s.size, s.mtime_ns, s.reason] for s in skipped.values()})


def forget_bundle(index_dir: Path, bundle_id: str) -> None:
    """Drop the run record and skip notes of ``bundle_id`` (its model's index is being purged)."""
    _skipped_path(index_dir, bundle_id).unlink(missing_ok=True)
    state = load_state(index_dir)
    if bundle_id in state.get("runs", {}):
        del state["runs"][bundle_id]
        write_json_atomic(index_dir / STATE_FILE, state)
