"""A small bootable Linux disk, built from Debian packages without loop devices or root.

Layout (raw, 32 MiB): syslinux's MBR boot code and one bootable FAT16
partition starting at 1 MiB, holding syslinux (installed with its mtools
variant), a Debian kernel and a busybox initramfs whose ``/init`` prints a
marker on the serial console (ttyS0) and powers off.  With ``polyvisor.counter``
on the kernel command line it prints ``polyvisor-counter N`` once a second
instead, for tests that must see a guest keep running.

Tools (Debian packages, installed by ``scripts/setup.sh``): ``mkfs.fat``
(dosfstools), ``mcopy`` (mtools), ``syslinux`` and ``/usr/lib/syslinux/mbr/mbr.bin``
(syslinux, syslinux-common), ``/bin/busybox`` (busybox-static), and a kernel
(``.cache/kernel/vmlinuz``, unpacked from Debian's linux-image package).
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polyvisor.errors import OperationFailed

#: What the guest prints on ttyS0 once it is up.
BOOT_MARKER = "POLYVISOR-BOOT-OK"
#: Prefix of each line the guest prints in counter mode.
COUNTER_PREFIX = "polyvisor-counter"

DISK_SIZE = 32 << 20
PARTITION_START_SECTOR = 2048
MBR_BOOT_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
BUSYBOX = Path("/bin/busybox")

_INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
if /bin/busybox grep -q polyvisor.counter /proc/cmdline; then
    i=0
    while true; do
        echo "{COUNTER_PREFIX} $i"
        i=$((i + 1))
        /bin/busybox sleep 1
    done
fi
echo "{BOOT_MARKER}"
/bin/busybox sync
/bin/busybox poweroff -f
"""

_SYSLINUX_CFG = """SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 panic=-1 loglevel=3 {extra}
"""


@dataclass(frozen=True)
class BootDisk:
    """A built boot disk and what it contains."""

    path: Path
    kernel: Path
    size: int
    marker: str = BOOT_MARKER


def find_kernel() -> Path:
    """A Debian kernel: ``$POLYVISOR_KERNEL``, the repository's ``.cache/kernel/vmlinuz``, or /boot."""
    candidates: list[Path] = []
    if env := os.environ.get("POLYVISOR_KERNEL"):
        candidates.append(Path(env))
    candidates.append(Path.cwd() / ".cache" / "kernel" / "vmlinuz")
    candidates.append(Path(__file__).resolve().parents[3] / ".cache" / "kernel" / "vmlinuz")
    candidates += sorted(Path("/boot").glob("vmlinuz-*"), reverse=True)
    for path in candidates:
        if path.is_file() and os.access(path, os.R_OK):
            return path
    raise OperationFailed(
        "no Linux kernel found: run scripts/setup.sh (it unpacks Debian's kernel into .cache/kernel) "
        "or set POLYVISOR_KERNEL"
    )


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise OperationFailed(f"{name} not found: install the Debian package {package} (scripts/setup.sh does)")
    return found


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise OperationFailed(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


# ----------------------------------------------------------------- initramfs


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One member of a "newc" cpio archive (Linux Documentation/filesystems/ramfs-rootfs-initramfs.rst)."""
    encoded = name.encode() + b"\0"
    header = b"070701" + b"".join(
        f"{value:08x}".encode()
        for value in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    )
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_initramfs(busybox: Path = BUSYBOX) -> bytes:
    """A gzip-compressed initramfs: busybox, /init, and the device nodes the console needs."""
    if not busybox.is_file():
        raise OperationFailed(f"{busybox} not found: install the Debian package busybox-static")
    members = [
        _cpio_entry("bin", stat.S_IFDIR | 0o755, ino=1),
        _cpio_entry("dev", stat.S_IFDIR | 0o755, ino=2),
        _cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), ino=3),
        _cpio_entry("dev/ttyS0", stat.S_IFCHR | 0o600, rdev=(4, 64), ino=4),
        _cpio_entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3), ino=5),
        _cpio_entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), ino=6),
        _cpio_entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox", ino=7),
        _cpio_entry("init", stat.S_IFREG | 0o755, _INIT_SCRIPT.encode(), ino=8),
        _cpio_entry("TRAILER!!!", 0),
    ]
    return gzip.compress(b"".join(members), compresslevel=6, mtime=0)


# ---------------------------------------------------------------------- disk


def _mbr(partition_sectors: int, boot_code: bytes) -> bytes:
    """Sector 0: boot code, one bootable FAT16 (LBA) partition entry, the 0x55AA signature."""
    sector = bytearray(512)
    sector[: len(boot_code)] = boot_code
    # Partition entry (16 bytes at 446): status, CHS first (unused: LBA), type 0x0e FAT16 LBA, CHS last, LBA, count.
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff",
                        PARTITION_START_SECTOR, partition_sectors)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def build_boot_disk(path: Path, *, kernel: Path | None = None, extra_cmdline: str = "") -> BootDisk:
    """Write a bootable raw disk image to *path* (replaced if present)."""
    kernel = kernel or find_kernel()
    mkfs = _tool("mkfs.fat", "dosfstools")
    mcopy = _tool("mcopy", "mtools")
    syslinux = _tool("syslinux", "syslinux")
    if not MBR_BOOT_CODE.is_file():
        raise OperationFailed(f"{MBR_BOOT_CODE} not found: install the Debian package syslinux-common")
    partition_sectors = DISK_SIZE // 512 - PARTITION_START_SECTOR
    with tempfile.TemporaryDirectory(prefix="polyvisor-bootdisk-") as tmp:
        work = Path(tmp)
        fat = work / "fat.img"
        _run([mkfs, "-C", "-F", "16", "-n", "POLYVISOR", "-h", str(PARTITION_START_SECTOR),
              str(fat), str(partition_sectors // 2)])
        (work / "initrd.gz").write_bytes(build_initramfs())
        (work / "syslinux.cfg").write_text(_SYSLINUX_CFG.format(extra=extra_cmdline))
        shutil.copyfile(kernel, work / "vmlinuz")
        env_free = ["-i", str(fat)]
        for name in ("vmlinuz", "initrd.gz", "syslinux.cfg"):
            _run([mcopy, *env_free, str(work / name), f"::/{name}"])
        _run([syslinux, "--install", str(fat)])
        tmp_out = path.with_name(f".{path.name}.building")
        with open(tmp_out, "wb") as out:
            out.truncate(DISK_SIZE)
            out.write(_mbr(partition_sectors, MBR_BOOT_CODE.read_bytes()[:440]))
            out.seek(PARTITION_START_SECTOR * 512)
            with open(fat, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp_out, path)
    return BootDisk(path=path, kernel=kernel, size=DISK_SIZE)
