"""CLIP's BPE text tokenizer at runtime, without torch or open_clip.

Gives the same ids as open_clip's ``SimpleTokenizer`` with 'lower' cleaning. The
cleaning and word splitting are open_clip's own code (ftfy, html, the ``regex``
pattern); the byte-level BPE of each word is done by Hugging Face ``tokenizers``
from the JSON file written by ``clipgrep.convert.tokenizer_export``.

The words are split here rather than by HF for two reasons. open_clip treats
``<start_of_text>``/``<end_of_text>`` in the text as special only where its regex
matches them as a whole word (``"😀<end_of_text>"`` is ordinary punctuation to
it), whereas HF cuts registered special tokens out of the text first. And HF's
regex engine (Oniguruma) splits differently from ``regex`` with IGNORECASE and
on characters the two Unicode tables disagree about.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BundleError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
# open_clip's pattern, flags included: IGNORECASE matters even on lower-cased text
# ("'ſ" matches "'s"; U+0345, whose case folding is a letter, matches no alternative and is dropped).
_WORD_PATTERN = SOT_TEXT + "|" + EOT_TEXT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean_lower(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Turns texts into CLIP token id rows: SOT, BPE ids, EOT, zero padding; truncated to end in EOT."""

    def __init__(self, bpe: Tokenizer, *, context_length: int = 77, sot_id: int = 49406, eot_id: int = 49407):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        import regex

        self._bpe = bpe
        self._pattern = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self._special_ids = {SOT_TEXT: sot_id, EOT_TEXT: eot_id}
        self.context_length = context_length
        self.sot_id = sot_id
        self.eot_id = eot_id

    @classmethod
    def from_file(
        cls, path: str | Path, *, context_length: int = 77, sot_id: int = 49406, eot_id: int = 49407
    ) -> ClipTokenizer:
        """Load the tokenizer JSON written by ``write_clip_tokenizer``."""
        from tokenizers import Tokenizer

        try:
            bpe = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files
            raise BundleError(f"cannot load tokenizer {path}: {e}") from None
        return cls(bpe, context_length=context_length, sot_id=sot_id, eot_id=eot_id)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids as int64 ``[len(texts), context_length]``; a lone string counts as one text."""
        if isinstance(texts, str):
            texts = [texts]
        rows = self._token_ids([self._pattern.findall(clean_lower(t)) for t in texts])
        out = np.zeros((len(rows), self.context_length), dtype=np.int64)
        for i, ids in enumerate(rows):
            ids = self._frame(ids)
            out[i, : len(ids)] = ids
        return out

    def _token_ids(self, texts_words: list[list[str]]) -> list[list[int]]:
        """Each text's ids; all ordinary-word runs of all texts go to HF in one batch."""
        layouts = [self._split_specials(words) for words in texts_words]
        runs = [part for layout in layouts for part in layout if isinstance(part, list)]
        encoded = iter(self._encode_runs(runs))
        rows: list[list[int]] = []
        for layout in layouts:
            row: list[int] = []
            for part in layout:
                if isinstance(part, int):
                    row.append(part)
                else:
                    row.extend(next(encoded))
            rows.append(row)
        return rows

    def _split_specials(self, words: list[str]) -> list[int | list[str]]:
        """The words as special-token ids and the runs of ordinary words between them."""
        layout: list[int | list[str]] = []
        for word in words:
            special = self._special_ids.get(word)
            if special is not None:
                layout.append(special)
            elif layout and isinstance(layout[-1], list):
                layout[-1].append(word)
            else:
                layout.append([word])
        return layout

    def _encode_runs(self, runs: list[list[str]]) -> list[list[int]]:
        if not runs:
            return []
        # is_pretokenized: each word is BPE'd on its own, as open_clip's per-word loop does.
        encodings: list[Any] = self._bpe.encode_batch(runs, is_pretokenized=True, add_special_tokens=False)
        return [e.ids for e in encodings]

    def _frame(self, ids: list[int]) -> list[int]:
        """Add SOT/EOT; when too long keep the first ``context_length`` and make the last one EOT."""
        framed = [self.sot_id, *ids, self.eot_id]
        if len(framed) > self.context_length:
            framed = framed[: self.context_length]
            framed[-1] = self.eot_id
        return framed
