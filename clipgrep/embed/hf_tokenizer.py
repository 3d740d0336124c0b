"""Non-CLIP tokenizers (XLM-RoBERTa, NLLB, SigLIP...) from an export's ``tokenizer.json``.

Runs Hugging Face ``tokenizers`` with exactly the settings Immich's runtime
applies to its published exports (immich-app/immich,
``machine-learning/immich_ml/models/clip/textual.py``, ``OpenClipTextualEncoder``
and ``MClipTextualEncoder``; ``transforms.clean_text``; checked 2026-12):

- text cleaning: whitespace runs collapse to one space (``" ".join(text.split())``);
  with ``text_cfg.tokenizer_kwargs.clean == "canonicalize"`` in config.json
  (SigLIP) punctuation (``string.punctuation``) is also removed and the text lower-cased;
- padding to ``text_cfg.context_length`` (default 77) with the ``pad_token`` of
  ``tokenizer_config.json`` (its id from tokenizer.json), truncation to the same length;
- NLLB models (Immich: model name starting with ``nllb``) get the FLORES-200
  code of the query language glued in front of the text (``f"{code}{text}"``,
  no space); with no language, nothing is prepended (as in Immich).

Runtime module: ``tokenizers`` is imported on first use only.
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, ClipgrepError

_PUNCTUATION = str.maketrans("", "", string.punctuation)

# A subset of Immich's WEBLATE_TO_FLORES200 (immich_ml/models/constants.py): ISO 639-1 -> FLORES-200.
FLORES200 = {
    "ar": "arb_Arab", "bg": "bul_Cyrl", "ca": "cat_Latn", "cs": "ces_Latn", "da": "dan_Latn",
    "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn", "es": "spa_Latn", "fa": "pes_Arab",
    "fi": "fin_Latn", "fr": "fra_Latn", "he": "heb_Hebr", "hi": "hin_Deva", "hu": "hun_Latn",
    "id": "ind_Latn", "it": "ita_Latn", "ja": "jpn_Hira", "ko": "kor_Hang", "nl": "nld_Latn",
    "pl": "pol_Latn", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "sv": "swe_Latn",
    "th": "tha_Thai", "tr": "tur_Latn", "uk": "ukr_Cyrl", "vi": "vie_Latn", "zh": "zho_Hans",
}


def clean_text(text: str, *, canonicalize: bool = False) -> str:
    text = " ".join(text.split())
    return text.translate(_PUNCTUATION).lower() if canonicalize else text


def flores_code(language: str) -> str:
    """FLORES-200 code for ``language`` (``fr``, ``pt-BR``, or already ``fra_Latn``)."""
    if "_" in language and len(language) == 8:
        return language
    code = FLORES200.get(language) or FLORES200.get(language.replace("_", "-").split("-")[0].lower())
    if code is None:
        raise ClipgrepError(f"unknown query language {language!r}",
                            f"use an ISO 639-1 code ({', '.join(sorted(FLORES200))}) or a FLORES-200 code")
    return code


class HfTokenizer:
    """Token ids and attention masks, int64 ``[N, context_length]`` each."""

    def __init__(self, path: str | Path, *, context_length: int, pad_token: str, clean: str = "whitespace",
                 language_prefix: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path))
        except ImportError:
            raise ClipgrepError("this model's tokenizer needs the 'tokenizers' package, which is not installed",
                                "pip install tokenizers") from None
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for unreadable files
            raise BundleError(f"cannot load tokenizer {path}: {e}", "re-install the model: clipgrep models add ...") \
                from None
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise BundleError(f"{path} has no pad token {pad_token!r}", "re-install the model: clipgrep models add ...")
        tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
        tokenizer.enable_truncation(max_length=context_length)
        self._tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = pad_id
        self.canonicalize = clean == "canonicalize"
        self.language_prefix = language_prefix

    @classmethod
    def from_spec(cls, path: Path, spec: dict[str, Any]) -> HfTokenizer:
        return cls(path, context_length=spec["context_length"], pad_token=spec["pad_token"],
                   clean=spec.get("clean", "whitespace"), language_prefix=spec.get("language_prefix"))

    def encode_with_mask(self, texts: Sequence[str], language: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        prefix = self.prefix(language)
        encodings = self._tokenizer.encode_batch([prefix + clean_text(t, canonicalize=self.canonicalize)
                                                  for t in texts])
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        return ids, mask

    def encode(self, texts: Sequence[str], language: str | None = None) -> np.ndarray:
        return self.encode_with_mask(texts, language)[0]

    def prefix(self, language: str | None) -> str:
        """What goes in front of a query in ``language``: its FLORES-200 code for NLLB, else nothing."""
        return flores_code(language) if language and self.language_prefix == "flores200" else ""
