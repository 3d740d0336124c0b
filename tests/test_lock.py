"""The index lock, across real processes: refusal with the holder's pid, waiting, crash release."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clipgrep.errors import ClipgrepError
from clipgrep.index.lock import index_lock

# Takes the lock, says so, then holds it until stdin closes (or it is killed).
HOLDER = """
import sys
from pathlib import Path
from clipgrep.index.lock import index_lock
with index_lock(Path(sys.argv[1]), wait=False):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "index" / "index.lock"


@pytest.fixture
def holder(lock_path: Path):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "locked\n"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_second_run_is_refused_with_the_holders_pid(lock_path: Path, holder: subprocess.Popen) -> None:
    expected = f"another clipgrep index is running \\(pid {holder.pid}\\)"
    with pytest.raises(ClipgrepError, match=expected) as info, index_lock(lock_path, wait=False):
        pytest.fail("got a lock that another process holds")
    assert "wait for it" in info.value.hint


def test_a_waiting_run_is_told_once_and_gets_the_lock_after_release(lock_path: Path,
                                                                     holder: subprocess.Popen) -> None:
    calls = []

    def on_wait() -> None:
        calls.append(1)
        holder.stdin.close()  # the holder finishes its run

    with index_lock(lock_path, on_wait=on_wait):
        assert lock_path.read_text() == f"{os.getpid()}\n"
    assert calls == [1]
    assert holder.wait(timeout=10) == 0


def test_the_lock_is_released_when_its_holder_is_killed(lock_path: Path, holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with index_lock(lock_path, wait=False):
        pass


def test_a_free_lock_is_taken_without_waiting_and_released_on_errors(lock_path: Path) -> None:
    def on_wait() -> None:
        pytest.fail("waited for a free lock")

    with pytest.raises(RuntimeError), index_lock(lock_path, on_wait=on_wait):
        raise RuntimeError("the run failed")
    assert lock_path.read_text() == ""  # no stale pid left behind
    # Not re-entrant: a second descriptor conflicts even within one process.
    with (index_lock(lock_path, wait=False), pytest.raises(ClipgrepError, match=f"pid {os.getpid()}"),
          index_lock(lock_path, wait=False)):
        pass
