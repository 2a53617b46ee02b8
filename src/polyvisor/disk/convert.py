"""Any format to any format, streaming and sparse-aware (``polyvisor disk convert``).

The source is walked through its chain-resolved map: ranges no layer holds and
zero extents are never read; data ranges are read in bounded chunks, and runs of
zeros inside them are not written, so a fresh destination keeps them
unallocated.  Memory stays bounded by the chunk size whatever the image size.
The destination appears under its name only once complete (see
:class:`~polyvisor.disk.fileio.OutputFiles`).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from polyvisor.disk.fileio import WriteBehind, io_buffer
from polyvisor.disk.image import DiskImage, ExtentKind, is_zero, same_bytes
from polyvisor.disk.paths import DEFAULT_POLICY, ReferencePolicy, real_path
from polyvisor.disk.registry import CreateOptions, create_image, open_image
from polyvisor.errors import UsageError
from polyvisor.records import record

#: Bytes read from the source per step.
CHUNK = 4 << 20
#: Chunks read ahead of the writer (memory: READ_AHEAD_BUFFERS * CHUNK).
READ_AHEAD_BUFFERS = 4
#: Zero detection granularity: aligned zero runs at least this long are not written.
ZERO_GRANULE = 64 << 10

Progress = Callable[[int, int], None]


@record
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
    durable: bool = True,
) -> ConvertResult:
    """Convert the image at *source* into a new *out_format* image at *destination*.

    With *durable* (the default) the output reaches stable storage before it appears under its name.
    """
    started = time.monotonic()
    options = options or CreateOptions()
    with open_image(source, source_format, policy=policy) as src:
        _refuse_overwriting_the_source(src, Path(destination))
        with create_image(destination, out_format, src.virtual_size, options, policy=policy,
                          durable=durable) as dst:
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


@record
class _Chunk:
    """A stretch of the source on its way from the reading thread to the writer."""

    offset: int
    length: int
    buffer: mmap.mmap | None  #: None: the range reads as zeros (no layer holds it), nothing was read
    done_up_to: int  #: progress: every byte below this has been dealt with once this chunk is


class _ReadAhead(threading.Thread):
    """Reads the source's data ranges into a few rotating buffers while the caller writes.

    Reads (pread, decompression) release the GIL, so reading and writing use both cores.  Memory stays
    bounded by the buffers: the reader waits for the writer to hand one back.
    """

    def __init__(self, src: DiskImage, *, zero_ranges: bool) -> None:
        super().__init__(name="polyvisor-read-ahead", daemon=True)
        self.src = src
        self.zero_ranges = zero_ranges  #: also pass ranges that read as zeros (diffing against a backing)
        self.buffers = [io_buffer(CHUNK) for _ in range(READ_AHEAD_BUFFERS)]
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for buffer in self.buffers:
            self.free.put(buffer)
        self.ready: queue.SimpleQueue[_Chunk | BaseException | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.read_bytes = 0

    def run(self) -> None:
        try:
            for ext in self.src.map():
                if ext.kind is not ExtentKind.DATA and not self.zero_ranges:
                    self.ready.put(_Chunk(ext.offset, 0, None, ext.end))
                    continue
                pos = ext.offset
                while pos < ext.end:
                    n = min(CHUNK - pos % CHUNK, ext.end - pos)
                    buffer = None
                    if ext.kind is ExtentKind.DATA:
                        buffer = self._take_buffer()
                        if buffer is None:
                            return
                        self.src.readinto(pos, memoryview(buffer)[:n])
                        self.read_bytes += n
                    self.ready.put(_Chunk(pos, n, buffer, pos + n))
                    pos += n
            self.ready.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which re-raises it
            self.ready.put(exc)

    def _take_buffer(self) -> mmap.mmap | None:
        while not self.stopping.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def chunks(self) -> Iterator[_Chunk]:
        """The chunks in order (hand each buffer back with :meth:`recycle`); reading errors are raised here."""
        while True:
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def recycle(self, buffer: mmap.mmap) -> None:
        """Give a buffer back to the reader once nothing refers to its content any more."""
        self.free.put(buffer)

    def stop(self) -> None:
        """End the reader (after an error in the writer) and wait for it."""
        self.stopping.set()
        self.join()


def copy_image(src: DiskImage, dst: DiskImage, *, progress: Progress | None = None) -> tuple[int, int]:
    """Copy every guest byte of *src* into *dst*; returns (data bytes read, bytes written)."""
    total = src.virtual_size
    if dst.virtual_size < total:
        raise UsageError(f"{dst.path}: {dst.virtual_size} bytes is smaller than the source's {total}")
    zero_buffer = io_buffer(CHUNK, writable=False)
    zeros = memoryview(zero_buffer)
    base = memoryview(io_buffer(CHUNK)) if dst.backing is not None else None
    reader = _ReadAhead(src, zero_ranges=base is not None)
    # The destination's writes run on a thread of their own, straight from the read-ahead buffers, which
    # return to the reader once the writes that use them are done.
    behind = WriteBehind()
    for buffer in [*reader.buffers, zero_buffer]:  # the zeros never change
        behind.lend(buffer)
    behind.attach(dst.files)
    reader.start()
    written = 0
    try:
        for chunk in reader.chunks():
            n = chunk.length
            data = memoryview(chunk.buffer)[:n] if chunk.buffer is not None else zeros[:n]
            if base is not None:
                below = base[:n]
                dst._read_backing_into(chunk.offset, below)
                written += _write_changed(
                    dst, chunk.offset, data, lambda s, e: same_bytes(data[s:e], below[s:e])  # noqa: B023 - used at once
                )
            elif n:
                written += _write_nonzero(dst, chunk.offset, data)
            if chunk.buffer is not None:
                behind.after_writes(partial(reader.recycle, chunk.buffer))
            if progress:
                progress(chunk.done_up_to, total)
        behind.close(dst.files)
    finally:
        behind.cancel(dst.files)
        reader.stop()
    return reader.read_bytes, written


def _granules(offset: int, length: int) -> list[tuple[int, int]]:
    """(start, end) offsets relative to *offset*, cut on absolute ZERO_GRANULE boundaries."""
    cuts = []
    pos = 0
    while pos < length:
        step = min(ZERO_GRANULE - (offset + pos) % ZERO_GRANULE, length - pos)
        cuts.append((pos, pos + step))
        pos += step
    return cuts


def _write_nonzero(dst: DiskImage, offset: int, chunk: memoryview) -> int:
    """Write the granules of *chunk* that hold a nonzero byte.

    When the first byte of every granule is nonzero, as in most data, the whole chunk is one write,
    decided by looking at those few bytes instead of testing each granule.
    """
    first_boundary = -offset % ZERO_GRANULE
    if chunk[0] and 0 not in chunk[first_boundary::ZERO_GRANULE].tobytes():
        dst.write(offset, chunk)
        return len(chunk)
    return _write_changed(dst, offset, chunk, lambda s, e: is_zero(chunk[s:e]))


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
