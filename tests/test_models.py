"""The model registry on disk: crash-atomic add/replace/remove, recovery, purge, the locks.

The kill tests fork a child that runs one models command and SIGKILLs itself
just before its Nth file-system write (rename, mkdir, rmdir, unlink, copy, write),
for every N the command makes; the parent then runs the next command and checks
that the old or the new model is installed, whole, with no temporaries left.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from clipgrep import models
from clipgrep.bundle import load_bundle
from clipgrep.errors import ClipgrepError, ModelNotFound
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.paths import index_dir, index_lock_file, models_dir, onnx_cache_dir, snapshot_dir
from clipgrep.store import IndexStore, last_run, list_bundle_ids

from .factories import make_contract_bundle
from .fakes import FakeImageEncoder

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different tiny bundles: the model before and after a replace."""
    root = tmp_path_factory.mktemp("sources")
    return make_contract_bundle(root / "old", seed=0), make_contract_bundle(root / "new", seed=1)


def bundle_id(source: Path) -> str:
    return load_bundle(source).bundle_id


def leftovers() -> list[str]:
    """Hidden entries of the models and index dirs other than the locks and removal records."""
    found = [p.name for p in models_dir().iterdir() if p.name.startswith(".")] if models_dir().is_dir() else []
    found += [p.name for p in index_dir().glob(".purge-*")]
    return sorted(n for n in found if n not in (".lock", ".lock.os") and not n.endswith(".removed"))


def installed_id(name: str) -> str | None:
    """The bundle id installed as ``name`` after the next command (``models list``), fully verified."""
    entry = {e.name: e for e in models.list_models()}.get(name)
    if entry is None:
        return None
    assert entry.bundle is not None, f"{name} is broken: {entry.problem}"
    return load_bundle(entry.path, verify="full").bundle_id


# --- kill -9 at every write step ----------------------------------------------------------------


def _die_at(step: int) -> None:
    """In a forked child: SIGKILL this process just before its ``step``-th write."""
    count = 0

    def wrap(owner: object, name: str) -> None:
        real = getattr(owner, name)

        def write(*args, **kwargs):
            nonlocal count
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, name, write)

    for name in ("rename", "replace", "mkdir", "rmdir", "unlink"):
        wrap(os, name)
    wrap(shutil, "copyfile")
    wrap(pathlib.Path, "write_text")


def run_killed(step: int, command: Callable[[], object]) -> int:
    """Run ``command`` in a child killed at write ``step``; its wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            _die_at(step)
            command()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def kill_at_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: Callable[[], None],
                       command: Callable[[], object], check: Callable[[], None]) -> int:
    """For N = 1, 2, ... until the command completes: a fresh home, ``setup``, kill at N, ``check``."""
    step = 0
    while True:
        step += 1
        monkeypatch.setenv("CLIPGREP_HOME", str(tmp_path / f"home-{step}"))
        setup()
        status = run_killed(step, command)
        check()
        assert leftovers() == [], f"killed at write {step}: temporaries left"
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"the command failed without a kill (step {step})"
            return step - 1
        assert os.WTERMSIG(status) == signal.SIGKILL


@fork_only
def test_add_killed_at_any_write_installs_nothing_or_the_whole_model(sources, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    old, _ = sources
    steps = kill_at_every_step(tmp_path, monkeypatch, setup=lambda: None,
                               command=lambda: models.add_model("m", checkpoint=old),
                               check=lambda: assert_in(installed_id("m"), {None, bundle_id(old)}))
    assert steps >= 5  # mkdir, copies, manifest, rename: every one was a kill point


@fork_only
def test_replace_killed_at_any_write_leaves_the_old_or_the_new_model(sources, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = sources
    kill_at_every_step(tmp_path, monkeypatch, setup=lambda: models.add_model("m", checkpoint=old),
                       command=lambda: models.add_model("m", checkpoint=new, replace=True),
                       check=lambda: assert_in(installed_id("m"), {bundle_id(old), bundle_id(new)}))
    assert installed_id("m") == bundle_id(new)


def fake_index(bundle_id: str) -> list[Path]:
    """Files where the index keeps a model's table and snapshot (their owners' paths)."""
    table = IndexStore(index_dir(), bundle_id, 8).table_dir
    made = [table / "_versions" / "1.manifest", table / "data" / "a.lance", snapshot_dir(bundle_id) / "CURRENT"]
    for path in made:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    return made


@fork_only
@pytest.mark.parametrize("purge", [False, True])
def test_remove_killed_at_any_write_leaves_the_model_or_nothing(purge: bool, sources, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old, _ = sources
    ident, index = bundle_id(old), load_bundle(old).index_id

    def setup() -> None:
        models.add_model("m", checkpoint=old)
        fake_index(index)

    def check() -> None:
        assert_in(installed_id("m"), {ident, None})
        table = IndexStore(index_dir(), index, 8).table_dir
        # the index of the model is whole or gone, never half-deleted
        assert (table / "_versions" / "1.manifest").exists() == (table / "data" / "a.lance").exists()

    kill_at_every_step(tmp_path, monkeypatch, setup, lambda: models.remove_model("m", purge=purge), check)
    assert installed_id("m") is None
    assert list_bundle_ids(index_dir()) == ([] if purge else [index])


def assert_in(value: object, allowed: set[object]) -> None:
    assert value in allowed, f"{value!r} is none of {allowed!r}"


# --- recovery without kills ------------------------------------------------------------------------


def test_stale_temporaries_are_removed_by_the_next_models_command(sources) -> None:
    """What killed runs of older versions left: a 155 MB .NAME.new-* stayed for good."""
    old, _ = sources
    models.add_model("m", checkpoint=old)
    stale = models_dir() / ".m.new-abc123" / "m"
    shutil.copytree(old, stale)
    (models_dir() / ".x.del-1234").mkdir()
    models.add_model("other", checkpoint=old)  # a successful add clears them too
    assert leftovers() == []


def test_a_replace_killed_between_its_renames_is_rolled_back_on_next_use(sources) -> None:
    old, new = sources
    models.add_model("m", checkpoint=old)
    staged = models_dir() / ".m.new-abc123" / "m"
    shutil.copytree(new, staged)
    (models_dir() / "m").rename(models_dir() / ".m.old-0123abcd")  # the state after the first rename
    assert models.load_model("m", auto_install=False).bundle_id == bundle_id(old)
    assert leftovers() == []


def test_add_waits_for_another_models_command(sources, tmp_path: Path) -> None:
    old, _ = sources
    told = []
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(models_dir() / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"

        def on_wait(what: str) -> None:
            told.append(what)
            holder.stdin.close()  # let it go

        models.add_model("m", checkpoint=old, on_wait=on_wait)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert told == ["another models command"]
    assert installed_id("m") == bundle_id(old)


HOLD_LOCK = """
import sys
from pathlib import Path
from clipgrep.index.lock import index_lock
with index_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_add_copies_only_the_files_the_manifest_lists_and_follows_no_link(sources, tmp_path: Path) -> None:
    """copytree followed links: out of the directory (copying outside files in), into a loop, into /dev/zero."""
    source = tmp_path / "src"
    shutil.copytree(sources[0], source)
    (tmp_path / "secret.txt").write_text("outside")
    (source / "secret.txt").symlink_to(tmp_path / "secret.txt")
    (source / "loop").symlink_to(source / "loop")
    (source / "zeros").symlink_to("/dev/zero")
    (source / "notes").mkdir()
    bundle = models.add_model("m", checkpoint=source)
    copied = {p.name for p in bundle.path.iterdir()}
    assert copied == {"manifest.json", ".verified.json", *bundle.manifest["files"]}


# --- remove, purge and the index lock --------------------------------------------------------------


def write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


@pytest.fixture
def indexed(sources, tmp_path: Path):
    """Model m installed and indexed (a real table and snapshot), with a text-session cache entry."""
    old, _ = sources
    bundle = models.add_model("m", checkpoint=old)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        write_image(tmp_path / "photos" / f"{i}.png", colour)
    update_index([tmp_path / "photos"], bundle=bundle, options=IndexOptions(workers=0), encoder=FakeImageEncoder())
    bundle.text_encoder().encode(["warm the cache"])
    assert list(onnx_cache_dir().iterdir())
    return bundle


def test_remove_keeps_the_index_and_says_how_to_purge_it(indexed) -> None:
    removal = models.remove_model("m")
    assert removal.path == models_dir() / "m" and not removal.purged and removal.data_bytes > 0
    assert list_bundle_ids(index_dir()) == [indexed.index_id]
    # The hint works after the fact: --purge finds the index of a model removed without it.
    later = models.remove_model("m", purge=True)
    assert later.path is None and later.purged and later.data_bytes == removal.data_bytes
    assert list_bundle_ids(index_dir()) == [] and not snapshot_dir(indexed.index_id).exists()
    assert list(onnx_cache_dir().iterdir()) == []
    assert last_run(index_dir(), indexed.index_id) is None
    with pytest.raises(ModelNotFound):
        models.remove_model("m", purge=True)


def test_purge_spares_an_index_another_installed_copy_uses(indexed, sources) -> None:
    models.add_model("copy", checkpoint=sources[0])  # the same model under another name: the same index
    removal = models.remove_model("m", purge=True)
    assert removal.shared_with == ("copy",) and removal.data_bytes == 0
    assert list_bundle_ids(index_dir()) == [indexed.index_id]
    assert list(onnx_cache_dir().iterdir())


def test_remove_from_the_command_line_says_what_stays(indexed) -> None:
    from typer.testing import CliRunner

    from clipgrep.cli import app

    result = CliRunner().invoke(app, ["models", "remove", "m"])
    assert result.exit_code == 0 and result.stdout == ""
    assert "stay, for a re-install of the same model; delete them with: clipgrep models remove m --purge" \
        in result.stderr
    result = CliRunner().invoke(app, ["models", "remove", "m", "--purge"])
    assert result.exit_code == 0 and "deleted its index and caches" in result.stderr


@pytest.mark.parametrize("command", ["remove", "replace"])
def test_remove_and_replace_wait_for_a_running_index_run(command: str, sources) -> None:
    """A run indexing with model m must not see it vanish or change (it failed with an internal error)."""
    old, new = sources
    models.add_model("m", checkpoint=old)
    told = []
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(index_lock_file())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"

        def on_wait(what: str) -> None:
            told.append(what)
            assert installed_id("m") == bundle_id(old), "changed while the index run held the lock"
            holder.stdin.close()

        if command == "remove":
            models.remove_model("m", on_wait=on_wait)
        else:
            models.add_model("m", checkpoint=new, replace=True, on_wait=on_wait)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert told == ["an index run"]
    assert installed_id("m") == (None if command == "remove" else bundle_id(new))


def test_an_index_run_whose_model_was_removed_while_it_waited_fails_cleanly(sources, tmp_path: Path) -> None:
    old, _ = sources
    bundle = models.add_model("m", checkpoint=old)  # loaded, as `clipgrep index` does before the lock
    models.remove_model("m")
    write_image(tmp_path / "p" / "a.png", (1, 2, 3))
    with pytest.raises(ClipgrepError, match="model m was removed while this run waited"):
        update_index([tmp_path / "p"], bundle=bundle, options=IndexOptions(workers=0), encoder=FakeImageEncoder())
