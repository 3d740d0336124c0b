"""A local photo tool writes nothing outside its own directories (no telemetry, no device ids)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .factories import make_contract_bundle

REPO_ROOT = Path(__file__).parent.parent


def files_under(directory: Path) -> set[Path]:
    return {path for path in directory.rglob("*") if not path.is_dir()}


def test_index_and_search_write_nothing_in_home_outside_clipgrep_dirs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(250, 10, 10), (10, 240, 10), (10, 10, 250)]):
        Image.new("RGB", (24, 16), colour).save(photos / f"{i}.png")
    bundle = make_contract_bundle(tmp_path / "bundle")
    # Only HOME decides where things go: no CLIPGREP_HOME, no XDG overrides (Linux), so that
    # clipgrep's own dirs are the platform defaults under HOME, as for a real user.
    env = {key: value for key, value in os.environ.items()
           if key != "CLIPGREP_HOME" and not key.startswith("XDG_") and key != "ORT_DISABLE_TELEMETRY"}
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(HOME=str(home), USERPROFILE=str(home), PYTHONPATH=os.pathsep.join(pythonpath),
               PYTHONDONTWRITEBYTECODE="1")

    def clipgrep(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "clipgrep", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        return result

    clipgrep("models", "add", "tiny", "--checkpoint", str(bundle))
    clipgrep("index", str(photos), "--model", "tiny", "--workers", "1")
    hits = clipgrep("search", "a red square", "--model", "tiny", "--paths").stdout.splitlines()
    assert len(hits) == 3

    written = files_under(home)
    own = [path for path in written if "clipgrep" in path.relative_to(home).parts]
    assert own, "clipgrep kept its state somewhere else than under HOME"
    assert sorted(map(str, written - set(own))) == []
