"""Any format to any format, streaming and sparse-aware (``polyvisor disk convert``).

The source is walked through its chain-resolved map: ranges no layer holds and
zero extents are never read; data ranges are read in bounded chunks, and runs of
zeros inside them are not written, so a fresh destination keeps them
unallocated.  Memory stays bounded by the chunk size whatever the image size.
The destination appears under its name only once complete (see
:class:`~polyvisor.disk.fileio.OutputFiles`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from polyvisor.disk.image import DiskImage, ExtentKind, is_zero
from polyvisor.disk.paths import DEFAULT_POLICY, ReferencePolicy, real_path
from polyvisor.disk.registry import CreateOptions, create_image, open_image
from polyvisor.errors import UsageError

#: Bytes read from the source per step.
CHUNK = 4 << 20
#: Zero detection granularity: aligned zero runs at least this long are not written.
ZERO_GRANULE = 64 << 10

Progress = Callable[[int, int], None]


@dataclass
class ConvertResult:
    """What a conversion did."""

    source: str
    destination: str
    format: str
    subformat: str
    virtual_size: int
    data_bytes_read: int
    data_bytes_written: int
    seconds: float


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    out_format: str,
    options: CreateOptions | None = None,
    *,
    source_format: str | None = None,
    policy: ReferencePolicy = DEFAULT_POLICY,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the image at *source* into a new *out_format* image at *destination*."""
    started = time.monotonic()
    options = options or CreateOptions()
    with open_image(source, source_format, policy=policy) as src:
        _refuse_overwriting_the_source(src, Path(destination))
        with create_image(destination, out_format, src.virtual_size, options, policy=policy) as dst:
            read, written = copy_image(src, dst, progress=progress)
            result = ConvertResult(
                source=str(source),
                destination=str(destination),
                format=dst.format_name,
                subformat=dst.subformat,
                virtual_size=dst.virtual_size,
                data_bytes_read=read,
                data_bytes_written=written,
                seconds=0.0,
            )
    result.seconds = time.monotonic() - started
    return result


def _refuse_overwriting_the_source(src: DiskImage, destination: Path) -> None:
    target = real_path(destination)
    for layer in src.chain():
        for file in layer.files:
            if real_path(Path(file.path)) == target:
                raise UsageError(f"{destination}: is the source image (or one of its files); choose another name")


def copy_image(src: DiskImage, dst: DiskImage, *, progress: Progress | None = None) -> tuple[int, int]:
    """Copy every guest byte of *src* into *dst*; returns (data bytes read, bytes written)."""
    total = src.virtual_size
    if dst.virtual_size < total:
        raise UsageError(f"{dst.path}: {dst.virtual_size} bytes is smaller than the source's {total}")
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    base = bytearray(CHUNK) if dst.backing is not None else None
    read_bytes = written = 0
    for ext in src.map():
        if ext.kind is not ExtentKind.DATA and dst.backing is None:
            if progress:
                progress(ext.end, total)
            continue
        pos = ext.offset
        while pos < ext.end:
            n = min(CHUNK - pos % CHUNK, ext.end - pos)
            chunk = view[:n]
            if ext.kind is ExtentKind.DATA:
                src.readinto(pos, chunk)
                read_bytes += n
            else:
                chunk[:] = bytes(n)
            if base is not None:
                backing_view = memoryview(base)[:n]
                dst._read_backing_into(pos, backing_view)
                written += _write_changed(
                    dst, pos, chunk, lambda s, e: chunk[s:e] == backing_view[s:e]  # noqa: B023 - used at once
                )
            else:
                written += _write_changed(dst, pos, chunk, lambda s, e: is_zero(chunk[s:e]))  # noqa: B023
            pos += n
            if progress:
                progress(pos, total)
    return read_bytes, written


def _granules(offset: int, length: int) -> list[tuple[int, int]]:
    """(start, end) offsets relative to *offset*, cut on absolute ZERO_GRANULE boundaries."""
    cuts = []
    pos = 0
    while pos < length:
        step = min(ZERO_GRANULE - (offset + pos) % ZERO_GRANULE, length - pos)
        cuts.append((pos, pos + step))
        pos += step
    return cuts


def _write_changed(dst: DiskImage, offset: int, chunk: memoryview, unchanged: Callable[[int, int], bool]) -> int:
    """Write the granules of *chunk* for which ``unchanged(start, end)`` is false, coalesced into runs."""
    written = 0
    run_start: int | None = None
    for start, end in _granules(offset, len(chunk)):
        if unchanged(start, end):
            if run_start is not None:
                dst.write(offset + run_start, chunk[run_start:start])
                written += start - run_start
                run_start = None
        elif run_start is None:
            run_start = start
    if run_start is not None:
        dst.write(offset + run_start, chunk[run_start:])
        written += len(chunk) - run_start
    return written
