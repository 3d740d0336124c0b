"""Image sets, text lists, caption-image pairs and the by-image train/val split."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipgrep.compress.data import PairSet, load_image_set, load_pairs, load_texts, split_pairs
from clipgrep.errors import ClipgrepError


def touch(*paths: Path) -> None:
    """Empty files are enough: the loaders check existence, they never decode images."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_of(call, *args) -> str:
    with pytest.raises(ClipgrepError) as info:
        call(*args)
    assert info.value.hint, "every error says how to fix it"
    assert "\n" not in str(info.value), "errors render on one line"
    return info.value.message


# --- load_image_set -----------------------------------------------------------------------


def test_directory_is_walked_recursively_sorted_images_only(tmp_path: Path) -> None:
    touch(tmp_path / "b.jpg", tmp_path / "a" / "z.PNG", tmp_path / "a" / "notes.txt",
          tmp_path / ".hidden.jpg", tmp_path / ".git" / "icon.png")
    images = load_image_set(tmp_path)
    assert images == [tmp_path / "a" / "z.PNG", tmp_path / "b.jpg"]
    assert all(image.is_absolute() for image in images)


def test_list_file_resolves_against_its_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    touch(data / "img" / "1.jpg", data / "img" / "2.jpg", tmp_path / "elsewhere.png")
    listing = data / "train.txt"
    listing.write_text(f"# train images\nimg/2.jpg\n\n  img/1.jpg  \n./img/2.jpg\n{tmp_path / 'elsewhere.png'}\n",
                       encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # relative entries must not depend on the working directory
    # File order is kept; the second spelling of img/2.jpg is the same image, kept once.
    assert load_image_set(listing) == [data / "img" / "2.jpg", data / "img" / "1.jpg", tmp_path / "elsewhere.png"]


def test_single_image_is_a_set_of_one(tmp_path: Path) -> None:
    touch(tmp_path / "a.webp")
    assert load_image_set(tmp_path / "a.webp") == [tmp_path / "a.webp"]


def test_missing_source(tmp_path: Path) -> None:
    assert str(tmp_path / "nope") in error_of(load_image_set, tmp_path / "nope")


def test_directory_without_images(tmp_path: Path) -> None:
    touch(tmp_path / "readme.txt")
    assert "no images" in error_of(load_image_set, tmp_path)


def test_list_of_only_comments_is_empty(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n\n", encoding="utf-8")
    assert "no images" in error_of(load_image_set, listing)


def test_missing_list_entries_report_count_and_first_lines(tmp_path: Path) -> None:
    touch(tmp_path / "ok.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("ok.jpg\n" + "".join(f"gone{i}.jpg\n" for i in range(5)), encoding="utf-8")
    message = error_of(load_image_set, listing)
    assert message.startswith(f"{listing}: 5 of 6 listed images do not exist")
    assert f"line 2: {tmp_path / 'gone0.jpg'}" in message and "line 4:" in message
    assert "line 5:" not in message and "and 2 more" in message


def test_list_file_not_utf8_names_the_line(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.jpg\n\xff\xfe.jpg\n")
    assert error_of(load_image_set, listing) == f"{listing}:2: not UTF-8 text"


# --- load_texts ---------------------------------------------------------------------------


def test_texts_one_per_line_blanks_skipped(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_bytes("\ufeffa red circle\r\n\n  # not a comment \n\t\nzwei Würfel\n".encode())
    assert load_texts(path) == ["a red circle", "# not a comment", "zwei Würfel"]


def test_texts_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert str(empty) in error_of(load_texts, empty)
    assert "does not exist" in error_of(load_texts, tmp_path / "missing.txt")
    assert "is a directory" in error_of(load_texts, tmp_path)


# --- load_pairs ---------------------------------------------------------------------------


def test_jsonl_single_and_multiple_captions(tmp_path: Path) -> None:
    touch(tmp_path / "img" / "a.jpg", tmp_path / "img" / "b.jpg")
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "img/a.jpg", "caption": "a dog"},
        {"image": "img/b.jpg", "captions": ["a cat", "  a   sleeping\ncat "], "source": "ignored"},
        {"image": "./img/a.jpg", "caption": "a brown dog"},  # same image, other spelling
    ])
    pairs = load_pairs(path)
    assert pairs.images == [tmp_path / "img" / "a.jpg", tmp_path / "img" / "b.jpg"]
    assert pairs.captions == ["a dog", "a cat", "a sleeping cat", "a brown dog"]
    assert pairs.caption_image.dtype == np.int64 and pairs.caption_image.tolist() == [0, 1, 1, 0]
    assert pairs.captions_of(0) == ["a dog", "a brown dog"] and pairs.captions_of(1) == ["a cat", "a sleeping cat"]
    assert pairs.caption_ids_of(0).tolist() == [0, 3]
    assert len(pairs) == 4 and pairs.root == tmp_path
    assert repr(pairs) == "PairSet(2 images, 4 captions)"


def test_csv_header_order_quotes_bom_crlf_and_repeated_images(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg", tmp_path / "sub" / "b.png")
    path = tmp_path / "pairs.csv"
    path.write_bytes('\ufeffid, Caption ,image\r\n1,"a dog, running",a.jpg\r\n2,a cat,sub/b.png\r\n\r\n'
                     '3,"a dog\r\nagain",a.jpg\r\n'.encode())
    pairs = load_pairs(path)
    assert pairs.images == [tmp_path / "a.jpg", tmp_path / "sub" / "b.png"]
    assert pairs.captions == ["a dog, running", "a cat", "a dog again"]
    assert pairs.caption_image.tolist() == [0, 1, 0]


def test_unknown_suffix_is_sniffed(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    (tmp_path / "pairs.txt").write_text('{"image": "a.jpg", "caption": "x"}\n', encoding="utf-8")
    (tmp_path / "table.txt").write_text("image,caption\na.jpg,y\n", encoding="utf-8")
    assert load_pairs(tmp_path / "pairs.txt").captions == ["x"]
    assert load_pairs(tmp_path / "table.txt").captions == ["y"]


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "not valid JSON"),
    ('["a.jpg", "a dog"]', "expected a JSON object"),
    ('{"caption": "a dog"}', "missing 'image'"),
    ('{"image": 3, "caption": "a dog"}', "'image' must be a non-empty path string"),
    ('{"image": "a.jpg"}', "missing 'caption'"),
    ('{"image": "a.jpg", "caption": "x", "captions": ["y"]}', "has both 'caption' and 'captions'"),
    ('{"image": "a.jpg", "captions": []}', "'captions' must be a non-empty list"),
    ('{"image": "a.jpg", "captions": "a dog"}', "'captions' must be a non-empty list"),
    ('{"image": "a.jpg", "captions": ["ok", 7]}', "a caption must be a string, got int"),
    ('{"image": "a.jpg", "caption": "   "}', "empty caption"),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    touch(tmp_path / "a.jpg")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "fine"}\n\n' + line + "\n", encoding="utf-8")
    assert error_of(load_pairs, path).startswith(f"{path}:3: {problem}")


@pytest.mark.parametrize(("text", "expected"), [
    ("image,text\na.jpg,a dog\n", ":1: the header needs 'image' and 'caption' columns"),
    ("", ":1: the header needs 'image' and 'caption' columns"),
    ("image,caption\na.jpg,a dog\na.jpg\n", ":3: missing 'caption'"),
    ("image,caption\na.jpg,a dog\n,a cat\n", ":3: 'image' must be a non-empty path string"),
    ("image,caption\na.jpg,\" \"\n", ":2: empty caption"),
])
def test_bad_csv_row_names_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    touch(tmp_path / "a.jpg")
    path = tmp_path / "pairs.csv"
    path.write_text(text, encoding="utf-8")
    assert error_of(load_pairs, path).startswith(f"{path}{expected}")


def test_missing_images_report_count_and_first_example(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "a.jpg", "caption": "x"}, {"image": "gone.jpg", "caption": "y"},
        {"image": "gone.jpg", "caption": "z"}, {"image": "lost.jpg", "caption": "w"}])
    message = error_of(load_pairs, path)
    assert message == (f"{path}: 2 of 3 images do not exist: line 2: {tmp_path / 'gone.jpg'}, "
                       f"line 4: {tmp_path / 'lost.jpg'}")


def test_empty_and_missing_pairs_files(tmp_path: Path) -> None:
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert error_of(load_pairs, empty) == f"{empty} has no pairs"
    header_only = tmp_path / "pairs.csv"
    header_only.write_text("image,caption\n", encoding="utf-8")
    assert error_of(load_pairs, header_only) == f"{header_only} has no pairs"
    assert "does not exist" in error_of(load_pairs, tmp_path / "nope.jsonl")


def test_pairset_select_and_validation() -> None:
    pairs = PairSet([Path("/a"), Path("/b"), Path("/c")], ["a1", "b1", "a2", "c1"], np.array([0, 1, 0, 2]))
    picked = pairs.select([2, 0])
    assert picked.images == [Path("/c"), Path("/a")]
    assert picked.captions == ["a1", "a2", "c1"] and picked.caption_image.tolist() == [1, 1, 0]
    with pytest.raises(ValueError):
        PairSet([Path("/a")], ["x", "y"], np.array([0]))
    with pytest.raises(ValueError):
        PairSet([Path("/a")], ["x"], np.array([1]))


# --- split_pairs --------------------------------------------------------------------------


def make_set(root: Path, n_images: int, order_seed: int | None = None, name: str = "pairs.jsonl") -> PairSet:
    """n_images images with 1-3 captions each, rows optionally shuffled."""
    rows = [{"image": f"img/{i:03d}.jpg", "caption": f"image {i} caption {j}"}
            for i in range(n_images) for j in range(i % 3 + 1)]
    touch(*(root / "img" / f"{i:03d}.jpg" for i in range(n_images)))
    if order_seed is not None:
        random.Random(order_seed).shuffle(rows)
    return load_pairs(write_jsonl(root / name, rows))


def val_names(val: PairSet) -> set[str]:
    return {image.name for image in val.images}


def test_split_by_image_keeps_captions_together(tmp_path: Path) -> None:
    pairs = make_set(tmp_path, 200)
    train, val = split_pairs(pairs, val_fraction=0.25, seed=0)
    assert 30 < len(val.images) < 70
    assert not set(train.images) & set(val.images)
    assert set(train.images) | set(val.images) == set(pairs.images)
    assert len(train) + len(val) == len(pairs)
    for part in (train, val):
        for i, image in enumerate(part.images):
            original = pairs.images.index(image)
            assert part.captions_of(i) == pairs.captions_of(original)


def test_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    pairs = make_set(tmp_path, 100)
    _, val = split_pairs(pairs, 0.3, seed=1)
    _, again = split_pairs(pairs, 0.3, seed=1)
    _, other_seed = split_pairs(pairs, 0.3, seed=2)
    assert val_names(val) == val_names(again) != val_names(other_seed)


def test_split_stable_under_reordering_growth_and_moving(tmp_path: Path) -> None:
    _, base = split_pairs(make_set(tmp_path / "a", 80), 0.2)
    _, shuffled = split_pairs(make_set(tmp_path / "b", 80, order_seed=7), 0.2)
    _, grown = split_pairs(make_set(tmp_path / "c", 160, order_seed=3), 0.2)
    shutil.move(tmp_path / "a", tmp_path / "moved")
    _, moved = split_pairs(load_pairs(tmp_path / "moved" / "pairs.jsonl"), 0.2)
    assert val_names(shuffled) == val_names(base) == val_names(moved)
    old = {f"{i:03d}.jpg" for i in range(80)}
    assert val_names(grown) & old == val_names(base)


def test_split_edge_fractions(tmp_path: Path) -> None:
    pairs = make_set(tmp_path, 10)
    train, val = split_pairs(pairs, 0.0)
    assert len(train.images) == 10 and len(val) == 0
    train, val = split_pairs(pairs, 1.0)
    assert len(train) == 0 and len(val.images) == 10
    assert "between 0 and 1" in error_of(split_pairs, pairs, 1.5)


def test_split_that_leaves_a_side_empty_is_an_error(tmp_path: Path) -> None:
    pairs = make_set(tmp_path, 1)
    message = error_of(split_pairs, pairs, 0.5)
    assert "split is empty (1 images, val_fraction 0.5)" in message


def test_split_of_a_hand_built_set_uses_absolute_paths() -> None:
    pairs = PairSet([Path(os.sep, "x", f"{i}.jpg") for i in range(50)], [f"c{i}" for i in range(50)],
                    np.arange(50))
    train, val = split_pairs(pairs, 0.5)
    assert len(train.images) + len(val.images) == 50 and val.root is None


# --- published data sets: COCO caption annotations and Karpathy split files ------------------


def write_json(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def coco_captions(tmp_path: Path) -> Path:
    """captions_val2014.json in miniature: ids out of order, an image without captions."""
    touch(*(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg" for i in (42, 7, 99)))
    return write_json(tmp_path / "annotations" / "captions_val2014.json", {
        "info": {"description": "tiny"},
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 480, "width": 640},
                   {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
                   {"id": 99, "file_name": "COCO_val2014_000000000099.jpg"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A dog  on a\nsofa."},
                        {"image_id": 42, "id": 2, "caption": "Two cats."},
                        {"image_id": 7, "id": 3, "caption": "A brown dog."}]})


def test_coco_captions_with_image_root(tmp_path: Path) -> None:
    pairs = load_pairs(coco_captions(tmp_path), image_root=tmp_path / "val2014")
    names = [image.name for image in pairs.images]
    assert names == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg"]  # 99 has no caption
    assert pairs.captions_of(0) == ["Two cats."]
    assert pairs.captions_of(1) == ["A dog on a sofa.", "A brown dog."]
    assert pairs.published_split is None


def test_coco_without_image_root_resolves_against_the_annotation_dir(tmp_path: Path) -> None:
    message = error_of(load_pairs, coco_captions(tmp_path))
    assert "3 of 3 images do not exist" not in message and "2 of 2 images do not exist" in message
    assert "entry 1:" in message and str(tmp_path / "annotations") in message


def test_coco_caption_of_an_unknown_image_is_refused(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    path = write_json(tmp_path / "captions.json", {"images": [{"id": 1, "file_name": "a.jpg"}],
                                                   "annotations": [{"image_id": 2, "caption": "x"}]})
    assert "annotations[0]" in error_of(load_pairs, path)


def karpathy(tmp_path: Path, flickr: bool = False) -> Path:
    """dataset_coco.json / dataset_flickr30k.json in miniature: every split, several sentences."""
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test", "train"]):
        folder = "" if flickr else ("train2014" if split == "train" else "val2014")
        name = f"{i}.jpg"
        touch(tmp_path / "images" / folder / name)
        entry = {"filename": name, "split": split, "imgid": i,
                 "sentences": [{"raw": f"image {i} caption {j}", "tokens": []} for j in range(2 + i % 2)]}
        if not flickr:
            entry["filepath"] = folder
        images.append(entry)
    return write_json(tmp_path / "dataset.json", {"images": images, "dataset": "flickr30k" if flickr else "coco"})


@pytest.mark.parametrize("flickr", [False, True])
def test_karpathy_split_file(tmp_path: Path, flickr: bool) -> None:
    pairs = load_pairs(karpathy(tmp_path, flickr), image_root=tmp_path / "images")
    assert len(pairs.images) == 6 and len(pairs) == 2 + 3 + 2 + 3 + 2 + 3
    assert pairs.published_split == ("train", "restval", "val", "test", "test", "train")
    if not flickr:
        assert pairs.images[2] == tmp_path / "images" / "val2014" / "2.jpg"
    assert pairs.captions_of(1) == ["image 1 caption 0", "image 1 caption 1", "image 1 caption 2"]
    test = pairs.published("test")
    assert [image.name for image in test.images] == ["3.jpg", "4.jpg"] and len(test) == 5
    assert test.published_split == ("test", "test")


def test_karpathy_split_pairs_uses_the_published_split(tmp_path: Path) -> None:
    pairs = load_pairs(karpathy(tmp_path), image_root=tmp_path / "images")
    train, val = split_pairs(pairs, val_fraction=0.5, seed=3)  # fraction and seed do not apply
    assert [image.name for image in train.images] == ["0.jpg", "1.jpg", "5.jpg"]
    assert [image.name for image in val.images] == ["2.jpg"]


def test_published_split_of_plain_pairs_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", [{"image": "a.jpg", "caption": "x"}]))
    assert "no published split" in error_of(pairs.published, "test")


@pytest.mark.parametrize(("entry", "problem"), [
    ({"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "x"}]}, "unknown split 'dev'"),
    ({"filename": "a.jpg", "split": "train"}, "'sentences' list"),
    ({"filename": "a.jpg", "split": "train", "sentences": []}, "no sentences"),
])
def test_bad_karpathy_entries_name_the_entry(tmp_path: Path, entry: dict, problem: str) -> None:
    touch(tmp_path / "a.jpg")
    message = error_of(load_pairs, write_json(tmp_path / "d.json", {"images": [entry]}))
    assert "images[0]" in message and problem in message


def test_one_line_jsonl_with_json_suffix_is_still_pairs(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    pairs = load_pairs(write_jsonl(tmp_path / "p.json", [{"image": "a.jpg", "captions": ["x", "y"]}]))
    assert len(pairs) == 2 and pairs.published_split is None
