"""VMDK: VMware virtual disks (VMware technical note "Virtual Disk Format 5.0", "VDF" below).

A VMDK disk is a text *descriptor* listing *extents* in guest order.  The
descriptor is either embedded in a hosted sparse extent (monolithicSparse,
streamOptimized) or a small file of its own naming the extent files
(monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, vmfs…).

Extent kinds read here (VDF "Extent Descriptions"):

* ``FLAT`` / ``VMFS`` — guest bytes verbatim in a file, from a sector offset;
* ``SPARSE`` — a hosted sparse extent: header, grain directory (GD) → grain
  tables (GT, 512 entries) → grains (VDF "Hosted Sparse Extents"), optionally
  with a redundant GD, zeroed-grain entries (GTE == 1, VDF 5.0) or deflated
  grains behind grain markers (VDF "Stream-Optimized Compressed Sparse
  Extents"), the GD then possibly found through a footer at the end;
* ``ZERO`` — sectors that read as zeros without a file.

``VMFSSPARSE``/``SESPARSE``/``VMFSRDM``/``VMFSRAW`` extents (and COWD files)
raise :class:`UnsupportedFeature`.  Extent files are reached only through
``opener.resolve`` (confined to the descriptor's directory unless allowed):
unlike qemu-img, polyvisor never reads a host file a descriptor names
elsewhere.  Delta disks (``parentCID`` + ``parentFileNameHint``) open their
parent through ``opener.open_backing`` and refuse a parent whose CID differs.

Writing: monolithicSparse (also with ``backing_file``: a delta),
twoGbMaxExtentSparse, monolithicFlat, twoGbMaxExtentFlat in place and at
random; streamOptimized sequentially — grains are deflated on a small thread
pool and written in guest order; an out-of-order write moves the stream into
an unlinked scratch file that is compressed in order when the image is
closed.  ``compress`` selects streamOptimized when no subformat is given and
is refused with any other subformat.
"""

from __future__ import annotations

import abc
import bisect
import collections
import itertools
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Self

from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.disk.formats.vmdk_structs import (
    ADAPTER_TYPES,
    COMPRESSION_DEFLATE,
    COMPRESSION_NONE,
    COWD_MAGIC,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_REDUNDANT_GD,
    FLAG_VALID_NEWLINE_TEST,
    FLAG_ZEROED_GRAIN_GTE,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    INCOMPATIBLE_FLAGS_MASK,
    KNOWN_INCOMPATIBLE_FLAGS,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GRAIN_DIRECTORY,
    MARKER_GRAIN_TABLE,
    MAX_DESCRIPTOR_BYTES,
    METADATA_MARKER,
    NEWLINE_CHECK,
    NO_PARENT_CID,
    SECTOR,
    SPARSE_HEADER,
    SPARSE_MAGIC,
    Descriptor,
    ExtentLine,
    SparseHeader,
    looks_like_descriptor,
    metadata_marker,
    new_cid,
    new_ddb,
    parse_descriptor,
    python_codec,
    with_new_cid,
)
from polyvisor.disk.image import DiskImage, ExtentKind, ProbeSample, Run, file_run, is_zero
from polyvisor.disk.paths import windows_path_to_relative
from polyvisor.disk.registry import register_format
from polyvisor.disk.structs import align_up
from polyvisor.errors import (
    BackingChainError,
    CorruptImage,
    LimitExceeded,
    MissingReference,
    OperationFailed,
    ReadOnlyImage,
    TruncatedImage,
    UnsafeReference,
    UnsupportedFeature,
    UnsupportedOption,
    UsageError,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future, ThreadPoolExecutor

    from polyvisor.disk.check import CheckResult
    from polyvisor.disk.registry import CreateOptions, Opener

#: Grain size polyvisor writes: 128 sectors = 64 KiB (VDF "Grain Size"; qemu and VMware's default).
DEFAULT_GRAIN_SECTORS = 128
#: Grain table entries per grain table (VDF: numGTEsPerGT is 512; qemu refuses more).
GTES_PER_GT = 512
#: Largest grain polyvisor follows (8 MiB); qemu stops at 1 GiB, real images use 64 KiB.
MAX_GRAIN_SECTORS = 1 << 14
#: Most grain directory entries polyvisor loads (4 MiB of GD; 32 TiB with 64 KiB grains).
MAX_GD_ENTRIES = 1 << 20
#: Grain table entries are 32-bit sector numbers: a sparse extent addresses 2 TiB of file.
MAX_SPARSE_FILE_SECTORS = 1 << 32
#: Grain tables kept in memory per extent (2 KiB each).
GT_CACHE_SIZE = 4096
#: Extent size of the twoGbMaxExtent subformats: 2047 MiB, as VMware splits (VDF example descriptors).
SPLIT_EXTENT_SECTORS = 4192256
#: The descriptor area polyvisor reserves in a monolithic sparse extent (qemu and VMware: 20 sectors).
EMBEDDED_DESCRIPTOR_SECTORS = 20
#: Largest disk polyvisor creates: a hosted sparse extent's 32-bit grain table entries reach 2 TiB of
#: file, of which up to 512 MiB is metadata.  The flat subformats keep the same limit so that every
#: subformat converts into every other.
MAX_VMDK_SIZE = (1 << 41) - (512 << 20)
#: Full grains handed to one compression task of a stream.
STREAM_BATCH_GRAINS = 16
#: Compression tasks in flight before the writer waits for the oldest.
STREAM_MAX_PENDING = 8
#: Stream bytes buffered before one pwrite.
STREAM_FLUSH_BYTES = 4 << 20
#: zlib level of stream grains (qemu uses zlib's default too).
DEFLATE_LEVEL = zlib.Z_DEFAULT_COMPRESSION
#: Grains ``check`` remembers for the overlap test of grains not on the grain grid (8 bytes each).
MAX_CHECKED_LOOSE_GRAINS = 1 << 21

_LITTLE = sys.byteorder == "little"


def _u32_array(data: bytes) -> array[int]:
    """Little-endian 32-bit entries (grain directories and tables) as an array."""
    table = array("I")
    table.frombytes(data)
    if not _LITTLE:
        table.byteswap()
    return table


def _u32_bytes(table: array[int]) -> bytes:
    if _LITTLE:
        return table.tobytes()
    swapped = array("I", table)
    swapped.byteswap()
    return swapped.tobytes()


def _sectors(nbytes: int) -> int:
    return -(-nbytes // SECTOR)


class _Coalescer:
    """Merges runs that continue each other (same kind, and for data the same file contiguously)."""

    def __init__(self) -> None:
        self.pending: Run | None = None

    def add(self, run: Run) -> Run | None:
        """Queue *run*; returns the previous run when *run* cannot extend it."""
        last = self.pending
        if (
            last is not None
            and last.kind is run.kind
            and last.decode is None
            and run.decode is None
            and (run.kind is not ExtentKind.DATA
                 or (last.file is run.file and last.host_offset + last.length == run.host_offset))
        ):
            last.length += run.length
            return None
        self.pending = run
        return last


class _WriteBatch:
    """Pending pwrites of one file, joined when they are contiguous."""

    LIMIT = 16 << 20

    def __init__(self, file: ImageFile) -> None:
        self.file = file
        self.offset = 0
        self.parts: list[bytes | bytearray | memoryview] = []
        self.size = 0

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a write; flushes what is queued first unless *data* continues it."""
        if self.parts and offset != self.offset + self.size:
            self.flush()
        if not self.parts:
            self.offset = offset
        self.parts.append(data)
        self.size += len(data)
        if self.size >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        """Write everything queued."""
        if not self.parts:
            return
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.file.write(self.offset, data)
        self.parts = []
        self.size = 0


def _zero_chunks(length: int) -> Iterator[memoryview]:
    block = memoryview(bytes(min(length, 1 << 20)))
    while length > 0:
        n = min(length, len(block))
        yield block[:n]
        length -= n


# ------------------------------------------------------------------ extents


class _Extent(abc.ABC):
    """One extent line: guest bytes ``[start, start + length)`` of the disk."""

    type_name = "?"

    def __init__(self, image_path: Path, start: int, length: int, access: str, *,
                 file: ImageFile | None, filename: str | None) -> None:
        self.image_path = image_path
        self.start = start
        self.length = length
        self.access = access
        self.file = file
        self.filename = filename

    @property
    def end(self) -> int:
        """First guest byte after the extent."""
        return self.start + self.length

    @abc.abstractmethod
    def map(self, rel: int, length: int) -> Iterator[Run]:
        """Runs (at guest offsets) for extent bytes ``[rel, rel + length)``."""

    def write(self, rel: int, data: memoryview | None, length: int) -> None:
        """Store *data* (zeros when None) at extent offset *rel*."""
        raise ReadOnlyImage(self.image_path, f"{self.type_name} extent cannot be written",
                            structure=f"VMDK extent {self.filename or ''}".strip())

    def flush_metadata(self) -> None:  # noqa: B027 - only sparse extents cache metadata
        """Write cached metadata (grain tables) back."""

    def check(self, result: CheckResult) -> None:  # noqa: B027 - zero and no-access extents have nothing to check
        """Report this extent's inconsistencies."""

    def describe(self) -> dict[str, Any]:
        """The extent as ``info`` shows it."""
        return {"type": self.type_name, "access": self.access, "file": self.filename,
                "sectors": self.length // SECTOR}

    def _require_writable(self) -> None:
        if self.access != "RW" or self.file is None or not self.file.writable:
            raise ReadOnlyImage(self.image_path, f"{self.access} extent {self.filename!r} is not writable",
                                structure="VMDK extent")


class _NoAccessExtent(_Extent):
    """A NOACCESS extent: present in the layout, never readable (VDF "Access")."""

    type_name = "NOACCESS"

    def map(self, rel: int, length: int) -> Iterator[Run]:
        raise UnsupportedFeature(self.image_path, f"guest bytes {self.start + rel}+{length} lie in a "
                                 "NOACCESS extent", structure="VMDK extent")


class _MissingExtent(_Extent):
    """An extent whose file does not exist: ``check`` reports it, reading it raises."""

    type_name = "MISSING"

    def __init__(self, image_path: Path, start: int, length: int, access: str, *, filename: str,
                 error: MissingReference) -> None:
        super().__init__(image_path, start, length, access, file=None, filename=filename)
        self.error = error

    def map(self, rel: int, length: int) -> Iterator[Run]:
        raise self.error

    def write(self, rel: int, data: memoryview | None, length: int) -> None:
        raise self.error

    def check(self, result: CheckResult) -> None:
        result.corruption(f"VMDK extent {self.filename}", self.error.reason)


class _ZeroExtent(_Extent):
    """A ZERO extent: sectors that read as zeros, stored nowhere."""

    type_name = "ZERO"

    def map(self, rel: int, length: int) -> Iterator[Run]:
        yield Run(self.start + rel, length, ExtentKind.ZERO)


class _FlatExtent(_Extent):
    """A FLAT or VMFS extent: guest bytes verbatim from ``file_offset`` of a file (VDF "Simple Extents")."""

    def __init__(self, image_path: Path, start: int, length: int, access: str, *, file: ImageFile,
                 filename: str, file_offset: int, type_name: str) -> None:
        super().__init__(image_path, start, length, access, file=file, filename=filename)
        self.flat_file = file
        self.file_offset = file_offset
        self.type_name = type_name

    def map(self, rel: int, length: int) -> Iterator[Run]:
        """Holes of the file (SEEK_DATA/SEEK_HOLE) are zeros; bytes past its end are a truncation."""
        yield file_run(self.flat_file, self.file_offset + rel, length, self.start + rel)

    def write(self, rel: int, data: memoryview | None, length: int) -> None:
        self._require_writable()
        if data is not None:
            self.flat_file.write(self.file_offset + rel, data)
            return
        pos = self.file_offset + rel
        for chunk in _zero_chunks(length):
            self.flat_file.write(pos, chunk)
            pos += len(chunk)

    def check(self, result: CheckResult) -> None:
        need = self.file_offset + self.length
        have = self.flat_file.size
        if have < need:
            result.corruption(f"VMDK extent {self.filename}",
                              f"flat extent file holds {have} bytes, the descriptor needs {need}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "offset": self.file_offset // SECTOR}


def read_sparse_header(file: ImageFile, path: Path) -> tuple[SparseHeader, bool]:
    """The effective header of a hosted sparse extent and whether it came from a stream footer.

    A header whose gdOffset is GD_AT_END is superseded by the footer: the
    three sectors before the end of the file are a footer marker, a copy of
    the header with the real gdOffset, and the end-of-stream marker (VDF
    "Stream-Optimized Compressed Sparse Extents", "The Footer").
    """
    size = file.size
    if size < SECTOR:
        raise TruncatedImage(file.display_path, f"file of {size} bytes cannot hold a sparse extent header",
                             structure="VMDK sparse extent header", offset=0)
    header = SPARSE_HEADER.read(file, 0)
    if header.magic == COWD_MAGIC:
        raise UnsupportedFeature(file.display_path, "ESX Server sparse extents (COWD, vmfsSparse) are not "
                                 "supported", structure="VMDK sparse extent header", offset=0)
    if header.magic != SPARSE_MAGIC:
        raise CorruptImage(file.display_path, f"bad magic {header.magic!r} (expected {SPARSE_MAGIC!r})",
                           structure="VMDK sparse extent header", offset=0)
    from_footer = False
    if header.gd_offset == GD_AT_END:
        if size < 4 * SECTOR:
            raise TruncatedImage(file.display_path, "stream with GD_AT_END has no room for a footer",
                                 structure="VMDK stream footer", offset=max(0, size - 3 * SECTOR))
        tail = file.read(size - 3 * SECTOR, 3 * SECTOR, "VMDK stream footer")
        footer_marker = METADATA_MARKER.unpack(tail, 0)
        eos = METADATA_MARKER.unpack(tail, 2 * SECTOR)
        footer = SPARSE_HEADER.unpack(tail, SECTOR)
        if (footer_marker.type != MARKER_FOOTER or footer_marker.size != 0 or footer.magic != SPARSE_MAGIC
                or eos.num_sectors != 0 or eos.size != 0 or eos.type != MARKER_EOS):
            raise CorruptImage(file.display_path, "header says the grain directory is at the end but the file "
                               "does not end with footer marker, footer and end-of-stream marker "
                               "(an incomplete stream?)", structure="VMDK stream footer",
                               offset=size - 3 * SECTOR)
        if footer.gd_offset == GD_AT_END:
            raise CorruptImage(file.display_path, "footer does not locate the grain directory either",
                               structure="VMDK stream footer", offset=size - 2 * SECTOR)
        header = footer
        from_footer = True
    where = "VMDK sparse extent header"
    if not 1 <= header.version <= 3:
        raise UnsupportedFeature(file.display_path, f"sparse extent version {header.version} (known: 1-3)",
                                 structure=where, offset=4)
    unknown = header.flags & INCOMPATIBLE_FLAGS_MASK & ~KNOWN_INCOMPATIBLE_FLAGS
    if unknown:
        raise UnsupportedFeature(file.display_path, f"unknown incompatible flags {unknown:#x}",
                                 structure=where, offset=8)
    if header.flags & FLAG_VALID_NEWLINE_TEST and header.newline_check != NEWLINE_CHECK:
        raise CorruptImage(file.display_path, "newline detection bytes damaged (the file went through a "
                           "text-mode transfer)", structure="VMDK sparse extent header", offset=73)
    if header.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        raise UnsupportedFeature(file.display_path, f"compression algorithm {header.compress_algorithm}",
                                 structure=where, offset=77)
    if header.grain_size == 0:
        raise CorruptImage(file.display_path, "grain size 0", structure="VMDK sparse extent header", offset=20)
    if header.grain_size > MAX_GRAIN_SECTORS:
        raise LimitExceeded(file.display_path, f"grain of {header.grain_size} sectors is larger than the "
                            f"{MAX_GRAIN_SECTORS} polyvisor follows", structure="VMDK sparse extent header",
                            offset=20)
    if header.num_gtes_per_gt == 0:
        raise CorruptImage(file.display_path, "grain tables of 0 entries",
                           structure="VMDK sparse extent header", offset=44)
    if header.num_gtes_per_gt > GTES_PER_GT:
        raise LimitExceeded(file.display_path, f"grain tables of {header.num_gtes_per_gt} entries (at most "
                            f"{GTES_PER_GT})", structure="VMDK sparse extent header", offset=44)
    coverage = header.num_gtes_per_gt * header.grain_size
    if -(-header.capacity // coverage) > MAX_GD_ENTRIES:
        raise LimitExceeded(file.display_path, f"capacity of {header.capacity} sectors needs more than "
                            f"{MAX_GD_ENTRIES} grain directory entries", structure="VMDK sparse extent header",
                            offset=12)
    if header.overhead * SECTOR > size:
        raise TruncatedImage(file.display_path, f"file of {size} bytes is shorter than its "
                             f"{header.overhead}-sector metadata", structure="VMDK sparse extent header",
                             offset=0)
    return header, from_footer


class _SparseExtent(_Extent):
    """A hosted sparse extent (VDF "Hosted Sparse Extents"; compressed: "Stream-Optimized …")."""

    type_name = "SPARSE"

    def __init__(self, image_path: Path, start: int, length: int, access: str, *, file: ImageFile,
                 filename: str | None, header: SparseHeader, gd: array[int], rgd: array[int] | None,
                 stream_layout: bool, owner: DiskImage | None = None) -> None:
        super().__init__(image_path, start, length, access, file=file, filename=filename)
        self.sparse_file = file
        self.header = header
        self.gd = gd
        self.rgd = rgd
        #: The header said GD_AT_END: metadata follows the grains, announced by markers.
        self.stream_layout = stream_layout
        self.owner = owner
        self.grain_sectors = header.grain_size
        self.grain_bytes = header.grain_size * SECTOR
        self.gtes = header.num_gtes_per_gt
        self.gt_coverage = self.gtes * self.grain_bytes
        self.gt_sectors = _sectors(self.gtes * 4)
        self.compressed = header.compress_algorithm == COMPRESSION_DEFLATE
        self.has_markers = bool(header.flags & FLAG_MARKERS)
        self.zeroed_grains = bool(header.flags & FLAG_ZEROED_GRAIN_GTE)
        self.first_grain_sector = max(header.overhead, 1)
        self._cache: collections.OrderedDict[int, array[int]] = collections.OrderedDict()
        self._dirty_gts: set[int] = set()
        self._gd_dirty = False
        self._next_free = max(_sectors(file.size), header.overhead)
        self._decoded: tuple[int, bytes] | None = None

    @classmethod
    def load(cls, image_path: Path, start: int, access: str, *, file: ImageFile, filename: str | None,
             header: SparseHeader, stream_layout: bool) -> _SparseExtent:
        """Read the grain directories of an existing extent, validated against the file."""
        n_gts = -(-header.capacity // (header.num_gtes_per_gt * header.grain_size))
        size = file.size

        def directory(offset: int, name: str) -> array[int]:
            if offset == 0 and n_gts:
                raise CorruptImage(file.display_path, f"{name} at sector 0 (the header)",
                                   structure="VMDK sparse extent header")
            if offset * SECTOR + n_gts * 4 > size:
                raise TruncatedImage(file.display_path, f"{name} of {n_gts} entries at sector {offset} lies "
                                     f"past the end of the {size}-byte file", structure=f"VMDK {name}",
                                     offset=offset * SECTOR)
            return _u32_array(file.read(offset * SECTOR, n_gts * 4, f"VMDK {name}"))

        gd = directory(header.gd_offset, "grain directory")
        rgd = directory(header.rgd_offset, "redundant grain directory") \
            if header.flags & FLAG_REDUNDANT_GD and header.rgd_offset else None
        return cls(image_path, start, header.capacity * SECTOR, access, file=file, filename=filename,
                   header=header, gd=gd, rgd=rgd, stream_layout=stream_layout)

    # --------------------------------------------------------- grain tables

    def _gt(self, index: int) -> array[int] | None:
        table = self._cache.get(index)
        if table is not None:
            self._cache.move_to_end(index)
            return table
        sector = self.gd[index]
        if sector == 0:
            return None
        table = _u32_array(self.sparse_file.read(sector * SECTOR, self.gtes * 4, f"VMDK grain table {index}"))
        self._cache[index] = table
        if len(self._cache) > GT_CACHE_SIZE:
            old, old_table = self._cache.popitem(last=False)
            if old in self._dirty_gts:
                self._write_gt(old, old_table)
                self._dirty_gts.discard(old)
        return table

    def _write_gt(self, index: int, table: array[int]) -> None:
        data = _u32_bytes(table)
        self.sparse_file.write(self.gd[index] * SECTOR, data)
        if self.rgd is not None and self.rgd[index]:
            self.sparse_file.write(self.rgd[index] * SECTOR, data)

    def flush_metadata(self) -> None:
        for index in sorted(self._dirty_gts):
            self._write_gt(index, self._cache[index])
        self._dirty_gts.clear()
        if self._gd_dirty:
            self.sparse_file.write(self.header.gd_offset * SECTOR, _u32_bytes(self.gd))
            if self.rgd is not None:
                self.sparse_file.write(self.header.rgd_offset * SECTOR, _u32_bytes(self.rgd))
            self._gd_dirty = False

    # --------------------------------------------------------------- reading

    def map(self, rel: int, length: int) -> Iterator[Run]:
        end = rel + length
        pos = rel
        file_size = self.sparse_file.size
        zeros = bytes(self.gtes * 4)
        runs = _Coalescer()
        grain = self.grain_bytes
        while pos < end:
            gt_index = pos // self.gt_coverage
            gt_base = gt_index * self.gt_coverage
            gt_end = min(gt_base + self.gt_coverage, end)
            table = self._gt(gt_index)
            first = (pos - gt_base) // grain
            last = (gt_end - 1 - gt_base) // grain + 1
            if table is None or table[first:last].tobytes() == zeros[: 4 * (last - first)]:
                out = runs.add(Run(self.start + pos, gt_end - pos, ExtentKind.UNALLOCATED))
                if out is not None:
                    yield out
                pos = gt_end
                continue
            for i in range(first, last):
                grain_start = gt_base + i * grain
                a = max(pos, grain_start)
                b = min(gt_end, grain_start + grain)
                entry = table[i]
                if entry == 0:
                    run = Run(self.start + a, b - a, ExtentKind.UNALLOCATED)
                elif entry == GTE_ZEROED and self.zeroed_grains:
                    run = Run(self.start + a, b - a, ExtentKind.ZERO)
                else:
                    self._validate_entry(entry, file_size, gt_index, i)
                    if self.compressed:
                        run = Run(self.start + a, b - a, ExtentKind.DATA, file=self.sparse_file,
                                  decode=self._decoder(entry, grain_start), unit_offset=self.start + grain_start)
                    else:
                        run = Run(self.start + a, b - a, ExtentKind.DATA, file=self.sparse_file,
                                  host_offset=entry * SECTOR + a - grain_start)
                out = runs.add(run)
                if out is not None:
                    yield out
            pos = gt_end
        if runs.pending is not None:
            yield runs.pending

    def _validate_entry(self, entry: int, file_size: int, gt_index: int, i: int) -> None:
        where = f"VMDK grain table {gt_index}"
        if entry < self.first_grain_sector:
            raise CorruptImage(self.sparse_file.display_path, f"entry {i} points to sector {entry}, inside the "
                               f"metadata (grains start at sector {self.first_grain_sector})",
                               structure=where, offset=self.gd[gt_index] * SECTOR + 4 * i)
        if entry * SECTOR >= file_size:
            raise TruncatedImage(self.sparse_file.display_path, f"entry {i} points to sector {entry}, past the "
                                 f"end of the {file_size}-byte file", structure=where,
                                 offset=self.gd[gt_index] * SECTOR + 4 * i)

    def _decoder(self, sector: int, grain_start: int) -> Callable[[], bytes]:
        return lambda: self.inflate(sector, grain_start)

    def inflate(self, sector: int, grain_start: int) -> bytes:
        """The guest bytes of the compressed grain at *sector* (VDF "Grain Marker")."""
        if self._decoded is not None and self._decoded[0] == sector:
            return self._decoded[1]
        file = self.sparse_file
        pos = sector * SECTOR
        if self.has_markers:
            marker = GRAIN_MARKER.unpack(file.read(pos, GRAIN_MARKER.size, "VMDK grain marker"))
            if marker.size == 0 or marker.size > 2 * self.grain_bytes:
                raise CorruptImage(file.display_path, f"compressed grain size {marker.size} is impossible for "
                                   f"a {self.grain_bytes}-byte grain", structure="VMDK grain marker", offset=pos)
            data = file.read(pos + GRAIN_MARKER.size, marker.size, "VMDK compressed grain")
        else:
            data = file.read_upto(pos, 2 * self.grain_bytes)
        out = inflate_grain(data, self.grain_bytes, file.display_path, pos)
        needed = min(self.grain_bytes, self.length - grain_start)
        if len(out) < needed:
            raise CorruptImage(file.display_path, f"compressed grain inflates to {len(out)} bytes, the grain "
                               f"holds {needed}", structure="VMDK compressed grain", offset=pos)
        self._decoded = (sector, out)
        return out

    # --------------------------------------------------------------- writing

    def _entry(self, grain_index: int) -> int:
        table = self._gt(grain_index // self.gtes)
        return 0 if table is None else table[grain_index % self.gtes]

    def _set_entry(self, grain_index: int, value: int) -> None:
        gt_index = grain_index // self.gtes
        table = self._gt(gt_index)
        if table is None:
            table = self._allocate_gt(gt_index)
        table[grain_index % self.gtes] = value
        self._dirty_gts.add(gt_index)

    def _allocate(self, sectors: int) -> int:
        sector = self._next_free
        if sector + sectors > MAX_SPARSE_FILE_SECTORS:
            raise LimitExceeded(self.sparse_file.display_path, "sparse extent is full: grain table entries "
                                "cannot address past 2 TiB of file", structure="VMDK grain allocation")
        self._next_free += sectors
        return sector

    def _allocate_gt(self, gt_index: int) -> array[int]:
        """A new zeroed grain table (and its redundant copy) at the end of the file."""
        blank = bytes(self.gt_sectors * SECTOR)
        sector = self._allocate(self.gt_sectors)
        self.sparse_file.write(sector * SECTOR, blank)
        self.gd[gt_index] = sector
        if self.rgd is not None:
            copy = self._allocate(self.gt_sectors)
            self.sparse_file.write(copy * SECTOR, blank)
            self.rgd[gt_index] = copy
        self._gd_dirty = True
        table = array("I", bytes(self.gtes * 4))
        self._cache[gt_index] = table
        return table

    def write(self, rel: int, data: memoryview | None, length: int) -> None:
        """Write in place where grains exist; otherwise allocate whole grains at the end of the file.

        A partial grain is completed from the parent (delta disks) or zeros;
        zeros over an unallocated grain of a disk without parent allocate
        nothing.
        """
        self._require_writable()
        if self.compressed:
            raise ReadOnlyImage(self.image_path, "compressed extents are written only as new streams",
                                structure="VMDK extent")
        grain = self.grain_bytes
        batch = _WriteBatch(self.sparse_file)
        owner = self.owner
        has_parent = owner is not None and owner.backing is not None
        pos = rel
        end = rel + length
        while pos < end:
            index = pos // grain
            grain_start = index * grain
            grain_end = min(grain_start + grain, self.length)
            b = min(end, grain_end)
            chunk = data[pos - rel : b - rel] if data is not None else None
            entry = self._entry(index)
            unallocated = entry == 0 or (entry == GTE_ZEROED and self.zeroed_grains)
            if not unallocated:
                if entry < self.first_grain_sector:
                    raise CorruptImage(self.sparse_file.display_path, f"grain {index} points into the metadata "
                                       f"(sector {entry})", structure="VMDK grain table")
                target = entry * SECTOR + pos - grain_start
                if chunk is not None:
                    batch.add(target, chunk)
                else:
                    for zeros in _zero_chunks(b - pos):
                        batch.add(target, zeros)
                        target += len(zeros)
                pos = b
                continue
            zero_data = chunk is None or is_zero(chunk)
            whole = pos == grain_start and b == grain_end
            if zero_data and (entry == GTE_ZEROED or not has_parent):
                pos = b
                continue
            if zero_data and whole and self.zeroed_grains:
                self._set_entry(index, GTE_ZEROED)
                pos = b
                continue
            if chunk is not None and whole and len(chunk) == grain:
                content: bytes | bytearray | memoryview = chunk
            else:
                buf = bytearray(grain)
                if entry == 0 and has_parent and owner is not None:
                    below = owner.read_backing(self.start + grain_start, grain_end - grain_start)
                    buf[: len(below)] = below
                if chunk is not None:
                    buf[pos - grain_start : b - grain_start] = chunk
                else:
                    buf[pos - grain_start : b - grain_start] = bytes(b - pos)
                content = buf
            sector = self._allocate(self.grain_sectors)
            batch.add(sector * SECTOR, content)
            self._set_entry(index, sector)
            pos = b
        batch.flush()

    # -------------------------------------------------------------- checking

    def check(self, result: CheckResult) -> None:
        """GD/RGD, grain tables, grains: ranges, overlaps, redundancy, markers, leaks."""
        name = f"VMDK extent {self.filename or self.sparse_file.display_path.name}"
        file = self.sparse_file
        file_sectors = _sectors(file.size)
        header = self.header
        n_gts = len(self.gd)
        meta: list[tuple[int, int, str]] = [(0, 1, "header")]
        if header.descriptor_offset and header.descriptor_size:
            meta.append((header.descriptor_offset, header.descriptor_offset + header.descriptor_size,
                         "embedded descriptor"))
        gd_sectors = _sectors(n_gts * 4)
        meta.append((header.gd_offset, header.gd_offset + gd_sectors, "grain directory"))
        if self.rgd is not None:
            meta.append((header.rgd_offset, header.rgd_offset + gd_sectors, "redundant grain directory"))
        gt_starts = array("Q")
        for t in range(n_gts):
            sector = self.gd[t]
            copy = self.rgd[t] if self.rgd is not None else None
            if copy is not None and (sector == 0) != (copy == 0):
                result.corruption(name, f"grain directory entry {t} is {sector}, redundant entry {copy}",
                                  header.gd_offset * SECTOR + 4 * t)
            if sector == 0:
                continue
            if sector + self.gt_sectors > file_sectors:
                result.corruption(name, f"grain table {t} at sector {sector} lies past the end of the file",
                                  header.gd_offset * SECTOR + 4 * t)
                continue
            gt_starts.append(sector)
            if self.stream_layout and self.has_markers:
                self._check_metadata_marker(result, name, sector - 1, kind=MARKER_GRAIN_TABLE,
                                            sectors=self.gt_sectors, what=f"grain table {t}")
            if not copy:
                continue
            if copy + self.gt_sectors > file_sectors:
                result.corruption(name, f"redundant grain table {t} at sector {copy} lies past the end of the "
                                  "file", header.rgd_offset * SECTOR + 4 * t)
                continue
            gt_starts.append(copy)
            cached = self._cache.get(t)
            primary = _u32_bytes(cached) if cached is not None else \
                file.read(sector * SECTOR, self.gtes * 4, f"VMDK grain table {t}")
            if primary != file.read(copy * SECTOR, self.gtes * 4, f"VMDK grain table {t}"):
                result.corruption(name, f"grain table {t} differs from its redundant copy", copy * SECTOR)
        if self.stream_layout and self.has_markers:
            self._check_metadata_marker(result, name, header.gd_offset - 1, kind=MARKER_GRAIN_DIRECTORY,
                                        sectors=gd_sectors, what="grain directory")
        sorted_gts = array("Q", sorted(gt_starts))
        for a, b in itertools.pairwise(sorted_gts):
            if b < a + self.gt_sectors:
                result.corruption(name, f"grain tables at sectors {a} and {b} overlap", b * SECTOR)
        for k, (start, stop, what) in enumerate(meta):
            if stop > file_sectors:
                result.corruption(name, f"{what} at sector {start} lies past the end of the file", start * SECTOR)
            i = bisect.bisect_right(sorted_gts, stop - 1) - 1
            if i >= 0 and sorted_gts[i] + self.gt_sectors > start:
                result.corruption(name, f"a grain table overlaps the {what}", start * SECTOR)
            for other_start, other_stop, other in meta[k + 1 :]:
                if start < other_stop and other_start < stop:
                    result.corruption(name, f"the {what} overlaps the {other}", start * SECTOR)
        if self.compressed:
            self._check_compressed_grains(result, name, file_sectors, sorted_gts, gd_sectors)
        else:
            self._check_plain_grains(result, name, file_sectors, sorted_gts)

    def _check_metadata_marker(self, result: CheckResult, name: str, sector: int, *, kind: int, sectors: int,
                               what: str) -> None:
        if sector < 1:
            result.corruption(name, f"no room for the marker of the {what}", 0)
            return
        raw = self.sparse_file.read_upto(sector * SECTOR, SECTOR)
        if len(raw) < SECTOR:
            result.corruption(name, f"marker of the {what} is past the end of the file", sector * SECTOR)
            return
        marker = METADATA_MARKER.unpack(raw)
        if marker.type != kind or marker.size != 0 or marker.num_sectors != sectors:
            result.corruption(name, f"{what} is not preceded by its marker (found type {marker.type}, "
                              f"{marker.num_sectors} sectors)", sector * SECTOR)

    def _entries(self, result: CheckResult, name: str) -> Iterator[tuple[int, int, int]]:
        """(grain index, entry, entry offset in file) of every allocated grain, in guest order."""
        for t in range(len(self.gd)):
            sector = self.gd[t]
            if sector == 0:
                continue
            try:
                table = self._gt(t)
            except TruncatedImage:
                continue  # already reported as past the end of the file
            if table is None or table.count(0) == len(table):
                continue
            for i, entry in enumerate(table):
                if entry == 0:
                    continue
                index = t * self.gtes + i
                if index * self.grain_bytes >= self.length:
                    result.corruption(name, f"grain table {t} entry {i} maps a grain beyond the capacity",
                                      sector * SECTOR + 4 * i)
                    continue
                yield index, entry, sector * SECTOR + 4 * i

    def _check_plain_grains(self, result: CheckResult, name: str, file_sectors: int,
                            sorted_gts: array[int]) -> None:
        """Uncompressed grains: in range, clear of metadata, not shared; unreferenced space is leaked.

        The file after the metadata is seen as grain-sized slots: grains on
        that grid own one slot each (two grains in one slot overlap); grains
        off the grid (after a grain table appended at the end) are checked
        against the grid grains and against each other in sorted order.
        """
        base = self.header.overhead
        gs = self.grain_sectors
        slots = max(0, (file_sectors - base) // gs)
        grid = bytearray(-(-slots // 8))  # slots owned by grains on the grid
        other = bytearray(len(grid))  # slots touched by appended grain tables and off-grid grains
        loose = array("Q")  # off-grid grains (bounded)
        allocated = 0

        def touched(sector_a: int, sector_b: int) -> range:
            return range(max(0, (sector_a - base) // gs), min(slots, -(-(sector_b - base) // gs)))

        for gt_sector in sorted_gts:
            for slot in touched(max(gt_sector, base), gt_sector + self.gt_sectors):
                other[slot >> 3] |= 1 << (slot & 7)
        for _index, entry, where in self._entries(result, name):
            if entry == GTE_ZEROED and self.zeroed_grains:
                continue
            allocated += 1
            if entry < self.first_grain_sector or entry < base:
                result.corruption(name, f"grain at sector {entry} lies inside the metadata", where)
                continue
            if entry + gs > file_sectors:
                result.corruption(name, f"grain at sector {entry} lies past the end of the file", where)
                continue
            i = bisect.bisect_right(sorted_gts, entry + gs - 1) - 1
            if i >= 0 and sorted_gts[i] + self.gt_sectors > entry:
                result.corruption(name, f"grain at sector {entry} overlaps a grain table", where)
                continue
            if (entry - base) % gs:
                if len(loose) < MAX_CHECKED_LOOSE_GRAINS:
                    loose.append(entry)
                continue
            slot = (entry - base) // gs
            if grid[slot >> 3] & (1 << (slot & 7)):
                result.corruption(name, f"grain at sector {entry} is used twice or overlaps another grain", where)
            grid[slot >> 3] |= 1 << (slot & 7)
        previous_end = -1
        for entry in sorted(loose):
            slots_here = touched(entry, entry + gs)
            if entry < previous_end or any(grid[s >> 3] & (1 << (s & 7)) for s in slots_here):
                result.corruption(name, f"grain at sector {entry} overlaps another grain", entry * SECTOR)
            for slot in slots_here:
                other[slot >> 3] |= 1 << (slot & 7)
            previous_end = entry + gs
        result.allocated_units = (result.allocated_units or 0) + allocated
        result.total_units = (result.total_units or 0) + -(-self.length // self.grain_bytes)
        used = int.from_bytes(grid, "little") | int.from_bytes(other, "little")
        free = slots - used.bit_count()
        if free > 0:
            result.leak(name, f"{free} grain-sized areas after the metadata are not referenced by any grain "
                        "table", base * SECTOR)

    def _check_compressed_grains(self, result: CheckResult, name: str, file_sectors: int,
                                 sorted_gts: array[int], gd_sectors: int) -> None:
        """Compressed grains: marker LBA and size, in range, no overlaps; unreferenced sectors leaked."""
        base = self.header.overhead
        file = self.sparse_file
        footprint_total = 0
        previous_end = 0
        ordered = True
        #: Grains in file order when the stream is not: sector << 24 | footprint in sectors.
        spans = array("Q")
        allocated = 0
        for index, entry, where in self._entries(result, name):
            if entry < base or entry < 1:
                result.corruption(name, f"grain at sector {entry} lies inside the metadata", where)
                continue
            if entry >= file_sectors:
                result.corruption(name, f"grain at sector {entry} lies past the end of the file", where)
                continue
            allocated += 1
            if self.has_markers:
                raw = file.read_upto(entry * SECTOR, GRAIN_MARKER.size)
                if len(raw) < GRAIN_MARKER.size:
                    result.corruption(name, f"grain marker at sector {entry} is cut by the end of the file",
                                      entry * SECTOR)
                    continue
                marker = GRAIN_MARKER.unpack(raw)
                if marker.lba != index * self.grain_sectors:
                    result.corruption(name, f"grain marker at sector {entry} says LBA {marker.lba}, its grain "
                                      f"table maps it to {index * self.grain_sectors}", entry * SECTOR)
                if marker.size == 0 or marker.size > 2 * self.grain_bytes:
                    result.corruption(name, f"grain marker at sector {entry} has impossible size {marker.size}",
                                      entry * SECTOR)
                    continue
                sectors = _sectors(GRAIN_MARKER.size + marker.size)
            else:
                sectors = 1
            if entry + sectors > file_sectors:
                result.corruption(name, f"compressed grain at sector {entry} runs past the end of the file",
                                  entry * SECTOR)
                continue
            i = bisect.bisect_right(sorted_gts, entry + sectors - 1) - 1
            if i >= 0 and sorted_gts[i] + self.gt_sectors > entry:
                result.corruption(name, f"grain at sector {entry} overlaps a grain table", where)
            footprint_total += sectors
            if entry < previous_end:
                ordered = False
            previous_end = max(previous_end, entry + sectors)
            if len(spans) < MAX_CHECKED_LOOSE_GRAINS:
                spans.append(entry << 24 | sectors)
        if not ordered:
            for a, b in itertools.pairwise(sorted(spans)):
                a_end, b = (a >> 24) + (a & 0xFFFFFF), b >> 24
                if b < a_end:
                    result.corruption(name, f"compressed grain at sector {b} overlaps the one before it",
                                      b * SECTOR)
        result.allocated_units = (result.allocated_units or 0) + allocated
        result.total_units = (result.total_units or 0) + -(-self.length // self.grain_bytes)
        if not self.has_markers:
            return
        metadata_after = sum(1 for s in sorted_gts if s >= base) * self.gt_sectors
        if self.stream_layout:
            metadata_after += sum(1 for s in sorted_gts if s >= base)  # grain table markers
            metadata_after += 1 + gd_sectors + 3  # GD marker, GD, footer marker, footer, end-of-stream
        unused = file_sectors - base - footprint_total - metadata_after
        tail = file_sectors - max(previous_end, base)
        if not self.stream_layout and 0 < tail < self.grain_sectors:
            unused -= tail  # qemu zero-fills a whole grain before compressing into its start
        if unused > 0 and ordered:
            result.leak(name, f"{unused} sectors after the metadata belong to no grain or table", base * SECTOR)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "grain_size": self.grain_bytes, "compressed": self.compressed}


def inflate_grain(data: bytes, grain_bytes: int, path: Path, offset: int) -> bytes:
    """Inflate one zlib-wrapped grain, refusing output larger than the grain or a cut stream."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, grain_bytes + 1)
    except zlib.error as exc:
        raise CorruptImage(path, f"compressed grain does not inflate: {exc}", structure="VMDK compressed grain",
                           offset=offset) from None
    if len(out) > grain_bytes:
        raise CorruptImage(path, f"compressed grain inflates beyond its {grain_bytes}-byte grain",
                           structure="VMDK compressed grain", offset=offset)
    if not inflater.eof:
        raise CorruptImage(path, "compressed grain ends before its deflate stream does",
                           structure="VMDK compressed grain", offset=offset)
    return out


# ------------------------------------------------------------ stream writer


def _deflate_grains(data: bytes | bytearray, grain: int) -> list[bytes | None]:
    """Deflate each grain of *data* (None for all-zero grains); runs on the pool, zlib drops the GIL."""
    view = memoryview(data)
    return [None if is_zero(view[p : p + grain]) else zlib.compress(view[p : p + grain], DEFLATE_LEVEL)
            for p in range(0, len(view), grain)]


class _StreamWriter:
    """Writes a streamOptimized extent front to back (VDF "Stream-Optimized Compressed Sparse Extents").

    Layout: header (gdOffset = GD_AT_END) and descriptor, then for each grain
    table in guest order its grains (marker + deflate data, sector aligned)
    followed by a grain table marker and the table, then the grain directory
    marker and directory, the footer marker and footer, and the end-of-stream
    marker.  Writes at increasing offsets are compressed on a thread pool as
    they arrive; the first write behind the frontier moves everything into an
    unlinked scratch file that is compressed in order by :meth:`finish`.
    """

    def __init__(self, image_path: Path, file: ImageFile, header: SparseHeader, capacity: int) -> None:
        self.image_path = image_path
        self.file = file
        self.header = header
        self.capacity = capacity
        self.grain = header.grain_size * SECTOR
        self.grain_sectors = header.grain_size
        self.n_gts = -(-capacity // (GTES_PER_GT * self.grain))
        self.gd = array("I", bytes(4 * self.n_gts))
        self.gt = array("I", bytes(4 * GTES_PER_GT))
        self.gt_index = -1
        self.next_grain = 0
        self.partial: bytearray | None = None
        self.partial_index = 0
        self.out = bytearray()
        self.out_base = header.overhead * SECTOR
        self.pending: collections.deque[tuple[int, Future[list[bytes | None]]]] = collections.deque()
        self.pool: ThreadPoolExecutor | None = None
        self.scratch: ImageFile | None = None
        self.finished = False

    # ----------------------------------------------------------- front end

    def write(self, offset: int, data: memoryview | None, length: int) -> None:
        """Guest bytes (zeros when *data* is None) at *offset*."""
        if self.scratch is None and (offset // self.grain < self.next_grain
                                     or (self.partial is not None and offset // self.grain < self.partial_index)):
            self._spill()
        if self.scratch is not None:
            if data is not None:
                self.scratch.write(offset, data)
            else:
                end = min(offset + length, self.scratch.size)
                pos = offset
                for zeros in _zero_chunks(max(0, end - pos)):
                    self.scratch.write(pos, zeros)
                    pos += len(zeros)
            return
        grain = self.grain
        pos = offset
        end = offset + length
        if self.partial is not None and pos // grain > self.partial_index:
            self._submit_partial()
        while pos < end:
            index = pos // grain
            grain_start = index * grain
            if pos > grain_start or end - pos < grain:
                if self.partial is None:
                    self.partial = bytearray(grain)
                    self.partial_index = index
                    self.next_grain = index
                n = min(end, grain_start + grain) - pos
                if data is not None:
                    self.partial[pos - grain_start : pos - grain_start + n] = data[pos - offset : pos - offset + n]
                else:
                    self.partial[pos - grain_start : pos - grain_start + n] = bytes(n)
                pos += n
                if pos == grain_start + grain:
                    self._submit_partial()
                continue
            count = min((end - pos) // grain, STREAM_BATCH_GRAINS)
            if self.partial is not None and self.partial_index == index:
                self.partial = None  # wholly overwritten by this write
            if data is not None:
                self._submit(index, bytes(data[pos - offset : pos - offset + count * grain]))
            self.next_grain = index + count
            pos += count * grain

    def _submit_partial(self) -> None:
        assert self.partial is not None
        self._submit(self.partial_index, self.partial)
        self.next_grain = self.partial_index + 1
        self.partial = None

    def _submit(self, first_grain: int, data: bytes | bytearray) -> None:
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor  # only streamOptimized output needs it

            self.pool = ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 4)),
                                           thread_name_prefix="vmdk-deflate")
        self.pending.append((first_grain, self.pool.submit(_deflate_grains, data, self.grain)))
        while self.pending and (len(self.pending) > STREAM_MAX_PENDING or self.pending[0][1].done()):
            self._collect_one()

    def _collect_one(self) -> None:
        first, future = self.pending.popleft()
        for i, compressed in enumerate(future.result()):
            if compressed is not None:
                self._emit_grain(first + i, compressed)

    def _drain(self) -> None:
        while self.pending:
            self._collect_one()

    # ------------------------------------------------------------ back end

    def _sector(self) -> int:
        return (self.out_base + len(self.out)) // SECTOR

    def _pad(self) -> None:
        self.out += bytes(-len(self.out) % SECTOR)

    def _emit_grain(self, index: int, compressed: bytes) -> None:
        gt_index = index // GTES_PER_GT
        if gt_index != self.gt_index:
            self._close_gt()
            self.gt_index = gt_index
        sector = self._sector()
        if sector + _sectors(GRAIN_MARKER.size + len(compressed)) > MAX_SPARSE_FILE_SECTORS:
            raise LimitExceeded(self.file.display_path, "stream exceeds 2 TiB: grain table entries cannot "
                                "address it", structure="VMDK stream")
        self.gt[index % GTES_PER_GT] = sector
        self.out += struct.pack("<QI", index * self.grain_sectors, len(compressed))
        self.out += compressed
        self._pad()
        if len(self.out) >= STREAM_FLUSH_BYTES:
            self._flush_out()

    def _close_gt(self) -> None:
        if self.gt_index < 0:
            return
        if any(self.gt):
            self.out += metadata_marker(MARKER_GRAIN_TABLE, _sectors(GTES_PER_GT * 4))
            self.gd[self.gt_index] = self._sector()
            self.out += _u32_bytes(self.gt)
            self._pad()
            self.gt = array("I", bytes(4 * GTES_PER_GT))
        self.gt_index = -1

    def _flush_out(self) -> None:
        if self.out:
            self.file.write(self.out_base, self.out)
            self.out_base += len(self.out)
            self.out = bytearray()

    # ------------------------------------------------------------- scratch

    def _spill(self) -> None:
        """Move the stream so far into an unlinked scratch file; later writes land there."""
        self._drain()
        self._close_gt()
        self._flush_out()
        import tempfile  # rarely needed, and it imports shutil: not at start-up

        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.image_path.name}.", suffix=".polyvisor-scratch",
                                        dir=self.image_path.parent)
            os.unlink(name)
        except OSError as exc:
            raise OperationFailed(f"{self.image_path}: cannot create the scratch file for out-of-order stream "
                                  f"writes: {exc.strerror}") from exc
        scratch = ImageFile(Path(name), fd, writable=True, display_path=self.file.display_path)
        try:
            reader = _SparseExtent(self.image_path, 0, self.capacity, "RW", file=self.file, filename=None,
                                   header=self.header, gd=self.gd, rgd=None, stream_layout=True)
            for t in range(self.n_gts):
                sector = self.gd[t]
                if not sector:
                    continue
                table = _u32_array(self.file.read(sector * SECTOR, GTES_PER_GT * 4, "VMDK grain table"))
                for i, entry in enumerate(table):
                    if entry:
                        grain_start = (t * GTES_PER_GT + i) * self.grain
                        scratch.write(grain_start, reader.inflate(entry, grain_start))
            if self.partial is not None:
                scratch.write(self.partial_index * self.grain, self.partial)
        except BaseException:
            scratch.close()
            raise
        self.partial = None
        self.scratch = scratch
        self.gd = array("I", bytes(4 * self.n_gts))
        self.out_base = self.header.overhead * SECTOR
        self.file.truncate(self.out_base)

    def _replay_scratch(self, scratch: ImageFile) -> None:
        """Compress the scratch file's data in guest order (holes are unallocated grains)."""
        grain = self.grain
        limit = align_up(self.capacity, grain)
        batch = STREAM_BATCH_GRAINS * grain
        pos = 0
        while pos < limit:
            data_at = scratch.seek_data(pos)
            if data_at is None or data_at >= limit:
                break
            start = data_at - data_at % grain
            stop = min(align_up(scratch.seek_hole(data_at), grain), limit)
            if stop <= start:
                stop = min(start + grain, limit)
            while start < stop:
                n = min(batch, stop - start)
                chunk = bytearray(scratch.read_upto(start, n))
                chunk += bytes(n - len(chunk))
                self._submit(start // grain, chunk)
                start += n
            pos = stop

    # -------------------------------------------------------------- finish

    def finish(self) -> None:
        """Write the remaining grains, the last grain table, GD, footer and end-of-stream marker."""
        if self.finished:
            return
        if self.scratch is not None:
            self._replay_scratch(self.scratch)
        elif self.partial is not None:
            self._submit_partial()
        self._drain()
        self._close_gt()
        gd_sectors = _sectors(4 * self.n_gts)
        self.out += metadata_marker(MARKER_GRAIN_DIRECTORY, gd_sectors)
        gd_sector = self._sector()
        self.out += _u32_bytes(self.gd)
        self._pad()
        footer = SparseHeader(**{name: getattr(self.header, name) for name in SPARSE_HEADER.field_names})
        footer.gd_offset = gd_sector
        self.out += metadata_marker(MARKER_FOOTER, 1)
        self.out += SPARSE_HEADER.pack(footer)
        self.out += metadata_marker(MARKER_EOS, 0)
        self._flush_out()
        self.finished = True

    def close(self) -> None:
        """Stop the pool and drop the scratch file."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None


# -------------------------------------------------------------------- image


def _new_sparse_header(capacity_sectors: int, descriptor_sectors: int, *, stream: bool) -> SparseHeader:
    """The header of a new hosted sparse extent, with qemu's and VMware's metadata placement.

    Plain: header, descriptor, redundant GD and its grain tables, GD and its
    grain tables, then grains from the next grain boundary.  Stream: header
    and descriptor only; the tables follow the grains.
    """
    grains = -(-capacity_sectors // DEFAULT_GRAIN_SECTORS)
    n_gts = -(-grains // GTES_PER_GT)
    gt_sectors = _sectors(GTES_PER_GT * 4)
    gd_sectors = _sectors(4 * n_gts)
    descriptor_offset = 1 if descriptor_sectors else 0
    if stream:
        return SparseHeader(SPARSE_MAGIC, 3, FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
                            capacity_sectors, DEFAULT_GRAIN_SECTORS, descriptor_offset, descriptor_sectors,
                            GTES_PER_GT, 0, GD_AT_END, align_up(1 + descriptor_sectors, DEFAULT_GRAIN_SECTORS),
                            0, NEWLINE_CHECK, COMPRESSION_DEFLATE, bytes(433))
    rgd = 1 + descriptor_sectors
    gd = rgd + gd_sectors + n_gts * gt_sectors
    overhead = align_up(gd + gd_sectors + n_gts * gt_sectors, DEFAULT_GRAIN_SECTORS)
    return SparseHeader(SPARSE_MAGIC, 1, FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GD, capacity_sectors,
                        DEFAULT_GRAIN_SECTORS, descriptor_offset, descriptor_sectors, GTES_PER_GT, rgd, gd,
                        overhead, 0, NEWLINE_CHECK, COMPRESSION_NONE, bytes(433))


def _init_sparse_file(image_path: Path, file: ImageFile, start: int, capacity_sectors: int, *,
                      descriptor: bytes | None, owner: DiskImage | None) -> _SparseExtent:
    """Lay out a new hosted sparse extent in *file* (grain tables preallocated as holes)."""
    descriptor_sectors = max(EMBEDDED_DESCRIPTOR_SECTORS, _sectors(len(descriptor))) if descriptor else 0
    header = _new_sparse_header(capacity_sectors, descriptor_sectors, stream=False)
    grains = -(-capacity_sectors // DEFAULT_GRAIN_SECTORS)
    if header.overhead + (grains - 1) * DEFAULT_GRAIN_SECTORS >= MAX_SPARSE_FILE_SECTORS:
        raise UsageError(f"{image_path}: {capacity_sectors * SECTOR} bytes is more than a sparse extent can "
                         "address (2 TiB of file including metadata)")
    n_gts = -(-grains // GTES_PER_GT)
    gt_sectors = _sectors(GTES_PER_GT * 4)
    gd_sectors = _sectors(4 * n_gts)
    file.truncate(header.overhead * SECTOR)
    file.write(0, SPARSE_HEADER.pack(header))
    if descriptor:
        file.write(SECTOR, descriptor)
    rgd = array("I", (header.rgd_offset + gd_sectors + i * gt_sectors for i in range(n_gts)))
    gd = array("I", (header.gd_offset + gd_sectors + i * gt_sectors for i in range(n_gts)))
    file.write(header.rgd_offset * SECTOR, _u32_bytes(rgd))
    file.write(header.gd_offset * SECTOR, _u32_bytes(gd))
    extent = _SparseExtent(image_path, start, capacity_sectors * SECTOR, "RW", file=file,
                           filename=file.display_path.name, header=header, gd=gd, rgd=rgd, stream_layout=False,
                           owner=owner)
    extent._next_free = header.overhead
    return extent


def _split_names(path: Path, letter: str, count: int) -> list[str]:
    """NAME-s001.vmdk … (qemu and VMware's naming: the extension kept, the number zero-padded to 3)."""
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    return [f"{stem}-{letter}{i:03d}{suffix}" for i in range(1, count + 1)]


#: createType values of descriptor files whose extents polyvisor reads (VMDK 5.0 spec, "Disk Descriptor
#: File"): hosted and ESXi file-backed types.  Device-backed types (fullDevice, partitionedDevice,
#: vmfsRaw, vmfsRawDeviceMap, vmfsPassthroughRawDeviceMap) and unknown ones are refused.
READABLE_CREATE_TYPES = frozenset({
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized",
    "vmfs", "vmfsThin", "vmfsPreallocated", "vmfsEagerZeroedThick", "vmfsSparse", "seSparse", "custom",
})

@register_format
class VmdkImage(DiskImage):
    """A VMDK disk: a descriptor and its extents (see the module docstring)."""

    format_name = "vmdk"
    subformats = ("monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse",
                  "twoGbMaxExtentFlat")
    create_options = frozenset({"adapter_type"})
    supports_compression = True
    supports_backing = True
    max_virtual_size = MAX_VMDK_SIZE

    def __init__(self, path: Path, *, virtual_size: int, subformat: str, files: list[ImageFile],
                 writable: bool = False, backing: DiskImage | None = None, backing_reference: str | None = None,
                 outputs: OutputFiles | None = None, descriptor: Descriptor | None,
                 descriptor_text: str | None, descriptor_file: ImageFile | None, descriptor_area: int,
                 extents: list[_Extent], stream: _StreamWriter | None = None) -> None:
        super().__init__(path, virtual_size=virtual_size, subformat=subformat, files=files, writable=writable,
                         backing=backing, backing_reference=backing_reference, outputs=outputs)
        self.descriptor = descriptor
        self._descriptor_text = descriptor_text
        self._descriptor_file = descriptor_file
        #: Bytes the descriptor may occupy: the embedded area, or 0 for a descriptor file.
        self._descriptor_area = descriptor_area
        self._extents = extents
        self._starts = [e.start for e in extents]
        self._stream = stream
        self._cid_changed = False
        for extent in extents:
            if isinstance(extent, _SparseExtent):
                extent.owner = self

    @property
    def cid(self) -> int | None:
        """The content ID (None for a sparse extent opened without a descriptor)."""
        return self.descriptor.cid if self.descriptor is not None else None

    # ----------------------------------------------------------------- probe

    @classmethod
    def probe(cls, sample: ProbeSample) -> int:
        """KDMV magic with a known version, COWD (to refuse it clearly), or a text descriptor."""
        head = sample.head
        if head[:4] == SPARSE_MAGIC and len(head) >= 8:
            return 100 if 1 <= struct.unpack_from("<I", head, 4)[0] <= 3 else 60
        if head[:4] == COWD_MAGIC:
            return 80
        if looks_like_descriptor(head):
            return 100
        return 0

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open a sparse extent with its embedded descriptor, or a descriptor file and its extents."""
        path = Path(path)
        file = ImageFile.open(path, writable=writable)
        opened: list[ImageFile] = [file]
        try:
            if file.read_upto(0, 4) in (SPARSE_MAGIC, COWD_MAGIC):
                return cls._open_monolithic(path, file, writable, opener)
            return cls._open_descriptor_file(path, file, writable, opener, opened)
        except BaseException:
            for f in opened:
                f.close()
            raise

    @classmethod
    def _open_monolithic(cls, path: Path, file: ImageFile, writable: bool, opener: Opener) -> Self:
        header, from_footer = read_sparse_header(file, path)
        extent = _SparseExtent.load(path, 0, "RW", file=file, filename=path.name, header=header,
                                    stream_layout=from_footer)
        subformat = "streamOptimized" if extent.compressed else "monolithicSparse"
        if writable and extent.compressed:
            raise ReadOnlyImage(path, "streamOptimized images are append-only streams; convert to another "
                                "subformat to modify the disk", structure="VMDK sparse extent header")
        if writable and header.version == 3:
            raise ReadOnlyImage(path, "version 3 sparse extents (changed block tracking) are opened read-only",
                                structure="VMDK sparse extent header")
        descriptor = text = None
        area = header.descriptor_size * SECTOR
        if header.descriptor_offset and header.descriptor_size:
            if area > MAX_DESCRIPTOR_BYTES:
                raise LimitExceeded(path, f"embedded descriptor of {header.descriptor_size} sectors is longer than "
                                    f"{MAX_DESCRIPTOR_BYTES} bytes", structure="VMDK sparse extent header",
                                    offset=36)
            if (header.descriptor_offset + header.descriptor_size) * SECTOR > file.size:
                raise TruncatedImage(path, f"embedded descriptor at sector {header.descriptor_offset} lies past "
                                     "the end of the file", structure="VMDK sparse extent header", offset=28)
            raw = file.read(header.descriptor_offset * SECTOR, area, "VMDK embedded descriptor")
            if raw.strip(b"\x00"):
                descriptor = parse_descriptor(raw, path)
                text = raw.split(b"\x00", 1)[0].decode(python_codec(descriptor.encoding), errors="replace")
        backing, reference = cls._open_parent(path, descriptor, opener, writable=writable)
        try:
            return cls(path, virtual_size=extent.length, subformat=subformat, files=[file], writable=writable,
                       backing=backing, backing_reference=reference, descriptor=descriptor,
                       descriptor_text=text, descriptor_file=file if descriptor is not None else None,
                       descriptor_area=area, extents=[extent])
        except BaseException:
            if backing is not None:
                backing.close()
            raise

    @classmethod
    def _open_descriptor_file(cls, path: Path, file: ImageFile, writable: bool, opener: Opener,
                              opened: list[ImageFile]) -> Self:
        size = file.size
        if size > MAX_DESCRIPTOR_BYTES:
            raise LimitExceeded(path, f"descriptor file of {size} bytes is longer than {MAX_DESCRIPTOR_BYTES}",
                                structure="VMDK descriptor")
        raw = file.read(0, size, "VMDK descriptor")
        if not looks_like_descriptor(raw[:4096]):
            raise CorruptImage(path, "neither a sparse extent (KDMV) nor a text descriptor", structure="VMDK",
                               offset=0)
        descriptor = parse_descriptor(raw, path)
        if descriptor.create_type not in READABLE_CREATE_TYPES:
            raise UnsupportedFeature(path, f"createType {descriptor.create_type!r} is not a disk type polyvisor "
                                     "reads (device-backed and unknown types are refused)",
                                     structure="VMDK descriptor")
        if not descriptor.extents:
            raise CorruptImage(path, "descriptor lists no extents", structure="VMDK descriptor")
        extents: list[_Extent] = []
        start = 0
        by_path: dict[Path, ImageFile] = {}
        for number, line in enumerate(descriptor.extents, start=1):
            extent = cls._open_extent(path, line, number, start, writable=writable, opener=opener,
                                      by_path=by_path, opened=opened)
            extents.append(extent)
            start += extent.length
        if writable:
            cls._refuse_shared_files(path, extents)
        backing, reference = cls._open_parent(path, descriptor, opener, writable=writable)
        text = raw.split(b"\x00", 1)[0].decode(python_codec(descriptor.encoding), errors="replace")
        try:
            return cls(path, virtual_size=start, subformat=descriptor.create_type, files=list(opened),
                       writable=writable, backing=backing, backing_reference=reference, descriptor=descriptor,
                       descriptor_text=text, descriptor_file=file, descriptor_area=0, extents=extents)
        except BaseException:
            if backing is not None:
                backing.close()
            raise

    @staticmethod
    def _refuse_shared_files(path: Path, extents: list[_Extent]) -> None:
        """Writing is refused when a sparse extent shares its file, or an extent is the descriptor itself.

        Two extents allocating grains at the end of one file would overwrite each other.
        """
        own = Path(os.path.abspath(path)).resolve()
        users = collections.Counter(Path(e.file.path) for e in extents if e.file is not None)
        for extent in extents:
            if extent.file is None or extent.access != "RW":
                continue
            target = Path(extent.file.path)
            if target == own or (isinstance(extent, _SparseExtent) and users[target] > 1):
                raise ReadOnlyImage(path, f"extent {extent.filename!r} shares its file with another extent or the "
                                    "descriptor; such a disk is opened read-only", structure="VMDK descriptor")

    @classmethod
    def _open_extent(cls, path: Path, line: ExtentLine, number: int, start: int, *, writable: bool,
                     opener: Opener, by_path: dict[Path, ImageFile], opened: list[ImageFile]) -> _Extent:
        where = f"VMDK descriptor extent line {number}"
        if line.sectors <= 0:
            raise CorruptImage(path, f"extent of {line.sectors} sectors", structure=where)
        length = line.sectors * SECTOR
        if start + length > 1 << 62:
            raise LimitExceeded(path, "extents add up to more than 4 EiB", structure=where)
        if line.type in ("VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW"):
            raise UnsupportedFeature(path, f"{line.type} extents are not supported", structure=where)
        if line.access == "NOACCESS":
            return _NoAccessExtent(path, start, length, line.access, file=None, filename=line.filename)
        if line.type == "ZERO":
            return _ZeroExtent(path, start, length, line.access, file=None, filename=None)
        assert line.filename is not None
        try:
            target = opener.resolve(path, line.filename, what="extent")
        except MissingReference as exc:
            return _MissingExtent(path, start, length, line.access, filename=line.filename, error=exc)
        extent_writable = writable and line.access == "RW"
        file = by_path.get(target)
        if file is None or (extent_writable and not file.writable):
            file = ImageFile.open(target, writable=extent_writable)
            by_path[target] = file
            opened.append(file)
        if line.type in ("FLAT", "VMFS"):
            return _FlatExtent(path, start, length, line.access, file=file, filename=line.filename,
                               file_offset=line.offset * SECTOR, type_name=line.type)
        header, from_footer = read_sparse_header(file, target)
        if header.capacity != line.sectors:
            raise CorruptImage(path, f"descriptor gives extent {line.filename!r} {line.sectors} sectors, its "
                               f"header {header.capacity}", structure=where)
        if extent_writable and header.compress_algorithm != COMPRESSION_NONE:
            raise ReadOnlyImage(path, f"compressed extent {line.filename!r} cannot be modified", structure=where)
        return _SparseExtent.load(path, start, line.access, file=file, filename=line.filename, header=header,
                                  stream_layout=from_footer)

    @classmethod
    def _open_parent(cls, path: Path, descriptor: Descriptor | None, opener: Opener, *,
                     writable: bool) -> tuple[DiskImage | None, str | None]:
        """The parent of a delta disk, its CID checked against parentCID (VDF "Delta Links")."""
        if descriptor is None or descriptor.parent_cid == NO_PARENT_CID:
            return None, None
        hint = descriptor.parent_hint
        if not hint:
            raise CorruptImage(path, f"parentCID={descriptor.parent_cid:08x} but no parentFileNameHint names the "
                               "parent", structure="VMDK descriptor")
        reference = windows_path_to_relative(hint)
        try:
            parent = opener.open_backing(path, reference, "vmdk", what="parent")
        except (UnsafeReference, MissingReference):
            # VMware on Windows writes absolute hints (D:\VMs\base.vmdk); a disk moved elsewhere keeps its
            # parent beside it.  The CID check below still has to pass.
            beside = PurePosixPath(reference).name
            if not PurePosixPath(reference).is_absolute() or not beside or not (path.parent / beside).is_file():
                raise
            parent = opener.open_backing(path, beside, "vmdk", what="parent")
        if parent is None:
            if writable:
                raise ReadOnlyImage(path, "a delta disk is written only with its parent open (partial grains are "
                                    "completed from it)", structure="VMDK descriptor")
            return None, hint
        parent_cid = parent.cid if isinstance(parent, VmdkImage) else None
        if parent_cid != descriptor.parent_cid:
            parent.close()
            shown = "none" if parent_cid is None else f"{parent_cid:08x}"
            raise BackingChainError(path, f"parentCID {descriptor.parent_cid:08x} does not match the CID {shown} "
                                    f"of parent {hint!r}: the parent changed after this delta was made",
                                    structure="VMDK descriptor")
        return parent, hint

    # ---------------------------------------------------------------- create

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """Create any of the five subformats (``adapter_type``: ide, lsilogic, buslogic, legacyESX)."""
        path = Path(path)
        subformat = options.subformat
        if options.compress:
            if subformat not in (None, "streamOptimized"):
                raise UnsupportedOption(f"vmdk compresses only as subformat=streamOptimized, not {subformat}")
            subformat = "streamOptimized"
        if subformat is None:
            subformat = "monolithicSparse"
        adapter = options.adapter_type or "ide"
        if adapter not in ADAPTER_TYPES:
            raise UnsupportedOption(f"vmdk adapter_type {adapter!r} unknown (known: {', '.join(ADAPTER_TYPES)})")
        if size <= 0:
            raise UsageError(f"{path}: a VMDK disk needs at least one sector")
        if size > cls.max_virtual_size:
            raise UsageError(f"{path}: {size} bytes exceeds the VMDK limit of {cls.max_virtual_size} bytes "
                             "(2 TiB of sparse extent including metadata)")
        cid = new_cid()
        descriptor = Descriptor(cid=cid, create_type=subformat, ddb=new_ddb(size, adapter, cid))
        descriptor.header["isNativeSnapshot"] = "no"
        if backing is not None:
            if subformat != "monolithicSparse":
                raise UnsupportedOption(f"vmdk backing files are supported with subformat=monolithicSparse, "
                                        f"not {subformat}")
            if not isinstance(backing, VmdkImage) or backing.cid is None:
                raise UnsupportedOption(f"vmdk backing file must be a VMDK disk with a descriptor (as qemu-img "
                                        f"requires), not {backing.format_name}")
            descriptor.parent_cid = backing.cid
            descriptor.parent_hint = options.backing_file
        sectors = size // SECTOR
        outputs = OutputFiles()
        try:
            if subformat in ("monolithicSparse", "streamOptimized"):
                descriptor.extents = [ExtentLine("RW", sectors, "SPARSE", path.name)]
                encoded = descriptor.encode()
                if len(encoded) > MAX_DESCRIPTOR_BYTES:
                    raise UsageError(f"{path}: descriptor would be longer than {MAX_DESCRIPTOR_BYTES} bytes")
                file = outputs.create(path)
                if subformat == "streamOptimized":
                    return cls._create_stream(path, size, file, descriptor=descriptor, encoded=encoded,
                                              outputs=outputs)
                image = cls(path, virtual_size=size, subformat=subformat, files=[file], writable=True,
                            backing=backing, backing_reference=options.backing_file, outputs=outputs,
                            descriptor=descriptor, descriptor_text=encoded.decode(), descriptor_file=file,
                            descriptor_area=max(EMBEDDED_DESCRIPTOR_SECTORS, _sectors(len(encoded))) * SECTOR,
                            extents=[])
                extent = _init_sparse_file(path, file, 0, sectors, descriptor=encoded, owner=image)
                image._extents = [extent]
                image._starts = [0]
                return image
            return cls._create_split(path, size, subformat, descriptor, outputs)
        except BaseException:
            outputs.abort()
            raise

    @classmethod
    def _create_stream(cls, path: Path, size: int, file: ImageFile, *, descriptor: Descriptor, encoded: bytes,
                       outputs: OutputFiles) -> Self:
        header = _new_sparse_header(size // SECTOR, max(EMBEDDED_DESCRIPTOR_SECTORS, _sectors(len(encoded))),
                                    stream=True)
        file.truncate(header.overhead * SECTOR)
        file.write(0, SPARSE_HEADER.pack(header))
        file.write(SECTOR, encoded)
        stream = _StreamWriter(path, file, header, size)
        return cls(path, virtual_size=size, subformat="streamOptimized", files=[file], writable=True,
                   outputs=outputs, descriptor=descriptor, descriptor_text=encoded.decode(), descriptor_file=file,
                   descriptor_area=header.descriptor_size * SECTOR, extents=[], stream=stream)

    @classmethod
    def _create_split(cls, path: Path, size: int, subformat: str, descriptor: Descriptor,
                      outputs: OutputFiles) -> Self:
        """monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse: extent files first, descriptor last."""
        sectors = size // SECTOR
        flat = subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
        if subformat == "monolithicFlat":
            stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
            names = [f"{stem}-flat{suffix}"]
            pieces = [sectors]
        else:
            pieces = [min(SPLIT_EXTENT_SECTORS, sectors - s) for s in range(0, sectors, SPLIT_EXTENT_SECTORS)]
            names = _split_names(path, "f" if flat else "s", len(pieces))
        directory = path.parent
        files: list[ImageFile] = []
        extents: list[_Extent] = []
        start = 0
        pending_sparse: list[tuple[ImageFile, int, int]] = []
        for name, count in zip(names, pieces, strict=True):
            file = outputs.create(directory / name)
            files.append(file)
            if flat:
                file.truncate(count * SECTOR)
                extents.append(_FlatExtent(path, start, count * SECTOR, "RW", file=file, filename=name,
                                           file_offset=0, type_name="FLAT"))
                descriptor.extents.append(ExtentLine("RW", count, "FLAT", name, 0))
            else:
                pending_sparse.append((file, start, count))
                descriptor.extents.append(ExtentLine("RW", count, "SPARSE", name))
            start += count * SECTOR
        descriptor_file = outputs.create(path)
        text = descriptor.render()
        descriptor_file.write(0, text.encode())
        image = cls(path, virtual_size=size, subformat=subformat, files=[descriptor_file, *files], writable=True,
                    outputs=outputs, descriptor=descriptor, descriptor_text=text, descriptor_file=descriptor_file,
                    descriptor_area=0, extents=extents)
        if pending_sparse:
            image._extents = [_init_sparse_file(path, f, s, n, descriptor=None, owner=image)
                              for f, s, n in pending_sparse]
            image._starts = [e.start for e in image._extents]
        return image

    # ---------------------------------------------------------------- access

    def _extent_index(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def _map(self, offset: int, length: int) -> Iterator[Run]:
        if self._stream is not None:
            raise UnsupportedFeature(self.path, "a streamOptimized image cannot be read while it is being "
                                     "written", structure="VMDK stream")
        end = offset + length
        pos = offset
        i = self._extent_index(offset)
        while pos < end:
            extent = self._extents[i]
            n = min(end, extent.end) - pos
            yield from extent.map(pos - extent.start, n)
            pos += n
            i += 1

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest bytes (streams: see :class:`_StreamWriter`)."""
        self._check_write(offset, len(data))
        self._store(offset, memoryview(data).cast("B"), len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range without materialising zero buffers (unallocated grains stay unallocated)."""
        self._check_write(offset, length)
        self._store(offset, None, length)

    def _store(self, offset: int, data: memoryview | None, length: int) -> None:
        if length == 0:
            return
        if self._stream is not None:
            self._stream.write(offset, data, length)
            return
        if self._outputs is None:
            self._cid_changed = True
        end = offset + length
        pos = offset
        i = self._extent_index(offset)
        while pos < end:
            extent = self._extents[i]
            n = min(end, extent.end) - pos
            chunk = data[pos - offset : pos - offset + n] if data is not None else None
            extent.write(pos - extent.start, chunk, n)
            pos += n
            i += 1

    # ------------------------------------------------------------- finishing

    def flush(self) -> None:
        """Grain tables and a changed CID first, then the files."""
        if self.writable and not self.closed:
            self._write_metadata()
        super().flush()

    def _finish(self) -> None:
        if self._stream is not None:
            self._stream.finish()
        self._write_metadata()

    def _write_metadata(self) -> None:
        for extent in self._extents:
            extent.flush_metadata()
        if self._cid_changed and self.descriptor is not None and self._descriptor_text is not None:
            self._write_new_cid()

    def _write_new_cid(self) -> None:
        """A modified disk gets a new CID (VDF "Content ID"), as VMware products and qemu do."""
        assert self.descriptor is not None
        assert self._descriptor_text is not None
        file = self._descriptor_file
        if file is None or not file.writable:
            return
        cid = new_cid()
        text = with_new_cid(self._descriptor_text, cid)
        encoded = text.encode(python_codec(self.descriptor.encoding))
        if self._descriptor_area:
            if len(encoded) > self._descriptor_area:
                return
            file.write(self.header_descriptor_offset(), encoded + bytes(self._descriptor_area - len(encoded)))
        else:
            file.write(0, encoded)
            file.truncate(len(encoded))
        self.descriptor.cid = cid
        self._descriptor_text = text
        self._cid_changed = False

    def header_descriptor_offset(self) -> int:
        """Byte offset of the embedded descriptor."""
        extent = self._extents[0]
        assert isinstance(extent, _SparseExtent)
        return extent.header.descriptor_offset * SECTOR

    def _close_files(self) -> None:
        if self._stream is not None:
            self._stream.close()
        super()._close_files()

    # ---------------------------------------------------------- description

    def _details(self) -> dict[str, Any]:
        desc = self.descriptor
        sparse = next((e for e in self._extents if isinstance(e, _SparseExtent)), None)
        stream_grain = self._stream.grain if self._stream is not None else None
        return {
            "create_type": desc.create_type if desc is not None else self.subformat,
            "cid": f"{desc.cid:08x}" if desc is not None else None,
            "parent_cid": f"{desc.parent_cid:08x}" if desc is not None else None,
            "adapter_type": desc.adapter_type if desc is not None else None,
            "hw_version": desc.ddb.get("ddb.virtualHWVersion") if desc is not None else None,
            "extents": [e.describe() for e in self._extents],
            "grain_size": sparse.grain_bytes if sparse is not None else stream_grain,
            "ddb": dict(desc.ddb) if desc is not None else {},
        }

    def check(self) -> CheckResult:
        """Descriptor against extents, then each extent's own metadata."""
        result = self._new_check_result()
        if self.writable and self._stream is None:
            self._write_metadata()  # the redundant grain tables on disk catch up with the cached ones
        desc = self.descriptor
        if desc is not None and self._descriptor_area and self._extents:
            described = sum(line.sectors for line in desc.extents)
            if len(desc.extents) != 1 or described != self._extents[0].length // SECTOR:
                result.corruption("VMDK embedded descriptor", f"extent lines describe {described} sectors in "
                                  f"{len(desc.extents)} extents, the sparse header {self.virtual_size // SECTOR}")
        for extent in self._extents:
            try:
                extent.check(result)
            except (CorruptImage, UnsupportedFeature) as exc:
                result.corruption(exc.structure or "VMDK extent", exc.reason, exc.offset)
        if result.image_end_offset is None and len(self.files) == 1:
            result.image_end_offset = self.files[0].size
        return result

