"""Deterministic test content: scattered pattern writes and the raw file they should produce."""

from __future__ import annotations

import random
from pathlib import Path

from polyvisor.disk import DiskImage


def scattered_writes(size: int, *, seed: int = 1, count: int = 24) -> list[tuple[int, bytes]]:
    """Writes at scattered, often unaligned offsets: patterns, a zero run, overwrites, the last byte.

    Offsets cover the first sector, cluster/grain/block boundaries of common
    sizes, and the very end of the disk.
    """
    rng = random.Random(seed)
    writes: list[tuple[int, bytes]] = []
    fixed = [0, 511, 4096 - 7, 65536 - 100, (1 << 20) - 3, (2 << 20) + 512, size // 2 + 13, size - 4096]
    for offset in fixed:
        if 0 <= offset < size:
            length = min(rng.randrange(1, 3 * 65536), size - offset)
            writes.append((offset, bytes([rng.randrange(1, 256)]) * length))
    for _ in range(count):
        offset = rng.randrange(0, size)
        length = min(rng.choice([1, 512, 4096, 65536, 70000, 1 << 20]), size - offset)
        data = rng.randbytes(length) if rng.random() < 0.5 else bytes([rng.randrange(1, 256)]) * length
        writes.append((offset, data))
    # A run of zeros over written data, and the very last byte.
    if size > 8192:
        writes.append((writes[0][0], bytes(min(4096, size - writes[0][0]))))
    writes.append((size - 1, b"\xee"))
    return writes


def apply_writes(image: DiskImage, writes: list[tuple[int, bytes]]) -> None:
    """Perform *writes* on a writable polyvisor image."""
    for offset, data in writes:
        image.write(offset, data)


def reference_raw(path: Path, size: int, writes: list[tuple[int, bytes]], base: Path | None = None) -> Path:
    """A sparse raw file with the result of *writes* (on top of a copy of *base*, if given)."""
    with open(path, "wb") as out:
        out.truncate(size)
        if base is not None:
            with open(base, "rb") as src:
                pos = 0
                while chunk := src.read(1 << 20):
                    if chunk.count(0) != len(chunk):
                        out.seek(pos)
                        out.write(chunk[: max(0, min(len(chunk), size - pos))])
                    pos += len(chunk)
        for offset, data in writes:
            out.seek(offset)
            out.write(data)
    return path


def qemu_io_commands(size: int, *, seed: int = 7, count: int = 16) -> list[str]:
    """qemu-io commands that fill an image with patterns, zeros and discards at scattered offsets."""
    rng = random.Random(seed)
    commands = []
    for i in range(count):
        offset = rng.randrange(0, size // 512) * 512
        length = min(rng.choice([512, 4096, 65536, 1 << 20, 3 << 20]), size - offset)
        if length <= 0:
            continue
        if i % 5 == 4:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    commands.append(f"write -P 0x5a {size - 512} 512")
    return commands
