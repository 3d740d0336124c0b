"""Training data for ``clipgrep compress``: image sets, caption lists and caption-image pairs.

Stage 1 needs one modality at a time (``load_image_set``, ``load_texts``);
stage 2 and evaluation need matched pairs (``load_pairs``, ``split_pairs``).

Every loader resolves relative paths against the directory of the file that
names them, checks that the images exist before training starts (a missing
file found after an hour of stage 1 is the worst time to find it), and raises
``ClipgrepError`` with ``file:line`` in the message for anything it rejects.

Only numpy and the standard library are imported here: the index scanner (and
pathspec with it) is imported by the one function that walks a directory.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ClipgrepError

# How many offending entries an error message names before it says "and N more".
_PREVIEW = 3

_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


# --- image sets and text lists ----------------------------------------------------------------


def load_image_set(source: str | os.PathLike[str]) -> list[Path]:
    """The images of a directory (recursive, sorted) or of a list file (one path per line).

    A directory is walked like ``clipgrep index`` walks it: image extensions from
    ``clipgrep.index.scan.IMAGE_EXTENSIONS``, hidden files and the default
    excludes (``.git/``, trash, NAS thumbnails...) left out, ``.clipgrepignore``
    honoured. A list file keeps its own order; relative paths are resolved against
    the list file's directory, blank lines and lines starting with ``#`` are
    skipped, and a path listed twice is kept once. A single image file is a set of
    one. Paths come back absolute (not resolved through symlinks).

    Example: ``load_image_set("~/datasets/coco/train2014")``
    """
    path = Path(source).expanduser()
    if path.is_dir():
        images = _scan_directory(path)
    elif path.is_file() and _is_image_name(path):
        images = [Path(os.path.abspath(path))]
    elif path.is_file():
        images = _read_image_list(path)
    else:
        raise ClipgrepError(f"{path} does not exist",
                            "pass a directory of images or a text file listing one image path per line")
    if not images:
        raise ClipgrepError(f"no images in {path}",
                            "add images (.jpg, .png, ...) or list their paths in the file, one per line")
    return images


def load_texts(path: str | os.PathLike[str]) -> list[str]:
    """One text per line (UTF-8), blank lines skipped, surrounding whitespace removed.

    There are no comment lines: a caption may well start with ``#``.

    Example: ``load_texts("captions.txt")`` for the text tower's stage 1.
    """
    path = Path(path).expanduser()
    texts = [line.strip() for line in _read_text(path).split("\n")]
    texts = [text for text in texts if text]
    if not texts:
        raise ClipgrepError(f"{path} has no texts", "put one caption per line, UTF-8 encoded")
    return texts


def _scan_directory(path: Path) -> list[Path]:
    # Imported here: scan pulls in pathspec, which list files and pairs never need.
    from ..index.scan import scan

    result = scan([path])
    if result.problems:
        # A silently smaller training set makes runs impossible to compare; say so up front.
        first = result.problems[0]
        raise ClipgrepError(
            f"{len(result.problems)} entries under {path} could not be read, e.g. {first.path}: {first.reason}",
            "fix their permissions, or list the images to use in a file instead")
    return [Path(entry.path) for entry in result.files]


def _read_image_list(path: Path) -> list[Path]:
    base = _absolute_dir(path)
    entries: list[tuple[int, Path]] = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((number, _resolve(base, line)))
    missing = [(number, image) for number, image in entries if not image.is_file()]
    if missing:
        raise ClipgrepError(
            f"{path}: {len(missing)} of {len(entries)} listed images do not exist: {_preview(missing)}",
            f"fix or remove those lines; relative paths are resolved against {base}")
    # A duplicate would sit in a contrastive batch as its own negative.
    return list(dict.fromkeys(image for _, image in entries))


def _is_image_name(path: Path) -> bool:
    from ..embed.formats import IMAGE_EXTENSIONS

    return path.suffix.lower() in IMAGE_EXTENSIONS


# --- caption-image pairs --------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class PairSet:
    """Captions and the images they describe; an image may have several captions.

    ``caption_image[t]`` (int64) is the index in ``images`` of caption t's image:
    exactly the ``text_to_image`` argument of ``metrics.recall_at_k`` and the
    ``positives`` of ``mining.mine_hard_negatives``. ``root`` is the directory
    that ``split_pairs`` takes image paths relative to (the pairs file's
    directory), so a data set that moves keeps its split. ``len()`` counts captions.
    Compared by identity: element-wise array equality has no single truth value.
    """

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray
    root: Path | None = None
    # The split each image has in the data set's own published split (Karpathy's
    # train/restval/val/test), or None for files that carry no split.
    published_split: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.caption_image, dtype=np.int64)
        if ids.shape != (len(self.captions),):
            raise ValueError(f"caption_image has shape {ids.shape}, expected ({len(self.captions)},)")
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.images)):
            raise ValueError(f"caption_image must index into images (0..{len(self.images) - 1})")
        object.__setattr__(self, "caption_image", ids)  # frozen: the one sanctioned write
        if self.published_split is not None and len(self.published_split) != len(self.images):
            raise ValueError(f"published_split has {len(self.published_split)} entries, "
                             f"expected {len(self.images)}")

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:  # the default would print every path and caption
        return f"PairSet({len(self.images)} images, {len(self.captions)} captions)"

    def caption_ids_of(self, image: int) -> np.ndarray:
        """Indices into ``captions`` of image ``image``'s captions, in file order."""
        return self._caption_ids[image]

    def captions_of(self, image: int) -> list[str]:
        """The captions of image ``image``, in file order."""
        return [self.captions[t] for t in self.caption_ids_of(image)]

    def select(self, image_ids: Sequence[int] | np.ndarray) -> PairSet:
        """A PairSet of these images (in this order) and all their captions (in file order)."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("select() got the same image twice")
        new_index = np.full(len(self.images), -1, dtype=np.int64)
        new_index[ids] = np.arange(len(ids))
        kept = np.flatnonzero(new_index[self.caption_image] >= 0)
        published = None if self.published_split is None else tuple(self.published_split[i] for i in ids)
        return PairSet([self.images[i] for i in ids], [self.captions[t] for t in kept],
                       new_index[self.caption_image[kept]], self.root, published)

    def published(self, *names: str) -> PairSet:
        """The images the data set's own split puts in one of ``names`` (e.g. ``"test"``)."""
        if self.published_split is None:
            raise ClipgrepError("these pairs carry no published split",
                                "use a Karpathy split file (dataset_coco.json, dataset_flickr30k.json), "
                                "or --split val for a held-out split by hash")
        return self.select([i for i, name in enumerate(self.published_split) if name in names])

    @cached_property
    def _caption_ids(self) -> list[np.ndarray]:
        # One stable sort instead of a full scan per captions_of() call (150k captions x 30k images).
        order = np.argsort(self.caption_image, kind="stable")
        bounds = np.searchsorted(self.caption_image[order], np.arange(len(self.images) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.images))]


def load_pairs(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> PairSet:
    """Caption-image pairs from JSONL, CSV, COCO caption annotations or a Karpathy split file.

    JSONL (``.jsonl``, ``.ndjson``, ``.json``): one object per line, either
    ``{"image": "a.jpg", "caption": "..."}`` or ``{"image": "a.jpg", "captions": ["...", ...]}``;
    other keys are ignored. CSV (``.csv``): a header row with ``image`` and
    ``caption`` columns (any order, other columns ignored). Another suffix is
    read as JSONL if its first non-blank character is ``{``, else as CSV. In both
    formats an image may appear on several rows: its captions are gathered in file
    order. Whitespace inside captions is collapsed to single spaces, as CLIP's
    tokenizer would anyway.

    A JSON document with an ``images`` list is read as a published data set:
    COCO caption annotations (``captions_train2014.json``: ``images`` with
    ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``), or
    Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``:
    ``images`` with ``filepath``/``filename``, ``split`` and ``sentences[].raw``),
    whose ``split`` is kept (``PairSet.published_split``) so that ``split_pairs``
    and ``compress eval --split test`` use the split the paper's tables use.

    Image paths are relative to ``image_root`` when given, else to the file's directory.

    Example: ``pairs = load_pairs("karpathy/dataset_flickr30k.json", image_root="flickr30k-images")``
    """
    path = Path(path).expanduser()
    text = _read_text(path)
    base = Path(os.path.abspath(Path(image_root).expanduser())) if image_root is not None else _absolute_dir(path)
    document = _json_document(text)
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        return _published_pairs(path, document, base)
    rows = _jsonl_rows(path, text) if _is_jsonl(path, text) else _csv_rows(path, text)
    return _gather_pairs(path, rows, base)


def split_pairs(pairs: PairSet, val_fraction: float = 0.1, seed: int = 0) -> tuple[PairSet, PairSet]:
    """Split into (train, val) by image: all captions of an image land on the same side.

    Each image is placed by a hash of ``seed`` and its path (relative to
    ``pairs.root`` when it lies under it): not by position and not by Python's
    per-process ``hash``. So reordering the pairs, adding images or moving the
    data set never moves an image across the split, and a model never sees in
    training an image it was validated on in an earlier run. The val side holds
    about ``val_fraction`` of the images, not exactly that many.

    Pairs that carry a published split (a Karpathy file) are split by it instead:
    train = ``train`` + ``restval``, val = ``val`` (``val_fraction`` and ``seed`` are
    not used; the ``test`` images are on neither side).

    Example: ``train, val = split_pairs(load_pairs("pairs.jsonl"), val_fraction=0.05)``
    """
    if pairs.published_split is not None:
        return pairs.published("train", "restval"), pairs.published("val")
    if not 0.0 <= val_fraction <= 1.0:
        raise ClipgrepError(f"val_fraction must be between 0 and 1, got {val_fraction}",
                            "use e.g. 0.1 for a 10% validation split")
    in_val = np.array([_unit_hash(_split_key(image, pairs.root), seed) < val_fraction
                       for image in pairs.images], dtype=bool)
    if 0.0 < val_fraction < 1.0 and (in_val.all() or not in_val.any()):
        side = "training" if in_val.all() else "validation"
        raise ClipgrepError(
            f"the {side} split is empty ({len(pairs.images)} images, val_fraction {val_fraction})",
            "use more images or a val_fraction further from 0 and 1")
    return pairs.select(np.flatnonzero(~in_val)), pairs.select(np.flatnonzero(in_val))


# A parsed row: (line number, image path as written, its captions).
_Row = tuple[int, str, list[str]]


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return False
    return suffix in _JSONL_SUFFIXES or text.lstrip().startswith("{")


def _jsonl_rows(path: Path, text: str) -> Iterator[_Row]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _row_error(path, number, f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise _row_error(path, number, "expected a JSON object like {\"image\": ..., \"caption\": ...}")
        yield number, _image_field(path, number, row.get("image")), _jsonl_captions(path, number, row)


def _jsonl_captions(path: Path, number: int, row: dict) -> list[str]:
    if "caption" in row and "captions" in row:
        raise _row_error(path, number, "has both 'caption' and 'captions'; keep one")
    if "caption" in row:
        return [_caption(path, number, row["caption"])]
    if "captions" not in row:
        raise _row_error(path, number, "missing 'caption'")
    captions = row["captions"]
    if not isinstance(captions, list) or not captions:
        raise _row_error(path, number, "'captions' must be a non-empty list of strings")
    return [_caption(path, number, caption) for caption in captions]


def _csv_rows(path: Path, text: str) -> Iterator[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        columns = [name.strip().lower() for name in header or []]
        if "image" not in columns or "caption" not in columns:
            raise _row_error(path, 1, f"the header needs 'image' and 'caption' columns, found {columns}")
        image_col, caption_col = columns.index("image"), columns.index("caption")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            # line_num is where the row ends: the same line unless a quoted caption spans lines.
            number = reader.line_num
            image = row[image_col] if image_col < len(row) else None
            caption = row[caption_col] if caption_col < len(row) else None
            yield number, _image_field(path, number, image), [_caption(path, number, caption)]
    except csv.Error as e:
        raise _row_error(path, reader.line_num, f"bad CSV ({e})") from None


def _image_field(path: Path, number: int, value: object) -> str:
    if value is None:
        raise _row_error(path, number, "missing 'image'")
    if not isinstance(value, str) or not value.strip():
        raise _row_error(path, number, "'image' must be a non-empty path string")
    return value.strip()


def _caption(path: Path, number: int, value: object) -> str:
    if value is None:
        raise _row_error(path, number, "missing 'caption'")
    if not isinstance(value, str):
        raise _row_error(path, number, f"a caption must be a string, got {type(value).__name__}")
    caption = " ".join(value.split())
    if not caption:
        raise _row_error(path, number, "empty caption")
    return caption


def _gather_pairs(path: Path, rows: Iterable[_Row], base: Path, unit: str = "line") -> PairSet:
    """``unit`` names what a row's number counts: a line of JSONL/CSV, or an entry of ``images``."""
    image_ids: dict[Path, int] = {}
    first_line: list[int] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for number, written, row_captions in rows:
        image = _resolve(base, written)
        if image not in image_ids:
            image_ids[image] = len(image_ids)
            first_line.append(number)
        captions.extend(row_captions)
        caption_image.extend([image_ids[image]] * len(row_captions))
    if not captions:
        raise ClipgrepError(f"{path} has no pairs",
                            "add one JSON object per line, or CSV rows under an 'image,caption' header")
    images = list(image_ids)
    missing = [(first_line[i], image) for i, image in enumerate(images) if not image.is_file()]
    if missing:
        raise ClipgrepError(
            f"{path}: {len(missing)} of {len(images)} images do not exist: {_preview(missing, unit)}",
            f"fix or remove those {unit}s; image paths are relative to {base} (--image-root sets it)")
    return PairSet(images, captions, np.array(caption_image, dtype=np.int64), base)


def _json_document(text: str) -> object:
    """The file as one JSON document, or None (JSONL and CSV are not one document)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None  # JSONL: the second object on the next line is "extra data"


def _published_pairs(path: Path, document: dict, base: Path) -> PairSet:
    """COCO caption annotations or a Karpathy split file, told apart by their keys."""
    entries = document["images"]
    if "annotations" in document:
        rows, splits = _coco_rows(path, entries, document["annotations"]), None
    else:
        rows, splits = _karpathy_rows(path, entries)
    pairs = _gather_pairs(path, rows, base, unit="entry")
    if splits is not None:
        # _gather_pairs numbers images in first-seen order, which is the entries' order here.
        pairs = PairSet(pairs.images, pairs.captions, pairs.caption_image, pairs.root, tuple(splits))
    return pairs


def _coco_rows(path: Path, images: list, annotations: object) -> list[_Row]:
    if not isinstance(annotations, list):
        raise _entry_error(path, "annotations", "'annotations' must be a list")
    file_of: dict[object, tuple[int, str]] = {}
    for number, image in enumerate(images, start=1):
        if not isinstance(image, dict) or "id" not in image:
            raise _entry_error(path, f"images[{number - 1}]", "needs 'id' and 'file_name'")
        file_of[image["id"]] = (number, _image_field(path, number, image.get("file_name")))
    captions: dict[object, list[str]] = {}
    for number, note in enumerate(annotations):
        if not isinstance(note, dict) or note.get("image_id") not in file_of:
            raise _entry_error(path, f"annotations[{number}]", "needs an 'image_id' listed in 'images'")
        captions.setdefault(note["image_id"], []).append(_caption(path, number + 1, note.get("caption")))
    # Images in 'images' order; an image without a caption is no pair (COCO test sets have none).
    return [(file_of[i][0], file_of[i][1], captions[i]) for i in file_of if i in captions]


_KARPATHY_SPLITS = frozenset({"train", "restval", "val", "test"})


def _karpathy_rows(path: Path, images: list) -> tuple[list[_Row], list[str]]:
    rows: list[_Row] = []
    splits: list[str] = []
    seen: set[str] = set()
    for number, image in enumerate(images, start=1):
        where = f"images[{number - 1}]"
        if not isinstance(image, dict) or not isinstance(image.get("sentences"), list):
            raise _entry_error(path, where, "needs 'filename', 'split' and a 'sentences' list")
        split = image.get("split")
        if split not in _KARPATHY_SPLITS:
            raise _entry_error(path, where, f"unknown split {split!r} (expected {', '.join(sorted(_KARPATHY_SPLITS))})")
        written = _image_field(path, number, image.get("filename"))
        if isinstance(image.get("filepath"), str) and image["filepath"]:
            written = f"{image['filepath']}/{written}"  # COCO: val2014/COCO_val2014_....jpg
        if written in seen:
            raise _entry_error(path, where, f"{written} is listed twice")
        seen.add(written)
        captions = [_caption(path, number, s.get("raw") if isinstance(s, dict) else None)
                    for s in image["sentences"]]
        if not captions:
            raise _entry_error(path, where, "has no sentences")
        rows.append((number, written, captions))
        splits.append(split)
    return rows, splits


def _entry_error(path: Path, where: str, problem: str) -> ClipgrepError:
    return ClipgrepError(f"{path}: {where}: {problem}", "fix the file, or convert it to JSONL pairs")


def _row_error(path: Path, number: int, problem: str) -> ClipgrepError:
    return ClipgrepError(f"{path}:{number}: {problem}", "fix or remove that line")


# --- shared helpers -------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a BOM is dropped), or a ClipgrepError naming the bad line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClipgrepError(f"{path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise ClipgrepError(f"{path} is a directory, not a file", "pass the file inside it") from None
    except OSError as e:
        raise ClipgrepError(f"cannot read {path}: {e.strerror or e}", "check the path and its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ClipgrepError(f"{path}:{line}: not UTF-8 text", "save the file as UTF-8") from None


def _absolute_dir(path: Path) -> Path:
    # abspath, not resolve: keep the user's spelling of symlinked data directories.
    return Path(os.path.abspath(path)).parent


def _resolve(base: Path, written: str) -> Path:
    """``written`` made absolute against ``base``; ``a/./b`` and ``a/x/../b`` become ``a/b``,
    so two spellings of one image are one image."""
    return Path(os.path.abspath(base / Path(written).expanduser()))


def _preview(entries: Sequence[tuple[int, Path]], unit: str = "line") -> str:
    shown = ", ".join(f"{unit} {number}: {image}" for number, image in entries[:_PREVIEW])
    more = len(entries) - _PREVIEW
    return f"{shown} and {more} more" if more > 0 else shown


def _split_key(image: Path, root: Path | None) -> str:
    # Both are absolute and normalised (abspath), so a plain prefix test is enough.
    if root is not None and image.is_relative_to(root):
        return image.relative_to(root).as_posix()
    return image.as_posix()


def _unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key) on every machine and Python version."""
    data = f"{seed}\0{key}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0**64
