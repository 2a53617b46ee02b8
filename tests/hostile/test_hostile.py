"""Every hostile case ends in a clear PolyvisorError within a second, with bounded memory; check reports it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polyvisor.disk import registered_formats
from tests.hostile.corpus import CASES, Case
from tests.peers import polyvisor_cli, polyvisor_env

REPO = Path(__file__).resolve().parents[2]
#: Python allocations one case may make (the probe's address space is capped at 1 GiB as well).
PEAK_BYTES = 64 << 20


def test_corpus_is_large_and_covers_every_format() -> None:
    assert len(CASES) >= 50
    assert {c.format for c in CASES} == {"raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"}
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.format in registered_formats()], ids=lambda c: c.name)
def test_hostile_image(case: Case, tmp_path: Path) -> None:
    image = case.build(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    probe = subprocess.run([sys.executable, "-m", "tests.hostile.probe", case.format, str(image),
                            case.refused],
                           capture_output=True, text=True, cwd=REPO, env=polyvisor_env(), timeout=60, check=False)
    assert probe.returncode == 0, f"{case.what}: escaped as a non-Polyvisor error:\n{probe.stderr[-3000:]}"
    outcome = json.loads(probe.stdout)
    assert outcome["error"] is not None, f"{case.what}: opened and read without complaint"
    assert image.name in outcome["message"], outcome["message"]
    assert outcome["seconds"] < 1.0, f"{case.what}: took {outcome['seconds']:.2f} s"
    assert outcome["peak_bytes"] < PEAK_BYTES, f"{case.what}: allocated {outcome['peak_bytes'] >> 20} MiB"
    check = outcome["check"]
    if case.check_finds:
        assert check.get("error") or check["corruptions"] > 0, f"{case.what}: check found nothing: {check}"
    after = {p: p.read_bytes() for p in before}
    assert after == before, "a hostile source was modified"

    if case.refused == "write":
        return
    out = tmp_path / "converted.raw"
    cli = polyvisor_cli("disk", "convert", "-f", case.format, "-O", "raw", str(image), str(out), cwd=REPO, timeout=60)
    assert cli.returncode == 1, cli.stdout
    assert cli.stderr.count("\n") == 1, cli.stderr
    assert "Traceback" not in cli.stderr
    assert not out.exists()
