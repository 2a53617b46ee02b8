"""VDI: VirtualBox's native disk image, dynamic (``normal``) and fixed.

Spec: VirtualBox ``src/VBox/Storage/VDICore.h`` and ``VDI.cpp``; qemu
``block/vdi.c`` for interoperability.  Structures and header validation are in
:mod:`polyvisor.disk.formats.vdi_structs`.

The guest disk is cut into blocks (1 MiB as written by VirtualBox and qemu).
The block map gives, for each block, the index of its data block in the data
area (data block *n* lives at ``offData + n * (cbBlockExtra + cbBlock) +
cbBlockExtra``), or ``FREE`` (never written) or ``ZERO`` (reads as zeros);
both read as zeros on a base image.  A dynamic image appends data blocks in
allocation order and counts them in ``cBlocksAllocated``; a fixed image has
every block allocated in order at creation.

Created images are laid out as VirtualBox 6/7 writes them (``vdiInitHeader``):
a "1.1+" header of 400 bytes, the block map at 1 MiB, the data area at the
next 1 MiB boundary after the map, legacy and LCHS geometry left
"not calculated" (0/0/0, 512-byte sectors), an empty comment, fresh random
``uuidCreate`` and ``uuidModify``.

The block map is paged: at most :data:`MAP_CACHE_PAGES` pages of
:data:`MAP_PAGE_ENTRIES` entries are in memory at once (32 MiB), so a
512 TiB image (a 2 GiB map) is handled in bounded memory.  Changed pages and
the header are written on flush and close.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.disk.formats.vdi_structs import (
    BLOCK_FREE,
    BLOCK_ZERO,
    DATA_ALIGN,
    DEFAULT_BLOCK_SIZE,
    FILE_INFO,
    HEADER1PLUS_SIZE,
    MAX_BLOCKS,
    NULL_UUID,
    PREHEADER,
    PREHEADER_SIZE,
    SECTOR_SIZE,
    SIGNATURE,
    TYPE_FIXED,
    TYPE_NAMES,
    TYPE_NORMAL,
    VERSION_0,
    VERSION_1_1,
    Header,
    ParsedHeader,
    PreHeader,
    decode_text,
    format_uuid,
    new_uuid,
    read_header,
    validate_header,
    version_text,
)
from polyvisor.disk.image import DiskImage, ExtentKind, ProbeSample, Run, file_run
from polyvisor.disk.registry import register_format
from polyvisor.disk.structs import align_up
from polyvisor.errors import CorruptImage, UsageError

if TYPE_CHECKING:
    from polyvisor.disk.check import CheckResult
    from polyvisor.disk.registry import CreateOptions, Opener

#: Block map entries per page of the in-memory cache (256 KiB, 64 GiB of disk at 1 MiB blocks).
MAP_PAGE_ENTRIES = 1 << 16
#: Pages of the block map kept in memory at most (32 MiB, the whole map of an 8 TiB disk).
MAP_CACHE_PAGES = 128
#: Entries compared at once when skipping runs of FREE or ZERO entries.
_SCAN_CHUNK = 4096
#: Entries written at once when creating the block map.
_CREATE_CHUNK = 1 << 20

_TYPECODE = "I" if array("I").itemsize == 4 else "L"
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_SAME = {value: array(_TYPECODE, [value]) * _SCAN_CHUNK for value in (BLOCK_FREE, BLOCK_ZERO)}
_ZERO_CHUNK = bytes(1 << 20)
#: Bitmap bytes searched at once for data blocks no entry uses.
_BITMAP_CHUNK = 1 << 20
#: ``bytes.translate`` table marking the bytes of a bitmap that have a clear bit.
_HAS_UNUSED_BIT = bytes(0 if value == 0xFF else 1 for value in range(256))


def _run_end(page: array[int], start: int, stop: int, value: int) -> int:
    """First index in ``[start, stop)`` of *page* whose entry is not *value* (FREE or ZERO), else *stop*."""
    pattern = _SAME[value]
    i = start
    while i < stop:
        n = min(_SCAN_CHUNK, stop - i)
        if page[i : i + n] == (pattern if n == _SCAN_CHUNK else pattern[:n]):
            i += n
            continue
        while page[i] == value:
            i += 1
        return i
    return stop


def _contiguous_end(page: array[int], start: int, stop: int) -> int:
    """First index after *start* in ``[start, stop)`` that does not continue its data block sequence."""
    i = start + 1
    expected = page[start] + 1
    while i < stop and page[i] == expected:
        i += 1
        expected += 1
    return i


class BlockMap:
    """The block map (``paBlocks``), paged in from the file and written back when changed."""

    def __init__(self, file: ImageFile, offset: int, count: int) -> None:
        self._file = file
        self._offset = offset
        self.count = count
        self.page_entries = MAP_PAGE_ENTRIES
        self.cache_pages = max(1, MAP_CACHE_PAGES)
        self.page_count = -(-count // self.page_entries)
        self._pages: dict[int, array[int]] = {}
        self._dirty: set[int] = set()
        self._recent = -1

    def page(self, number: int) -> array[int]:
        """Entries ``[number * page_entries, ...)``, loaded if needed (least recently used pages leave)."""
        page = self._pages.get(number)
        if page is not None:
            if self._recent != number:
                del self._pages[number]
                self._pages[number] = page
                self._recent = number
            return page
        first = number * self.page_entries
        entries = min(self.page_entries, self.count - first)
        data = self._file.read(self._offset + 4 * first, 4 * entries, "VDI block map")
        page = array(_TYPECODE)
        page.frombytes(data)
        if _BIG_ENDIAN_HOST:
            page.byteswap()
        while len(self._pages) >= self.cache_pages:
            self._evict()
        self._pages[number] = page
        self._recent = number
        return page

    def get(self, block: int) -> int:
        """The entry of *block*."""
        number, index = divmod(block, self.page_entries)
        return self.page(number)[index]

    def set(self, block: int, value: int) -> None:
        """Change the entry of *block* (written on :meth:`flush`)."""
        number, index = divmod(block, self.page_entries)
        self.page(number)[index] = value
        self._dirty.add(number)

    def flush(self) -> None:
        """Write every changed page."""
        for number in sorted(self._dirty):
            self._write_page(number, self._pages[number])
        self._dirty.clear()

    def _evict(self) -> None:
        number = next(iter(self._pages))
        page = self._pages.pop(number)
        if number in self._dirty:
            self._write_page(number, page)
            self._dirty.discard(number)

    def _write_page(self, number: int, page: array[int]) -> None:
        if _BIG_ENDIAN_HOST:
            page = array(_TYPECODE, page)
            page.byteswap()
        self._file.write(self._offset + 4 * number * self.page_entries, page.tobytes())


@register_format
class VdiImage(DiskImage):
    """A VirtualBox VDI image (dynamic or fixed; version 1.1, or the old 0.2 layout)."""

    format_name = "vdi"
    subformats = ("dynamic", "fixed")
    create_options = frozenset()
    #: qemu's ``VDI_DISK_SIZE_MAX`` (VirtualBox allows more, but qemu would not open it).
    max_virtual_size = MAX_BLOCKS * DEFAULT_BLOCK_SIZE

    def __init__(self, path: Path, *, parsed: ParsedHeader, file: ImageFile, writable: bool,
                 outputs: OutputFiles | None = None, created: bool = False) -> None:
        header = parsed.header
        super().__init__(
            path,
            # qemu rounds a disk size that is not a multiple of 512 up (VBoxManage convertfromraw makes them).
            virtual_size=align_up(header.disk_size, SECTOR_SIZE),
            subformat="fixed" if header.image_type == TYPE_FIXED else "dynamic",
            files=[file],
            writable=writable,
            outputs=outputs,
        )
        self._parsed = parsed
        self._header = header
        self.block_size = header.block_size
        self._stride = header.block_extra + header.block_size
        self._table = BlockMap(file, header.off_blocks, header.blocks)
        self._file_end = file.size
        self._header_dirty = False
        #: Whether ``uuidModify`` is already fresh for this session (VD's ``vdSetModifiedFlag``).
        self._modify_uuid_renewed = created

    # ----------------------------------------------------------- construction

    @classmethod
    def probe(cls, sample: ProbeSample) -> int:
        """The signature at offset 64; 100 with a version polyvisor reads, 60 with another."""
        head = sample.head
        if len(head) < PREHEADER_SIZE or int.from_bytes(head[64:68], "little") != SIGNATURE:
            return 0
        return 100 if int.from_bytes(head[68:72], "little") in (VERSION_1_1, VERSION_0) else 60

    @classmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open a VDI; writable opening also requires a consistent block map."""
        file = ImageFile.open(path, writable=writable)
        try:
            parsed = read_header(file, path)
            validate_header(parsed, file.size, path)
            image = cls(path, parsed=parsed, file=file, writable=writable)
            if writable:
                image._refuse_unsafe_map()
            return image
        except BaseException:
            file.close()
            raise

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """A new image laid out as VirtualBox's ``vdiInitHeader``/``vdiImageCreateFile`` make it."""
        if size > cls.max_virtual_size:
            raise UsageError(f"{path}: {size} bytes exceed the largest VDI qemu opens ({cls.max_virtual_size} bytes)")
        fixed = (options.subformat or cls.subformats[0]) == "fixed"
        blocks = -(-size // DEFAULT_BLOCK_SIZE)
        off_blocks = align_up(PREHEADER_SIZE + HEADER1PLUS_SIZE, DATA_ALIGN)
        off_data = align_up(off_blocks + 4 * blocks, DATA_ALIGN)
        header = Header(
            cb_header=HEADER1PLUS_SIZE, image_type=TYPE_FIXED if fixed else TYPE_NORMAL, flags=0,
            comment=bytes(256), off_blocks=off_blocks, off_data=off_data,
            legacy_cylinders=0, legacy_heads=0, legacy_sectors=0, legacy_sector_size=SECTOR_SIZE, dummy=0,
            disk_size=size, block_size=DEFAULT_BLOCK_SIZE, block_extra=0, blocks=blocks,
            blocks_allocated=blocks if fixed else 0, uuid_create=new_uuid(), uuid_modify=new_uuid(),
            uuid_linkage=NULL_UUID, uuid_parent_modify=NULL_UUID,
            lchs_cylinders=0, lchs_heads=0, lchs_sectors=0, lchs_sector_size=SECTOR_SIZE,
        )
        parsed = ParsedHeader(VERSION_1_1, header, HEADER1PLUS_SIZE)
        outputs = OutputFiles()
        try:
            file = outputs.create(path)
            file.write(0, PREHEADER.pack(PreHeader(FILE_INFO, SIGNATURE, VERSION_1_1)) + parsed.pack())
            for first in range(0, blocks, _CREATE_CHUNK):
                last = min(blocks, first + _CREATE_CHUNK)
                if fixed:
                    entries = array(_TYPECODE, range(first, last))
                    if _BIG_ENDIAN_HOST:
                        entries.byteswap()
                    chunk = entries.tobytes()
                else:
                    chunk = b"\xff" * (4 * (last - first))
                file.write(off_blocks + 4 * first, chunk)
            file.truncate(off_data + (blocks * DEFAULT_BLOCK_SIZE if fixed else 0))
            return cls(path, parsed=parsed, file=file, writable=True, outputs=outputs, created=True)
        except BaseException:
            outputs.abort()
            raise

    # ------------------------------------------------------------- the layer

    @property
    def _file(self) -> ImageFile:
        return self.files[0]

    def _data_offset(self, index: int) -> int:
        """File offset of the guest bytes of data block *index* (past its extra service data)."""
        return self._header.off_data + index * self._stride + self._header.block_extra

    def _map(self, offset: int, length: int) -> Iterator[Run]:
        block_size = self.block_size
        per_page = self._table.page_entries
        coalesce = self._stride == block_size
        end = offset + length
        last_block = (end - 1) // block_size
        pos = offset
        while pos < end:
            block = pos // block_size
            number = block // per_page
            base = number * per_page
            page = self._table.page(number)
            stop = min(last_block + 1 - base, len(page))
            i = block - base
            while i < stop:
                entry = page[i]
                if entry >= BLOCK_ZERO:
                    j = _run_end(page, i + 1, stop, entry)
                    run_end = min(end, (base + j) * block_size)
                    kind = ExtentKind.UNALLOCATED if entry == BLOCK_FREE else ExtentKind.ZERO
                    yield Run(pos, run_end - pos, kind)
                else:
                    j = _contiguous_end(page, i, stop) if coalesce else i + 1
                    run_end = min(end, (base + j) * block_size)
                    host = self._data_offset(entry) + pos - (base + i) * block_size
                    yield file_run(self._file, host, run_end - pos, pos)  # a fixed image's holes are zeros
                pos = run_end
                i = j

    # ---------------------------------------------------------------- writing

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write in place; new blocks are appended at the end of the data area in order."""
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        if not view:
            return
        self._renew_modify_uuid()
        block_size = self.block_size
        end = offset + len(view)
        pending_host = pending_start = pending_length = 0
        pos = offset
        while pos < end:
            block, within = divmod(pos, block_size)
            n = min(block_size - within, end - pos)
            entry = self._table.get(block)
            if entry >= BLOCK_ZERO:
                entry = self._allocate(block)
            host = self._data_offset(entry) + within
            if pending_length and host == pending_host + pending_length:
                pending_length += n
            else:
                if pending_length:
                    self._write_data(pending_host, view[pending_start : pending_start + pending_length])
                pending_host, pending_start, pending_length = host, pos - offset, n
            pos += n
        self._write_data(pending_host, view[pending_start : pending_start + pending_length])

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero the allocated blocks of a range; FREE and ZERO blocks already read as zeros."""
        self._check_write(offset, length)
        if length == 0:
            return
        for run in self._map(offset, length):
            if run.kind is not ExtentKind.DATA:
                continue
            self._renew_modify_uuid()
            pos = run.host_offset
            stop = run.host_offset + run.length
            while pos < stop:
                n = min(len(_ZERO_CHUNK), stop - pos)
                self._write_data(pos, memoryview(_ZERO_CHUNK)[:n])
                pos += n

    def _write_data(self, host: int, data: memoryview) -> None:
        self._file.write(host, data)
        self._file_end = max(self._file_end, host + len(data))

    def _allocate(self, block: int) -> int:
        """Give *block* the next data block (``cBlocksAllocated``) at the end of the data area."""
        header = self._header
        index = header.blocks_allocated
        if index >= header.blocks:
            raise CorruptImage(self.path, f"cannot allocate block {block}: all {header.blocks} data blocks are "
                               "already allocated", structure="VDI header")
        start = header.off_data + index * self._stride
        if start < self._file_end:
            # Bytes left past the last allocated block (a crash, or another writer): clear the new block.
            pos = start
            while pos < start + self._stride:
                n = min(len(_ZERO_CHUNK), start + self._stride - pos)
                self._write_data(pos, memoryview(_ZERO_CHUNK)[:n])
                pos += n
        self._table.set(block, index)
        header.blocks_allocated = index + 1
        self._header_dirty = True
        return index

    def _renew_modify_uuid(self) -> None:
        """A new ``uuidModify`` on the first write after opening, as VirtualBox's VD layer does."""
        if not self._modify_uuid_renewed:
            self._header.uuid_modify = new_uuid()
            self._modify_uuid_renewed = True
            self._header_dirty = True

    def _write_metadata(self) -> None:
        """Changed block map pages, the file extended over every allocated block, then the header."""
        if not self.writable or self.closed:
            return
        self._table.flush()
        data_end = self._header.off_data + self._header.blocks_allocated * self._stride
        if self._file_end < data_end:
            self._file.truncate(data_end)
            self._file_end = data_end
        if self._header_dirty:
            self._file.write(PREHEADER_SIZE, self._parsed.pack())
            self._header_dirty = False

    def flush(self) -> None:
        """Write the block map and header, then sync."""
        self._write_metadata()
        super().flush()

    def _finish(self) -> None:
        self._write_metadata()

    # ----------------------------------------------------------------- checks

    def _scan_map(self, result: CheckResult) -> tuple[int, bytearray, bool]:
        """Walk the block map; report bad entries into *result*.

        Returns the entries that reference a data block of the disk (counted
        as qemu's ``vdi_co_check`` does), the bitmap of referenced data
        blocks, and whether an entry makes writing unsafe (shared, too large,
        or past ``cBlocksAllocated``, where the next allocation would land).
        """
        header = self._header
        blocks, allocated = header.blocks, header.blocks_allocated
        seen = bytearray((blocks + 7) // 8)
        file_size = self._file.size
        per_page = self._table.page_entries
        referenced = 0
        unsafe = False
        for number in range(self._table.page_count):
            page = self._table.page(number)
            base = number * per_page
            i = 0
            while i < len(page):
                entry = page[i]
                if entry >= BLOCK_ZERO:
                    i = _run_end(page, i + 1, len(page), entry)
                    continue
                block = base + i
                where = header.off_blocks + 4 * block
                i += 1
                if entry >= blocks:
                    result.corruption("VDI block map", f"block {block} points to data block {entry}, beyond the "
                                      f"{blocks} blocks of the disk", where)
                    unsafe = True
                    continue
                referenced += 1
                if seen[entry >> 3] & (1 << (entry & 7)):
                    result.corruption("VDI block map", f"data block {entry} is used twice (again by block {block})",
                                      where)
                    unsafe = True
                seen[entry >> 3] |= 1 << (entry & 7)
                if entry >= allocated:
                    result.corruption("VDI block map", f"block {block} points to data block {entry}, beyond the "
                                      f"{allocated} blocks allocated", where)
                    unsafe = True
                data_end = self._data_offset(entry) + header.block_size
                if data_end > file_size:
                    result.corruption("VDI data", f"data block {entry} of block {block} ends at {data_end}, past "
                                      f"the end of the file ({file_size} bytes)", where)
        return referenced, seen, unsafe

    def _refuse_unsafe_map(self) -> None:
        probe = self._new_check_result()
        if self._scan_map(probe)[2]:
            first = probe.problems[0]
            raise CorruptImage(self.path, f"{first.message}; refusing to open for writing (see polyvisor disk check)",
                               structure=first.structure, offset=first.offset)

    def check(self) -> CheckResult:
        """Header sanity, the block map against the allocation count and the file, shared and leaked blocks."""
        self._write_metadata()  # a writable image is checked as it will be on disk
        header = self._header
        result = self._new_check_result()
        v1 = self._parsed.version == VERSION_1_1
        if v1 and (header.off_blocks % SECTOR_SIZE or header.off_data % SECTOR_SIZE):
            result.corruption("VDI header", f"block map offset {header.off_blocks} or data offset "
                              f"{header.off_data} is not sector-aligned (qemu refuses such images)", PREHEADER_SIZE)
        if header.legacy_sector_size != SECTOR_SIZE:
            result.corruption("VDI header", f"legacy geometry sector size {header.legacy_sector_size} is not "
                              f"{SECTOR_SIZE} (qemu refuses such images)")
        if self._parsed.has_lchs and header.lchs_sector_size != SECTOR_SIZE:
            result.corruption("VDI header", f"LCHS geometry sector size {header.lchs_sector_size} is not "
                              f"{SECTOR_SIZE} (VirtualBox refuses such images)")
        if NULL_UUID in (header.uuid_create, header.uuid_modify):
            result.corruption("VDI header", "null creation or modification UUID (VirtualBox refuses such images)")

        referenced, seen, _ = self._scan_map(result)
        allocated = header.blocks_allocated
        if referenced != allocated:
            result.corruption("VDI header", f"{allocated} blocks recorded as allocated, but the block map "
                              f"references {referenced}")
        used_bytes = -(-allocated // 8)
        for chunk_start in range(0, used_bytes, _BITMAP_CHUNK):
            gaps = seen[chunk_start : min(used_bytes, chunk_start + _BITMAP_CHUNK)].translate(_HAS_UNUSED_BIT)
            found = gaps.find(1)
            while found >= 0:
                byte = chunk_start + found
                for index in range(byte * 8, min(byte * 8 + 8, allocated)):
                    if not seen[byte] & (1 << (index & 7)):
                        result.leak("VDI data", f"data block {index} is allocated but no block uses it",
                                    self._data_offset(index))
                found = gaps.find(1, found + 1)
        data_end = header.off_data + allocated * self._stride
        file_size = self._file.size
        if file_size < data_end:
            result.corruption("VDI data", f"the file ends at {file_size}, before the end of its {allocated} "
                              f"allocated blocks ({data_end})")
        elif file_size > data_end:
            result.leak("VDI data", f"{file_size - data_end} bytes past the last allocated block", data_end)
        result.allocated_units = referenced
        result.total_units = header.blocks
        result.image_end_offset = data_end
        return result

    # ------------------------------------------------------------ description

    def _details(self) -> dict[str, Any]:
        header = self._header

        def geometry(cylinders: int, heads: int, sectors: int, sector_size: int) -> dict[str, int]:
            return {"cylinders": cylinders, "heads": heads, "sectors": sectors, "sector_size": sector_size}

        return {
            "version": version_text(self._parsed.version),
            "image_type": TYPE_NAMES[header.image_type],
            "header_size": header.cb_header,
            "image_flags": header.flags,
            "block_size": header.block_size,
            "block_extra": header.block_extra,
            "blocks": header.blocks,
            "blocks_allocated": header.blocks_allocated,
            "uuid_create": format_uuid(header.uuid_create),
            "uuid_modify": format_uuid(header.uuid_modify),
            "uuid_linkage": format_uuid(header.uuid_linkage),
            "uuid_parent_modify": format_uuid(header.uuid_parent_modify),
            "comment": decode_text(header.comment),
            "block_map_offset": header.off_blocks,
            "data_offset": header.off_data,
            "legacy_geometry": geometry(header.legacy_cylinders, header.legacy_heads, header.legacy_sectors,
                                        header.legacy_sector_size),
            "lchs_geometry": geometry(header.lchs_cylinders, header.lchs_heads, header.lchs_sectors,
                                      header.lchs_sector_size) if self._parsed.has_lchs else None,
        }
