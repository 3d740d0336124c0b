"""The model registry: named bundles under ``$CLIPGREP_HOME/models``.

Stdlib only at import time; converting a model imports torch and open_clip
inside ``add_model``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .bundle import MANIFEST, VERIFIED_STAMP, Bundle, load_bundle, rename_manifest
from .errors import ClipgrepError, ModelNotFound
from .paths import models_dir

# ViT-B-32 trained on LAION-2B (laion2b_s34b_b79k): the most widely used open
# CLIP weights, the same architecture as the paper's teacher, and the fastest
# strong CPU choice here (50 image tokens). Fetched as Immich's published ONNX
# export and quantised here, without torch (clipgrep.catalogue.DEFAULT).
DEFAULT_MODEL = "vit-b-32"
MODEL_ENV = "CLIPGREP_MODEL"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Progress = Callable[[str], None]


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
              revision: str | None = None, on_progress: Progress | None = None) -> Bundle:
    """Install a model as ``name``: convert an open_clip model, or copy a bundle directory.

    ``checkpoint`` may be a weights file, a local open_clip dir (what ``compress``
    writes) or an existing bundle directory (installed by copy). ``from_source``
    imports a published ONNX export (a hub repo or a local directory) without torch;
    with no source at all, ``name`` must be in the catalogue (``models available``).

    >>> add_model("b32", arch="ViT-B-32", checkpoint="open_clip_model.safetensors")  # doctest: +SKIP
    """
    dest = model_path(name)
    if dest.exists() and not replace:
        raise ClipgrepError(f"a model named {name!r} is already installed",
                            f"pass --replace, or remove it first: clipgrep models remove {name}")
    if precision not in ("int8", "fp32"):
        raise ClipgrepError(f"unknown precision {precision!r}", "use int8 or fp32")
    if from_source is None and arch is None and checkpoint is None and not random_init:
        from .catalogue import entry

        from_source = entry(name).repo
    source_path = Path(checkpoint).expanduser() if checkpoint is not None else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.new-", dir=dest.parent) as tmp:
        staged = Path(tmp) / name
        if from_source is not None:
            from .imports import import_export

            import_export(from_source, staged, name=name, precision=precision, revision=revision,
                          on_progress=on_progress)
        elif source_path is not None and (source_path / MANIFEST).is_file():
            _copy_bundle(source_path, staged, name)
        else:
            from .convert.pipeline import convert_model
            from .convert.source import ModelSource

            source = ModelSource(arch, pretrained, source_path, random_init)
            convert_model(source, staged, name=name, precision=precision, on_progress=on_progress)
        _swap_into_place(staged, dest)
    return load_bundle(dest)


def remove_model(name: str) -> Path:
    """Delete an installed model; returns where it was."""
    path = model_path(name)
    if not path.is_dir():
        raise ModelNotFound(f"no model named {name!r} is installed", "see: clipgrep models list")
    shutil.rmtree(path)
    return path


def _copy_bundle(source: Path, staged: Path, name: str) -> None:
    load_bundle(source, verify="full")  # refuse to install a broken or tampered bundle
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns(VERIFIED_STAMP))
    rename_manifest(staged, name)
    load_bundle(staged, verify="full")


def _swap_into_place(staged: Path, dest: Path) -> None:
    """Replace ``dest`` with ``staged`` so that a reader never sees a half-written model."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
    staged.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
