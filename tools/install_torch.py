"""Install the CPU build of torch and torchvision into a venv (used by the Makefile).

PyPI's Linux torch wheels are CUDA builds (~3 GB of nvidia-* wheels), and PyPI's
torchvision is CUDA-only too. PyTorch's CPU index serves CPU builds of both, so
that is where they come from by default. Some machines cannot reach it but have a
mirror that serves a CPU torch itself (this project's CI machine): the index is
probed first, briefly, and when it does not answer pip's own configured sources are
used instead. `make test` then checks that no CUDA package came in.

    python tools/install_torch.py --python .venv/bin/python [--index-url URL] [--dry-run]

``--index-url ''`` (or TORCH_INDEX_URL='') skips the CPU index: pip's sources only.
Versions come from constraints.txt. Standard library only: it runs before any venv exists.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
PACKAGES = ("torch", "torchvision")


def index_answers(url: str, timeout: float) -> bool:
    """Whether ``url`` serves a torch project page within ``timeout`` seconds, all told.

    urllib's own timeout does not bound name resolution, so the request runs in a
    daemon thread that is abandoned when the time is up.
    """
    answered: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/torch/", timeout=timeout) as response:
                answered.append(response.status == 200)
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def pip_command(python: str, index_url: str | None) -> list[str]:
    """The pip command line: from ``index_url`` when given, else from pip's configured sources."""
    command = [python, "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS)]
    if index_url:
        command += ["--index-url", index_url]
    return command + list(PACKAGES)


def choose_index(url: str, timeout: float) -> str | None:
    if not url:
        return None
    if index_answers(url, timeout):
        return url
    print(f"install_torch: {url} could not be reached (waited at most {timeout:g} s); installing torch from pip's "
          "configured sources, which must serve a CPU build (set TORCH_INDEX_URL to a reachable "
          "CPU index otherwise)", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the venv's interpreter")
    parser.add_argument("--index-url", default=os.environ.get("TORCH_INDEX_URL", CPU_INDEX),
                        help="an index serving CPU builds of torch and torchvision ('' for none)")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("TORCH_INDEX_TIMEOUT", "5")),
                        help="seconds to wait for the index to answer")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    args = parser.parse_args(argv)
    command = pip_command(args.python, choose_index(args.index_url, args.timeout))
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
