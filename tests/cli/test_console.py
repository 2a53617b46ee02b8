"""The ``polyvisor`` process itself: what reaches its pipes, its exit status, how it ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Runs the console entry point after leaving an object whose finalizer reports the interpreter's teardown.
WITNESS = """
import sys, threading, time
import polyvisor.cli as cli

class Witness:
    def __del__(self):
        sys.stderr.write("teardown\\n")

cli.witness = Witness()
if sys.argv[1] == "--with-thread":
    del sys.argv[1]
    threading.Thread(target=time.sleep, args=(0.5,)).start()
cli.run()
"""


def _run_console(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usual
    return subprocess.run([sys.executable, "-c", WITNESS, *argv], capture_output=True, text=True, timeout=60,
                          check=False, env=env)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.raw"
    with path.open("wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"\x42" * 4096)
    return path


def test_a_disk_command_skips_the_teardown_but_not_its_output(image: Path) -> None:
    # stdout is a pipe here, so block-buffered: without the flush before the exit the JSON would be lost.
    proc = _run_console("disk", "map", "--json", str(image))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert any(row["data"] for row in rows)
    assert "teardown" not in proc.stderr


def test_a_disk_command_keeps_its_exit_status_and_error(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "b.raw"
    other.write_bytes(bytes(3 << 20))
    proc = _run_console("disk", "compare", str(image), str(other))
    assert proc.returncode == 1, proc.stderr
    assert "mismatch at offset 1048576" in proc.stdout
    proc = _run_console("disk", "info", str(tmp_path / "missing.raw"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("polyvisor: ")
    assert "missing.raw" in proc.stderr
    assert "teardown" not in proc.stderr


def test_other_commands_and_running_threads_get_the_normal_exit(image: Path) -> None:
    proc = _run_console("drivers", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "teardown" in proc.stderr
    proc = _run_console("--with-thread", "disk", "info", str(image))
    assert proc.returncode == 0, proc.stderr
    assert "virtual size" in proc.stdout.lower()
    assert "teardown" in proc.stderr
