"""Putting open_clip's CLIP BPE tokenizer into a bundle, and checking a model uses it.

The runtime (``clipgrep.embed.tokenizer``) reads the vocabulary file without
torch or open_clip. Finding it only needs open_clip installed, never imported.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..embed.tokenizer import MERGE_COUNT, VOCAB_FILENAME
from ..errors import ConversionError, NeedsExtra

_INSTALL_HINT = "install the conversion extra: pip install 'clipgrep[convert]' -c constraints.txt"


def open_clip_bpe_path() -> Path:
    """Where open_clip's merges file lives, found without importing open_clip (and so torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise NeedsExtra("the tokenizer export needs open_clip_torch, which is not installed", _INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILENAME
    if not path.is_file():
        raise ConversionError(f"open_clip's tokenizer vocabulary {path} is missing")
    return path


def write_clip_tokenizer(dest_path: str | Path) -> None:
    """Copy open_clip's CLIP BPE vocabulary (the file the bundle's tokenizer reads) to ``dest_path``.

    The file ships in the open_clip wheel (MIT licence, from OpenAI CLIP); it is
    copied as is, so the same open_clip version always gives the same bytes.
    """
    shutil.copyfile(open_clip_bpe_path(), dest_path)


def clip_tokenizer_settings(open_clip_tokenizer: Any) -> dict[str, Any]:
    """The bundle's tokenizer settings, if this open_clip tokenizer is one we reproduce exactly.

    Only a plain ``SimpleTokenizer`` with 'lower' cleaning, no extra special tokens and no
    reduction (random-mask) strategy qualifies; anything else raises ``ConversionError``.
    """
    tok = open_clip_tokenizer
    cls = type(tok)
    if cls.__module__ != "open_clip.tokenizer" or cls.__qualname__ != "SimpleTokenizer":
        _unsupported(f"{cls.__module__}.{cls.__qualname__}")
    # A real SimpleTokenizer means open_clip.tokenizer is loaded: compare the function by identity.
    clean_lower = getattr(sys.modules.get(cls.__module__), "_clean_lower", object())
    if getattr(tok, "clean_fn", None) is not clean_lower:
        _unsupported("SimpleTokenizer with non-'lower' text cleaning")
    if getattr(tok, "reduction_fn", None) is not None:
        _unsupported("SimpleTokenizer with a reduction mask")
    sot_id, eot_id = tok.sot_token_id, tok.eot_token_id
    if list(tok.all_special_ids) != [sot_id, eot_id] or tok.vocab_size != MERGE_COUNT + 2 * 256 + 2:
        _unsupported("SimpleTokenizer with a custom vocabulary or extra special tokens")
    if not isinstance(tok.context_length, int) or tok.context_length < 2:
        _unsupported(f"SimpleTokenizer with context length {tok.context_length!r}")
    return {
        "kind": "clip-bpe",
        "context_length": tok.context_length,
        "sot_id": sot_id,
        "eot_id": eot_id,
        "clean": "lower",
    }


def _unsupported(what: str) -> NoReturn:
    raise ConversionError(f"this model's tokenizer ({what}) isn't supported yet")
