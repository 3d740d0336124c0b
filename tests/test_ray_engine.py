"""index --engine ray on a local Ray cluster: local and S3 (moto on 127.0.0.1) tables, a worker
and the driver killed mid-job, incremental re-runs, and clipgrep's own ``search --table`` reading
what Ray wrote. Needs the ray extra (``make test-ray``); skipped without it. One cluster per module
(ray.init(num_cpus=2)), the tiny contract bundle's real ONNX path in the encoder actors.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("ray")
pytest.importorskip("lance")

from clipgrep import models
from clipgrep.cli import app
from clipgrep.engines.ray_index import RayIndexOptions, index_with_ray
from clipgrep.engines.sharded_table import ShardedTable
from clipgrep.table_uri import parse_table_uri

from .factories import make_contract_bundle

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = 200
BUCKET = "clipgrep-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on 127.0.0.1, set in the environment before the cluster starts (workers inherit it)."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster for the module; its GCS address lets a subprocess driver join it."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", pythonpath)  # workers import this checkout's clipgrep
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def bundle_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contract_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def bundle(bundle_source: Path, cluster: str):
    return models.add_model("tiny", checkpoint=bundle_source)


def colour(i: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(i)
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def png_bytes(rgb: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """IMAGES generated PNGs (old mtimes: out of the racy window) and one file that is not an image."""
    root = tmp_path / "photos"
    for i in range(IMAGES):
        path = root / f"{i // 50:02d}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(colour(i)))
        age(path)
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, ns=(time.time_ns() - 3600 * 10**9,) * 2)


def table_paths(uri: str) -> list[str]:
    table = ShardedTable.existing(parse_table_uri(uri))
    return [os.fsdecode(p) for p in table.images.to_arrow().column("path").to_pylist()]


def assert_exactly_once(uri: str, expected: set[str]) -> None:
    paths = table_paths(uri)
    assert len(paths) == len(set(paths)), "an image was committed twice"
    assert set(paths) == expected


def all_images(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*.png")}


def search_table_cli(uri: str, *args: str) -> list[str]:
    result = CliRunner().invoke(app, ["search", "--table", uri, "--model", "tiny", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_installed_ray_sink_replays_its_input_on_a_retried_write() -> None:
    # lance-ray 0.5.0's write_lance commits partial data after a retried fragment write (lance-ray
    # #5290); Ray's own sink re-reads its input on each attempt. Guard against a Ray that lacks that.
    from ray.data._internal.datasource import lance_datasink

    assert hasattr(lance_datasink, "_make_stream_factory")


def test_local_table_round_trip_incremental_and_search(bundle, photos: Path, tmp_path: Path) -> None:
    uri = str(tmp_path / "db" / "photos")
    report = index_with_ray([str(photos)], uri, bundle, RayIndexOptions(shard_size=120))
    assert (report.encoded, report.shards, report.rows) == (IMAGES, 2, IMAGES)
    assert report.skipped_files == [(str(photos / "broken.jpg"), "not an image")]
    assert_exactly_once(uri, all_images(photos))

    # clipgrep's own search reads what Ray wrote: an image's own vector ranks it first
    query = photos / "01" / "0077.png"
    lines = search_table_cli(uri, str(query), "-k", "3")
    assert len(lines) == 3 and lines[0].split("\t")[1] == str(query) and float(lines[0].split("\t")[0]) > 0.999

    # one deleted, one rewritten, one new; the broken file is not tried again
    (photos / "00" / "0001.png").unlink()
    changed = photos / "02" / "0100.png"
    changed.write_bytes(png_bytes((1, 2, 3)))
    (photos / "03" / "new.png").write_bytes(png_bytes((9, 9, 9)))
    age(changed, photos / "03" / "new.png")  # else they are racy, and encoded once more by the next run
    again = index_with_ray([str(photos)], uri, bundle, RayIndexOptions(shard_size=120))
    assert (again.encoded, again.removed, again.unchanged, again.skipped_before) == (2, 1, IMAGES - 2, 1)
    assert_exactly_once(uri, all_images(photos))

    nothing = index_with_ray([str(photos)], uri, bundle, RayIndexOptions(shard_size=120))
    assert (nothing.encoded, nothing.shards, nothing.rows) == (0, 0, IMAGES)


def test_an_encoder_worker_killed_mid_job_is_retried(bundle, photos: Path, tmp_path: Path) -> None:
    uri = str(tmp_path / "db" / "photos")
    killed: list[int] = []
    done = threading.Event()

    def kill_first_encoder() -> None:
        while not done.is_set() and not killed:
            for pid in _ray_processes("MapBatches(OrtEncoder)"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_encoder)
    killer.start()
    try:
        report = index_with_ray([str(photos)], uri, bundle, RayIndexOptions(shard_size=IMAGES, encode_batch=8))
    finally:
        done.set()
        killer.join()
    assert killed, "no encoder actor was seen to kill"
    assert report.rows == IMAGES
    assert_exactly_once(uri, all_images(photos))


def test_a_killed_driver_resumes_without_loss_or_duplicates(bundle, photos: Path, tmp_path: Path,
                                                             cluster: str) -> None:
    uri = str(tmp_path / "db" / "photos")
    driver = subprocess.Popen(
        [sys.executable, "-m", "clipgrep", "index", "--engine", "ray", "--address", cluster, str(photos),
         "--table", uri, "--model", "tiny", "--shard-size", "100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None and _committed_rows(uri) == 0:
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
        driver.send_signal(signal.SIGKILL)  # after the first shard's commit, with the second in flight
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    committed = _committed_rows(uri)
    assert 0 < committed < IMAGES
    report = index_with_ray([str(photos)], uri, bundle, RayIndexOptions(shard_size=100))
    assert report.unchanged == committed and report.encoded == IMAGES - committed
    assert_exactly_once(uri, all_images(photos))


def test_object_store_sources_and_table(bundle, s3_endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    count = 60
    for i in range(count):
        s3.put_object(Bucket=BUCKET, Key=f"photos/{i:03d}.png", Body=png_bytes(colour(i)))
    s3.put_object(Bucket=BUCKET, Key="photos/notes.txt", Body=b"not listed: not an image name")
    source, uri = f"s3://{BUCKET}/photos", f"s3://{BUCKET}/db/photos"
    expected = {f"s3://{BUCKET}/photos/{i:03d}.png" for i in range(count)}

    report = index_with_ray([source], uri, bundle, RayIndexOptions(shard_size=count))
    assert (report.encoded, report.rows) == (count, count)
    assert_exactly_once(uri, expected)
    assert search_table_cli(uri, "--paths", "-k", "1", "text:anything")  # the CLI reaches the bucket too

    # same size and (second-resolution) time, new content: found by its ETag
    s3.put_object(Bucket=BUCKET, Key="photos/005.png", Body=png_bytes((7, 7, 7)))
    s3.delete_object(Bucket=BUCKET, Key="photos/006.png")
    again = index_with_ray([source], uri, bundle, RayIndexOptions(shard_size=count))
    assert (again.encoded, again.removed) == (1, 1)
    assert_exactly_once(uri, expected - {f"s3://{BUCKET}/photos/006.png"})


def _committed_rows(uri: str) -> int:
    try:
        return ShardedTable.existing(parse_table_uri(uri)).count()
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _ray_processes(title: str) -> list[int]:
    """Pids of Ray workers whose process title contains ``title`` (Ray sets it to the task or actor)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if title.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found
