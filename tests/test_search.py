"""Search: query syntax, ranking, scoping, output formats and exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipgrep.cli import app
from clipgrep.errors import ClipgrepError
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import add_model
from clipgrep.query import QueryTerm, parse_query, parse_term
from clipgrep.ranking import rank, search
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


@pytest.mark.parametrize("raw", ["a photo of " + "a very long caption " * 15,   # longer than NAME_MAX (item 19)
                                 "x" * 5000,                                        # longer than PATH_MAX
                                 "nul\0byte", "/".join(["deep"] * 2000)])
def test_any_text_is_a_text_term_even_when_it_cannot_be_a_path(raw: str) -> None:
    assert parse_term(raw) == QueryTerm(1.0, text=raw)
    assert parse_term("2:" + raw) == QueryTerm(2.0, text=raw)


def test_only_regular_files_are_image_terms(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkfifo("pipe.jpg")                      # opening it would block
    os.symlink("/dev/zero", "zero.jpg")        # reading it never ends
    os.mkdir("folder.jpg")
    for name in ("pipe.jpg", "zero.jpg", "folder.jpg"):
        assert parse_term(name) == QueryTerm(1.0, text=name)
    Image.new("RGB", (4, 4)).save("real.png")
    os.symlink("real.png", "link.png")
    assert parse_term("link.png").image == tmp_path / "link.png"  # a link to a regular file is one


def test_weights_must_be_finite() -> None:
    with pytest.raises(ClipgrepError, match="too large"):
        parse_term("1" + "0" * 400 + ":dog")   # float() makes it inf


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
    assert fake_search("red", threshold=1.0) == []


def test_huge_finite_weights_only_scale_the_query(indexed: Path) -> None:
    """Only the ratio of weights matters; 1e300 x a float32 vector used to overflow to inf, then nan scores."""
    plain = fake_search("red", sub=["blue"], k=None)
    huge = fake_search("1" + "0" * 300 + ":red", sub=["1" + "0" * 300 + ":blue"], k=None)
    assert [name for name, _ in huge] == [name for name, _ in plain]
    assert np.allclose([score for _, score in huge], [score for _, score in plain], atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": float("nan")}, "threshold must be a cosine between -1 and 1"),
    ({"threshold": float("inf")}, "threshold must be a cosine between -1 and 1"),
    ({"threshold": 1.5}, "threshold must be a cosine between -1 and 1"),
    ({"k": 0}, "at least 1"),
    ({"k": -3}, "at least 1"),
])
def test_numeric_options_are_checked(indexed: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ClipgrepError, match=message):
        fake_search("red", **kwargs)


@pytest.fixture
def many_reds(tmp_path: Path) -> Path:
    """14 shades of red: more matches above a threshold than the default 10 results."""
    bundle = add_model("tiny", checkpoint=make_contract_bundle(tmp_path / "bundle"))
    root = tmp_path / "reds"
    root.mkdir()
    for i in range(14):
        Image.new("RGB", (8, 8), (255 - 5 * i, 5 * i, 0)).save(root / f"red{i:02d}.png")
    update_index([root], bundle=bundle, encoder=FakeImageEncoder(), options=IndexOptions(workers=0))
    return root


def test_a_threshold_without_k_returns_every_match(many_reds: Path) -> None:
    assert len(fake_search("red")) == 10                      # no threshold: the best 10
    assert len(fake_search("red", threshold=0.9)) == 14       # was cut to 10 in silence
    assert len(fake_search("red", threshold=0.9, k=5)) == 5


def test_cli_threshold_lists_all_matches_and_says_what_k_left_out(many_reds: Path) -> None:
    query = str(many_reds / "red00.png")
    everything = cli(query, "--threshold", "0.9", "--paths", "-0")
    assert everything.exit_code == 0 and everything.stderr == ""
    assert everything.stdout_bytes.count(b"\0") == 14
    capped = cli(query, "--threshold", "0.9", "-k", "4")
    assert capped.exit_code == 0 and len(capped.stdout.splitlines()) == 4
    assert capped.stderr == "clipgrep: 10 more results score 0.9 or more; raise -k to see them\n"


@pytest.mark.parametrize("under, expected", [
    ("under", {"blue sky.png"}),
    ("under_score", {"red too.png"}),
    ("under%", {"red again.png"}),
    ("under/", {"blue sky.png"}),
    ("..", set(COLOURS)),                     # above the root: everything in it
])
def test_under_matches_exact_subtrees_despite_like_wildcards(indexed: Path, under: str, expected: set) -> None:
    found = {name for name, _ in fake_search("red", k=None, under=str(indexed / under))}
    assert found == {os.path.basename(name) for name in expected}


def test_under_an_empty_subdirectory_is_no_match_not_an_error(indexed: Path) -> None:
    (indexed / "empty").mkdir()
    assert fake_search("red", under=str(indexed / "empty")) == []


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
    result = cli(str(indexed / "blue.png"), "--threshold", "0.9", "--under", str(indexed / "under_score"))
    assert result.exit_code == 1 and result.stdout == "" and result.stderr == ""


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("clipgrep: error: ")
    assert message in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--under", "{root}/nowhere"), "--under {root}/nowhere does not exist"),
    (("--under", "{root}/red.png"), "is not a directory"),
    (("--under", "{outside}"), "is outside every indexed root"),
    (("--model", "nope"), "no model named 'nope' is installed"),
    (("--model", "nope"), "clipgrep models list"),
    (("--threshold", "nan"), "threshold must be a cosine between -1 and 1, not nan"),
    (("--threshold", "1e400"), "not inf"),
    (("--threshold", "-2"), "between -1 and 1"),
    (("-k", "0"), "number of results must be at least 1"),
    (("1" + "0" * 400 + ":red",), "too large"),
])
def test_bad_search_input_is_one_line_and_exit_2(indexed: Path, tmp_path: Path, args: tuple[str, ...],
                                                 message: str) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    fill = {"root": str(indexed), "outside": str(outside)}
    result = cli("red", *(a.format(**fill) for a in args))
    one_line_error(result, message.format(**fill))


def test_a_caption_longer_than_a_file_name_is_searched_as_text(indexed: Path) -> None:
    caption = "a long caption about a small red bicycle leaning on a wall at night, " * 5
    assert len(caption) > 255
    result = cli(caption, "-k", "3")
    assert result.exit_code == 0 and result.stderr == "" and len(result.stdout.splitlines()) == 3


@pytest.mark.parametrize("args", [("red", "-0.5:blue", "-k", "3", "-p"),
                                  ("-0.5:blue", "red", "-k", "3", "-p"),
                                  ("-k", "3", "-p", "--", "-0.5:blue", "red"),
                                  ("red", "--sub", "0.5:blue", "-k", "3", "-p"),
                                  ("red", "--add", "-0.5:blue", "-k", "3", "-p")])
def test_a_negative_weight_can_start_a_term(indexed: Path, args: tuple[str, ...]) -> None:
    """`-0.5:blue` is a term wherever it stands (Click read it as the options -0 -. -5 ...)."""
    expected = [h.path for h in search(["red"], sub=["0.5:blue"], model="tiny", k=3)]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected


def test_words_after_double_dash_are_all_terms(indexed: Path) -> None:
    """POSIX: `--` ends the options, so `-k 3` after it is text (options go before `--`)."""
    expected = search(["-k", "3"], model="tiny", k=4)
    result = cli("-k", "4", "--", "-k", "3")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"{h.score:.4f}\t{h.path}" for h in expected]


def search_process(indexed: Path, stdout: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipgrep", "search", "--model", "tiny", str(indexed / "red.png")],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)


def test_output_to_a_full_device_is_one_line_and_exit_2(indexed: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        result = search_process(indexed, full)
    assert result.returncode == 2
    assert result.stderr == ("clipgrep: error: cannot write the output: No space left on device "
                             "(free some space, or send the output elsewhere)\n")


def test_results_into_a_closed_pipe_exit_0_quietly(indexed: Path) -> None:
    """`clipgrep search x | head -1`: the reader leaving early is not an error (as with grep)."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = search_process(indexed, write)
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == ""


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
