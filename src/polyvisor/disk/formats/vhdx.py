"""VHDX (Hyper-V virtual hard disk v2): fixed, dynamic and differencing images.

Implements Microsoft's [MS-VHDX]; § numbers refer to it, structures live in
:mod:`polyvisor.disk.formats.vhdx_structs`.  Behaviour matches qemu's
``block/vhdx*.c`` where the spec leaves room.

Reading: the current header (§2.2.2), a region table (§2.2.3), the metadata
items (§2.6), the BAT (§2.5) with its interleaved sector bitmap entries, and
for differencing images the sector bitmaps (§2.4) and the parent named by the
parent locator (§2.6.2.6).  A non-empty log (§2.3) is replayed before anything
else is read: on disk when the image is opened writable (then LogGuid is
cleared in a new header), in memory otherwise, so a read-only source is never
written.

Choices, where the spec or qemu leave them open:

* Subformat: ``differencing`` when HasParent is set; otherwise ``fixed`` when
  LeaveBlockAllocated is set (§2.6.2.1: the flag marks a fully provisioned
  file); otherwise ``dynamic``.  Block states cannot decide it: qemu's own fixed
  images carry ZERO-state blocks (its ``block_state_zero`` default).
* Created images: default block size 32 MiB (Hyper-V's default; qemu picks
  8-64 MiB by size); a differencing image defaults to its parent's block and
  logical sector sizes.  The virtual size is rounded up to the logical sector
  size (512 or 4096), as qemu rounds to 512.  Physical sector size 4096.
  Layout: header section, 1 MiB log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB,
  payload from the next MiB.  A fixed image's blocks are all FULLY_PRESENT and
  contiguous in a sparse file.
* Read states: NOT_PRESENT is unallocated (the parent's data in a differencing
  image); ZERO, UNDEFINED and UNMAPPED (and the 0.95 draft's value 5) read as
  zeros without consulting a parent, as qemu and dissect read them.
* Metadata crash consistency: an image being created is invisible until
  committed, so its BAT and sector bitmaps are written directly.  An image
  reopened writable journals every changed BAT or sector bitmap 4 KiB page
  through the log when it is flushed or closed (set LogGuid, write one entry,
  flush, apply in place, flush, clear LogGuid), so a crash leaves either the old
  or the new metadata; payload is flushed before the metadata pointing to it.
* ``write_zeroes`` turns whole unallocated blocks into ZERO blocks and writes
  zeros into allocated ones (no block is ever released, so nothing leaks).
* Parents: the parent locator type is VHDX's own (§2.6.2.6.1), so a
  differencing image needs a VHDX parent; it is found through the opener,
  ``relative_path`` first, then ``absolute_win32_path``/``volume_path`` and
  their basename in the image's directory, and must carry the DataWriteGuid
  named by ``parent_linkage`` (or ``parent_linkage2``).  Written locators hold
  ``parent_linkage``, ``relative_path`` and the parent's absolute path with
  backslashes (there is no drive letter to give it).
* Peers: qemu 7.2 opens neither differencing VHDX nor 4096-byte logical
  sectors ("Operation not supported"); Hyper-V reads both.

Memory stays bounded: the BAT is held in memory up to ``MAX_BAT_ENTRIES``
(larger images are refused), a dirty log is replayed only up to
``MAX_LOG_REPLAY``, and changed sector bitmap pages are committed in batches.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
import sys
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, Self

from polyvisor import __version__, records
from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.disk.formats import vhdx_structs as vs
from polyvisor.disk.image import DiskImage, ExtentKind, ProbeSample, Run, file_run
from polyvisor.disk.paths import windows_path_to_relative
from polyvisor.disk.registry import register_format
from polyvisor.disk.structs import align_up, is_power_of_two
from polyvisor.errors import (
    BackingChainError,
    ChecksumMismatch,
    CorruptImage,
    LimitExceeded,
    MissingReference,
    OperationFailed,
    TruncatedImage,
    UnsafeReference,
    UnsupportedFeature,
    UnsupportedOption,
    UsageError,
)
from polyvisor.records import field, record

if TYPE_CHECKING:
    from polyvisor.disk.check import CheckResult
    from polyvisor.disk.registry import CreateOptions, Opener

MIB = vs.MIB
DEFAULT_BLOCK_SIZE = 32 * MIB
DEFAULT_LOG_SIZE = 1 * MIB
#: BAT entries polyvisor keeps in memory (64 MiB): 8 TiB at 1 MiB blocks, the 64 TiB maximum from 8 MiB.
MAX_BAT_ENTRIES = 1 << 23
#: Largest log polyvisor scans for a sequence to replay (Hyper-V and qemu write 1 MiB logs).
MAX_LOG_REPLAY = 64 * MIB
#: No structure polyvisor follows lies beyond this file offset (64 TiB of payload plus metadata).
MAX_FILE_OFFSET = 1 << 47
#: Sector bitmap pages cached for writing before they are committed.
MAX_CACHED_BITMAP_PAGES = 4096
#: Log descriptors may not write the file type identifier or the headers (§2.2.2).
LOG_FORBIDDEN_END = vs.REGION_TABLE_OFFSETS[0]
#: The check's map of used file space covers at most this many 1 MiB units (64 MiB of memory).
MAX_CHECK_UNITS = 1 << 26
_BAT_PAGE_ENTRIES = vs.LOG_SECTOR // 8
_ZERO_CHUNK = bytes(MIB)
_ZERO_READ_STATES = frozenset({vs.PAYLOAD_BLOCK_UNDEFINED, vs.PAYLOAD_BLOCK_ZERO, vs.PAYLOAD_BLOCK_UNMAPPED,
                               vs.PAYLOAD_BLOCK_UNMAPPED_V095})
_PRESENT_STATES = frozenset({vs.PAYLOAD_BLOCK_FULLY_PRESENT, vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT})


@record(frozen=True, slots=True)
class _Region:
    """A stretch of the file that payload blocks must not overlap."""

    start: int
    end: int
    name: str


@record(slots=True)
class _Problem:
    """Something tolerated while opening that ``check`` reports."""

    structure: str
    message: str
    offset: int | None = None


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


class _Headers:
    """The two headers (§2.2.2): which one is current, and the spec's update procedure."""

    def __init__(self, file: ImageFile, current: vs.Header, index: int) -> None:
        self.file = file
        self.current = current
        self.index = index

    def update(self, **changes: Any) -> None:
        """Write the current header, changed and with the next sequence number, over the other one."""
        header = records.replace(self.current, checksum=0,
                                     sequence_number=self.current.sequence_number + 1, **changes)
        target = 1 - self.index
        self.file.write(vs.HEADER_OFFSETS[target], _header_bytes(header))
        self.file.flush()
        self.current, self.index = header, target


def _header_bytes(header: vs.Header) -> bytearray:
    buf = bytearray(vs.HEADER_SIZE)
    buf[: vs.HEADER.size] = vs.HEADER.pack(records.replace(header, checksum=0))
    return vs.with_checksum(buf)


class _MetaSource:
    """Metadata reads: the file, seen through the in-memory replay of a log (§2.3.3) if there is one."""

    def __init__(self, file: ImageFile, pieces: list[tuple[int, int, bytes | None]] | None = None,
                 end: int = 0) -> None:
        self.file = file
        self.pieces = pieces or []
        self.starts = [p[0] for p in self.pieces]
        self.end = max(file.size, end)

    def _overlapping(self, start: int, end: int) -> Iterator[tuple[int, int, bytes | None]]:
        index = max(0, bisect.bisect_right(self.starts, start) - 1)
        while index < len(self.pieces) and self.pieces[index][0] < end:
            piece = self.pieces[index]
            if piece[1] > start:
                yield piece
            index += 1

    def read(self, offset: int, length: int, structure: str) -> bytes:
        """Exactly *length* bytes at *offset*."""
        if not self.pieces:
            return self.file.read(offset, length, structure)
        if offset < 0 or offset + length > self.end:
            raise _truncated(self.file, structure, offset, length)
        buf = bytearray(self.file.read_upto(offset, length))
        buf.extend(bytes(length - len(buf)))
        for start, end, data in self._overlapping(offset, offset + length):
            lo, hi = max(start, offset), min(end, offset + length)
            buf[lo - offset : hi - offset] = bytes(hi - lo) if data is None else data[lo - start : hi - start]
        return bytes(buf)

    def split(self, start: int, end: int) -> Iterator[tuple[int, int, bytes | bool | None]]:
        """``(start, end, source)`` covering the range: source True = the file, else log bytes or zeros."""
        pos = start
        for piece_start, piece_end, data in self._overlapping(start, end):
            lo, hi = max(piece_start, start), min(piece_end, end)
            if lo > pos:
                yield pos, lo, True
            yield lo, hi, None if data is None else data[lo - piece_start : hi - piece_start]
            pos = hi
        if pos < end:
            yield pos, end, True


def _truncated(file: ImageFile, structure: str, offset: int, length: int) -> TruncatedImage:
    """A truncation error for *length* bytes at *offset*."""
    return TruncatedImage(file.display_path, f"needs {length} bytes past the end of the file",
                          structure=structure, offset=offset)


@record
class _State:
    """Everything ``open``/``create`` parse or decide, handed to the image."""

    headers: _Headers
    source: _MetaSource
    creator: str
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    virtual_size: int
    parameter_flags: int
    virtual_disk_id: bytes
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int
    regions: list[_Region]
    bat: array[int]
    parent_locator: dict[str, str] = field(default_factory=dict)
    log_state: str = "clean"
    problems: list[_Problem] = field(default_factory=list)


def _bat_entry_count(data_blocks: int, chunk_ratio: int, has_parent: bool) -> int:
    """BAT entries for *data_blocks* payload blocks (§2.5)."""
    if has_parent:
        return -(-data_blocks // chunk_ratio) * (chunk_ratio + 1)
    return data_blocks + (data_blocks - 1) // chunk_ratio if data_blocks else 0


_NOT_ZERO = re.compile(rb"[^\x00]")
_NOT_ONES = re.compile(rb"[^\xff]")


def _bit_runs(bitmap: bytes, first: int, count: int) -> Iterator[tuple[bool, int, int]]:
    """``(bit set, offset from *first*, length)`` runs of bits ``[first, first + count)`` (§2.4: bit 0 of
    byte 0 first).  Whole 0x00/0xFF bytes are skipped by a C-speed scan, so the cost grows with the
    number of runs and bytes, never with their product."""
    end = first + count
    pos = first
    while pos < end:
        start = pos
        bit = bitmap[pos >> 3] >> (pos & 7) & 1
        while pos < end and pos & 7 and bitmap[pos >> 3] >> (pos & 7) & 1 == bit:
            pos += 1
        if pos < end and not pos & 7:
            found = (_NOT_ONES if bit else _NOT_ZERO).search(bitmap, pos >> 3)
            pos = min(end, (found.start() if found else len(bitmap)) * 8)
            while pos < end and bitmap[pos >> 3] >> (pos & 7) & 1 == bit:
                pos += 1
        yield bool(bit), start - first, pos - start


def _set_bit_range(page: bytearray, first: int, end: int) -> None:
    """Set bits ``[first, end)`` of *page* (bit 0 of byte 0 first, §2.4)."""
    while first < end and first % 8:
        page[first // 8] |= 1 << (first % 8)
        first += 1
    whole = (end - first) // 8
    if whole > 0:
        page[first // 8 : first // 8 + whole] = b"\xff" * whole
        first += whole * 8
    while first < end:
        page[first // 8] |= 1 << (first % 8)
        first += 1


@register_format
class VhdxImage(DiskImage):
    """A VHDX image: one file, optionally the child of a VHDX parent."""

    format_name = "vhdx"
    subformats = ("dynamic", "fixed")
    create_options = frozenset({"block_size", "logical_sector_size"})
    supports_backing = True
    max_virtual_size = vs.MAX_VIRTUAL_SIZE

    def __init__(self, path: Path, state: _State, *, writable: bool, journaled: bool,
                 backing: DiskImage | None = None, backing_reference: str | None = None,
                 outputs: OutputFiles | None = None) -> None:
        flags = state.parameter_flags
        if flags & vs.HAS_PARENT:
            subformat = "differencing"
        elif flags & vs.LEAVE_BLOCKS_ALLOCATED:
            subformat = "fixed"
        else:
            subformat = "dynamic"
        file = state.source.file
        super().__init__(path, virtual_size=state.virtual_size, subformat=subformat, files=[file],
                         writable=writable, backing=backing, backing_reference=backing_reference,
                         outputs=outputs)
        self._state = state
        self._file = file
        self._headers = state.headers
        self._source = state.source
        self._bat = state.bat
        self._block_size = state.block_size
        self._lss = state.logical_sector_size
        self._has_parent = bool(flags & vs.HAS_PARENT)
        self._sectors_per_block = self._block_size // self._lss
        self._chunk_ratio = vs.SECTORS_PER_BITMAP_BLOCK * self._lss // self._block_size
        self._data_blocks = -(-state.virtual_size // self._block_size)
        self._regions = sorted(state.regions, key=lambda r: r.start)  # disjoint: checked when read
        self._region_ends = [r.end for r in self._regions]
        self._journaled = journaled
        self._modified = False
        self._dirty_bat: set[int] = set()
        self._bitmap_pages: dict[int, bytearray] = {}
        self._dirty_bitmaps: set[int] = set()
        self._log_sequence = 0
        self._run_patterns: dict[int, re.Pattern[bytes]] = {}
        self._file_size = file.size
        self._data_end = state.source.end
        self._alloc_end = align_up(max([self._file_size, *(r.end for r in self._regions)]), MIB)

    # ------------------------------------------------------------ probing

    @classmethod
    def probe(cls, sample: ProbeSample) -> int:
        """The file type identifier ``vhdxfile`` opens every VHDX file (§2.2.1)."""
        return 100 if sample.head[:8] == b"vhdxfile" else 0

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open an image (replaying its log), and its parent through *opener*."""
        file = ImageFile.open(Path(path), writable=writable)
        backing: DiskImage | None = None
        try:
            state = _load(Path(path), file, writable)
            reference = None
            if state.parameter_flags & vs.HAS_PARENT:
                backing, reference = _open_parent(Path(path), state.parent_locator, opener)
            image = cls(Path(path), state, writable=writable, journaled=True, backing=backing,
                        backing_reference=reference)
            if writable:
                image._check_blocks_for_writing()
        except BaseException:
            if backing is not None:
                backing.close()
            file.close()
            raise
        return image

    # ------------------------------------------------------------ creating

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """A new dynamic, fixed or (with a VHDX *backing*) differencing image."""
        parent: VhdxImage | None = None
        if backing is not None:
            if not isinstance(backing, VhdxImage):
                raise UnsupportedFeature(path, f"a differencing VHDX needs a VHDX parent, not {backing.format_name}",
                                         structure="VHDX parent locator")
            if options.subformat == "fixed":
                raise UnsupportedOption("a differencing VHDX cannot be fixed")
            parent = backing
        fixed = options.subformat == "fixed"
        lss = options.logical_sector_size or (parent._lss if parent else 512)
        block_size = options.block_size or (parent._block_size if parent else DEFAULT_BLOCK_SIZE)
        if lss not in (512, 4096):
            raise UsageError(f"{path}: logical_sector_size must be 512 or 4096, not {lss}")
        if not (vs.MIN_BLOCK_SIZE <= block_size <= vs.MAX_BLOCK_SIZE and is_power_of_two(block_size)):
            raise UsageError(f"{path}: block_size must be a power of two from 1 MiB to 256 MiB, not {block_size}")
        size = align_up(size, lss)
        if size > vs.MAX_VIRTUAL_SIZE:
            raise UsageError(f"{path}: {size} bytes exceeds the VHDX maximum of 64 TiB")
        chunk_ratio = vs.SECTORS_PER_BITMAP_BLOCK * lss // block_size
        data_blocks = -(-size // block_size)
        entries = _bat_entry_count(data_blocks, chunk_ratio, parent is not None)
        if entries > MAX_BAT_ENTRIES:
            raise UsageError(f"{path}: {entries} BAT entries are more than polyvisor keeps in memory; "
                             "choose a larger block_size")
        log_offset, metadata_offset, bat_offset = 1 * MIB, 2 * MIB, 3 * MIB
        bat_length = max(MIB, align_up(entries * 8, MIB))
        data_start = bat_offset + bat_length
        bat = array("Q", bytes(entries * 8))
        if fixed:
            for block in range(data_blocks):
                bat[block + block // chunk_ratio] = vs.bat_entry(vs.PAYLOAD_BLOCK_FULLY_PRESENT,
                                                                  data_start + block * block_size)
        flags = vs.LEAVE_BLOCKS_ALLOCATED if fixed else 0
        locator: dict[str, str] = {}
        reference = None
        if parent is not None:
            flags = vs.HAS_PARENT
            locator, reference = _parent_locator_for(Path(path), parent)
        outputs = OutputFiles()
        file = outputs.create(Path(path))
        try:
            header = vs.Header(b"head", 0, int.from_bytes(os.urandom(4), "little"), vs.new_guid(),
                               vs.new_guid(), vs.ZERO_GUID, 0, 1, DEFAULT_LOG_SIZE, log_offset)
            creator = f"polyvisor {__version__}"
            file.write(0, vs.FILE_IDENTIFIER.pack(vs.FileIdentifier(b"vhdxfile", creator.encode("utf-16-le"))))
            file.write(vs.HEADER_OFFSETS[0], _header_bytes(header))
            header = records.replace(header, sequence_number=header.sequence_number + 1)
            file.write(vs.HEADER_OFFSETS[1], _header_bytes(header))
            table = _region_table_bytes([(vs.BAT_REGION, bat_offset, bat_length),
                                         (vs.METADATA_REGION, metadata_offset, MIB)])
            for offset in vs.REGION_TABLE_OFFSETS:
                file.write(offset, table)
            virtual_disk_id = vs.new_guid()
            file.write(metadata_offset, _metadata_bytes(
                block_size=block_size, flags=flags, size=size, disk_id=virtual_disk_id, lss=lss, locator=locator))
            file.write(bat_offset, _bat_bytes(bat))
            file.truncate(data_start + (data_blocks * block_size if fixed else 0))
            state = _State(
                headers=_Headers(file, header, 1), source=_MetaSource(file), creator=creator,
                block_size=block_size, logical_sector_size=lss, physical_sector_size=4096, virtual_size=size,
                parameter_flags=flags, virtual_disk_id=virtual_disk_id, bat_offset=bat_offset,
                bat_length=bat_length, metadata_offset=metadata_offset, metadata_length=MIB,
                regions=_reserved_regions(log_offset=log_offset, log_length=DEFAULT_LOG_SIZE,
                                          bat_offset=bat_offset, bat_length=bat_length,
                                          metadata_offset=metadata_offset, metadata_length=MIB),
                bat=bat, parent_locator=locator,
            )
            return cls(Path(path), state, writable=True, journaled=False, backing=parent,
                       backing_reference=reference, outputs=outputs)
        except BaseException:
            outputs.abort()
            raise

    # ------------------------------------------------------------ the layer

    def _block_host(self, block: int, entry: int, length: int | None = None) -> int:
        """The file offset of a present block, validated against the file and the metadata."""
        host = vs.bat_offset(entry)
        if length is None:
            length = min(self._block_size, self.virtual_size - block * self._block_size)
        return self._checked_host(host, length, f"VHDX BAT entry for block {block}")

    def _checked_host(self, host: int, length: int, what: str) -> int:
        if host < vs.HEADER_SECTION_SIZE:
            raise CorruptImage(self.path, f"points into the header section (offset {host})", structure=what,
                               offset=host)
        index = bisect.bisect_right(self._region_ends, host)  # the first region ending after host
        if index < len(self._regions) and self._regions[index].start < host + length:
            raise CorruptImage(self.path, f"block at {host} overlaps the {self._regions[index].name}",
                               structure=what, offset=host)
        if host + length > self._data_end:
            raise _truncated(self._file, what, host, length)
        return host

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[ExtentKind, int, int, int]]:
        """``(kind, guest offset, length, host offset)`` per block or sector bitmap run."""
        bs, ratio = self._block_size, self._chunk_ratio
        bat = self._bat
        pos = offset
        while pos < end:
            block = pos // bs
            in_block = pos - block * bs
            n = min(bs - in_block, end - pos)
            entry = bat[block + block // ratio]
            state = entry & vs.BAT_STATE_MASK
            if state == vs.PAYLOAD_BLOCK_FULLY_PRESENT:
                yield ExtentKind.DATA, pos, n, self._block_host(block, entry) + in_block
            elif state == vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                yield from self._partial_pieces(block, entry, pos, n)
            elif state == vs.PAYLOAD_BLOCK_NOT_PRESENT or state in _ZERO_READ_STATES:
                # One piece for the whole stretch of identical entries: terabyte holes cost one scan.
                stop = min(end, self._blocks_before(self._same_entries_end(block + block // ratio, entry)) * bs)
                n = max(n, stop - pos)
                yield (ExtentKind.UNALLOCATED if state == vs.PAYLOAD_BLOCK_NOT_PRESENT else ExtentKind.ZERO), pos, n, 0
            else:
                raise CorruptImage(self.path, f"block {block} has the reserved state {state}",
                                   structure="VHDX BAT", offset=self._state.bat_offset + 8 * (block + block // ratio))
            pos += n

    def _same_entries_end(self, index: int, entry: int) -> int:
        """The index past the run of BAT entries equal to *entry* from *index* on (a C-speed scan)."""
        pattern = self._run_patterns.get(entry)
        if pattern is None:
            pattern = re.compile(b"(?:" + re.escape(array("Q", [entry]).tobytes()) + b")*")
            if len(self._run_patterns) < 64:
                self._run_patterns[entry] = pattern
        match = pattern.match(memoryview(self._bat).cast("B"), index * 8)
        return index + (match.end() - index * 8) // 8 if match else index + 1

    def _blocks_before(self, index: int) -> int:
        """How many payload blocks have BAT entries before *index* (sector bitmap entries interleave)."""
        return index - index // (self._chunk_ratio + 1)

    def _partial_pieces(self, block: int, entry: int, pos: int, n: int) -> Iterator[tuple[ExtentKind, int, int, int]]:
        """Runs of a PARTIALLY_PRESENT block: set sector bitmap bits here, clear ones in the parent (§2.4)."""
        if not self._has_parent:
            raise CorruptImage(self.path, f"block {block} is partially present in an image without a parent",
                               structure="VHDX BAT")
        host = self._block_host(block, entry)
        block_start = block * self._block_size
        lss = self._lss
        first = (pos - block_start) // lss
        last = -(-(pos + n - block_start) // lss)
        bitmap, offset = self._bitmap_bytes(block, first, last)
        for present, run_first, run_length in _bit_runs(bitmap, offset, last - first):
            start = max(pos, block_start + (first + run_first) * lss)
            stop = min(pos + n, block_start + (first + run_first + run_length) * lss)
            if present:
                yield ExtentKind.DATA, start, stop - start, host + start - block_start
            else:
                yield ExtentKind.UNALLOCATED, start, stop - start, 0

    def _bitmap_host(self, block: int) -> int | None:
        """File offset of the sector bitmap block covering *block*'s chunk, None if not present."""
        chunk = block // self._chunk_ratio
        index = (chunk + 1) * self._chunk_ratio + chunk
        entry = self._bat[index]
        state = entry & vs.BAT_STATE_MASK
        if state == vs.SB_BLOCK_NOT_PRESENT:
            return None
        if state != vs.SB_BLOCK_PRESENT:
            raise CorruptImage(self.path, f"sector bitmap entry has the reserved state {state}",
                               structure="VHDX BAT", offset=self._state.bat_offset + 8 * index)
        return self._checked_host(vs.bat_offset(entry), vs.SECTOR_BITMAP_BLOCK_SIZE,
                                  f"VHDX sector bitmap block of chunk {chunk}")

    def _bitmap_bytes(self, block: int, first: int, last: int) -> tuple[bytes, int]:
        """The sector bitmap bytes covering sectors ``[first, last)`` of *block*, and the bit of sector *first*."""
        host = self._bitmap_host(block)
        if host is None:
            raise CorruptImage(self.path, f"block {block} is partially present but its sector bitmap block "
                                          "is not", structure="VHDX BAT")
        base = (block % self._chunk_ratio) * self._sectors_per_block
        lo, hi = (base + first) // 8, -(-(base + last) // 8)
        raw = bytearray(self._source.read(host + lo, hi - lo, "VHDX sector bitmap"))
        page = (host + lo) - (host + lo) % vs.LOG_SECTOR
        while page < host + hi:
            cached = self._bitmap_pages.get(page)
            if cached is not None:
                a, b = max(page, host + lo), min(page + vs.LOG_SECTOR, host + hi)
                raw[a - host - lo : b - host - lo] = cached[a - page : b - page]
            page += vs.LOG_SECTOR
        return bytes(raw), base + first - lo * 8

    def _map(self, offset: int, length: int) -> Iterator[Run]:
        pending: list[Any] | None = None  # [kind, guest, length, host]
        for kind, guest, n, host in self._pieces(offset, offset + length):
            if pending is not None and pending[0] is kind and (
                kind is not ExtentKind.DATA or pending[3] + pending[2] == host
            ):
                pending[2] += n
                continue
            if pending is not None:
                yield from self._runs(*pending)
            pending = [kind, guest, n, host]
        if pending is not None:
            yield from self._runs(*pending)

    def _runs(self, kind: ExtentKind, guest: int, length: int, host: int) -> Iterator[Run]:
        """Runs for one coalesced piece: data is split by the log replay overlay and by file holes."""
        if kind is not ExtentKind.DATA:
            yield Run(guest, length, kind)
            return
        for start, end, source in self._source.split(host, host + length):
            at = guest + start - host
            if source is None:
                yield Run(at, end - start, ExtentKind.ZERO)
            elif isinstance(source, bytes):
                yield Run(at, end - start, ExtentKind.DATA, decode=_constant(source), unit_offset=at)
            else:
                yield file_run(self._file, start, end - start, at)

    # ------------------------------------------------------------ writing

    def _check_blocks_for_writing(self) -> None:
        """Refuse to write into an image whose present blocks point outside the file or into metadata,
        and allocate new blocks past the end of every present one (a last block may be cut short)."""
        ratio = self._chunk_ratio
        end = self._alloc_end
        for index, entry in enumerate(self._bat):
            state = entry & vs.BAT_STATE_MASK
            if index % (ratio + 1) == ratio:
                if state == vs.SB_BLOCK_PRESENT:
                    host = self._checked_host(vs.bat_offset(entry), vs.SECTOR_BITMAP_BLOCK_SIZE,
                                              "VHDX sector bitmap entry")
                    end = max(end, host + vs.SECTOR_BITMAP_BLOCK_SIZE)
            elif state in _PRESENT_STATES:
                block = index - index // (ratio + 1)
                if block >= self._data_blocks:
                    raise CorruptImage(self.path, f"entry {index} is in use past the end of the disk",
                                       structure="VHDX BAT", offset=self._state.bat_offset + 8 * index)
                end = max(end, self._block_host(block, entry) + self._block_size)
        self._alloc_end = align_up(end, MIB)

    def _begin_modification(self) -> None:
        """Before the first change to a reopened file: new FileWriteGuid and DataWriteGuid (§2.2.2)."""
        if self._modified:
            return
        self._modified = True
        if self._journaled:
            self._headers.update(file_write_guid=vs.new_guid(), data_write_guid=vs.new_guid(),
                                 log_guid=vs.ZERO_GUID)
            self._headers.update()

    def _allocate(self, length: int) -> int:
        """A new, zero-filled, 1 MiB aligned stretch at the end of the file (§2.5)."""
        host = align_up(self._alloc_end, MIB)
        if host + length > MAX_FILE_OFFSET:
            raise LimitExceeded(self.path, "the file would grow past polyvisor's limit", structure="VHDX BAT")
        self._alloc_end = host + length
        if self._alloc_end > self._file_size:
            self._file.truncate(self._alloc_end)
            self._file_size = self._alloc_end
            self._data_end = max(self._data_end, self._alloc_end)
        return host

    def _set_entry(self, index: int, entry: int) -> None:
        self._bat[index] = entry
        self._dirty_bat.add(index // _BAT_PAGE_ENTRIES)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest bytes, allocating blocks at the end of the file as needed."""
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        if not view:
            return
        self._begin_modification()
        if self._has_parent:
            offset, view = self._sector_aligned(offset, view)
        self._write_blocks(offset, view)
        if len(self._bitmap_pages) > MAX_CACHED_BITMAP_PAGES:
            self._commit_metadata()

    def _sector_aligned(self, offset: int, view: memoryview) -> tuple[int, memoryview]:
        """Widen a write to whole logical sectors, the unit of the sector bitmap, with the current content."""
        lss = self._lss
        start = offset - offset % lss
        stop = align_up(offset + len(view), lss)
        if start == offset and stop == offset + len(view):
            return offset, view
        buf = bytearray(stop - start)
        if start != offset:
            buf[:lss] = self.read(start, lss)
        if stop != offset + len(view) and (stop - lss > start or start == offset):
            buf[-lss:] = self.read(stop - lss, lss)
        buf[offset - start : offset - start + len(view)] = view
        return start, memoryview(buf)

    def _write_blocks(self, offset: int, view: memoryview) -> None:
        """Write block by block, joining physically contiguous pieces into one pwrite."""
        bs = self._block_size
        pos, end = offset, offset + len(view)
        pending: tuple[int, int, int] | None = None  # host, source offset, length
        while pos < end:
            block = pos // bs
            in_block = pos - block * bs
            n = min(bs - in_block, end - pos)
            target = self._writable_block(block, in_block, n) + in_block
            if pending is not None and pending[0] + pending[2] == target:
                pending = (pending[0], pending[1], pending[2] + n)
            else:
                if pending is not None:
                    self._file.write(pending[0], view[pending[1] : pending[1] + pending[2]])
                pending = (target, pos - offset, n)
            pos += n
        if pending is not None:
            self._file.write(pending[0], view[pending[1] : pending[1] + pending[2]])

    def _writable_block(self, block: int, in_block: int, n: int) -> int:
        """The host offset of *block*, allocated if needed; marks written sectors in a partial block."""
        index = block + block // self._chunk_ratio
        entry = self._bat[index]
        state = entry & vs.BAT_STATE_MASK
        if state == vs.PAYLOAD_BLOCK_FULLY_PRESENT:
            return self._block_host(block, entry)
        if state == vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            if not self._has_parent:
                raise CorruptImage(self.path, f"block {block} is partially present in an image without a parent",
                                   structure="VHDX BAT")
            host = self._block_host(block, entry)
            self._set_bits(block, in_block, n)
            return host
        if state != vs.PAYLOAD_BLOCK_NOT_PRESENT and state not in _ZERO_READ_STATES:
            raise CorruptImage(self.path, f"block {block} has the reserved state {state}", structure="VHDX BAT")
        whole = in_block == 0 and n == min(self._block_size, self.virtual_size - block * self._block_size)
        host = self._allocate(self._block_size)
        if self._has_parent and state == vs.PAYLOAD_BLOCK_NOT_PRESENT and not whole:
            self._set_entry(index, vs.bat_entry(vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT, host))
            self._set_bits(block, in_block, n)
        else:
            self._set_entry(index, vs.bat_entry(vs.PAYLOAD_BLOCK_FULLY_PRESENT, host))
        return host

    def _set_bits(self, block: int, in_block: int, n: int) -> None:
        """Mark the (whole) sectors ``[in_block, in_block + n)`` of *block* as present in this file."""
        host = self._bitmap_host(block)
        if host is None:
            host = self._allocate(vs.SECTOR_BITMAP_BLOCK_SIZE)
            chunk = block // self._chunk_ratio
            self._set_entry((chunk + 1) * self._chunk_ratio + chunk, vs.bat_entry(vs.SB_BLOCK_PRESENT, host))
        base = (block % self._chunk_ratio) * self._sectors_per_block
        first = base + in_block // self._lss
        end = base + (in_block + n) // self._lss
        page_bits = vs.LOG_SECTOR * 8
        while first < end:
            page_index = first // page_bits
            page_offset = host + page_index * vs.LOG_SECTOR
            page = self._bitmap_pages.get(page_offset)
            if page is None:
                page = bytearray(self._source.read(page_offset, vs.LOG_SECTOR, "VHDX sector bitmap"))
                self._bitmap_pages[page_offset] = page
            stop = min(end, (page_index + 1) * page_bits)
            _set_bit_range(page, first - page_index * page_bits, stop - page_index * page_bits)
            self._dirty_bitmaps.add(page_offset)
            first = stop

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros: whole unallocated blocks become ZERO blocks (§2.5.1.1)."""
        self._check_write(offset, length)
        if not length:
            return
        self._begin_modification()
        bs = self._block_size
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            in_block = pos - block * bs
            n = min(bs - in_block, end - pos)
            index = block + block // self._chunk_ratio
            state = self._bat[index] & vs.BAT_STATE_MASK
            whole = in_block == 0 and n == min(bs, self.virtual_size - block * bs)
            if state in _PRESENT_STATES or (self._has_parent and state == vs.PAYLOAD_BLOCK_NOT_PRESENT
                                            and not whole):
                for at in range(pos, pos + n, MIB):
                    self.write(at, _ZERO_CHUNK[: min(MIB, pos + n - at)])
            elif whole and state != vs.PAYLOAD_BLOCK_ZERO:
                self._set_entry(index, vs.bat_entry(vs.PAYLOAD_BLOCK_ZERO))
            pos += n

    # ------------------------------------------------------------ metadata commit

    def _dirty_pages(self) -> list[tuple[int, bytes]]:
        """The changed 4 KiB pages of the BAT and the sector bitmaps, as ``(file offset, bytes)``."""
        pages: list[tuple[int, bytes]] = []
        for page in sorted(self._dirty_bat):
            data = _bat_bytes(self._bat[page * _BAT_PAGE_ENTRIES : (page + 1) * _BAT_PAGE_ENTRIES])
            offset = self._state.bat_offset + page * vs.LOG_SECTOR
            if len(data) < vs.LOG_SECTOR:
                rest = self._file.read_upto(offset + len(data), vs.LOG_SECTOR - len(data))
                data += rest + bytes(vs.LOG_SECTOR - len(data) - len(rest))
            pages.append((offset, data))
        pages.extend((offset, bytes(self._bitmap_pages[offset])) for offset in sorted(self._dirty_bitmaps))
        return pages

    def _commit_metadata(self) -> None:
        """Write the changed BAT and sector bitmap pages: through the log for a reopened image."""
        pages = self._dirty_pages()
        if pages:
            log_length = self._headers.current.log_length
            if self._journaled and log_length >= 2 * vs.LOG_SECTOR:
                self._journal(pages, log_length)
            else:
                for offset, data in pages:
                    self._file.write(offset, data)
        self._dirty_bat.clear()
        self._dirty_bitmaps.clear()
        self._bitmap_pages.clear()

    def _journal(self, pages: list[tuple[int, bytes]], log_length: int) -> None:
        """Log, flush, apply and retire *pages*, one log entry per batch that fits the log (§2.3)."""
        capacity = log_length // vs.LOG_SECTOR
        per_entry = capacity
        while per_entry + vs.descriptor_sectors(per_entry) > capacity:
            per_entry -= 1
        log_offset = self._headers.current.log_offset
        self._file.flush()
        for first in range(0, len(pages), per_entry):
            batch = pages[first : first + per_entry]
            log_guid = vs.new_guid()
            self._headers.update(log_guid=log_guid)
            self._log_sequence += 1
            entry = vs.build_log_entry(self._log_sequence, log_guid, batch, tail=0, file_size=self._file_size)
            self._file.write(log_offset, entry)
            self._file.flush()
            for offset, data in batch:
                self._file.write(offset, data)
            self._file.flush()
            self._headers.update(log_guid=vs.ZERO_GUID)

    def _finish(self) -> None:
        self._commit_metadata()

    def flush(self) -> None:
        """Commit changed metadata, then push everything to stable storage."""
        if self.writable and not self.closed:
            self._commit_metadata()
        super().flush()

    # ------------------------------------------------------------ description

    def _details(self) -> dict[str, Any]:
        state = self._state
        header = self._headers.current
        return {
            "block_size": self._block_size,
            "logical_sector_size": self._lss,
            "physical_sector_size": state.physical_sector_size,
            "has_parent": self._has_parent,
            "leave_blocks_allocated": bool(state.parameter_flags & vs.LEAVE_BLOCKS_ALLOCATED),
            "parent_locator": dict(state.parent_locator),
            "log": state.log_state,
            "header_sequence_number": header.sequence_number,
            "data_write_guid": vs.guid_text(header.data_write_guid),
            "file_write_guid": vs.guid_text(header.file_write_guid),
            "virtual_disk_id": vs.guid_text(state.virtual_disk_id),
            "creator": state.creator,
        }

    # ------------------------------------------------------------ checking

    def check(self) -> CheckResult:
        """Headers, region tables, metadata, log and every BAT entry; leaks in dynamic images."""
        result = self._new_check_result()
        for problem in self._state.problems:
            result.corruption(problem.structure, problem.message, problem.offset)
        if self._state.log_state.startswith("replayed in memory"):
            result.corruption("VHDX log", f"{self._state.log_state}: open the image writable to replay it",
                              self._headers.current.log_offset)
        _BatChecker(self, result).run()
        return result


class _BatChecker:
    """Every BAT entry against the spec (§2.5.1) and the file; overlaps and leaks via a map of used MiBs."""

    def __init__(self, image: VhdxImage, result: CheckResult) -> None:
        self.image = image
        self.result = result
        self.file_size = image._file.size
        units = -(-self.file_size // MIB)
        self.used: bytearray | None = bytearray(units) if units <= MAX_CHECK_UNITS else None
        self.end = 0

    def mark(self, start: int, length: int, marker: int, what: str, at: int) -> None:
        """Record a used stretch; report what it overlaps."""
        self.end = max(self.end, start + length)
        if self.used is None:
            return
        a, b = start // MIB, min(len(self.used), -(-(start + length) // MIB))
        if a >= b:
            return
        taken = max(self.used[a:b])
        if taken == 1:
            self.result.corruption("VHDX BAT", f"{what} at {start} overlaps the header section, log or a region", at)
        elif taken == 2:
            self.result.corruption("VHDX BAT", f"{what} at {start} overlaps another block", at)
        self.used[a:b] = bytes([marker]) * (b - a)

    def present(self, host: int, needed: int, size: int, what: str, at: int) -> None:
        """A present block of *size* bytes whose first *needed* bytes hold guest data."""
        if host < vs.HEADER_SECTION_SIZE:
            self.result.corruption("VHDX BAT", f"{what} points into the header section ({host})", at)
            return
        if host + needed > self.file_size:
            self.result.corruption("VHDX BAT", f"{what} at {host} extends past the end of the file "
                                               f"({self.file_size})", at)
        # qemu once wrote last blocks cut short at the end of the file: only the guest part must exist.
        self.mark(host, max(needed, min(size, self.file_size - host)), 2, what, at)

    def run(self) -> None:
        image, result = self.image, self.result
        for region in image._regions:
            self.mark(region.start, region.end - region.start, 1, region.name, region.start)
        ratio, bs = image._chunk_ratio, image._block_size
        bat_offset = image._state.bat_offset
        first_block: int | None = None
        allocated = 0
        partial_chunks: set[int] = set()
        bitmap_chunks: set[int] = set()
        for index, entry in enumerate(image._bat):
            at = bat_offset + 8 * index
            state = entry & vs.BAT_STATE_MASK
            host = vs.bat_offset(entry)
            if entry & vs.BAT_RESERVED_MASK:
                result.corruption("VHDX BAT", f"entry {index} has reserved bits set", at)
            if index % (ratio + 1) == ratio:
                chunk = index // (ratio + 1)
                if state == vs.SB_BLOCK_PRESENT:
                    if not image._has_parent:
                        result.corruption("VHDX BAT", f"sector bitmap block of chunk {chunk} present in an "
                                                      "image without a parent", at)
                    bitmap_chunks.add(chunk)
                    self.present(host, vs.SECTOR_BITMAP_BLOCK_SIZE, vs.SECTOR_BITMAP_BLOCK_SIZE,
                                 f"sector bitmap block of chunk {chunk}", at)
                elif state != vs.SB_BLOCK_NOT_PRESENT:
                    result.corruption("VHDX BAT", f"sector bitmap entry {index} has the reserved state {state}", at)
                elif host:
                    result.corruption("VHDX BAT", f"absent sector bitmap entry {index} carries a file offset", at)
                continue
            block = index - index // (ratio + 1)
            if state in _PRESENT_STATES:
                if block >= image._data_blocks:
                    result.corruption("VHDX BAT", f"entry {index} is in use past the end of the disk", at)
                    continue
                if state == vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    if not image._has_parent:
                        result.corruption("VHDX BAT", f"block {block} is partially present in an image "
                                                      "without a parent", at)
                    partial_chunks.add(block // ratio)
                allocated += 1
                first_block = host if first_block is None else min(first_block, host)
                self.present(host, min(bs, image.virtual_size - block * bs), bs, f"block {block}", at)
            elif state in (vs.PAYLOAD_BLOCK_NOT_PRESENT, vs.PAYLOAD_BLOCK_ZERO):
                if host:
                    result.corruption("VHDX BAT", f"block {block} in a zero state carries a file offset", at)
            elif state not in _ZERO_READ_STATES:
                result.corruption("VHDX BAT", f"block {block} has the reserved state {state}", at)
        for chunk in sorted(partial_chunks - bitmap_chunks):
            result.corruption("VHDX BAT", f"chunk {chunk} has partially present blocks but no sector bitmap block",
                              bat_offset + 8 * ((chunk + 1) * ratio + chunk))
        result.allocated_units = allocated
        result.total_units = image._data_blocks
        result.image_end_offset = max(self.end, vs.HEADER_SECTION_SIZE)
        if first_block is not None and image.subformat != "fixed":
            self.leaks(first_block)

    def leaks(self, first_block: int) -> None:
        """Unreferenced MiBs between the first payload block and the end of the file."""
        if self.used is None:
            return
        unit = self.used.find(0, first_block // MIB)
        while unit >= 0:
            found = _NOT_ZERO.search(self.used, unit)
            stop = found.start() if found else len(self.used)
            self.result.leak("VHDX file", f"{stop - unit} MiB at {unit * MIB} are not used by any block", unit * MIB)
            unit = self.used.find(0, stop)


# ------------------------------------------------------------------ parsing


def _load(path: Path, file: ImageFile, writable: bool) -> _State:
    """Parse everything up to the BAT, replaying the log first (§2.3.3)."""
    problems: list[_Problem] = []
    ident = file.read_upto(0, vs.FILE_IDENTIFIER.size)
    if ident[:8] != b"vhdxfile":
        raise CorruptImage(path, "no 'vhdxfile' file type identifier", structure="VHDX file type identifier",
                           offset=0)
    creator = ident[8:].decode("utf-16-le", errors="replace").split("\0", 1)[0]
    headers = _read_headers(path, file, problems)
    header = headers.current
    if header.log_version != 0:
        raise UnsupportedFeature(path, f"log version {header.log_version} (only 0 is defined)",
                                 structure="VHDX header")
    if header.log_offset % MIB or header.log_offset < vs.HEADER_SECTION_SIZE or header.log_length % MIB \
            or header.log_offset + header.log_length > MAX_FILE_OFFSET:
        raise CorruptImage(path, f"log at {header.log_offset} of {header.log_length} bytes is not 1 MiB aligned "
                                 "after the header section", structure="VHDX header")
    source, log_state = _replay_log(path, file, headers, writable)
    bat_region, metadata_region, regions = _read_region_table(path, source, header, problems)
    metadata_offset, metadata_length = metadata_region.file_offset, metadata_region.length
    items = _read_metadata(path, source, metadata_offset, metadata_length, problems)
    parameters = vs.FILE_PARAMETERS_ITEM.unpack(_item(path, items, vs.FILE_PARAMETERS, 8, "file parameters"))
    block_size = parameters.block_size
    if not (vs.MIN_BLOCK_SIZE <= block_size <= vs.MAX_BLOCK_SIZE and is_power_of_two(block_size)):
        raise CorruptImage(path, f"block size {block_size} is not a power of two from 1 MiB to 256 MiB",
                           structure="VHDX file parameters")
    if parameters.flags & ~(vs.LEAVE_BLOCKS_ALLOCATED | vs.HAS_PARENT):
        problems.append(_Problem("VHDX file parameters", f"reserved flag bits set ({parameters.flags:#x})"))
    lss = int.from_bytes(_item(path, items, vs.LOGICAL_SECTOR_SIZE, 4, "logical sector size")[:4], "little")
    pss = int.from_bytes(_item(path, items, vs.PHYSICAL_SECTOR_SIZE, 4, "physical sector size")[:4], "little")
    size = int.from_bytes(_item(path, items, vs.VIRTUAL_DISK_SIZE, 8, "virtual disk size")[:8], "little")
    disk_id = _item(path, items, vs.VIRTUAL_DISK_ID, 16, "page 83 data")[:16]
    if lss not in (512, 4096):
        raise CorruptImage(path, f"logical sector size {lss} is neither 512 nor 4096",
                           structure="VHDX logical sector size")
    if pss not in (512, 4096):
        raise CorruptImage(path, f"physical sector size {pss} is neither 512 nor 4096",
                           structure="VHDX physical sector size")
    if size > vs.MAX_VIRTUAL_SIZE:
        raise LimitExceeded(path, f"virtual size {size} exceeds the VHDX maximum of 64 TiB",
                            structure="VHDX virtual disk size")
    if size % lss:
        raise CorruptImage(path, f"virtual size {size} is not a multiple of the {lss}-byte logical sector",
                           structure="VHDX virtual disk size")
    has_parent = bool(parameters.flags & vs.HAS_PARENT)
    locator: dict[str, str] = {}
    if has_parent:
        locator = _parse_parent_locator(path, _item(path, items, vs.PARENT_LOCATOR, 20, "parent locator"))
    chunk_ratio = vs.SECTORS_PER_BITMAP_BLOCK * lss // block_size
    count = _bat_entry_count(-(-size // block_size), chunk_ratio, has_parent)
    if count > MAX_BAT_ENTRIES:
        raise LimitExceeded(path, f"{count} BAT entries are more than polyvisor keeps in memory "
                                  f"({MAX_BAT_ENTRIES})", structure="VHDX BAT")
    if count * 8 > bat_region.length:
        raise CorruptImage(path, f"BAT region of {bat_region.length} bytes cannot hold {count} entries",
                           structure="VHDX region table")
    bat: array[int] = array("Q")
    for pos in range(0, count * 8, 16 * MIB):
        bat.frombytes(source.read(bat_region.file_offset + pos, min(16 * MIB, count * 8 - pos), "VHDX BAT"))
    if sys.byteorder == "big":
        bat.byteswap()
    return _State(
        headers=headers, source=source, creator=creator, block_size=block_size, logical_sector_size=lss,
        physical_sector_size=pss, virtual_size=size, parameter_flags=parameters.flags, virtual_disk_id=disk_id,
        bat_offset=bat_region.file_offset, bat_length=bat_region.length, metadata_offset=metadata_offset,
        metadata_length=metadata_length, regions=regions, bat=bat, parent_locator=locator,
        log_state=log_state, problems=problems,
    )


def _read_headers(path: Path, file: ImageFile, problems: list[_Problem]) -> _Headers:
    """The current header: the valid one with the higher sequence number (§2.2.2)."""
    valid: list[vs.Header | None] = []
    reasons: list[str] = []
    for offset in vs.HEADER_OFFSETS:
        raw = file.read_upto(offset, vs.HEADER_SIZE)
        reason = ""
        header = vs.HEADER.unpack(raw) if len(raw) == vs.HEADER_SIZE else None
        if header is None:
            reason = "truncated"
        elif header.signature != b"head":
            reason = "no 'head' signature"
        elif not vs.checksum_ok(raw):
            reason = "bad checksum"
        elif header.version != 1:
            reason = f"version {header.version}"
        valid.append(None if reason else header)
        reasons.append(reason)
    usable = [(header, index) for index, header in enumerate(valid) if header is not None]
    if not usable:
        message = f"no valid header (64 KiB: {reasons[0]}; 128 KiB: {reasons[1]})"
        if "bad checksum" in reasons:
            raise ChecksumMismatch(path, message, structure="VHDX header", offset=vs.HEADER_OFFSETS[0])
        if reasons == ["truncated", "truncated"]:
            raise _truncated(file, "VHDX header", vs.HEADER_OFFSETS[0], vs.HEADER_SIZE)
        raise CorruptImage(path, message, structure="VHDX header", offset=vs.HEADER_OFFSETS[0])
    for index, reason in enumerate(reasons):
        if reason:
            problems.append(_Problem("VHDX header", f"invalid copy: {reason}", vs.HEADER_OFFSETS[index]))
    if len(usable) == 2 and usable[0][0].sequence_number == usable[1][0].sequence_number:
        if usable[0][0] != usable[1][0]:
            raise CorruptImage(path, "both headers have the same sequence number but differ",
                               structure="VHDX header", offset=vs.HEADER_OFFSETS[0])
        return _Headers(file, usable[0][0], 0)
    header, index = max(usable, key=lambda pair: pair[0].sequence_number)
    return _Headers(file, header, index)


def _replay_log(path: Path, file: ImageFile, headers: _Headers, writable: bool) -> tuple[_MetaSource, str]:
    """Find the active log sequence and replay it: on disk if *writable*, else in memory (§2.3.3)."""
    header = headers.current
    if header.log_guid == vs.ZERO_GUID or header.log_length == 0:
        return _MetaSource(file), "clean"
    if header.log_length > MAX_LOG_REPLAY:
        raise LimitExceeded(path, f"log of {header.log_length} bytes is larger than polyvisor replays "
                                  f"({MAX_LOG_REPLAY})", structure="VHDX log", offset=header.log_offset)
    log = file.read(header.log_offset, header.log_length, "VHDX log")
    entries = vs.find_active_sequence(log, header.log_guid)
    if not entries:
        damaged = vs.count_entry_headers(log, header.log_guid)
        if damaged:
            # Entries of the current log exist but none forms a valid sequence: the metadata they were
            # meant to update may be stale, so the image cannot be trusted (a log never written has none).
            raise CorruptImage(path, f"the log holds {damaged} entries of the current log GUID but no valid "
                               "sequence (bad checksums or a broken chain); cannot replay it",
                               structure="VHDX log", offset=header.log_offset)
        return _MetaSource(file), "LogGuid set but the log holds no valid sequence (nothing to replay)"
    head = entries[-1].header
    size = file.size
    if head.flushed_file_offset > size:
        raise _truncated(file, "VHDX log", size, head.flushed_file_offset - size)
    if head.last_file_offset > MAX_FILE_OFFSET:
        raise CorruptImage(path, f"log entry's LastFileOffset {head.last_file_offset} is absurd",
                           structure="VHDX log entry", offset=header.log_offset + entries[-1].position)
    limit = max(size, head.last_file_offset)
    pieces = vs.resolve_replay(entries)
    log_range = (header.log_offset, header.log_offset + header.log_length)
    for start, end, _ in pieces:
        if start < LOG_FORBIDDEN_END:
            raise CorruptImage(path, f"log descriptor writes into the file header at {start}",
                               structure="VHDX log descriptor", offset=header.log_offset)
        if start < log_range[1] and end > log_range[0]:
            raise CorruptImage(path, f"log descriptor writes into the log itself at {start}",
                               structure="VHDX log descriptor", offset=header.log_offset)
        if end > limit:
            raise CorruptImage(path, f"log descriptor writes {start}..{end}, past the end of the file ({limit})",
                               structure="VHDX log descriptor", offset=header.log_offset)
    noun = "entry" if len(entries) == 1 else "entries"
    sequence = f"{len(entries)} log {noun}, sequence {entries[0].header.sequence_number}..{head.sequence_number}"
    if not writable:
        return _MetaSource(file, pieces, limit), f"replayed in memory ({sequence}); the file is unchanged"
    headers.update(file_write_guid=vs.new_guid())
    for start, end, data in pieces:
        if data is not None:
            file.write(start, data)
        else:
            _zero_file_range(file, start, min(end, size))
    if size < head.last_file_offset:
        try:
            file.truncate(align_up(head.last_file_offset, MIB))
        except OSError as exc:
            raise OperationFailed(f"{path}: cannot extend the file to {head.last_file_offset} bytes while "
                                  f"replaying its log: {exc.strerror}") from exc
    file.flush()
    headers.update(log_guid=vs.ZERO_GUID)
    headers.update()
    return _MetaSource(file), f"replayed on open ({sequence})"


def _zero_file_range(file: ImageFile, start: int, end: int) -> None:
    """Write zeros over the data of ``[start, end)``; holes of a sparse file already read as zeros."""
    pos = start
    while pos < end:
        data = file.seek_data(pos)
        if data is None or data >= end:
            return
        hole = min(file.seek_hole(data), end)
        if hole <= data:
            hole = end
        for at in range(data, hole, MIB):
            file.write(at, _ZERO_CHUNK[: min(MIB, hole - at)])
        pos = hole


def _reserved_regions(*, log_offset: int, log_length: int, bat_offset: int, bat_length: int,
                      metadata_offset: int, metadata_length: int) -> list[_Region]:
    regions = [_Region(0, vs.HEADER_SECTION_SIZE, "header section"),
               _Region(bat_offset, bat_offset + bat_length, "BAT region"),
               _Region(metadata_offset, metadata_offset + metadata_length, "metadata region")]
    if log_length:
        regions.append(_Region(log_offset, log_offset + log_length, "log"))
    return regions


def _read_region_table(path: Path, source: _MetaSource, header: vs.Header, problems: list[_Problem],
                       ) -> tuple[vs.RegionTableEntry, vs.RegionTableEntry, list[_Region]]:
    """The BAT and metadata regions, and every region for overlap checks (§2.2.3)."""
    tables: list[bytes | None] = []
    reasons: list[str] = []
    for offset in vs.REGION_TABLE_OFFSETS:
        try:
            raw = source.read(offset, vs.REGION_TABLE_SIZE, "VHDX region table")
        except CorruptImage:
            tables.append(None)
            reasons.append("truncated")
            continue
        reason = ""
        if raw[:4] != b"regi":
            reason = "no 'regi' signature"
        elif not vs.checksum_ok(raw):
            reason = "bad checksum"
        tables.append(None if reason else raw)
        reasons.append(reason)
    chosen = tables[0] if tables[0] is not None else tables[1]
    if chosen is None:
        message = f"no valid region table (192 KiB: {reasons[0]}; 256 KiB: {reasons[1]})"
        if "bad checksum" in reasons:
            raise ChecksumMismatch(path, message, structure="VHDX region table", offset=vs.REGION_TABLE_OFFSETS[0])
        raise CorruptImage(path, message, structure="VHDX region table", offset=vs.REGION_TABLE_OFFSETS[0])
    for index, reason in enumerate(reasons):
        if reason:
            problems.append(_Problem("VHDX region table", f"invalid copy: {reason}", vs.REGION_TABLE_OFFSETS[index]))
    if tables[0] is not None and tables[1] is not None and tables[0] != tables[1]:
        problems.append(_Problem("VHDX region table", "the two copies differ", vs.REGION_TABLE_OFFSETS[1]))
    table_offset = vs.REGION_TABLE_OFFSETS[0] if tables[0] is not None else vs.REGION_TABLE_OFFSETS[1]
    table_header = vs.REGION_TABLE_HEADER.unpack(chosen)
    if table_header.entry_count > vs.MAX_REGION_ENTRIES:
        raise CorruptImage(path, f"{table_header.entry_count} entries (at most {vs.MAX_REGION_ENTRIES})",
                           structure="VHDX region table", offset=table_offset)
    found: dict[bytes, vs.RegionTableEntry] = {}
    spans: list[_Region] = [_Region(0, vs.HEADER_SECTION_SIZE, "header section")]
    if header.log_length:
        spans.append(_Region(header.log_offset, header.log_offset + header.log_length, "log"))
    for index in range(table_header.entry_count):
        at = vs.REGION_TABLE_HEADER.size + index * vs.REGION_TABLE_ENTRY.size
        entry = vs.REGION_TABLE_ENTRY.unpack(chosen, at)
        name = {vs.BAT_REGION: "BAT region", vs.METADATA_REGION: "metadata region"}.get(
            entry.guid, f"region {vs.guid_text(entry.guid)}")
        if entry.file_offset % MIB or entry.file_offset < vs.HEADER_SECTION_SIZE or entry.length == 0 \
                or entry.length % MIB or entry.file_offset + entry.length > MAX_FILE_OFFSET:
            raise CorruptImage(path, f"{name} at {entry.file_offset} of {entry.length} bytes is not a 1 MiB "
                                     "aligned stretch after the header section",
                               structure="VHDX region table entry", offset=table_offset + at)
        if entry.guid in (vs.BAT_REGION, vs.METADATA_REGION):
            if entry.guid in found:
                raise CorruptImage(path, f"{name} listed twice", structure="VHDX region table entry",
                                   offset=table_offset + at)
            found[entry.guid] = entry
        elif entry.flags & vs.REGION_REQUIRED:
            raise UnsupportedFeature(path, f"required {name} is unknown to polyvisor",
                                     structure="VHDX region table entry", offset=table_offset + at)
        spans.append(_Region(entry.file_offset, entry.file_offset + entry.length, name))
    spans.sort(key=lambda r: r.start)
    for before, after in itertools.pairwise(spans):
        if after.start < before.end:
            raise CorruptImage(path, f"{after.name} at {after.start} overlaps the {before.name}",
                               structure="VHDX region table", offset=table_offset)
    for guid, name in ((vs.BAT_REGION, "BAT"), (vs.METADATA_REGION, "metadata")):
        if guid not in found:
            raise CorruptImage(path, f"no {name} region", structure="VHDX region table", offset=table_offset)
    return found[vs.BAT_REGION], found[vs.METADATA_REGION], spans


def _read_metadata(path: Path, source: _MetaSource, region_offset: int, region_length: int,
                   problems: list[_Problem]) -> dict[bytes, bytes]:
    """The known metadata items' bytes by GUID (§2.6.1)."""
    table = source.read(region_offset, vs.METADATA_TABLE_SIZE, "VHDX metadata table")
    header = vs.METADATA_TABLE_HEADER.unpack(table)
    if header.signature != b"metadata":
        raise CorruptImage(path, "no 'metadata' signature", structure="VHDX metadata table", offset=region_offset)
    if header.entry_count > vs.MAX_METADATA_ENTRIES:
        raise CorruptImage(path, f"{header.entry_count} entries (at most {vs.MAX_METADATA_ENTRIES})",
                           structure="VHDX metadata table", offset=region_offset)
    known = {vs.FILE_PARAMETERS, vs.VIRTUAL_DISK_SIZE, vs.VIRTUAL_DISK_ID, vs.LOGICAL_SECTOR_SIZE,
             vs.PHYSICAL_SECTOR_SIZE, vs.PARENT_LOCATOR}
    items: dict[bytes, bytes] = {}
    spans: list[tuple[int, int]] = []
    for index in range(header.entry_count):
        at = vs.METADATA_TABLE_HEADER.size + index * vs.METADATA_TABLE_ENTRY.size
        entry = vs.METADATA_TABLE_ENTRY.unpack(table, at)
        where = region_offset + at
        if entry.length:
            if entry.offset < vs.METADATA_TABLE_SIZE or entry.length > vs.MAX_METADATA_ITEM \
                    or entry.offset + entry.length > region_length:
                raise CorruptImage(path, f"item {vs.guid_text(entry.item_id)} at {entry.offset} of {entry.length} "
                                         f"bytes lies outside the {region_length}-byte metadata region",
                                   structure="VHDX metadata table entry", offset=where)
            spans.append((entry.offset, entry.offset + entry.length))
        if entry.item_id in known:
            if entry.item_id in items:
                raise CorruptImage(path, f"item {vs.guid_text(entry.item_id)} listed twice",
                                   structure="VHDX metadata table entry", offset=where)
            items[entry.item_id] = source.read(region_offset + entry.offset, entry.length, "VHDX metadata item")
        elif entry.flags & vs.METADATA_IS_REQUIRED:
            raise UnsupportedFeature(path, f"required metadata item {vs.guid_text(entry.item_id)} is unknown to "
                                           "polyvisor", structure="VHDX metadata table entry", offset=where)
    spans.sort()
    for before, after in itertools.pairwise(spans):
        if after[0] < before[1]:
            problems.append(_Problem("VHDX metadata table", f"items at {before[0]} and {after[0]} overlap",
                                     region_offset + after[0]))
    return items


def _item(path: Path, items: dict[bytes, bytes], guid: bytes, length: int, name: str) -> bytes:
    data = items.get(guid)
    if data is None:
        raise CorruptImage(path, f"required metadata item '{name}' is missing", structure="VHDX metadata table")
    if len(data) < length:
        raise CorruptImage(path, f"item of {len(data)} bytes, needs {length}", structure=f"VHDX {name}")
    return data


def _parse_parent_locator(path: Path, data: bytes) -> dict[str, str]:
    """The parent locator's key/value entries (§2.6.2.6)."""
    structure = "VHDX parent locator"
    header = vs.PARENT_LOCATOR_HEADER.unpack(data)
    if header.locator_type != vs.VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedFeature(path, f"parent locator type {vs.guid_text(header.locator_type)} is not VHDX",
                                 structure=structure)
    count = header.key_value_count
    if vs.PARENT_LOCATOR_HEADER.size + count * vs.PARENT_LOCATOR_ENTRY.size > len(data):
        raise CorruptImage(path, f"{count} entries do not fit its {len(data)} bytes", structure=structure)
    entries: dict[str, str] = {}
    for index in range(count):
        entry = vs.PARENT_LOCATOR_ENTRY.unpack(data, vs.PARENT_LOCATOR_HEADER.size + index * 12)
        texts = []
        for offset, length in ((entry.key_offset, entry.key_length), (entry.value_offset, entry.value_length)):
            if length == 0 or length % 2 or offset + length > len(data):
                raise CorruptImage(path, f"entry {index}: string at {offset} of {length} bytes is invalid",
                                   structure=structure)
            try:
                texts.append(data[offset : offset + length].decode("utf-16-le"))
            except UnicodeDecodeError as exc:
                raise CorruptImage(path, f"entry {index}: not UTF-16", structure=structure) from exc
        key, value = texts
        if key in entries:
            raise CorruptImage(path, f"key {key!r} appears twice", structure=structure)
        entries[key] = value
    return entries


def _linkage(path: Path, text: str) -> bytes:
    try:
        return vs.guid(text.strip().strip("{}"))
    except ValueError as exc:
        raise CorruptImage(path, f"parent_linkage {text!r} is not a GUID", structure="VHDX parent locator") from exc


def _open_parent(path: Path, locator: dict[str, str], opener: Opener) -> tuple[DiskImage | None, str | None]:
    """Open the parent: relative_path first, then the absolute paths and their basenames here (§2.6.2.6.2)."""
    structure = "VHDX parent locator"
    if "parent_linkage" not in locator:
        raise CorruptImage(path, "no parent_linkage entry", structure=structure)
    expected = {_linkage(path, locator["parent_linkage"])}
    if "parent_linkage2" in locator:
        expected.add(_linkage(path, locator["parent_linkage2"]))
    candidates: list[tuple[str, str, bool]] = []  # (reference to open, as written, unsafe is an error)
    if locator.get("relative_path"):
        candidates.append((windows_path_to_relative(locator["relative_path"]), locator["relative_path"], True))
    for key in ("absolute_win32_path", "volume_path"):
        written = locator.get(key)
        if written:
            candidates.append((windows_path_to_relative(written), written, False))
            name = PureWindowsPath(written).name
            if name:
                candidates.append((name, written, True))
    if not candidates:
        raise CorruptImage(path, "names no parent path", structure=structure)
    unsafe: UnsafeReference | None = None
    tried: list[str] = []
    for reference, written, report_unsafe in candidates:
        if reference in tried:
            continue
        tried.append(reference)
        try:
            parent = opener.open_backing(path, reference, "vhdx", what="VHDX parent")
        except MissingReference:
            continue
        except UnsafeReference as exc:
            if report_unsafe and unsafe is None:
                unsafe = exc
            continue
        if parent is None:
            return None, written
        if not isinstance(parent, VhdxImage) or parent._headers.current.data_write_guid not in expected:
            found = vs.guid_text(parent._headers.current.data_write_guid) if isinstance(parent, VhdxImage) else "?"
            parent.close()
            raise BackingChainError(
                path, f"parent {parent.path} has DataWriteGuid {found}, but parent_linkage expects "
                      f"{locator['parent_linkage']}: the parent changed after this image was made",
                structure=structure)
        return parent, written
    if unsafe is not None:
        raise unsafe
    raise MissingReference(path, f"parent not found (tried {', '.join(tried)})", structure=structure)


# ------------------------------------------------------------------ building


def _bat_bytes(entries: array[int]) -> bytes:
    if sys.byteorder == "big":
        swapped = array("Q", entries)
        swapped.byteswap()
        return swapped.tobytes()
    return entries.tobytes()


def _region_table_bytes(regions: list[tuple[bytes, int, int]]) -> bytearray:
    """A region table (§2.2.3) listing *regions* as required."""
    table = bytearray(vs.REGION_TABLE_SIZE)
    table[: vs.REGION_TABLE_HEADER.size] = vs.REGION_TABLE_HEADER.pack(
        vs.RegionTableHeader(b"regi", 0, len(regions), 0))
    for index, (guid, offset, length) in enumerate(regions):
        at = vs.REGION_TABLE_HEADER.size + index * vs.REGION_TABLE_ENTRY.size
        table[at : at + vs.REGION_TABLE_ENTRY.size] = vs.REGION_TABLE_ENTRY.pack(
            vs.RegionTableEntry(guid, offset, length, vs.REGION_REQUIRED))
    return vs.with_checksum(table)


def _parent_locator_bytes(entries: dict[str, str]) -> bytes:
    """A VHDX parent locator item (§2.6.2.6) with UTF-16 keys and values after the entry array."""
    strings = bytearray()
    table = bytearray()
    base = vs.PARENT_LOCATOR_HEADER.size + len(entries) * vs.PARENT_LOCATOR_ENTRY.size
    for key, value in entries.items():
        key_bytes, value_bytes = key.encode("utf-16-le"), value.encode("utf-16-le")
        key_offset = base + len(strings)
        strings += key_bytes
        value_offset = base + len(strings)
        strings += value_bytes
        table += vs.PARENT_LOCATOR_ENTRY.pack(
            vs.ParentLocatorEntry(key_offset, value_offset, len(key_bytes), len(value_bytes)))
    header = vs.PARENT_LOCATOR_HEADER.pack(vs.ParentLocatorHeader(vs.VHDX_PARENT_LOCATOR_TYPE, 0, len(entries)))
    return header + bytes(table) + bytes(strings)


def _metadata_bytes(*, block_size: int, flags: int, size: int, disk_id: bytes, lss: int,
                    locator: dict[str, str]) -> bytes:
    """The metadata table and its items (§2.6), items packed from 64 KiB on."""
    virtual = vs.METADATA_IS_REQUIRED | vs.METADATA_IS_VIRTUAL_DISK
    items: list[tuple[bytes, bytes, int]] = [
        (vs.FILE_PARAMETERS, vs.FILE_PARAMETERS_ITEM.pack(vs.FileParameters(block_size, flags)),
         vs.METADATA_IS_REQUIRED),
        (vs.VIRTUAL_DISK_SIZE, size.to_bytes(8, "little"), virtual),
        (vs.VIRTUAL_DISK_ID, disk_id, virtual),
        (vs.LOGICAL_SECTOR_SIZE, lss.to_bytes(4, "little"), virtual),
        (vs.PHYSICAL_SECTOR_SIZE, (4096).to_bytes(4, "little"), virtual),
    ]
    if locator:
        items.append((vs.PARENT_LOCATOR, _parent_locator_bytes(locator), virtual))
    region = bytearray(vs.METADATA_TABLE_SIZE)
    region[: vs.METADATA_TABLE_HEADER.size] = vs.METADATA_TABLE_HEADER.pack(
        vs.MetadataTableHeader(b"metadata", 0, len(items), bytes(20)))
    for index, (guid, data, item_flags) in enumerate(items):
        at = vs.METADATA_TABLE_HEADER.size + index * vs.METADATA_TABLE_ENTRY.size
        region[at : at + vs.METADATA_TABLE_ENTRY.size] = vs.METADATA_TABLE_ENTRY.pack(
            vs.MetadataTableEntry(guid, len(region), len(data), item_flags, 0))
        region += data
    return bytes(region)


def _parent_locator_for(path: Path, parent: VhdxImage) -> tuple[dict[str, str], str]:
    """Locator entries naming *parent*: its DataWriteGuid, relative and absolute paths (§2.6.2.6.2)."""
    parent_path = Path(os.path.abspath(parent.path))
    home = Path(os.path.abspath(path)).parent
    relative = os.path.relpath(parent_path, home).replace(os.sep, "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    locator = {
        "parent_linkage": "{" + vs.guid_text(parent._headers.current.data_write_guid) + "}",
        "relative_path": relative,
        "absolute_win32_path": str(parent_path).replace(os.sep, "\\"),
    }
    return locator, relative
