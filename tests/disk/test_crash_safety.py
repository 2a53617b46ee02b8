"""``polyvisor disk convert`` killed with SIGKILL: nothing under the final name, the source untouched."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from polyvisor.disk import registered_formats
from tests.peers import VARIANTS, Variant, polyvisor_env

REGISTERED = [v for v in VARIANTS if v.format in registered_formats()]
SOURCE_SIZE = 192 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A raw source of random data (incompressible, so every format has work to do) and its digest."""
    path = tmp_path_factory.mktemp("crash") / "source.raw"
    with open(path, "wb") as f:
        for _ in range(SOURCE_SIZE >> 20):
            f.write(os.urandom(1 << 20))
    return path, _digest(path)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp") and ".polyvisor-" in p.name]


def _written(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in _temporaries(folder))


#: Moments to kill at: predicates over the output folder, checked every millisecond.
MOMENTS: dict[str, Callable[[Path], bool]] = {
    "at-start": lambda folder: True,
    "temporary-created": lambda folder: bool(_temporaries(folder)),
    "quarter-written": lambda folder: _written(folder) >= SOURCE_SIZE // 4,
    "three-quarters-written": lambda folder: _written(folder) >= SOURCE_SIZE * 3 // 4,
}


@pytest.mark.parametrize("variant", REGISTERED, ids=lambda v: v.id)
def test_sigkill_during_convert(variant: Variant, source: tuple[Path, str], tmp_path: Path) -> None:
    source_path, digest = source
    killed = 0
    for moment, reached in MOMENTS.items():
        folder = tmp_path / moment
        folder.mkdir()
        destination = folder / f"out.{variant.format}"
        options = ",".join(f"{k}={v}" for k, v in variant.options.items())
        argv = [sys.executable, "-m", "polyvisor", "disk", "convert", "-O", variant.format,
                *(["-o", options] if options else []), str(source_path), str(destination)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=polyvisor_env())
        deadline = time.monotonic() + 120
        while proc.poll() is None and not reached(folder) and time.monotonic() < deadline:
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
            finals = [p for p in folder.iterdir() if p not in _temporaries(folder)]
            assert finals == [], f"{moment}: files under final names after SIGKILL: {finals}"
        else:
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
            assert destination.exists()
        if proc.stderr:
            proc.stderr.close()
        assert _digest(source_path) == digest, f"{moment}: the source changed"
    assert killed >= 2, "conversions finished before they could be interrupted; enlarge SOURCE_SIZE"
