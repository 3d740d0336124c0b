"""tools/install_size.py: the size table of an environment and the base-install budget (make check-size)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "install_size.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), "--python", sys.executable, *args],
                          capture_output=True, text=True, check=False)


def test_lists_each_distribution_with_its_size_and_who_needs_it() -> None:
    run = _run()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    numpy = next(line for line in lines if " numpy==" in line)
    assert "onnxruntime" in numpy.split("needed by:")[1]  # numpy is a requirement of onnxruntime
    sizes = [float(line.split()[0]) for line in lines[:-1]]
    assert sizes == sorted(sizes, reverse=True) and float(numpy.split()[0]) > 1
    assert lines[-1].endswith(f"total, {len(sizes)} distributions")
    assert abs(float(lines[-1].split()[0]) - sum(sizes)) <= 0.05 * len(sizes)  # each row rounded to 0.1


def test_fails_in_one_line_over_the_budget() -> None:
    run = _run("--budget-mib", "1")
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "over its budget of 1 MiB" in run.stderr
    assert _run("--budget-mib", "1e9").returncode == 0
