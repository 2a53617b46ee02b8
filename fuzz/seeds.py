"""Seed images for fuzzing: small valid images of every format and subformat, made by qemu-img and qemu-io.

Small on purpose: tiny clusters, a few MiB of virtual size, a handful of
written ranges, so that every mutation is parsed and fully mapped in
milliseconds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}

#: (seed name, polyvisor format, qemu-img create -o options); virtual sizes are 2 MiB + 512 unless noted.
SEEDS: list[tuple[str, str, str]] = [
    ("qcow2-v3-c512", "qcow2", "compat=1.1,cluster_size=512"),
    ("qcow2-v2-c4k", "qcow2", "compat=0.10,cluster_size=4096"),
    ("qcow2-v3-extl2", "qcow2", "compat=1.1,cluster_size=16384,extended_l2=on"),
    ("vmdk-sparse", "vmdk", "subformat=monolithicSparse"),
    ("vmdk-stream", "vmdk", "subformat=streamOptimized"),
    ("vhd-dynamic", "vhd", "subformat=dynamic"),
    ("vhd-fixed", "vhd", "subformat=fixed"),
    ("vhdx-dynamic", "vhdx", "subformat=dynamic,block_size=1M,log_size=1M"),
    ("vdi-dynamic", "vdi", "static=off"),
    ("vdi-fixed", "vdi", "static=on"),
]

SEED_SIZE = (2 << 20) + 512
_WRITES = ["write -P 0x11 0 4096", "write -P 0x22 1048576 1536", "write -z 65536 4096",
           f"write -P 0x33 {SEED_SIZE - 512} 512"]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def build_seeds(folder: Path) -> dict[str, tuple[Path, str]]:
    """Create (or reuse) every seed in *folder*: name -> (path, polyvisor format)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}
    for name, fmt, options in SEEDS:
        path = folder / f"{name}.{fmt}"
        if not path.exists():
            tmp = folder / f".{name}.tmp.{fmt}"
            raw = folder / f".{name}.raw"
            _run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(SEED_SIZE)])
            _run(["qemu-io", "-f", "raw", *[a for w in _WRITES for a in ("-c", w)], str(raw)])
            if fmt == "qcow2":  # plus a compressed cluster, a zero cluster, and qcow2's own layout
                _run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(raw), str(tmp)])
                _run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 8192 512", "-c", "write -z 1048576 512",
                      str(tmp)])
            else:
                _run(["qemu-img", "convert", "-f", "raw", "-O", QEMU_FORMAT[fmt], "-o", options, str(raw), str(tmp)])
            raw.unlink()
            tmp.rename(path)
        out[name] = (path, fmt)
    return out
