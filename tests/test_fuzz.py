"""CI's short, fixed-seed fuzz run of every format parser (long runs: fuzz/run.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fuzz.seeds import SEEDS
from polyvisor.disk import registered_formats
from tests.peers import REPO, polyvisor_env

FUZZED = sorted({fmt for _, fmt, _ in SEEDS})


def test_every_format_with_metadata_has_seeds() -> None:
    assert set(FUZZED) == set(registered_formats()) - {"raw"}


@pytest.mark.parametrize("fmt", [f for f in FUZZED if f in registered_formats()])
@pytest.mark.timeout(900)
def test_fixed_seed_fuzz_run(fmt: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    seeds = tmp_path_factory.getbasetemp() / "fuzz-seeds"
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--format", fmt, "--runs", "400", "--seed", "1",
         "--seeds-dir", str(seeds)],
        capture_output=True, text=True, cwd=REPO, env=polyvisor_env(), timeout=880, check=False,
    )
    assert proc.returncode == 0, f"findings:\n{proc.stderr[-4000:]}"
    print(proc.stdout)
