"""CLIP's BPE text tokenizer at runtime, without torch or open_clip.

This is open_clip's ``SimpleTokenizer`` ('lower' cleaning) re-implemented on
numpy and the standard library, reading the same vocabulary file
(``bpe_simple_vocab_16e6.txt.gz``, shipped in every bundle), and tested to give
identical ids. It is not Hugging Face ``tokenizers``: building an HF tokenizer
from this vocabulary costs ~105-130 ms per process (import, JSON or dict
construction in Rust) against ~30 ms here, and a search process has 0.5 s in all.

Cleaning follows open_clip: ftfy, HTML unescaping twice, whitespace collapse,
lower-casing. Printable ASCII without ``&`` passes through all of that
unchanged, so for such queries ftfy (~55 ms to import) is not even loaded.
"""
from __future__ import annotations

import html
import re
import zlib
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# SimpleTokenizer keeps lines [1, 49152-256-2] of the merges file: a 49408-token vocab
# of 2*256 byte symbols, these merges and the two special tokens.
MERGE_COUNT = 49152 - 256 - 2
SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
# open_clip's pattern, flags included: IGNORECASE matters even on lower-cased text
# ("'ſ" matches "'s"; U+0345, whose case folding is a letter, matches no alternative and is dropped).
_WORD_PATTERN = SOT_TEXT + "|" + EOT_TEXT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# For plain ASCII the same split needs only the standard library's ``re`` (``regex`` costs ~25 ms).
_ASCII_WORD_PATTERN = re.compile(
    re.escape(SOT_TEXT) + "|" + re.escape(EOT_TEXT) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
# Printable ASCII without '&': ftfy and html.unescape leave such text unchanged.
_PLAIN_ASCII = re.compile(r"[ -%'-~]*")


def clean_lower(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    if not _PLAIN_ASCII.fullmatch(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.strip().split()).strip().lower()


def bytes_to_unicode() -> list[str]:
    """open_clip's byte -> printable character table, in its order (which fixes the ids)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_order = printable + others
    chars = [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]
    table = [""] * 256
    for byte, char in zip(byte_order, chars):
        table[byte] = char
    return table


def _symbol_order() -> list[str]:
    """The 256 byte symbols in vocabulary order (open_clip lists printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def _read_head_lines(path: Path, count: int) -> list[str]:
    """The first ``count`` lines of a gzip text file, decompressing only as far as needed.

    The vocabulary file holds 262k lines but CLIP uses the first 48,895: stopping
    there takes ~6 ms instead of ~80 ms for the whole file.
    """
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16+: expect a gzip header
    out = bytearray()
    with open(path, "rb") as f:
        while out.count(b"\n") <= count:
            data = decompressor.unconsumed_tail or f.read(1 << 18)
            if not data:
                break
            out += decompressor.decompress(data, 1 << 18)
    return out.decode("utf-8").split("\n")[:count]


class ClipTokenizer:
    """Turns texts into CLIP token id rows: SOT, BPE ids, EOT, zero padding; truncated to end in EOT.

    >>> ClipTokenizer.from_file("bpe_simple_vocab_16e6.txt.gz").encode(["a photo of a cat"])[0, :7]  # doctest: +SKIP
    array([49406,   320,  1125,   539,   320,  2368, 49407])
    """

    def __init__(self, merges: list[str], *, context_length: int = 77, sot_id: int = 49406,
                 eot_id: int = 49407, pad_id: int = 0, special_texts: tuple[str, str] = (SOT_TEXT, EOT_TEXT)) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        symbols = _symbol_order()
        tokens = symbols + [s + END_OF_WORD for s in symbols] + [m.replace(" ", "", 1) for m in merges]
        tokens += [SOT_TEXT, EOT_TEXT]
        # dict(zip(...)) like open_clip: a repeated token keeps its last id.
        self._ids = dict(zip(tokens, range(len(tokens))))
        # Merge ranks keyed by "left right" strings: building 48k tuple keys costs twice as long.
        self._ranks = dict(zip(merges, range(len(merges))))
        self._byte_chars = bytes_to_unicode()
        # Literal special tokens in a query become the special ids: open_clip spells them
        # <start_of_text>/<end_of_text>, Hugging Face's CLIP tokenizer.json <|startoftext|>/<|endoftext|>.
        self._special_ids = dict(zip(special_texts, (sot_id, eot_id)))
        self._word_source = _WORD_PATTERN
        self._ascii_pattern = _ASCII_WORD_PATTERN
        if tuple(special_texts) != (SOT_TEXT, EOT_TEXT):
            alternatives = "|".join(re.escape(t) for t in special_texts)
            self._word_source = alternatives + _WORD_PATTERN[len(SOT_TEXT + "|" + EOT_TEXT):]
            self._ascii_pattern = re.compile(alternatives + _ASCII_WORD_PATTERN.pattern[
                len(re.escape(SOT_TEXT) + "|" + re.escape(EOT_TEXT)):])
        self._word_pattern: Any = None  # regex's compiled pattern, made on first non-ASCII text
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)
        self.context_length = context_length
        self.sot_id = sot_id
        self.eot_id = eot_id
        # open_clip pads with 0; Immich's exports pad with <|endoftext|> (the causal text tower
        # never looks past the first end-of-text, so only the ids differ, not the embeddings).
        self.pad_id = pad_id

    @classmethod
    def from_file(cls, path: str | Path, *, context_length: int = 77, sot_id: int = 49406,
                  eot_id: int = 49407, pad_id: int = 0,
                  special_texts: tuple[str, str] = (SOT_TEXT, EOT_TEXT)) -> ClipTokenizer:
        """Load the CLIP BPE vocabulary file (gzip text, one merge per line after a header)."""
        try:
            lines = _read_head_lines(Path(path), MERGE_COUNT + 1)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
            raise BundleError(f"cannot load tokenizer {path}: {e}",
                              "re-install the model: clipgrep models add ...") from None
        merges = lines[1:MERGE_COUNT + 1]
        if len(merges) != MERGE_COUNT or any(m.count(" ") != 1 for m in merges[:100]):
            raise BundleError(f"{path} is not a CLIP BPE vocabulary", "re-install the model: clipgrep models add ...")
        return cls(merges, context_length=context_length, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id,
                   special_texts=special_texts)

    @classmethod
    def from_spec(cls, path: str | Path, spec: dict[str, Any]) -> ClipTokenizer:
        """Load as a bundle manifest's ``tokenizer`` settings say."""
        return cls.from_file(path, context_length=spec["context_length"], sot_id=spec["sot_id"],
                             eot_id=spec["eot_id"], pad_id=spec.get("pad_id", 0),
                             special_texts=tuple(spec.get("special_texts", (SOT_TEXT, EOT_TEXT))))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids as int64 ``[len(texts), context_length]``; a lone string counts as one text."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self._frame(self._token_ids(clean_lower(text)))
            out[row, : len(ids)] = ids
        return out

    def _words(self, text: str) -> list[str]:
        if text.isascii():
            return self._ascii_pattern.findall(text)
        if self._word_pattern is None:
            import regex

            self._word_pattern = regex.compile(self._word_source, regex.IGNORECASE)
        return self._word_pattern.findall(text)

    def _token_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._words(text):
            special = self._special_ids.get(word)
            if special is not None:
                ids.append(special)
                continue
            mapped = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(self._ids[token] for token in self._bpe(mapped))
        return ids

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """open_clip's BPE: repeatedly merge the best-ranked adjacent pair; the last symbol ends the word."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            pairs = {f"{a} {b}" for a, b in pairwise(parts)}
            best = min(pairs, key=lambda pair: ranks.get(pair, 1 << 30))
            if best not in ranks:
                break
            first, second = best.split(" ")
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def _frame(self, ids: list[int]) -> list[int]:
        """Add SOT/EOT; when too long keep the first ``context_length`` and make the last one EOT."""
        framed = [self.sot_id, *ids, self.eot_id]
        if len(framed) > self.context_length:
            framed = framed[: self.context_length]
            framed[-1] = self.eot_id
        return framed
