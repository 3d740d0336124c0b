"""The command line: help, output streams, exit codes, model management."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clipgrep.cli import app

from .factories import make_contract_bundle

PLAIN = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}


def run(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env={**PLAIN, **env})


def all_commands() -> list[tuple[str, ...]]:
    """Every command path of the app, from the Typer objects themselves."""
    paths: list[tuple[str, ...]] = [()]

    def walk(typer_app: typer.Typer, prefix: tuple[str, ...]) -> None:
        for command in typer_app.registered_commands:
            paths.append(prefix + (command.name or command.callback.__name__,))
        for group in typer_app.registered_groups:
            paths.append(prefix + (group.name,))
            walk(group.typer_instance, prefix + (group.name,))

    walk(app, ())
    return paths


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "clipgrep")
def test_help_matches_golden(path: tuple[str, ...], golden) -> None:
    result = run(*path, "--help")
    assert result.exit_code == 0
    assert "Usage: clipgrep" in result.stdout
    golden.check(f"help/{'_'.join(('clipgrep',) + path)}.txt", result.stdout)


@pytest.mark.parametrize("path", all_commands()[1:], ids=lambda p: " ".join(p))
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    lines = [line.strip() for line in run(*path, "--help").stdout.splitlines() if line.strip()]
    assert len(lines[1]) > 10, f"{path} has no description"


def test_version() -> None:
    from clipgrep import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"clipgrep {__version__}\n"


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The contract bundle installed as 'tiny' through the CLI (install-by-copy needs no torch)."""
    source = make_contract_bundle(tmp_path / "src")
    result = run("models", "add", "tiny", "--checkpoint", str(source))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "installed tiny" in result.stderr
    return source


def test_models_live_under_clipgrep_home(installed: Path, clipgrep_home: Path) -> None:
    assert (clipgrep_home / "models" / "tiny" / "manifest.json").is_file()


def test_models_list_table_and_json(installed: Path) -> None:
    table = run("models", "list")
    assert table.exit_code == 0
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "PRECISION", "DIM", "SIZE", "ARCH", "WEIGHTS"]
    assert row.split()[:3] == ["tiny", "fp32", "8"]
    entries = [json.loads(line) for line in run("models", "list", "--json").stdout.splitlines()]
    assert [(e["name"], e["embed_dim"], e["precision"]) for e in entries] == [("tiny", 8, "fp32")]


def test_models_list_shows_broken_models(installed: Path, clipgrep_home: Path) -> None:
    (clipgrep_home / "models" / "tiny" / "text.onnx").unlink()
    result = run("models", "list")
    assert result.exit_code == 0
    assert "broken:" in result.stdout and "missing text.onnx" in result.stdout


@pytest.mark.parametrize("manifest, reason", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (None, "manifest field tokenizer must be an object, not str"),
    (" " * (2 << 20), "larger than 1024 KiB"),
])
def test_models_list_shows_a_hostile_manifest_as_broken(installed: Path, clipgrep_home: Path,
                                                        manifest: str | None, reason: str) -> None:
    """A RecursionError, an AttributeError and 2 GB of RAM before; now a broken entry with its reason."""
    path = clipgrep_home / "models" / "tiny" / "manifest.json"
    if manifest is None:
        manifest = json.dumps({**json.loads(path.read_text()), "tokenizer": "clip-bpe"})
    path.write_text(manifest)
    result = run("models", "list")
    assert result.exit_code == 0, result.stderr
    assert "broken:" in result.stdout and reason in result.stdout


def test_models_add_refuses_a_bundle_with_a_linked_file(tmp_path: Path) -> None:
    """A link was followed and the outside file copied in."""
    source = make_contract_bundle(tmp_path / "src")
    outside = tmp_path / "outside.onnx"
    (source / "text.onnx").rename(outside)
    (source / "text.onnx").symlink_to(outside)
    result = run("models", "add", "tiny", "--checkpoint", str(source))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "text.onnx is not a regular file" in result.stderr


def test_models_info(installed: Path) -> None:
    text = run("models", "info", "tiny")
    assert text.exit_code == 0
    fields = dict(line.split(None, 1) if "  " not in line else [part.strip() for part in line.split("  ", 1)]
                  for line in text.stdout.splitlines())
    assert fields["name"] == "tiny" and fields["precision"] == "fp32" and fields["arch"] == "contract-test"
    manifest = json.loads(run("models", "info", "tiny", "--json").stdout)
    assert manifest["name"] == "tiny" and manifest["format"] == "clipgrep-bundle"


def test_models_info_accepts_a_bundle_directory(installed: Path) -> None:
    result = run("models", "info", str(installed), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["name"] == "tiny"


def test_models_add_refuses_to_overwrite_without_replace(installed: Path) -> None:
    again = run("models", "add", "tiny", "--checkpoint", str(installed))
    assert again.exit_code == 2 and "already installed" in again.stderr and "--replace" in again.stderr
    assert run("models", "add", "tiny", "--checkpoint", str(installed), "--replace").exit_code == 0


def test_models_remove(installed: Path, clipgrep_home: Path) -> None:
    result = run("models", "remove", "tiny")
    assert result.exit_code == 0 and result.stdout == ""
    assert not (clipgrep_home / "models" / "tiny").exists()
    assert run("models", "remove", "tiny").exit_code == 2


def test_empty_model_list_talks_on_stderr_only() -> None:
    result = run("models", "list")
    assert result.exit_code == 0 and result.stdout == "" and "clipgrep models add" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("models", "info", "nope"), "no model named 'nope' is installed"),
    (("models", "add", "bad/name", "--checkpoint", "."), "invalid model name"),
    (("models", "info", "./not-a-bundle"), "not a clipgrep bundle"),
])
def test_errors_are_one_line_on_stderr_with_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("clipgrep: error: ")
    assert message in result.stderr


def test_debug_env_shows_the_traceback() -> None:
    from clipgrep.errors import ModelNotFound

    result = run("models", "info", "nope", CLIPGREP_DEBUG="1")
    assert isinstance(result.exception, ModelNotFound)


@pytest.mark.convert
def test_offline_conversion_error_is_one_line() -> None:
    pytest.importorskip("torch")
    result = run("models", "add", "b32", "--arch", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
                 HF_HUB_OFFLINE="1")
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("clipgrep: error")]
    assert len(errors) == 1
    assert "clipgrep models add NAME --arch ViT-B-32 --pretrained laion2b_s34b_b79k --checkpoint FILE" in errors[0]


# --- conventions every grep/rg/fd user relies on ---------------------------------------------------

@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "clipgrep")
def test_dash_h_is_help_everywhere(path: tuple[str, ...]) -> None:
    short, long = run(*path, "-h"), run(*path, "--help")
    assert short.exit_code == 0 and short.stdout == long.stdout


def clipgrep_process(*args: str, stdout: int | object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipgrep", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **PLAIN}, check=False)


@pytest.mark.parametrize("args", [("--help",), ("-h",), ("search", "-h"), ("models", "add", "--help")])
def test_help_into_a_closed_pipe_exits_0(args: tuple[str, ...]) -> None:
    """`clipgrep --help | head`: the reader leaving is not an error, and exit 1 would mean "no match"."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with a fast `head`
    try:
        result = clipgrep_process(*args, stdout=write)
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("--help",), ("search", "--help"), ("--version",), ("models", "list"),
                                  ("models", "info", "tiny", "--json"), ("status",)])
def test_output_to_a_full_device_is_one_line_and_exit_2(installed: Path, args: tuple[str, ...]) -> None:
    with open("/dev/full", "w") as full:
        result = clipgrep_process(*args, stdout=full)
    assert result.returncode == 2
    assert result.stderr == ("clipgrep: error: cannot write the output: No space left on device "
                             "(free some space, or send the output elsewhere)\n")


def test_negative_workers_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run("index", str(tmp_path), "--workers", "-1")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("clipgrep: error: the number of decoding workers must be 0 or more, not -1 "
                             "(e.g. --workers 2; 0 decodes in the indexing process itself)\n")


def test_models_add_checks_its_arguments_before_importing_torch(tmp_path: Path) -> None:
    """A typo must not cost the ~3 s of importing torch before it is reported."""
    script = (
        "import sys\n"
        "from clipgrep.errors import ClipgrepError\n"
        "from clipgrep.models import add_model\n"
        "cases = [{}, {'arch': 'ViT-B-32'}, {'arch': 'ViT-B-32', 'checkpoint': '/no/such.pt'},\n"
        f"         {{'checkpoint': {str(tmp_path)!r}}},\n"
        "         {'arch': 'ViT-B-32', 'random_init': True, 'pretrained': 'x'}]\n"
        "for kwargs in cases:\n"
        "    try:\n"
        "        add_model('x', **kwargs)\n"
        "    except ClipgrepError as e:\n"
        "        print(e.message)\n"
        "    assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, kwargs\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "'x' is not in clipgrep's catalogue",  # no source at all: a catalogue name (models available)
        "no weights given for ViT-B-32",
        "checkpoint /no/such.pt does not exist",
        (f"{tmp_path} is neither a clipgrep bundle nor an open_clip model directory "
         "(no manifest.json or open_clip_config.json)"),
        "--random-init excludes --checkpoint and --pretrained",
    ]
