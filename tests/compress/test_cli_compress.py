"""``clipgrep compress export`` and ``eval`` through the command line, on a tiny student."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipgrep.cli import app

from ..convert_support import TINY_CONFIG, register_tiny_arch, tiny_model

pytestmark = pytest.mark.convert


def run(*args: str):
    return CliRunner().invoke(app, ["compress", *args], env={"COLUMNS": "200"})


@pytest.fixture
def stage_output(tmp_path: Path) -> Path:
    """What a stage writes: OUT/student as an open_clip local-dir, with its resolved config."""
    pytest.importorskip("torch")
    from safetensors.torch import save_file

    register_tiny_arch(tmp_path)
    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    preprocess = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (student / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG,
                                                               "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in tiny_model(seed=5).state_dict().items()},
              student / "open_clip_model.safetensors")
    return tmp_path / "run"


def test_export_installs_int8_and_fp32_bundles_from_one_onnx_export(stage_output: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from clipgrep.convert import pipeline
    from clipgrep.models import list_models

    exports: list[Path] = []
    real = pipeline.export_onnx
    monkeypatch.setattr(pipeline, "export_onnx", lambda loaded, work: exports.append(work) or real(loaded, work))
    result = run("export", str(stage_output), "tiny-student")
    assert len(exports) == 1, "both precisions come from one ONNX export"
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    entries = {e.name: e.bundle for e in list_models()}
    assert {n: b.precision for n, b in entries.items()} == {"tiny-student": "int8", "tiny-student-fp32": "fp32"}
    assert entries["tiny-student"].manifest["parity"]["token_ids_identical"] is True


def test_export_of_a_directory_without_a_student_is_one_error_line(tmp_path: Path) -> None:
    result = run("export", str(tmp_path), "x")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "no trained student" in result.stderr


def test_eval_prints_a_table_and_json(stage_output: Path, tmp_path: Path) -> None:
    from benchmarks.synthetic import generate_dataset

    assert run("export", str(stage_output), "st").exit_code == 0
    pairs = generate_dataset(tmp_path / "data", 12, image_size=64)
    table = run("eval", "--pairs", str(pairs), "-m", "st-fp32", "-m", "st")
    assert table.exit_code == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header[:4] == ["model", "prec", "params", "MB"]
    assert "st-fp32" in table.stdout and "img" in table.stdout
    rows = [json.loads(line) for line in run("eval", "--pairs", str(pairs), "-m", "st-fp32", "-m", "st",
                                             "--json").stdout.splitlines()]
    assert [r["name"] for r in rows] == ["st-fp32", "st"]
    assert rows[0]["image_speedup_b1"] == 1.0 and 0 <= rows[1]["t2i_R@1"] <= 1


def test_stage1_then_export_from_the_command_line(tmp_path: Path) -> None:
    import torch

    from benchmarks.synthetic import generate_dataset

    torch.set_num_threads(1)  # tiny model: extra threads only contend on a shared 2-core machine
    arch = register_tiny_arch(tmp_path)
    pairs = generate_dataset(tmp_path / "data", 8, image_size=64)
    out = tmp_path / "s1"
    result = run("stage1", "--teacher", f"{arch}:random", "--student", "text=1,text_width=16",
                 "--texts", str(pairs.parent / "texts.txt"), "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--max-steps", "3", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert (out / "student" / "open_clip_config.json").is_file() and (out / "config.json").is_file()
    assert "step 3/" in result.stderr
    plan = json.loads((out / "student" / "config.json").read_text())["plan"]
    assert plan["text_init"] == "random" and plan["model_cfg"]["text_cfg"]["width"] == 16
    assert run("export", str(out), "s1", "--precision", "fp32").exit_code == 0  # through the parity gate
