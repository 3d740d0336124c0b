"""Search: query syntax, ranking, scoping, output formats and exit codes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipgrep.cli import app
from clipgrep.errors import ClipgrepError
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import add_model
from clipgrep.search import QueryTerm, parse_query, parse_term, rank, search
from clipgrep.snapshot import read_snapshot

from .factories import make_contract_bundle
from .fakes import FakeImageEncoder, FakeQueryEncoder

COLOURS = {
    "red.png": (250, 10, 10),
    "dark red.jpg": (140, 0, 0),
    "green.png": (10, 240, 10),
    "blue.png": (10, 10, 250),
    "purple.png": (160, 0, 160),
    "100% cotton_red's.png": (230, 30, 30),   # SQL LIKE and quote characters in a name
    "under/blue sky.png": (60, 60, 255),
    "under_score/red too.png": (255, 0, 0),   # sibling of under/ whose name LIKE's "_" would match
    "under%/red again.png": (200, 0, 0),
}


def make_tree(root: Path) -> Path:
    for name, colour in COLOURS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 16), colour).save(path)
    return root


@pytest.fixture
def indexed(tmp_path: Path) -> Path:
    """A tree indexed with the fake colour encoder under the model name 'tiny'."""
    bundle = add_model("tiny", checkpoint=make_contract_bundle(tmp_path / "bundle"))
    root = make_tree(tmp_path / "pics")
    report = update_index([root], bundle=bundle, encoder=FakeImageEncoder(), options=IndexOptions(workers=0))
    assert report.added == len(COLOURS)
    return root


def fake_search(*queries: str, **kwargs) -> list[tuple[str, float]]:
    hits = search(list(queries), model="tiny", encoder=FakeQueryEncoder(), **kwargs)
    return [(os.path.basename(h.path), h.score) for h in hits]


# --- query syntax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("golden retriever", QueryTerm(1.0, text="golden retriever")),
    ("2:golden retriever", QueryTerm(2.0, text="golden retriever")),
    ("-0.5:cat", QueryTerm(-0.5, text="cat")),
    (".5:cat", QueryTerm(0.5, text="cat")),
    ("\\12:30 train", QueryTerm(1.0, text="12:30 train")),
    ("text:2:literal", QueryTerm(1.0, text="2:literal")),
    ("a: colon later", QueryTerm(1.0, text="a: colon later")),
])
def test_parse_term(raw: str, expected: QueryTerm) -> None:
    assert parse_term(raw) == expected


def test_existing_file_is_an_image_term_unless_forced_to_text(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (4, 4)).save("pool.jpg")
    assert parse_term("pool.jpg").image == tmp_path / "pool.jpg"
    assert parse_term("3:pool.jpg") == QueryTerm(3.0, image=tmp_path / "pool.jpg")
    assert parse_term("text:pool.jpg") == QueryTerm(1.0, text="pool.jpg")
    assert parse_term("pool.jpg", sign=-1).weight == -1.0


def test_empty_and_zero_queries_are_user_errors() -> None:
    with pytest.raises(ClipgrepError, match="no query"):
        parse_query([])
    with pytest.raises(ClipgrepError, match="zero"):
        parse_query(["0:red"])


# --- ranking ------------------------------------------------------------------------------------

def test_text_query_ranks_by_meaning(indexed: Path) -> None:
    names = [name for name, _ in fake_search("red", k=4)]
    assert set(names) == {"red.png", "red too.png", "dark red.jpg", "red again.png"}
    assert [name for name, _ in fake_search("blue", k=2)] == ["blue.png", "blue sky.png"]


def test_weights_add_and_sub_combine_terms(indexed: Path) -> None:
    # red + blue points at purple; subtracting blue from purple leaves red.
    assert fake_search("red", add=["blue"], k=1)[0][0] == "purple.png"
    assert fake_search("2:red", sub=["blue"], k=1)[0][0] != "purple.png"
    scores = dict(fake_search("red", k=None))
    assert scores["blue.png"] < scores["purple.png"] < scores["red.png"]


def test_image_query_reuses_the_indexed_vector(indexed: Path) -> None:
    class NoImages(FakeQueryEncoder):
        def encode_images(self, paths):
            raise AssertionError("an indexed image should not be decoded again")

    hits = search([str(indexed / "green.png")], model="tiny", encoder=NoImages())
    assert os.path.basename(hits[0].path) == "green.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_image_query_outside_the_index_is_encoded(indexed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "query.png"
    Image.new("RGB", (10, 10), (0, 0, 255)).save(outside)
    assert fake_search(str(outside), k=1)[0][0] == "blue.png"


def test_threshold_and_top_k(indexed: Path) -> None:
    assert len(fake_search("red", k=3)) == 3
    above = fake_search("red", k=None, threshold=0.9)
    assert above and all(score >= 0.9 for _, score in above)
    assert fake_search("red", threshold=1.01) == []


@pytest.mark.parametrize("under, expected", [
    ("under", {"blue sky.png"}),
    ("under_score", {"red too.png"}),
    ("under%", {"red again.png"}),
    ("under/", {"blue sky.png"}),
    ("nowhere", set()),
])
def test_under_matches_exact_subtrees_despite_like_wildcards(indexed: Path, under: str, expected: set) -> None:
    assert {name for name, _ in fake_search("red", k=None, under=str(indexed / under))} == expected


def test_rank_orders_ties_by_path_and_scores_descend(indexed: Path) -> None:
    from clipgrep.models import load_model
    from clipgrep.paths import snapshot_dir

    snapshot = read_snapshot(snapshot_dir(load_model("tiny").index_id))
    query = np.zeros(8, np.float32)
    query[4] = 1.0  # orthogonal to every colour vector: all scores tie at 0
    hits = rank(snapshot, query, k=None)
    assert [h.path for h in hits] == sorted(h.path for h in hits)
    hits = rank(snapshot, snapshot.vectors[0].copy(), k=None)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_without_an_index_says_how_to_build_one(tmp_path: Path) -> None:
    add_model("empty", checkpoint=make_contract_bundle(tmp_path / "b"))
    with pytest.raises(ClipgrepError) as info:
        search(["red"], model="empty")
    assert "clipgrep index DIR --model empty" in info.value.hint


# --- the command line ---------------------------------------------------------------------------

def cli(*args: str):
    return CliRunner().invoke(app, ["search", "--model", "tiny", *args], env={"COLUMNS": "100"})


def normalised(output: bytes | str, root: Path) -> str:
    text = output.decode("utf-8", "backslashreplace") if isinstance(output, bytes) else output
    return text.replace(str(root), "ROOT")


@pytest.mark.parametrize("fmt", [(), ("--paths",), ("--json",), ("--paths", "-0")],
                         ids=["scores", "paths", "json", "paths0"])
def test_output_formats_match_goldens(indexed: Path, fmt: tuple[str, ...], golden) -> None:
    """An indexed image as the query: its stored vector is reused, so scores need no model."""
    result = cli(str(indexed / "red.png"), "-k", "4", *fmt)
    assert result.exit_code == 0 and result.stderr == ""
    golden.check(f"search/{'_'.join(f.lstrip('-') for f in fmt) or 'scores'}.txt", normalised(result.stdout_bytes, indexed).replace("\0", "\\0\n"))


def test_default_output_is_score_tab_path(indexed: Path) -> None:
    lines = cli(str(indexed / "blue.png"), "-k", "2").stdout.splitlines()
    score, path = lines[0].split("\t")
    assert float(score) == pytest.approx(1.0, abs=1e-4) and path == str(indexed / "blue.png")


def test_json_lines_parse(indexed: Path) -> None:
    rows = [json.loads(line) for line in cli(str(indexed / "green.png"), "--json").stdout.splitlines()]
    assert rows[0] == {"score": pytest.approx(1.0, abs=1e-5), "path": str(indexed / "green.png")}


def test_no_results_exits_1_with_empty_stdout(indexed: Path) -> None:
    result = cli(str(indexed / "red.png"), "--threshold", "1.5")
    assert result.exit_code == 1 and result.stdout == ""


def test_conflicting_formats_exit_2(indexed: Path) -> None:
    result = cli("red", "--paths", "--json")
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1


def test_odd_file_names_survive_null_output(tmp_path: Path) -> None:
    bundle = add_model("tiny", checkpoint=make_contract_bundle(tmp_path / "bundle"))
    root = tmp_path / "odd"
    root.mkdir()
    names = [b"new\nline.png", b"caf\xe9.png", b"plain.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (200, 20 * i, 20)).save(os.path.join(os.fsencode(root), name), format="PNG")
    update_index([root], bundle=bundle, encoder=FakeImageEncoder(), options=IndexOptions(workers=0))
    result = cli(os.fsdecode(os.path.join(os.fsencode(root), b"plain.png")), "--paths", "-0", "-k", "10")
    assert result.exit_code == 0
    printed = result.stdout_bytes.split(b"\0")
    assert printed[-1] == b""
    assert sorted(printed[:-1]) == sorted(os.path.join(os.fsencode(root), n) for n in names)
    as_json = [json.loads(line) for line in cli(os.fsdecode(os.path.join(os.fsencode(root), b"plain.png")),
                                                "--json").stdout_bytes.splitlines()]
    assert {os.fsencode(row["path"]) for row in as_json} == {os.path.join(os.fsencode(root), n) for n in names}
