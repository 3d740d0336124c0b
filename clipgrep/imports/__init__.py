"""Bundles from published ONNX exports (Immich's Hugging Face repos or a local copy), without torch.

``clipgrep models add NAME --from HUB_REPO|DIR``: layout.py reads the export,
hub.py downloads it, build.py quantises it and gates it against the fp32 export.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ClipgrepError

Progress = Callable[[str], None]
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def import_export(source: str, staging: Path, *, name: str, precision: str = "int8", revision: str | None = None,
                  on_progress: Progress | None = None) -> None:
    """Build a bundle in ``staging`` from ``source``: a local export directory or a hub repo ``owner/name``."""
    from .build import build_bundle
    from .layout import read_export

    step = on_progress or (lambda _: None)
    local = Path(source).expanduser()
    provenance: dict[str, Any]
    step("download")
    if local.is_dir():
        root = local.resolve()
        provenance = {"source": str(root), "revision": None}
    elif _REPO.match(source) and not source.startswith((".", "/")):
        from .hub import download

        fetched = download(source, revision, model=name)
        root = fetched.root
        provenance = {"source": f"hf://{fetched.repo}", "repo": fetched.repo, "revision": fetched.revision,
                      "hub_hashes_verified": fetched.verified}
    else:
        raise ClipgrepError(f"{source!r} is neither a directory nor a Hugging Face repo (owner/name)",
                            "e.g. --from immich-app/ViT-B-32__openai, or --from ./ViT-B-32__openai")
    step("read export")
    export = read_export(root, source_name=source.rstrip("/"))
    # Immich names its repos ARCH__WEIGHTS (ViT-B-32__openai); `models list` shows the two.
    arch, _, weights = Path(source.rstrip("/")).name.partition("__")
    provenance = {"arch": arch, "weights": weights or "-", **provenance}
    build_bundle(export, staging, name=name, precision=precision, provenance=provenance, on_progress=step)
    step("install")  # the caller (models.add_model) moves ``staging`` into place
