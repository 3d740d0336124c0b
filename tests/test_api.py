"""The Python API: every public name, used as the README documents it, keeps working on every use."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import clipgrep

from .factories import make_contract_bundle

# Each public name used twice through `import clipgrep; clipgrep.NAME`, in one fresh process (nothing
# imported before, as in a user's script). `clipgrep.search` was the function on first access and the
# submodule of the same name after it, so the second call raised "'module' object is not callable".
USES = {
    "DEFAULT_MODEL": "assert isinstance(clipgrep.DEFAULT_MODEL, str)",
    "ClipgrepError": "assert str(clipgrep.ClipgrepError('m', 'h')) == 'm; h'",
    "add_model": "clipgrep.add_model(f'tiny{i}', checkpoint=SOURCE)",
    "list_models": "assert f'tiny{i}' in [m.name for m in clipgrep.list_models()]",
    "load_model": "bundle = clipgrep.load_model(f'tiny{i}')",
    "load_bundle": "assert clipgrep.load_bundle(SOURCE).embed_dim == 8",
    "Bundle": "assert isinstance(bundle, clipgrep.Bundle)",
    "IndexOptions": "options = clipgrep.IndexOptions(workers=0)",
    "update_index": "report = clipgrep.update_index([PICS], bundle=bundle, options=options)",
    "IndexReport": "assert isinstance(report, clipgrep.IndexReport) and report.rows == 2",
    "search": "hits = clipgrep.search(['a red square'], model=f'tiny{i}', k=5)",
    "Hit": "assert len(hits) == 2 and all(isinstance(h, clipgrep.Hit) for h in hits)",
    # EMB holds one vector for PICS/red.png: it replaces that row, so each round has 2 rows.
    "import_embeddings": "assert clipgrep.import_embeddings(EMB, bundle=bundle).rows == 2",
    "remove_model": "clipgrep.remove_model(f'tiny{i}')",
}


def test_every_public_name_is_exercised() -> None:
    assert set(USES) == set(clipgrep.__all__) - {"__version__"}


def test_every_public_name_works_twice_in_one_process(tmp_path: Path) -> None:
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(pics / name)
    emb = tmp_path / "clip-out"
    (emb / "img_emb").mkdir(parents=True)
    (emb / "metadata").mkdir()
    np.save(emb / "img_emb" / "img_emb_0.npy", np.ones((1, 8), np.float16))
    pq.write_table(pa.table({"image_path": [str(pics / "red.png")]}), emb / "metadata" / "metadata_0.parquet")
    # remove_model goes last: indexing and search use the model added in the same round.
    order = [name for name in USES if name != "remove_model"] + ["remove_model"]
    body = "\n".join(f"    {USES[name]}" for name in order)
    script = (f"import clipgrep\nSOURCE = {str(make_contract_bundle(tmp_path / 'bundle'))!r}\n"
              f"PICS = {str(pics)!r}\nEMB = {str(emb)!r}\nfor i in range(2):\n{body}\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "ok\n"


def test_no_submodule_shadows_a_public_name() -> None:
    """Importing a submodule sets it as an attribute of the package, replacing a lazily served name."""
    submodules = {m.name for m in pkgutil.iter_modules(clipgrep.__path__)}
    assert not submodules & set(clipgrep.__all__)
