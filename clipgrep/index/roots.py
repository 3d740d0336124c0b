"""What clipgrep keeps indexed: root directories, each with its excludes, and single image files.

Roots never nest, so every indexed path has exactly one owner and one set of excludes:

- indexing a directory inside a root refreshes that root, and excludes given with it are stored
  on the root, anchored at the directory (``index ~/P/2024 -x raw/`` stores ``/2024/**/raw/``);
- indexing a directory that holds roots or remembered files makes it the root; their excludes
  move to it, anchored where they were, so nothing they left out comes in;
- forgetting a directory or file inside a root excludes it from that root (a literal, anchored
  pattern) and drops its rows: "stop indexing this" means the same wherever the path lies.

A FILE argument is indexed without becoming a root. Inside a root it is simply refreshed (the
root already covers it). Elsewhere it is remembered as a *file*: a plain ``clipgrep index``
keeps it fresh, ``status`` lists it under files, ``forget FILE`` drops it, and when it is
deleted its row goes with it (unless its drive looks unmounted). Someone who indexes one
picture expects it to stay searchable and current, not to see it listed, and warned about,
as a folder.

They live in LanceDB's ``roots`` table (``store.py``). Every index run starts by reading them, and
a no-op run must not pay ``import lancedb`` (~1 s), so each save also writes ``roots.json``, a
derived copy stamped with the table version it shows; a load trusts it only when that stamp is the
table's latest version (``freshness.table_version``), and reads the table otherwise.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ClipgrepError
from ..store import ROOTS_TABLE, Tracked
from .freshness import table_version
from .plan import under_roots

ROOTS_CACHE = "roots.json"


def anchor(pattern: str, rel: str) -> str:
    """``pattern``, written for the directory ``rel`` below a root, rewritten for the root.

    gitignore rules: a pattern with a slash before its end is relative to its base directory;
    one without matches at any depth below it.
    """
    if rel in ("", ".") or not pattern.strip() or pattern.startswith("#"):
        return pattern
    negate = "!" if pattern.startswith("!") else ""
    body = pattern[len(negate):]
    base = "/" + _escape(rel)
    joined = f"{base}/{body.lstrip('/')}" if "/" in body.rstrip("/") else f"{base}/**/{body}"
    return negate + joined


def literal(rel: str) -> str:
    """A pattern matching exactly the path ``rel`` below a root (a file, or a directory and all in it)."""
    return "/" + _escape(rel)


def _escape(rel: str) -> str:
    parts = rel.replace(os.sep, "/").strip("/").split("/")
    escaped = [re.sub(r"([\\*?\[\]])", r"\\\1", part) for part in parts]
    escaped = [re.sub(r" $", r"\\ ", part) for part in escaped]  # gitignore strips trailing spaces
    return "/".join(escaped)


@dataclass(frozen=True)
class Selection:
    """What one index run walks, and what it found missing."""

    units: list[Tracked]         # roots and files to scan, with the excludes to walk them with
    missing: list[str]           # remembered roots or files that are not there now: their rows stay
    gone: list[str]              # remembered files that were deleted: their rows go


class RootSet:
    """The remembered roots and files, kept free of nesting; loaded and saved under the index lock."""

    def __init__(self, roots: dict[str, Tracked] | None = None, files: dict[str, Tracked] | None = None) -> None:
        self.roots: dict[str, Tracked] = {}
        self.files: dict[str, Tracked] = {}
        for root in sorted((roots or {}).values(), key=lambda r: len(r.path)):  # outer roots first
            self.add_dir(root.path, root.excludes, root.device)
        for file in (files or {}).values():
            self.add_file(file.path, file.device)
        self._saved = (dict(roots or {}), dict(files or {}))

    @classmethod
    def load(cls, index_dir: Path) -> RootSet:
        # Normalised on load too: older versions remembered files as roots, and nested roots twice.
        version = table_version(index_dir / f"{ROOTS_TABLE}.lance")
        cached = _read_cache(index_dir)
        if cached is not None and cached.get("table_version") == version:
            return cls(tracked_from_json(cached.get("roots")), tracked_from_json(cached.get("files")))
        if version == 0:  # not migrated yet (protocol.recover does it under the lock): read the old file
            from .legacy import load_tracked as load_legacy

            return cls(*load_legacy(index_dir))
        from ..store import load_tracked

        roots, files, _ = load_tracked(index_dir)
        return cls(roots, files)

    def save(self, index_dir: Path, force: bool = False) -> None:
        """Commit the roots and files, if changed (a no-op re-index writes nothing), and their cache."""
        if (self.roots, self.files) != self._saved or force:
            from ..store import save_tracked
            from .protocol import commit

            version = commit("roots", lambda: save_tracked(index_dir, self.roots, self.files))
            _write_cache(index_dir, version, self.roots, self.files)
            self._saved = (dict(self.roots), dict(self.files))

    def paths(self) -> list[str]:
        """Every remembered root and file, sorted."""
        return sorted([*self.roots, *self.files])

    def root_of(self, path: str) -> Tracked | None:
        """The remembered root that contains ``path`` (or is it)."""
        return next((r for r in self.roots.values() if under_roots(path, [r.path])), None)

    def add_dir(self, path: str, excludes: tuple[str, ...] = (), device: int | None = None) -> Tracked:
        """Remember the directory ``path`` with ``excludes``; returns the root that now covers it."""
        outer = self.root_of(path)
        if outer is not None:
            rel = os.path.relpath(path, outer.path)
            return self._set(replace(outer, excludes=_merged(outer.excludes, [anchor(p, rel) for p in excludes])))
        merged: list[str] = []
        for inner in [r for r in self.roots.values() if under_roots(r.path, [path])]:
            merged += [anchor(p, os.path.relpath(inner.path, path)) for p in inner.excludes]
            del self.roots[inner.path]
        for file in [f for f in self.files if under_roots(f, [path])]:
            del self.files[file]
        return self._set(Tracked(path, _merged(tuple(merged), excludes), device))

    def add_file(self, path: str, device: int | None = None) -> Tracked:
        """The unit that indexes the file ``path``: itself, remembered unless a root covers it."""
        if self.root_of(path) is not None:
            return Tracked(path)
        if device is None and path in self.files:
            device = self.files[path].device
        self.files[path] = Tracked(path, device=device)
        return self.files[path]

    def remove_excludes(self, patterns: tuple[str, ...], under: list[str]) -> None:
        """Drop ``patterns`` from the roots holding the paths ``under`` (default: every root).

        A pattern is given as it was added, relative to the path it was given with.
        """
        for pattern in patterns:
            found = False
            for path in under or list(self.roots):
                root = self.root_of(path)
                if root is None:
                    continue
                stored = anchor(pattern, os.path.relpath(path, root.path))
                if stored in root.excludes:
                    self._set(replace(root, excludes=tuple(p for p in root.excludes if p != stored)))
                    found = True
            if not found:
                raise ClipgrepError(f"no indexed root has the exclude {pattern!r}",
                                    "'clipgrep status' lists each root's excludes")

    def forget(self, path: str) -> str | None:
        """Stop indexing ``path``; returns the pattern that now excludes it from its root, if any."""
        if path in self.roots:
            del self.roots[path]
            return None
        if path in self.files:
            del self.files[path]
            return None
        root = self.root_of(path)
        if root is None:
            raise ClipgrepError(f"{path} is not an indexed root", "see the indexed roots with: clipgrep status")
        pattern = literal(os.path.relpath(path, root.path))
        self._set(replace(root, excludes=_merged(root.excludes, [pattern])))
        return pattern

    def record_device(self, path: str, device: int) -> None:
        for table in (self.roots, self.files):
            if path in table:
                table[path] = replace(table[path], device=device)

    def select(self, args: list[str], excludes: tuple[str, ...]) -> Selection:
        """Remember ``args`` (default: what is remembered, else the current directory) and say what to walk.

        Excludes go to the roots of the directory arguments, or to every root without arguments.
        Raises ``ClipgrepError`` for an argument that does not exist.
        """
        if not args and not self.roots and not self.files:
            args = [os.getcwd()]
        if args:
            dirs = [arg for arg in args if self._add_arg(arg, excludes)]
            # After every argument is in: a later one may have become the root of an earlier one.
            chosen = {root.path: root for root in (self.root_of(d) for d in dirs) if root is not None}
            for file in (arg for arg in args if arg not in dirs and not under_roots(arg, list(chosen))):
                chosen[file] = self.files.get(file, Tracked(file))
            return Selection(sorted(chosen.values(), key=lambda u: u.path), [], [])
        for root in list(self.roots.values()):
            self._set(replace(root, excludes=_merged(root.excludes, excludes)))
        units: list[Tracked] = []
        missing: list[str] = []
        gone: list[str] = []
        for tracked in [*self.roots.values(), *self.files.values()]:
            if os.path.exists(tracked.path):
                units.append(tracked)
            elif tracked.path in self.files and _deleted(tracked):
                gone.append(tracked.path)
                del self.files[tracked.path]
            else:
                missing.append(tracked.path)
        return Selection(sorted(units, key=lambda u: u.path), sorted(missing), sorted(gone))

    def _add_arg(self, arg: str, excludes: tuple[str, ...]) -> bool:
        """Remember one argument; True if it is a directory."""
        try:
            st = os.stat(arg)
        except (FileNotFoundError, NotADirectoryError):
            raise ClipgrepError(f"{arg} does not exist", "check the path") from None
        except OSError:
            return False  # the scan says why it cannot be read
        if not stat.S_ISDIR(st.st_mode):
            self.add_file(arg)  # the scan refuses it if it is not an image file
            return False
        self.add_dir(arg, excludes)
        return True

    def _set(self, root: Tracked) -> Tracked:
        self.roots[root.path] = root
        return root


def remembered_roots(index_dir: Path) -> list[str]:
    """The remembered root directories (not the remembered files)."""
    return sorted(RootSet.load(index_dir).roots)


def refresh_cache(index_dir: Path) -> None:
    """Rewrite ``roots.json`` from the table when a killed writer left it behind (writers only)."""
    version = table_version(index_dir / f"{ROOTS_TABLE}.lance")
    cached = _read_cache(index_dir)
    if version and (cached is None or cached.get("table_version") != version):
        from ..store import load_tracked

        roots, files, read_at = load_tracked(index_dir)
        _write_cache(index_dir, read_at, roots, files)


def _read_cache(index_dir: Path) -> dict[str, Any] | None:
    try:
        cached = json.loads((index_dir / ROOTS_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) else None


def _write_cache(index_dir: Path, version: int, roots: dict[str, Tracked], files: dict[str, Tracked]) -> None:
    # Paths may hold surrogate escapes (non-UTF-8 names); JSON's \u escapes keep them.
    data = {"table_version": version, "roots": {p: _info(roots[p]) for p in sorted(roots)},
            "files": {p: _info(files[p]) for p in sorted(files)}}
    for stale in index_dir.glob(f".{ROOTS_CACHE}.*.tmp"):  # left by killed writers (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = index_dir / f".{ROOTS_CACHE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, index_dir / ROOTS_CACHE)


def _info(tracked: Tracked) -> dict[str, Any]:
    info: dict[str, Any] = {"excludes": list(tracked.excludes)} if tracked.excludes else {}
    if tracked.device is not None:
        info["device"] = tracked.device
    return info


def tracked_from_json(raw: Any) -> dict[str, Tracked]:
    """Roots or files as ``_info`` wrote them, by path; anything malformed is left out."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for path, info in raw.items():
        info = info if isinstance(info, dict) else {}
        excludes = tuple(p for p in info.get("excludes", ()) if isinstance(p, str))
        device = info.get("device")
        out[path] = Tracked(path, excludes, device if isinstance(device, int) else None)
    return out


def _merged(excludes: tuple[str, ...], more: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return excludes + tuple(p for i, p in enumerate(more) if p not in excludes and p not in more[:i])


def _deleted(file: Tracked) -> bool:
    """Whether a remembered file that is not there was deleted, rather than left on a drive that
    is not mounted now: its nearest existing directory is on the device the file was on."""
    if file.device is None:
        return False
    parent = os.path.dirname(file.path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        return os.stat(parent).st_dev == file.device
    except OSError:
        return False
