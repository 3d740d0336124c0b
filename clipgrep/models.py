"""The model registry: named bundles under ``$CLIPGREP_HOME/models``.

Stdlib only at import time; converting a model imports torch and open_clip
inside ``add_model``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .bundle import MANIFEST, Bundle, load_bundle, rename_manifest
from .errors import BundleError, ClipgrepError, ModelNotFound
from .index.lock import index_lock
from .model_install import models_lock, staging, swap_in, take_out, try_recover
from .paths import index_lock_file, models_dir

# ViT-B-32 trained on LAION-2B (laion2b_s34b_b79k): the most widely used open
# CLIP weights, the same architecture as the paper's teacher, and the fastest
# strong CPU choice here (50 image tokens). Fetched as Immich's published ONNX
# export and quantised here, without torch (clipgrep.catalogue.DEFAULT).
DEFAULT_MODEL = "vit-b-32"
MODEL_ENV = "CLIPGREP_MODEL"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Progress = Callable[[str], None]
Waiting = Callable[[str], None]  # told what it waits for: "an index run", "another models command"


@dataclass(frozen=True)
class ModelEntry:
    """An installed model as ``models list`` sees it: a bundle, or why it cannot be loaded."""

    name: str
    path: Path
    bundle: Bundle | None
    problem: str | None


def default_model_name() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def model_path(name: str) -> Path:
    if not _NAME.match(name):
        raise ClipgrepError(f"invalid model name {name!r}",
                            "use letters, digits, '.', '_' and '-' (up to 64, starting with a letter or digit)")
    return models_dir() / name


def list_models() -> list[ModelEntry]:
    """Every installed model, sorted by name, including broken ones (with the reason)."""
    try_recover()
    return _installed()


def _installed() -> list[ModelEntry]:
    root = models_dir()
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            entries.append(ModelEntry(path.name, path, load_bundle(path), None))
        except ClipgrepError as e:
            entries.append(ModelEntry(path.name, path, None, e.message))
    return entries


def load_model(name: str | None = None, *, auto_install: bool = True,
               on_progress: Progress | None = None) -> Bundle:
    """The bundle for ``name`` (an installed name or a bundle directory; default: the default model).

    The default model is converted on first use when ``auto_install`` is set.

    >>> bundle = load_model("vit-b-32")  # doctest: +SKIP
    """
    name = name or default_model_name()
    if os.sep in name or name.startswith("."):
        return load_bundle(Path(name).expanduser())
    path = model_path(name)
    if not (path / MANIFEST).exists():
        try_recover()  # a replace killed half-way leaves the model aside: put it back
    if (path / MANIFEST).exists():
        return load_bundle(path)
    if name == DEFAULT_MODEL and auto_install:
        return add_model(DEFAULT_MODEL, on_progress=on_progress)
    raise ModelNotFound(f"no model named {name!r} is installed",
                        f"add it with: clipgrep models add {name} --from OWNER/REPO (see: clipgrep models "
                        "available), or pick one from: clipgrep models list")


def add_model(name: str, *, arch: str | None = None, pretrained: str | None = None,
              checkpoint: str | os.PathLike[str] | None = None, precision: str = "int8",
              random_init: bool = False, replace: bool = False, from_source: str | None = None,
              revision: str | None = None, on_progress: Progress | None = None,
              on_wait: Waiting | None = None) -> Bundle:
    """Install a model as ``name``: import a published ONNX export, convert an open_clip model, or copy a bundle.

    ``from_source`` imports a published ONNX export (a hub repo or a local
    directory) without torch; ``checkpoint`` may be a weights file, a local
    open_clip dir (what ``compress`` writes) or an existing bundle directory
    (installed by copy). With no source at all, ``name`` must be in the catalogue
    (``models available``). The model is built beside the models and renamed into
    place (``model_install``): a kill at any point leaves the previous model, or the
    new one, installed. ``on_wait(what)`` is called when another models command or
    an index run (``--replace``) must finish first.

    >>> add_model("b32", arch="ViT-B-32", checkpoint="open_clip_model.safetensors")  # doctest: +SKIP
    """
    if from_source is None and arch is None and checkpoint is None and not random_init:
        from .catalogue import entry

        model_path(name)  # an invalid name is refused as such, not as a missing catalogue entry
        from_source = entry(name).repo
    return add_models({precision: name}, arch=arch, pretrained=pretrained, checkpoint=checkpoint,
                      random_init=random_init, replace=replace, from_source=from_source, revision=revision,
                      on_progress=on_progress, on_wait=on_wait)[0]


def add_models(names: Mapping[str, str], *, arch: str | None = None, pretrained: str | None = None,
               checkpoint: str | os.PathLike[str] | None = None, random_init: bool = False,
               replace: bool = False, from_source: str | None = None, revision: str | None = None,
               on_progress: Progress | None = None, on_wait: Waiting | None = None) -> list[Bundle]:
    """``add_model`` at several precisions at once (``{"int8": "m", "fp32": "m-fp32"}``): a
    converted model is loaded and exported to ONNX once, then quantised and gated per precision."""
    for precision in names:
        if precision not in ("int8", "fp32"):
            raise ClipgrepError(f"unknown precision {precision!r}", "use int8 or fp32")
    dests = {precision: model_path(name) for precision, name in names.items()}
    source_path = Path(checkpoint).expanduser() if checkpoint is not None else None
    copy = from_source is None and source_path is not None and (source_path / MANIFEST).is_file()
    if copy and len(names) > 1:
        raise ClipgrepError("a bundle directory holds one precision", "install it under one name")
    with models_lock(on_wait=_told(on_wait, "another models command")), contextlib.ExitStack() as stack:
        for precision, dest in dests.items():
            if dest.exists() and not replace:
                raise ClipgrepError(f"a model named {names[precision]!r} is already installed",
                                    f"pass --replace, or remove it first: clipgrep models remove {names[precision]}")
        staged = {precision: stack.enter_context(staging(name)) for precision, name in names.items()}
        if from_source is not None:
            from .imports import import_export

            for precision, name in names.items():  # the download is cached: fetched once
                import_export(from_source, staged[precision], name=name, precision=precision,
                              revision=revision, on_progress=on_progress)
        elif copy:
            (precision, name), = names.items()
            _copy_bundle(source_path, staged[precision], name)  # type: ignore[arg-type]  # copy: a path
        else:
            from .convert.pipeline import convert_models
            from .convert.source import ModelSource

            source = ModelSource(arch, pretrained, source_path, random_init)
            convert_models(source, {precision: (staged[precision], name) for precision, name in names.items()},
                           on_progress=on_progress)
        for precision, dest in dests.items():
            if dest.exists():  # an index run must not switch models half-way: wait for it
                with index_lock(index_lock_file(), on_wait=_told(on_wait, "an index run")):
                    swap_in(staged[precision], dest)
            else:
                swap_in(staged[precision], dest)
        return [load_bundle(dest) for dest in dests.values()]


@dataclass(frozen=True)
class Removal:
    """What ``remove_model`` did, and what it left on disk."""

    name: str
    path: Path | None            # the model directory removed; None if it was removed before
    data_bytes: int              # its index and caches: deleted (purged) or left on disk
    purged: bool
    shared_with: tuple[str, ...]  # installed models with the same image tower (copies, text swaps): the index stays


def remove_model(name: str, *, purge: bool = False, on_wait: Waiting | None = None) -> Removal:
    """Delete an installed model; with ``purge``, also its index and caches (unless a copy uses them).

    Without ``purge`` the index stays, for a re-install of the same model, and
    ``remove_model(name, purge=True)`` can delete it later. Waits for a running
    index run (``on_wait("an index run")``), which must not lose its model.

    >>> remove_model("b32", purge=True).data_bytes  # doctest: +SKIP
    """
    path = model_path(name)
    with models_lock(on_wait=_told(on_wait, "another models command")) as root:
        removed = _RemovedRecord(root, name)
        installed = path.is_dir()
        if installed:
            try:
                identity: tuple[str, str] | None = _identity(load_bundle(path))
            except ClipgrepError:  # a broken model: nothing tells which index is its own
                identity = None
        else:
            identity = removed.read() if purge else None
            if identity is None:
                raise ModelNotFound(f"no model named {name!r} is installed", "see: clipgrep models list")
        with index_lock(index_lock_file(), on_wait=_told(on_wait, "an index run")):
            others = {e.name: _identity(e.bundle) for e in _installed() if e.name != name and e.bundle is not None}
            shared = tuple(other for other, ident in others.items() if identity and ident[0] == identity[0])
            data = _own_data(identity, list(others.values()))
            size = _data_bytes(*data)
            if purge:
                _purge(*data)
                removed.clear()
            elif size and identity is not None:
                removed.write(identity)
            if installed:
                take_out(path)
    return Removal(name, path if installed else None, size, purge, shared)


def _told(on_wait: Waiting | None, what: str) -> Callable[[], None] | None:
    return None if on_wait is None else lambda: on_wait(what)


def _identity(bundle: Bundle) -> tuple[str, str]:
    """What names a model's data outside its directory: its index id (image tower), its text cache key."""
    from .embed.onnx import text_cache_key

    return bundle.index_id, text_cache_key(bundle)


def _own_data(identity: tuple[str, str] | None, others: list[tuple[str, str]]) -> tuple[str | None, list[Path]]:
    """The model's index (its index id) and optimised-cache entries, each unless another model uses it too.

    A renamed copy, or a model that swapped only the text tower, has the same
    index id; a student that kept the teacher's text tower has another index id
    but the same text cache.
    """
    from .embed.onnx import cached_sessions

    if identity is None:
        return None, []
    index_id, cache_key = identity
    return (None if any(index_id == other[0] for other in others) else index_id,
            [] if any(cache_key == other[1] for other in others) else cached_sessions(cache_key))


def _data_bytes(index_id: str | None, caches: list[Path]) -> int:
    from .index.purge import index_bytes
    from .status import disk_bytes

    return (index_bytes(index_id) if index_id else 0) + sum(disk_bytes(cache) for cache in caches)


def _purge(index_id: str | None, caches: list[Path]) -> None:
    from .index.purge import purge_index

    if index_id:
        purge_index(index_id)
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)


class _RemovedRecord:
    """``.NAME.removed``: the identity of a model removed without ``--purge``, so a later purge finds its index."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / f".{name}.removed"

    def read(self) -> tuple[str, str] | None:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            # "bundle_id": records written before indexes were keyed by the image tower
            identity = str(record.get("index_id", record.get("bundle_id"))), str(record["cache_key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # Both name paths that a purge deletes: never trust them to be more than hex digits.
        return identity if all(re.fullmatch(r"[0-9a-f]{16}", part) for part in identity) else None

    def write(self, identity: tuple[str, str]) -> None:
        self.path.write_text(json.dumps({"index_id": identity[0], "cache_key": identity[1]}), encoding="utf-8")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _copy_bundle(source: Path, staged: Path, name: str) -> None:
    """Copy the manifest's files, and only those, each a regular file: a link is never followed.

    Following links would copy files from outside the directory in, or read
    /dev/zero or a loop forever; unlisted files have no business in a bundle.
    """
    bundle = load_bundle(source, verify="full")  # refuse to install a broken or tampered bundle
    staged.mkdir()
    for file in [MANIFEST, *bundle.manifest["files"]]:
        if not stat.S_ISREG((source / file).lstat().st_mode):
            raise BundleError(f"{source / file} is a link or special file, not a regular file",
                              "copy the real file into the bundle directory, then add it again")
        shutil.copyfile(source / file, staged / file, follow_symlinks=False)
    rename_manifest(staged, name)
    load_bundle(staged, verify="full")
