"""Booting a disk under QEMU (TCG) and watching its serial console for a marker.

This is a verification peer for the demo and the tests, not part of any
conversion: polyvisor itself never runs QEMU to read or write disks.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from polyvisor.errors import OperationFailed

QEMU_FORMATS = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}


@dataclass(frozen=True)
class BootResult:
    """What the guest printed and whether the marker appeared."""

    booted: bool
    seconds: float
    console: str


def boot_until_marker(disk: Path, fmt: str, marker: str, *, timeout: float = 180.0,
                      memory_mib: int = 256) -> BootResult:
    """Boot *disk* (polyvisor format name *fmt*) with TCG; stop once *marker* is printed on ttyS0."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise OperationFailed("qemu-system-x86_64 not found: install the Debian package qemu-system-x86")
    argv = [
        qemu, "-accel", "tcg", "-m", str(memory_mib), "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-drive", f"file={disk},format={QEMU_FORMATS[fmt]},if=ide", "-snapshot",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    output = bytearray()
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    booted = False
    try:
        while time.monotonic() - started < timeout:
            if not selector.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
            if marker.encode() in output:
                booted = True
                break
    finally:
        selector.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    return BootResult(booted, time.monotonic() - started, output.decode(errors="replace"))
