"""The main job's default: a bootable disk through every format, then booted under QEMU (TCG)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyvisor.demo.bootdisk import BOOT_MARKER, build_boot_disk
from polyvisor.demo.disk_demo import CHAIN, run_demo
from tests.peers import qemu_compare


def test_boot_disk_is_a_partitioned_fat_disk(tmp_path: Path) -> None:
    disk = build_boot_disk(tmp_path / "boot.raw")
    data = disk.path.read_bytes()
    assert data[510:512] == b"\x55\xaa"
    assert data[446] == 0x80  # bootable partition
    fat = data[2048 * 512 :]
    assert fat[54:62] == b"FAT16   "
    assert b"LDLINUX SYS" in data  # syslinux installed in the FAT root directory


@pytest.mark.boot
@pytest.mark.timeout(600)
def test_demo_chain_boots(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path, boot=True, say=lines.append)
    assert [s.format for s in result.steps] == [f for f, _ in CHAIN]
    for step in result.steps:
        assert step.identical, step
        assert step.check_clean, step
        qemu_compare(step.destination, step.format, result.original, "raw")
    assert result.boot is not None
    assert result.boot.booted, result.boot.console[-2000:]
    assert BOOT_MARKER in result.boot.console
    assert result.ok
    assert lines[-1] == "demo succeeded"
