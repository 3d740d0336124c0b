"""``clipgrep index --from-embeddings DIR``: clip-retrieval's inference output imported as rows.

Shards are generated the way clip-retrieval's writer lays them out (``img_emb/img_emb_{N}.npy``,
N zero-padded to the partition count's width, ``metadata/metadata_{N}.parquet`` with
``image_path`` and extra columns, ``text_emb/`` beside them), with the tiny contract bundle
(8 dims) installed as the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipgrep.cli import app
from clipgrep.errors import ClipgrepError
from clipgrep.index.imported import ORIGIN_PREFIX, ImportOptions, import_embeddings, stored_path
from clipgrep.paths import index_dir, snapshot_dir
from clipgrep.ranking import Hit, search
from clipgrep.snapshot import read_snapshot
from clipgrep.store import IndexStore, StoredFile

from . import test_index
from .test_index import RED, age, index, write_image
from .test_reliability import assert_published, assert_search_equals_table, crash_at, table_state

# The tiny contract bundle, installed; a fixture that makes any use of LanceDB fail.
bundle_source, bundle, forbid_store = test_index.bundle_source, test_index.bundle, test_index.forbid_store
DIM = 8


def write_shards(out: Path, shards: list[tuple[list, np.ndarray]], width: int = 2) -> Path:
    """clip-retrieval's layout: one .npy and one parquet per shard, numbers zero-padded to ``width``."""
    for folder in ("img_emb", "text_emb", "metadata"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for number, (paths, vectors) in enumerate(shards):
        name = str(number).zfill(width)
        np.save(out / "img_emb" / f"img_emb_{name}.npy", vectors)
        np.save(out / "text_emb" / f"text_emb_{name}.npy", np.ones((len(paths), DIM), np.float16))
        pq.write_table(pa.table({"image_path": pa.array(paths, pa.string()),
                                 "caption": [f"caption {i}" for i in range(len(paths))],
                                 "url": [f"https://example.com/{i}" for i in range(len(paths))]}),
                       out / "metadata" / f"metadata_{name}.parquet")
    return out


def random_vectors(n: int, seed: int, dtype=np.float32, dim: int = DIM) -> np.ndarray:
    # Not unit length: the import normalises.
    return (np.random.default_rng(seed).standard_normal((n, dim)) * 3).astype(dtype)


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class VectorQuery:
    """A query encoder whose every text is the given vector: search finds rows by their vector."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = unit(vector[None])[0]

    def encode_texts(self, texts):
        return np.stack([self.vector] * len(texts))

    def encode_images(self, paths):
        raise AssertionError("no image query here")


def run_import(source: Path, bundle, **options) -> object:
    return import_embeddings(source, bundle=bundle, options=ImportOptions(**options))


def stored(bundle) -> dict[str, StoredFile]:
    return IndexStore(index_dir(), bundle.index_id, bundle.embed_dim).files()


def searched_paths(query: np.ndarray, **kwargs) -> list[str]:
    return [hit.path for hit in search(["q"], model="tiny", encoder=VectorQuery(query), **kwargs)]


# --- the import -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_shards_import_normalised_with_their_paths_and_search_finds_a_row_by_its_vector(
        bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    monkeypatch.chdir(tmp_path)
    first = [f"s3://bucket/photos/{i}.jpg" for i in range(5)]
    second = [f"/archive/2019/{i}.jpg" for i in range(4)] + ["relative/dir/x.jpg"]
    vectors = [random_vectors(5, 1, dtype), random_vectors(5, 2, dtype)]
    source = write_shards(tmp_path / "clip-out", [(first, vectors[0]), (second, vectors[1])])

    report = run_import(source, bundle, commit_rows=3)

    paths = first + second[:4] + [str(tmp_path / "relative/dir/x.jpg")]  # relative: against the current dir
    assert (report.added, report.updated, report.shards, report.rows, report.skipped) == (10, 0, 2, 10, {})
    snap = read_snapshot(snapshot_dir(bundle.index_id))
    assert snap is not None and sorted(snap.paths) == sorted(paths)
    expected = unit(np.concatenate(vectors))
    for path, vector in zip(paths, expected):
        np.testing.assert_allclose(snap.vector_for(path), vector, atol=1e-6)
    rows = stored(bundle)
    assert {r.origin for r in rows.values()} == {ORIGIN_PREFIX + str(source)}
    for i, path in enumerate(paths):
        assert searched_paths(np.concatenate(vectors)[i], k=1) == [path]


def test_padding_of_any_width_pairs_shards_by_number(bundle, tmp_path: Path) -> None:
    shards = [([f"/w/{n}-{i}.jpg" for i in range(2)], random_vectors(2, n)) for n in range(11)]
    source = write_shards(tmp_path / "out", shards, width=3)  # img_emb_000 ... img_emb_010
    report = run_import(source, bundle)
    assert (report.shards, report.rows) == (11, 22)
    np.testing.assert_allclose(read_snapshot(snapshot_dir(bundle.index_id)).vector_for("/w/10-1.jpg"),
                               unit(shards[10][1])[1], atol=1e-6)


def test_a_second_import_replaces_rows_by_path_and_adds_no_duplicate(bundle, tmp_path: Path) -> None:
    paths = [f"/a/{i}.jpg" for i in range(4)]
    run_import(write_shards(tmp_path / "one", [(paths, random_vectors(4, 1))]), bundle)
    newer = random_vectors(4, 9)
    report = run_import(write_shards(tmp_path / "two", [(paths[2:] + ["/a/new.jpg"], newer[:3])]), bundle)
    assert (report.added, report.updated, report.rows) == (1, 2, 5)
    np.testing.assert_allclose(read_snapshot(snapshot_dir(bundle.index_id)).vector_for("/a/2.jpg"),
                               unit(newer)[0], atol=1e-6)


def test_a_dimension_that_is_not_the_models_is_one_error_naming_both_before_any_write(
        bundle, tmp_path: Path) -> None:
    source = write_shards(tmp_path / "out", [(["/a.jpg"], random_vectors(1, 1, dim=6))])
    with pytest.raises(ClipgrepError, match="6-dim embeddings but the model makes 8-dim"):
        run_import(source, bundle)
    assert not IndexStore(index_dir(), bundle.index_id, DIM).exists()
    result = CliRunner().invoke(app, ["index", "--from-embeddings", str(source), "--model", "tiny"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "6-dim" in result.stderr and "8-dim" in result.stderr


def test_bad_rows_and_bad_shards_are_counted_and_left_out_while_the_rest_imports(bundle, tmp_path: Path) -> None:
    vectors = random_vectors(5, 1)
    vectors[1] = 0.0
    vectors[2, 0] = np.nan
    source = write_shards(tmp_path / "out", [(["/ok/0.jpg", "/ok/1.jpg", "/ok/2.jpg", None, ""], vectors),
                                             (["/lost/0.jpg"], random_vectors(1, 2)),
                                             (["/lost/1.jpg", "/lost/2.jpg"], random_vectors(2, 3)),
                                             (["/ok/3.jpg"], random_vectors(1, 4))])
    (source / "metadata" / "metadata_01.parquet").unlink()                   # no paths for shard 1
    pq.write_table(pa.table({"image_path": ["/lost/1.jpg"]}), source / "metadata" / "metadata_02.parquet")
    report = run_import(source, bundle)
    assert sorted(stored(bundle)) == ["/ok/0.jpg", "/ok/3.jpg"]
    assert report.skipped == {"no image_path": 2, "zero or non-finite vector": 2}
    assert [(Path(p).name, why.split(";")[0]) for p, why in report.problems] == [
        ("img_emb_01.npy", "has no metadata/metadata_1.parquet (no paths)"),
        ("metadata_02.parquet", "has 1 rows for 2 embeddings")]


@pytest.mark.parametrize("layout, message", [
    ("nothing", "has no image embeddings"),
    ("text only", "rerun its inference with images enabled"),
    ("missing", "is not a directory"),
])
def test_a_folder_without_image_embeddings_is_one_error(bundle, tmp_path: Path, layout: str, message: str) -> None:
    source = tmp_path / "out"
    if layout != "missing":
        source.mkdir()
    if layout == "text only":
        (source / "text_emb").mkdir()
    with pytest.raises(ClipgrepError, match=message):
        run_import(source, bundle)


def test_stored_paths_keep_urls_and_make_file_paths_absolute() -> None:
    assert stored_path("gs://b/k/a.jpg", "/cwd") == "gs://b/k/a.jpg"
    assert stored_path("https://x.org/a b.jpg", "/cwd") == "https://x.org/a b.jpg"
    assert stored_path("/p//q/../a.jpg", "/cwd") == "/p/a.jpg"
    assert stored_path("00001234", "/cwd") == "/cwd/00001234"  # a webdataset key
    assert stored_path(b"/caf\xe9.jpg", "/cwd") == os.fsdecode(b"/caf\xe9.jpg")
    assert [stored_path(v, "/cwd") for v in (None, "", "a\0b", 12)] == [None] * 4


# --- crashes -----------------------------------------------------------------------------------------

IMPORT_CALL = """
import sys
from clipgrep.index.imported import ImportOptions, import_embeddings
from clipgrep.models import load_model
import_embeddings(sys.argv[1], bundle=load_model("tiny"), options=ImportOptions(commit_rows=2))
"""


# Every write step of an import (see clipgrep/index/protocol.py), "rows#2" in the middle of the rows.
IMPORT_STEPS = ("orphans", "rows", "rows#2", "maintain", "publish", "run")


@pytest.mark.parametrize("step", IMPORT_STEPS)
def test_an_import_killed_after_any_write_step_and_run_again_holds_every_row_exactly_once(
        bundle, tmp_path: Path, step: str) -> None:
    root = tmp_path / "p"
    age(write_image(root / "red.png", RED))
    index(root, bundle)  # a walked row beside the imported ones
    paths = [f"s3://b/{i}.jpg" for i in range(5)] + ["/elsewhere/a.jpg", "s3://b/0.jpg"]  # one path twice
    vectors = random_vectors(7, 5)
    source = write_shards(tmp_path / "out", [(paths[:3], vectors[:3]), (paths[3:], vectors[3:])])

    crash_at(step, IMPORT_CALL, source)
    assert_search_equals_table(bundle)  # before the rerun: a dead writer's commits are shown

    run_import(source, bundle, commit_rows=2)
    assert_published(bundle)
    table = table_state(bundle)
    assert sorted(table) == sorted({*paths, str(root / "red.png")})
    np.testing.assert_allclose(table["s3://b/0.jpg"], unit(vectors)[6], atol=1e-6)  # the last one wins


# --- imported rows and the rest of clipgrep ------------------------------------------------------------


def test_a_walk_never_deletes_imported_rows_even_under_its_root(bundle, tmp_path: Path, forbid_store) -> None:
    root = tmp_path / "photos"
    age(write_image(root / "red.png", RED), write_image(root / "gone.png", RED))
    index(root, bundle)
    imported = [str(root / "2019" / "not-here.jpg"), str(root / "also-not-here.jpg"), "s3://b/x.jpg"]
    run_import(write_shards(tmp_path / "out", [(imported, random_vectors(3, 1))]), bundle)
    (root / "gone.png").unlink()

    assert index(root, bundle).removed == 1
    assert sorted(stored(bundle)) == sorted([str(root / "red.png"), *imported])
    assert sorted(read_snapshot(snapshot_dir(bundle.index_id)).paths) == sorted(stored(bundle))
    forbid_store()
    assert index(root, bundle).unchanged == 1  # the no-op fast path keeps them too, without LanceDB
    assert sorted(read_snapshot(snapshot_dir(bundle.index_id)).paths) == sorted([str(root / "red.png"), *imported])


def test_a_walk_takes_over_an_imported_row_only_when_it_finds_the_file(bundle, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    local = write_image(root / "red.png", RED)
    age(local)
    vector = random_vectors(1, 3)
    run_import(write_shards(tmp_path / "out", [([str(local)], vector)]), bundle)
    row = stored(bundle)[str(local)]
    assert (row.size, row.mtime_ns) == (local.stat().st_size, local.stat().st_mtime_ns)  # the file is here

    index(root, bundle)  # unchanged since the import: the imported vector stays
    np.testing.assert_allclose(read_snapshot(snapshot_dir(bundle.index_id)).vector_for(str(local)),
                               unit(vector)[0], atol=1e-6)
    write_image(local, (0, 0, 255))
    age(local)
    os.utime(local, ns=(10**18, 10**18))  # changed: the walk encodes it and the row is a walked one
    index(root, bundle)
    assert stored(bundle)[str(local)].origin is None


def test_under_takes_prefixes_of_imported_paths_that_do_not_exist_here(bundle, tmp_path: Path) -> None:
    paths = ["s3://bucket/dir/a.jpg", "s3://bucket/dir2/b.jpg", "/nowhere/archive/c.jpg", "/nowhere/other/d.jpg"]
    vectors = random_vectors(4, 7)
    run_import(write_shards(tmp_path / "out", [(paths, vectors)]), bundle)
    query = vectors[1]
    assert searched_paths(query, threshold=-1, under="s3://bucket/dir") == ["s3://bucket/dir/a.jpg"]
    assert searched_paths(query, threshold=-1, under="s3://bucket/")[0] == "s3://bucket/dir2/b.jpg"
    assert searched_paths(query, threshold=-1, under="/nowhere/archive") == ["/nowhere/archive/c.jpg"]
    with pytest.raises(ClipgrepError, match="--under /nowhere/arch does not exist"):
        searched_paths(query, under="/nowhere/arch")  # a prefix, not a directory of rows

    runner = CliRunner()
    result = runner.invoke(app, ["search", "red", "--model", "tiny", "--under", "s3://bucket/dir2", "--paths"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "s3://bucket/dir2/b.jpg\n"  # the URL survives the command line unmangled
    result = runner.invoke(app, ["search", "red", "--model", "tiny", "--under", "s3://bucket/none"])
    assert result.exit_code == 2 and "--under s3://bucket/none does not exist" in result.stderr


def test_previews_thumbnails_and_the_page_go_on_without_non_local_pictures(bundle, tmp_path: Path) -> None:
    from clipgrep.preview import render_previews
    from clipgrep.preview.layout import Screen
    from clipgrep.thumbnails import ThumbnailCache, make_index_thumbnails

    run_import(write_shards(tmp_path / "out", [(["s3://b/a.jpg", "/nowhere/b.jpg"], random_vectors(2, 1))]),
               bundle)
    screen = Screen("blocks", rows=4, columns=80, cell_px=(8, 16))
    out = render_previews([Hit(0.5, "s3://b/a.jpg"), Hit(0.4, "/nowhere/b.jpg")], screen,
                          cache=ThumbnailCache(tmp_path / "thumbs"))
    assert b"s3://b/a.jpg" in out and b"/nowhere/b.jpg" in out
    assert make_index_thumbnails(bundle.index_id, workers=1) == (0, 2)

    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from clipgrep.store import path_key
    from clipgrep.ui import create_app

    from .ui_support import TOKEN

    page = create_app(VectorQuery(np.ones(DIM)), snapshot_dir(bundle.index_id), TOKEN,
                      thumbnails=ThumbnailCache(tmp_path / "thumbs"), reveal=lambda folder: None)
    client = TestClient(page, base_url="http://127.0.0.1:8765", follow_redirects=False)
    assert client.get(f"/?token={TOKEN}").status_code == 303
    assert client.get("/").status_code == 200
    thumb = client.get(f"/thumb/{path_key('s3://b/a.jpg')}")
    assert thumb.status_code == 404 and "not a local file" in thumb.text
    assert client.get(f"/view/{path_key('s3://b/a.jpg')}").status_code == 200


# --- tables and the command line ---------------------------------------------------------------------


def test_cli_import_reports_on_stderr_and_as_json_and_refuses_walk_options(bundle, tmp_path: Path) -> None:
    source = write_shards(tmp_path / "out", [(["s3://b/a.jpg", "s3://b/b.jpg"], random_vectors(2, 1))])
    runner = CliRunner()
    result = runner.invoke(app, ["index", "--from-embeddings", str(source), "--model", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["added"], report["rows"], report["origin"]) == (2, 2, ORIGIN_PREFIX + str(source))
    assert result.stderr.startswith("clipgrep: 2 images indexed (2 added, 0 updated from 1 shards of ")

    result = runner.invoke(app, ["index", str(tmp_path), "--from-embeddings", str(source), "--model", "tiny"])
    assert result.exit_code == 2 and result.stdout == ""
    assert "--from-embeddings walks no folder, so ROOTS does not apply" in result.stderr
