"""The runtime CLIP tokenizer gives open_clip's ids exactly, without importing torch."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipgrep.convert.tokenizer_export import clip_tokenizer_settings, write_clip_tokenizer
from clipgrep.embed.tokenizer import ClipTokenizer
from clipgrep.errors import BundleError, ConversionError, NeedsExtra

from .convert_support import require_open_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
SOT, EOT = 49406, 49407

HAND_MADE = [
    "",
    " ",
    " \t\n\r  ",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "MiXeD CaSe WoRdS",
    "don't stop",
    "DON'T STOP",
    "it's, we're, they've, I'm, we'll, he'd",
    "'s 't 're 've 'm 'll 'd",
    "don'\u017f \u017fo \u0130stanbul \u212aelvin",
    "ypogegrammeni \u0345 a\u0345b !\u0345!",
    "rock 'n' roll '' '''",
    "\u2018curly\u2019 \u201cdouble quotes\u201d",
    "Tom &amp; Jerry",
    "fish &amp;amp; chips",
    "it&#39;s &lt;b&gt;bold&lt;/b&gt; &nbsp;here",
    "&amp;lt;end_of_text&amp;gt;",
    "cafe\u0301 vs caf\u00e9",
    "n\u0303 a\u0308 o\u0308\u0301",
    "Stra\u00dfe STRASSE \u1e9e",
    "日本語のテキスト",
    "猫の写真 一只猫",
    "한국어 고양이 사진",
    "Привет, мир! КОШКА",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε ΣΙΣΥΦΟΣ",
    "a dog \U0001f436 and a cat \U0001f431",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 emoji",
    "flags \U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1f8",
    "thumbs \U0001f44d\U0001f3fd skin tone",
    "\U0001f600\U0001f600\U0001f600",
    "\ufb01nal \ufb02ower \ufb03",
    "\uff21\uff22\uff23 \uff11\uff12\uff13 \uff01\uff1f",
    "caf\u00c3\u00a9 \u00e2\u20ac\u0153mojibake\u00e2\u20ac\u009d",
    "tab\tseparated\tvalues\nand\nnewlines",
    "non\u00a0breaking\u00a0spaces",
    "zero\u200bwidth\u200bspace and \ufeffBOM",
    "\x1b[31mred\x1b[0m text",
    "control \x00\x01\x07 chars",
    "3.14159 and 2,718 and 1e-10 and -42",
    "0123456789",
    "\u0661\u0662\u0663 \u0967\u0968\u0969 \u2460\u2461 \u00bd",
    "https://example.com/path?q=cat&lang=en#frag",
    "/home/user/Pictures/IMG_0001.JPG",
    "C:\\Users\\me\\Desktop\\photo (1).png",
    "def f(x): return x**2 + 1  # comment",
    "if (a && b || !c) { return arr[i]; }",
    "<start_of_text>",
    "<end_of_text>",
    "<start_of_text>a cat<end_of_text>",
    "a cat <end_of_text> a dog",
    "a cat<end_of_text>a dog",
    "\U0001f600<end_of_text>",
    "\U0001f600 <end_of_text>",
    "!<start_of_text>",
    "<START_OF_TEXT> upper case special",
    "<start_of_text<end_of_text>>",
    "<<end_of_text>",
    "<end_of_text><end_of_text><start_of_text>",
    "a" * 300,
]

# Texts well over 77 tokens (and one just over): truncation must keep SOT and end in EOT.
LONG = [
    "the quick brown fox jumps over the lazy dog " * 10,
    "0123456789" * 10,
    "\U0001f436\U0001f431 " * 50,
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8" * 20,
    "word " * 76,
    "<end_of_text> " * 100,
]
HAND_MADE += LONG

GOLDEN_TEXTS = [
    "",
    "a photo of a cat",
    "A PHOTO OF A DOG",
    "don't",
    "Tom &amp; Jerry",
    "caf\u00e9 Stra\u00dfe",
    "猫の写真",
    "Привет",
    "\U0001f436 \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7",
    "https://example.com/img_01.jpg",
    "3.14 and 42",
    "a cat<end_of_text>a dog",
    "\U0001f600<end_of_text>",
    "  tabs\tand\nnewlines  ",
    "the quick brown fox jumps over the lazy dog " * 10,
]

_FUZZ_PIECES = [
    "a", "cat", "Photo", "DON'T", "'s", "'LL", "'\u017f", "\u017f", "\u0130", "\u212a", "\u00df", "\u01c5",
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<", ">", "text>", "_of_",
    "&amp;", "&amp;amp;", "&#39;", "&lt;end_of_text&gt;", "&nbsp;",
    "\U0001f600", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1eb\U0001f1f7", "\ufb01",
    "\u00c3\u00a9", "\u00e2\u20ac\u2122", "\x1b[0m", "http://x.io/a?b=c", "3.14",
]
# Code point ranges to draw random characters from (surrogates excluded: not encodable).
_FUZZ_RANGES = [
    (0x00, 0x1F), (0x20, 0x7E), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF),
    (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x3040, 0x30FF),
    (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF),
]
_FUZZ_SEPARATORS = ["", "", " ", "  ", "\n", "\t", "\u00a0", "\u200b"]


def _fuzz_text(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(0, 10)):
        if rng.random() < 0.4:
            parts.append(rng.choice(_FUZZ_PIECES))
        else:
            lo, hi = rng.choice(_FUZZ_RANGES)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        parts.append(rng.choice(_FUZZ_SEPARATORS))
    return "".join(parts)


def _open_clip_installed() -> bool:
    return importlib.util.find_spec("open_clip") is not None


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer JSON built from open_clip's vocabulary file (open_clip installed, not imported)."""
    if not _open_clip_installed():
        pytest.skip("open_clip_torch is not installed")
    path = tmp_path_factory.mktemp("tokenizer") / "bpe_vocab.txt.gz"
    write_clip_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def clip_tokenizer(vocab_file: Path) -> ClipTokenizer:
    return ClipTokenizer.from_file(vocab_file)


@pytest.fixture(scope="session")
def reference() -> Any:
    """open_clip's own tokenizer for ViT-B-32."""
    return require_open_clip().get_tokenizer("ViT-B-32")


def _mismatches(texts: list[str], ours: np.ndarray, theirs: np.ndarray) -> list[str]:
    return [texts[i] for i in np.flatnonzero((ours != theirs).any(axis=1))]


@pytest.mark.convert
@pytest.mark.parametrize("context_length", [77, 32])
def test_hand_made_texts_match_open_clip(vocab_file: Path, reference: Any, context_length: int) -> None:
    tokenizer = ClipTokenizer.from_file(vocab_file, context_length=context_length)
    ours = tokenizer.encode(HAND_MADE)
    theirs = reference(HAND_MADE, context_length=context_length).numpy()
    assert ours.dtype == np.int64
    assert ours.shape == theirs.shape == (len(HAND_MADE), context_length)
    assert _mismatches(HAND_MADE, ours, theirs) == []


@pytest.mark.convert
def test_fuzzed_texts_match_open_clip(clip_tokenizer: ClipTokenizer, reference: Any) -> None:
    rng = random.Random(20240611)
    texts = [_fuzz_text(rng) for _ in range(2000)]
    assert sum("<end_of_text>" in t or "<start_of_text>" in t for t in texts) > 100
    mismatched = _mismatches(texts, clip_tokenizer.encode(texts), reference(texts).numpy())
    assert mismatched == [], f"{len(mismatched)} of {len(texts)} differ, e.g. {mismatched[:5]!r}"


@pytest.mark.parametrize("context_length", [77, 32])
def test_long_texts_are_truncated_to_end_in_eot(vocab_file: Path, context_length: int) -> None:
    rows = ClipTokenizer.from_file(vocab_file, context_length=context_length).encode(LONG)
    assert rows.shape == (len(LONG), context_length)
    assert (rows[:, 0] == SOT).all()
    assert (rows[:, -1] == EOT).all()


def test_short_text_is_framed_and_zero_padded(clip_tokenizer: ClipTokenizer) -> None:
    row = clip_tokenizer.encode(["a photo of a cat"])[0]
    n = int(np.flatnonzero(row)[-1]) + 1
    assert row[0] == SOT and row[n - 1] == EOT
    assert (row[n:] == 0).all()
    assert clip_tokenizer.encode([""])[0, :3].tolist() == [SOT, EOT, 0]


def test_lone_string_is_one_text(clip_tokenizer: ClipTokenizer) -> None:
    np.testing.assert_array_equal(clip_tokenizer.encode("a cat"), clip_tokenizer.encode(["a cat"]))


def test_no_texts_gives_empty_batch(clip_tokenizer: ClipTokenizer) -> None:
    assert clip_tokenizer.encode([]).shape == (0, 77)


def test_token_ids_golden(clip_tokenizer: ClipTokenizer, golden: Any) -> None:
    rows = clip_tokenizer.encode(GOLDEN_TEXTS)
    # The row up to its last non-zero id (the final EOT); the rest is padding.
    entries = [
        {"text": text, "ids": row[: int(np.flatnonzero(row)[-1]) + 1].tolist()}
        for text, row in zip(GOLDEN_TEXTS, rows)
    ]
    lines = ",\n".join("  " + json.dumps(entry, ensure_ascii=True) for entry in entries)
    golden.check("token_ids.json", "[\n" + lines + "\n]\n")


def test_written_tokenizer_is_byte_identical(vocab_file: Path, tmp_path: Path) -> None:
    again = tmp_path / "bpe_vocab.txt.gz"
    write_clip_tokenizer(again)
    assert again.read_bytes() == vocab_file.read_bytes()


def test_runtime_does_not_import_torch_or_open_clip(vocab_file: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from clipgrep.convert.tokenizer_export import write_clip_tokenizer
        from clipgrep.embed.tokenizer import ClipTokenizer

        write_clip_tokenizer({str(tmp_path / "bpe_vocab.txt.gz")!r})
        ids = ClipTokenizer.from_file({str(tmp_path / "bpe_vocab.txt.gz")!r}).encode(["a cat"])
        assert ids[0, 0] == {SOT}, ids
        print(sorted(m for m in ("torch", "open_clip") if m in sys.modules))
        """
    )
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # Written by another process, so also a check that no per-process hash seed leaks into the file.
    assert (tmp_path / "bpe_vocab.txt.gz").read_bytes() == vocab_file.read_bytes()


def test_export_without_open_clip_needs_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(NeedsExtra, match="open_clip_torch"):
        write_clip_tokenizer(tmp_path / "bpe_vocab.txt.gz")


def test_missing_tokenizer_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot load tokenizer"):
        ClipTokenizer.from_file(tmp_path / "nope.json")


@pytest.mark.convert
def test_settings_of_open_clip_tokenizer(reference: Any) -> None:
    assert clip_tokenizer_settings(reference) == {
        "kind": "clip-bpe",
        "context_length": 77,
        "sot_id": SOT,
        "eot_id": EOT,
        "clean": "lower",
    }


class _HFTokenizerLookalike:
    context_length = 64


class SimpleTokenizer:
    """Same name as open_clip's class but from another module: still not supported."""

    context_length = 77


@pytest.mark.parametrize("tokenizer", [_HFTokenizerLookalike(), SimpleTokenizer(), object()])
def test_unsupported_tokenizer_is_a_conversion_error(tokenizer: object) -> None:
    with pytest.raises(ConversionError, match="isn't supported yet"):
        clip_tokenizer_settings(tokenizer)


@pytest.mark.convert
@pytest.mark.parametrize("change", ["clean_fn", "reduction_fn"])
def test_other_simple_tokenizer_settings_are_a_conversion_error(reference: Any, change: str) -> None:
    variant = copy.copy(reference)
    setattr(variant, change, lambda *args, **kwargs: None)
    with pytest.raises(ConversionError, match="isn't supported yet"):
        clip_tokenizer_settings(variant)
