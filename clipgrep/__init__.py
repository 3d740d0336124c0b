"""clipgrep: semantic image search from the command line.

The Python API (everything the CLI does is one of these calls)::

    import clipgrep
    bundle = clipgrep.load_model()                 # the default model, converted on first use
    vectors = bundle.text_encoder().encode(["a red bicycle at night"])

Names are imported lazily so that ``import clipgrep`` (and ``clipgrep --help``)
stays fast and never loads onnxruntime, lancedb or torch.
"""
from __future__ import annotations

import os
from typing import Any

# onnxruntime (1.32) writes a device id and queues telemetry events under
# ~/.cache/Microsoft/DeveloperTools/ on every run unless this is set before it is
# first imported (calling its API afterwards is too late). Every clipgrep module,
# and so every clipgrep import of onnxruntime, runs this first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

_API = {
    "Bundle": "clipgrep.bundle",
    "load_bundle": "clipgrep.bundle",
    "ClipgrepError": "clipgrep.errors",
    "load_model": "clipgrep.models",
    "add_model": "clipgrep.models",
    "list_models": "clipgrep.models",
    "remove_model": "clipgrep.models",
    "DEFAULT_MODEL": "clipgrep.models",
    "update_index": "clipgrep.index.build",
    "IndexOptions": "clipgrep.index.build",
    "IndexReport": "clipgrep.index.build",
    "import_embeddings": "clipgrep.index.imported",
    "search": "clipgrep.ranking",
    "Hit": "clipgrep.ranking",
}

__all__ = ["__version__", *_API]  # noqa: PLE0604 - _API's keys are the names


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'clipgrep' has no attribute {name!r}")
