"""HEIC photos (the iPhone default) index and search like any other format, through pillow-heif."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import add_model
from clipgrep.ranking import search

from .factories import make_contract_bundle

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is in the test extra")


def save_heic(path: Path, colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", (48, 32), colour)
    pillow_heif.from_pillow(image).save(path, quality=95)  # no opener registered: clipgrep must do it
    return path


def test_heic_files_are_indexed_and_found_by_a_heic_query(tmp_path: Path) -> None:
    bundle = add_model("tiny", checkpoint=make_contract_bundle(tmp_path / "bundle"))
    photos = tmp_path / "photos"
    photos.mkdir()
    save_heic(photos / "red.heic", (240, 20, 20))
    save_heic(photos / "blue.HEIC", (20, 20, 240))
    Image.new("RGB", (48, 32), (20, 240, 20)).save(photos / "green.png")

    report = update_index([photos], bundle=bundle, options=IndexOptions(workers=1))
    assert (report.added, report.skipped) == (3, [])

    query = save_heic(tmp_path / "query.heic", (230, 30, 30))  # not indexed: decoded for the query
    hits = search([str(query)], model="tiny", k=3)
    assert os.path.basename(hits[0].path) == "red.heic"
    assert hits[0].score > hits[1].score
