"""Exporting open_clip's CLIP BPE tokenizer as a Hugging Face ``tokenizers`` JSON file.

The runtime (``clipgrep.embed.tokenizer``) loads that file without torch or open_clip.
Building it only reads open_clip's merges file, so open_clip must be installed
but is never imported here.
"""
from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConversionError, NeedsExtra

_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# SimpleTokenizer keeps lines [1, 49152-256-2] of the merges file: a 49408-token vocab
# of 2*256 byte symbols, these merges and the two special tokens.
_MERGE_COUNT = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
END_OF_WORD = "</w>"
_INSTALL_HINT = "install the conversion extra: pip install 'clipgrep[convert]' -c constraints.txt"


def open_clip_bpe_path() -> Path:
    """Where open_clip's merges file lives, found without importing open_clip (and so torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise NeedsExtra("the tokenizer export needs open_clip_torch, which is not installed", _INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / _BPE_FILENAME
    if not path.is_file():
        raise ConversionError(f"open_clip's tokenizer vocabulary {path} is missing")
    return path


def _bytes_to_unicode() -> list[str]:
    """open_clip's byte -> printable character table, in its insertion order (which fixes the ids)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]


def clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and ranked merges exactly as ``SimpleTokenizer.__init__`` builds them."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    if len(merges) != _MERGE_COUNT or any(len(m) != 2 for m in merges):
        raise ConversionError(f"{bpe_path} is not the CLIP BPE vocabulary that open_clip expects")
    symbols = _bytes_to_unicode()
    word_ends = [s + END_OF_WORD for s in symbols]
    tokens = symbols + word_ends + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    # dict(zip(...)) like open_clip: a repeated token would keep its last id.
    return dict(zip(tokens, range(len(tokens)))), merges  # type: ignore[return-value]


def build_clip_tokenizer_json(bpe_path: Path) -> str:
    """The tokenizer as compact JSON; the same input always gives the same string."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab, merges = clip_vocab_and_merges(bpe_path)
    # The special tokens stay plain vocab entries, not registered special tokens: HF would split
    # them out before the pre-tokenizer, which open_clip does not do (see embed.tokenizer).
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
    # The runtime splits words itself with open_clip's regex; HF only maps bytes and runs BPE.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tokenizer.to_str(pretty=False)


def write_clip_tokenizer(dest_path: str | Path) -> None:
    """Write the HF tokenizer JSON for open_clip's default CLIP BPE vocabulary to ``dest_path``."""
    text = build_clip_tokenizer_json(open_clip_bpe_path())
    Path(dest_path).write_bytes(text.encode("utf-8"))


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
    if list(tok.all_special_ids) != [sot_id, eot_id] or tok.vocab_size != _MERGE_COUNT + 2 * 256 + 2:
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
