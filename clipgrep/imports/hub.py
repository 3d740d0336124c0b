"""Downloading a published export from the Hugging Face hub, checked file by file.

``huggingface_hub`` does the transfer: its progress bars, its cache (a second
``models add`` of the same revision downloads nothing), resuming a transfer
the connection dropped, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, proxies and tokens.
Here: pick the files a bundle needs, pin the revision to a commit, and refuse
any file whose bytes do not hash to what the hub announced for it (sha256 for
LFS files, the git blob id for small ones).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import sha256_file
from ..errors import ClipgrepError, first_line
from .layout import TOWER_DIRS


@dataclass(frozen=True)
class Download:
    root: Path
    repo: str
    revision: str  # the commit hash the files come from
    verified: bool  # False only when taken from the local cache without reaching the hub


REQUIRED_FILES = ("config.json", "visual/model.onnx", "visual/preprocess_cfg.json", "textual/model.onnx",
                  "textual/tokenizer.json", "textual/tokenizer_config.json")


def _offline_hint(repo: str, name: str) -> str:
    return (f"download it where the hub is reachable (hf download {repo} --local-dir DIR), copy DIR here "
            f"and run: clipgrep models add {name} --from DIR")


def wanted_files(names: list[str]) -> list[str]:
    """The root config.json and the files directly in visual/ and textual/ (not fp16/, rknpu/...)."""
    return sorted(n for n in names if n == "config.json"
                  or (n.count("/") == 1 and n.split("/")[0] in TOWER_DIRS))


def download(repo: str, revision: str | None = None, model: str = "NAME") -> Download:
    """Fetch the export ``repo`` (at ``revision``, default the main branch) into the hub cache."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    try:
        info = huggingface_hub.HfApi().model_info(repo, revision=revision, files_metadata=True)
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as e:
        raise ClipgrepError(f"{repo}{'@' + revision if revision else ''} is not on the hub: {first_line(e)}",
                            "check the name: clipgrep models available") from None
    except Exception as e:  # noqa: BLE001 - offline, DNS, proxy, TLS, 5xx: all end the same way
        cached = _from_cache(repo, revision)
        if cached is not None:
            return cached
        raise ClipgrepError(f"cannot download {repo} from the Hugging Face hub ({first_line(e)})",
                            _offline_hint(repo, model)) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = wanted_files(list(siblings))
    missing = [f for f in REQUIRED_FILES if f not in siblings]
    if missing:
        raise ClipgrepError(f"{repo} is not an export in Immich's layout: it has no {', '.join(missing)}",
                            "pick a model from: clipgrep models available")
    try:
        root = Path(huggingface_hub.snapshot_download(repo, revision=info.sha, allow_patterns=files))
    except Exception as e:  # noqa: BLE001 - network and disk errors alike: resumable
        raise ClipgrepError(f"downloading {repo} failed: {first_line(e)}",
                            f"run the command again to resume, or {_offline_hint(repo, model)}") from None
    for name in files:
        _verify(root, name, siblings[name], repo)
    return Download(root, repo, str(info.sha), verified=True)


def _from_cache(repo: str, revision: str | None) -> Download | None:
    """A complete earlier download of ``repo`` in the hub cache, or None (used when the hub cannot be reached).

    Downloads are pinned to a commit, which leaves no branch ref in the cache, so
    without a ``revision`` the newest cached snapshot is taken.
    """
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    candidates = [snapshots / revision] if revision else \
        sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if snapshots.is_dir() else []
    for root in candidates:
        if all((root / f).is_file() for f in REQUIRED_FILES):
            return Download(root, repo, root.name, verified=False)
    return None


def _verify(root: Path, name: str, sibling: Any, repo: str) -> None:
    path = root / name
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None:
        expected, actual, algorithm = lfs.sha256, sha256_file(path), "sha256"
    else:
        expected, actual, algorithm = sibling.blob_id, git_blob_id(path), "git blob id"
    if expected and actual != expected:
        _drop_from_cache(path)
        raise ClipgrepError(f"{repo}: downloaded {name} does not match its {algorithm} on the hub "
                            f"({actual[:12]}... != {expected[:12]}...)",
                            "run the command again to re-download it; if it persists, the mirror or proxy "
                            "alters files: use --from DIR with a verified copy")


def git_blob_id(path: Path) -> str:
    """The git object id of a file's content (what the hub reports for files not stored in LFS)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _drop_from_cache(path: Path) -> None:
    """Remove a bad file (its cache blob too), so the next run downloads it again."""
    try:
        blob = path.resolve()
        path.unlink()
        if blob != path:
            blob.unlink()
    except OSError:
        pass
