"""``polyvisor disk …`` as users run it: output, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyvisor.cli import main
from polyvisor.disk import registered_formats
from tests.peers import VARIANTS, Variant, polyvisor_cli, qemu_compare

REGISTERED = [v for v in VARIANTS if v.format in registered_formats()]


polyvisor = polyvisor_cli


def test_create_info_map_check_compare_convert_raw(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "create", "-O", "raw", "a.raw", "3M"]) == 0
    with open("a.raw", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x42" * 4096)
    capsys.readouterr()
    assert main(["disk", "info", "--json", "a.raw"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "raw"
    assert info["virtual_size"] == 3 << 20
    assert info["backing"] == []
    assert main(["disk", "map", "--json", "a.raw"]) == 0
    rows = json.loads(capsys.readouterr().out)
    data = [r for r in rows if r["data"]]
    assert data
    assert data[0]["start"] <= 1 << 20 < data[0]["start"] + data[0]["length"]
    assert main(["disk", "check", "a.raw"]) == 0
    assert "No errors" in capsys.readouterr().out
    assert main(["disk", "convert", "-O", "raw", "a.raw", "b.raw"]) == 0
    assert main(["disk", "compare", "a.raw", "b.raw"]) == 0
    with open("b.raw", "r+b") as f:
        f.seek(5000)
        f.write(b"\x01")
    capsys.readouterr()
    assert main(["disk", "compare", "a.raw", "b.raw"]) == 1
    assert "mismatch at offset 5000" in capsys.readouterr().out


def test_errors_are_one_line_on_stderr(workdir: Path) -> None:
    missing = polyvisor("disk", "info", "missing.qcow2", cwd=workdir)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "missing.qcow2" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_size = polyvisor("disk", "create", "-O", "raw", "x.raw", "12Q", cwd=workdir)
    assert bad_size.returncode == 1
    assert "invalid size" in bad_size.stderr
    assert not (workdir / "x.raw").exists()
    compare = polyvisor("disk", "compare", "missing.raw", "missing.raw", cwd=workdir)
    assert compare.returncode == 2
    bad_option = polyvisor("disk", "create", "-O", "raw", "-o", "cluster_size=64K", "y.raw", "1M", cwd=workdir)
    assert bad_option.returncode == 1
    assert "cluster_size" in bad_option.stderr
    unknown = polyvisor("disk", "create", "-O", "qcow3", "z", "1M", cwd=workdir)
    assert unknown.returncode == 1
    assert "unknown disk format" in unknown.stderr


@pytest.mark.parametrize("variant", REGISTERED, ids=lambda v: v.id)
def test_convert_progress_and_info_every_format(variant: Variant, workdir: Path) -> None:
    source = workdir / "src.raw"
    with open(source, "wb") as f:
        f.truncate(4 << 20)
        f.seek(123456)
        f.write(b"polyvisor" * 1000)
    options = ",".join(f"{k}={v}" for k, v in variant.options.items())
    fmt: str = variant.format
    argv = ["disk", "convert", "-p", "-O", fmt, *(["-o", options] if options else []), "src.raw", f"out.{fmt}"]
    proc = polyvisor(*argv, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    qemu_compare(workdir / f"out.{fmt}", fmt, source, "raw")
    info = polyvisor("disk", "info", "--json", f"out.{fmt}", cwd=workdir)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["format"] == fmt
    assert described["subformat"] == variant.name
    assert described["virtual_size"] >= 4 << 20
    check = polyvisor("disk", "check", "--json", f"out.{fmt}", cwd=workdir)
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout)["check-errors"] == 0
