"""The Ray engine's plan (change detection, stale rows, deterministic shards), --table URIs and options.

Pure functions: no Ray, no LanceDB; they run in every install.
"""
from __future__ import annotations

import pytest

from clipgrep.engines.shard_plan import RowState, SourceFile, make_shard_plan, shard_id
from clipgrep.errors import ClipgrepError
from clipgrep.table_uri import TableLocation, parse_table_uri, storage_options

HOUR_NS = 3600 * 10**9


def listed(n: int, root: str = "/p") -> list[SourceFile]:
    return [SourceFile(f"{root}/{i:03d}.jpg", 100 + i, 1000 * HOUR_NS + i) for i in range(n)]


def row(f: SourceFile, shard: str = "s0", *, skipped: bool = False, fingerprint: str = "fp") -> RowState:
    return RowState(f.path, f.size, f.mtime_ns, fingerprint, f.mtime_ns + HOUR_NS, shard, skipped)


def test_shards_are_sorted_fixed_size_and_named_by_their_content() -> None:
    files = listed(25)
    plan = make_shard_plan(reversed(files), [], ["/p"], 10)
    assert [len(s.files) for s in plan.shards] == [10, 10, 5]
    assert [f.path for s in plan.shards for f in s.files] == sorted(f.path for f in files)
    assert plan.shards[0].id == shard_id(files[:10])
    assert make_shard_plan(files, [], ["/p"], 10).shards == plan.shards  # deterministic


def test_after_a_killed_run_the_remaining_files_fall_into_the_same_shards() -> None:
    files = listed(25)
    first = make_shard_plan(files, [], ["/p"], 10)
    committed = [row(f, first.shards[0].id) for f in first.shards[0].files]
    rerun = make_shard_plan(files, committed, ["/p"], 10)
    assert rerun.shards == first.shards[1:]
    assert (rerun.unchanged, rerun.stale) == (10, [])


def test_changed_new_and_deleted_files() -> None:
    a, b, c, d = listed(4)
    rows = [row(a), row(b), row(c), RowState("/p/gone.jpg", 1, 1, "fp", 2 * HOUR_NS, "s0")]
    now = [a, SourceFile(b.path, b.size + 1, b.mtime_ns), SourceFile(c.path, c.size, c.mtime_ns + 1), d]
    plan = make_shard_plan(now, rows, ["/p"], 10)
    assert [f.path for f in plan.shards[0].files] == [b.path, c.path, d.path]
    assert {r.path for r in plan.stale} == {b.path, c.path, "/p/gone.jpg"}
    assert (plan.unchanged, plan.removed) == (1, 1)


def test_rows_outside_the_sources_are_left_alone() -> None:
    other = RowState("/q/x.jpg", 1, 1, "fp", 2 * HOUR_NS, "s0")
    sibling = RowState("/pq/x.jpg", 1, 1, "fp", 2 * HOUR_NS, "s0")  # /p is not a prefix of /pq
    plan = make_shard_plan([], [other, sibling], ["/p"], 10)
    assert plan.stale == [] and plan.removed == 0


def test_objects_compare_by_etag_not_time() -> None:
    obj = SourceFile("s3://b/p/a.jpg", 10, 5, etag="e1")
    same = RowState(obj.path, 10, 999, "e1", 0, "s0")  # another time, same ETag: unchanged
    assert make_shard_plan([obj], [same], ["s3://b/p"], 10).unchanged == 1
    rewritten = SourceFile(obj.path, 10, 5, etag="e2")
    plan = make_shard_plan([rewritten], [same], ["s3://b/p"], 10)
    assert plan.to_encode == 1 and plan.stale == [same]


def test_a_racy_row_is_encoded_again() -> None:
    f = listed(1)[0]
    racy = RowState(f.path, f.size, f.mtime_ns, "fp", f.mtime_ns + 10**9, "s0")  # indexed 1 s after the write
    assert make_shard_plan([f], [racy], ["/p"], 10).to_encode == 1


def test_duplicates_keep_one_row() -> None:
    f = listed(1)[0]
    plan = make_shard_plan([f], [row(f, "a1"), row(f, "b2"), row(f, "a0")], ["/p"], 10)
    assert plan.unchanged == 1 and {r.shard for r in plan.stale} == {"a1", "a0"}


def test_skipped_files_wait_until_they_change_or_retry_skipped() -> None:
    f = listed(1)[0]
    record = row(f, skipped=True)
    assert make_shard_plan([f], [record], ["/p"], 10).skipped_before == 1
    assert make_shard_plan([f], [record], ["/p"], 10, retry_skipped=True).to_encode == 1
    # decoded since (an image row and an older skip record): the skip record goes
    plan = make_shard_plan([f], [record, row(f, "s1")], ["/p"], 10)
    assert plan.unchanged == 1 and plan.stale == [record]


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://bucket/db/photos", TableLocation("s3://bucket/db", "photos")),
    ("s3://bucket/db/photos.lance/", TableLocation("s3://bucket/db", "photos")),
    ("gs://b/photos", TableLocation("gs://b", "photos")),
    ("/data/db/photos.lance", TableLocation("/data/db", "photos")),
    ("file:///data/photos", TableLocation("/data", "photos")),
])
def test_table_uris(uri: str, expected: TableLocation) -> None:
    assert parse_table_uri(uri) == expected
    assert expected.uri == f"{expected.database}/{expected.name}.lance"


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "http://host/db/t", "s4://b/t"])
def test_bad_table_uris_are_one_line_errors(uri: str) -> None:
    with pytest.raises(ClipgrepError):
        parse_table_uri(uri)


def test_storage_options_follow_the_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage_options() == {"aws_endpoint": "http://127.0.0.1:9000", "allow_http": "true",
                                 "aws_region": "eu-west-1"}


@pytest.mark.parametrize(("args", "message"), [
    (["--table", "/tmp/t", "photos"], "--table and --address go with --engine ray"),
    (["--engine", "ray", "photos"], "--engine ray writes to a table named by --table"),
])
def test_index_options_of_the_ray_engine_go_together(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from clipgrep.cli import app

    result = CliRunner().invoke(app, ["index", *args])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
