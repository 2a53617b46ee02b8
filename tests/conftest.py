"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for one test's images (the tests' own cwd is left alone)."""
    d = tmp_path / "images"
    d.mkdir()
    old = Path.cwd()
    os.chdir(d)
    try:
        yield d
    finally:
        os.chdir(old)
