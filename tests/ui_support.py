"""A small library of generated photos and its snapshot, for the web page's tests."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from clipgrep.snapshot import write_snapshot

from .fakes import FakeQueryEncoder

TOKEN = "test-token-0123456789"
# name -> colour; the fake encoder maps "red"/"green"/"blue" onto colour axes.
PHOTOS = {
    "red/apple.jpg": (230, 20, 20),
    "red/cherry.png": (200, 0, 30),
    "green/leaf.jpg": (20, 220, 30),
    "blue/sea.jpg": (20, 40, 230),
    "blue/sky.png": (90, 120, 250),
    "odd/<img src=x onerror=alert(1)>.png": (120, 120, 0),
    "odd/new\nline.png": (0, 120, 120),
}
ODD_BYTES_NAME = b"caf\xe9.png"  # not UTF-8


def make_photos(root: Path, extra_greys: int = 0) -> list[str]:
    """Photos with distinct mtimes (the order listed = oldest first); returns their paths."""
    paths = []
    items = list(PHOTOS.items()) + [(f"grey/g{i:03}.jpg", (100 + i % 50,) * 3) for i in range(extra_greys)]
    for n, (name, colour) in enumerate(items):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), colour).save(path)
        os.utime(path, ns=(1_700_000_000_000_000_000 + n * 10**9,) * 2)
        paths.append(str(path))
    odd = os.path.join(os.fsencode(root / "odd"), ODD_BYTES_NAME)
    Image.new("RGB", (64, 48), (250, 200, 0)).save(odd, format="PNG")
    paths.append(os.fsdecode(odd))
    return paths


def index_photos(paths: list[str], snapshot_dir: Path, encoder: FakeQueryEncoder | None = None) -> None:
    encoder = encoder or FakeQueryEncoder()
    vectors = encoder.encode_images([Path(p) for p in paths])
    stats = [os.stat(p) for p in paths]
    write_snapshot(snapshot_dir, paths, vectors, [s.st_size for s in stats], [s.st_mtime_ns for s in stats],
                   [s.st_mtime_ns + 10**10 for s in stats], ["00"] * len(paths), {"bundle_id": "fake"})


def row_id(path: str) -> int:
    from clipgrep.store import path_key

    return path_key(path)
