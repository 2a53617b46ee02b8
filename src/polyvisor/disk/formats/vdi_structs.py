"""VDI on-disk structures and header validation.

Spec: VirtualBox ``src/VBox/Storage/VDICore.h`` (``VDIPREHEADER``,
``VDIHEADER0``, ``VDIHEADER1``, ``VDIHEADER1PLUS``, ``VDIDISKGEOMETRY``, the
block pointer values) and ``VDI.cpp`` (``vdiValidatePreHeader``,
``vdiValidateHeader``, ``vdiOpenImage``, ``vdiInitHeader``); qemu
``block/vdi.c`` (``vdi_open``) for the limits qemu-img applies.  All fields
are little-endian.

Layout of a file::

    0      pre-header: 64 bytes of text, signature 0xBEDA107F, version
    72     header (v1.1: cbHeader bytes, 384 or 400 for "1.1+"; v0: 348 bytes)
    offBlocks  block map: one uint32 per block (data block index, FREE or ZERO)
    offData    data blocks, each cbBlockExtra bytes of service data then cbBlock bytes
"""

from __future__ import annotations

import uuid
from pathlib import Path

from polyvisor.disk.fileio import ImageFile
from polyvisor.disk.structs import Layout, is_power_of_two
from polyvisor.errors import CorruptImage, LimitExceeded, TruncatedImage, UnsupportedFeature
from polyvisor.records import record

#: ``VDI_IMAGE_SIGNATURE`` (VDICore.h).
SIGNATURE = 0xBEDA107F
#: ``VDI_IMAGE_VERSION``: major 1, minor 1 — what VirtualBox and qemu write.
VERSION_1_1 = 0x00010001
#: The one major-0 version ``vdiValidatePreHeader`` still accepts (``VDIHEADER0`` layout).
VERSION_0 = 0x00000002
#: The pre-header text VirtualBox 6 and 7.0 write ("for eyes only").
FILE_INFO = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

#: ``VDIIMAGETYPE`` values.
TYPE_NORMAL = 1  #: dynamically growing base image
TYPE_FIXED = 2  #: preallocated base image
TYPE_UNDO = 3  #: growing image for undo/commit of another image
TYPE_DIFF = 4  #: growing differencing image on top of a parent
TYPE_NAMES = {TYPE_NORMAL: "normal", TYPE_FIXED: "fixed", TYPE_UNDO: "undo", TYPE_DIFF: "diff"}

#: Block map entry of a block that was never written (``VDI_IMAGE_BLOCK_FREE``).
BLOCK_FREE = 0xFFFFFFFF
#: Block map entry of a block that reads as zeros (``VDI_IMAGE_BLOCK_ZERO``, qemu's ``VDI_DISCARDED``).
BLOCK_ZERO = 0xFFFFFFFE

SECTOR_SIZE = 512
#: ``VDI_IMAGE_DEFAULT_BLOCK_SIZE``; the only block size qemu reads or writes.
DEFAULT_BLOCK_SIZE = 1 << 20
#: ``VDI_DATA_ALIGN``: VirtualBox starts the block map and the data area on 1 MiB boundaries.
DATA_ALIGN = 1 << 20
#: Block sizes ``vdiOpenImage`` accepts ("intentionally more forgiving than when creating").
MIN_BLOCK_SIZE = DEFAULT_BLOCK_SIZE // 8
MAX_BLOCK_SIZE = DEFAULT_BLOCK_SIZE * 128
#: qemu's ``VDI_BLOCKS_IN_IMAGE_MAX``: the block map, rounded to a sector, must stay within INT_MAX bytes.
MAX_BLOCKS = (0x80000000 - SECTOR_SIZE) // 4

PREHEADER_SIZE = 72
HEADER1_SIZE = 384  #: ``sizeof(VDIHEADER1)``
HEADER1PLUS_SIZE = 400  #: ``sizeof(VDIHEADER1PLUS)``
HEADER0_SIZE = 348  #: ``sizeof(VDIHEADER0)``
NULL_UUID = bytes(16)


def new_uuid() -> bytes:
    """A random (version 4) UUID as ``RTUuidCreate`` stores it."""
    return uuid.uuid4().bytes_le


@record(slots=True)
class PreHeader:
    """``VDIPREHEADER``: free text, the signature and the version (major << 16 | minor)."""

    file_info: bytes
    signature: int
    version: int


PREHEADER = Layout(PreHeader, "<64sII", "VDI pre-header")


@record(slots=True)
class Header:
    """``VDIHEADER1PLUS`` (VDICore.h), the form polyvisor keeps every header version in.

    ``VDIHEADER1`` is its first 384 bytes (no LCHS geometry).  UUIDs are
    ``RTUUID``s as stored: the first three fields little-endian.
    """

    cb_header: int
    image_type: int
    flags: int
    comment: bytes
    off_blocks: int
    off_data: int
    legacy_cylinders: int
    legacy_heads: int
    legacy_sectors: int
    legacy_sector_size: int
    dummy: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks: int
    blocks_allocated: int
    uuid_create: bytes
    uuid_modify: bytes
    uuid_linkage: bytes
    uuid_parent_modify: bytes
    lchs_cylinders: int
    lchs_heads: int
    lchs_sectors: int
    lchs_sector_size: int


HEADER1PLUS = Layout(Header, "<3I256s2I4IIQ4I16s16s16s16s4I", "VDI header")


@record(slots=True)
class Header0:
    """``VDIHEADER0``: the old major-0 header; block map and data follow it unaligned."""

    image_type: int
    flags: int
    comment: bytes
    legacy_cylinders: int
    legacy_heads: int
    legacy_sectors: int
    legacy_sector_size: int
    disk_size: int
    block_size: int
    blocks: int
    blocks_allocated: int
    uuid_create: bytes
    uuid_modify: bytes
    uuid_linkage: bytes


HEADER0 = Layout(Header0, "<2I256s4IQ3I16s16s16s", "VDI header v0")


@record(slots=True)
class ParsedHeader:
    """A header as read from a file: its version, its layout and its fields."""

    version: int
    header: Header
    #: Bytes of the header on disk after the pre-header (348, 384 or 400).
    stored_size: int

    @property
    def has_lchs(self) -> bool:
        """Whether the header is a "1.1+" one with the LCHS geometry."""
        return self.version == VERSION_1_1 and self.stored_size >= HEADER1PLUS_SIZE

    def pack(self) -> bytes:
        """The header bytes to write back at offset 72, in the layout it was read in."""
        h = self.header
        if self.version == VERSION_0:
            return HEADER0.pack(Header0(
                h.image_type, h.flags, h.comment, h.legacy_cylinders, h.legacy_heads, h.legacy_sectors,
                h.legacy_sector_size, h.disk_size, h.block_size, h.blocks, h.blocks_allocated,
                h.uuid_create, h.uuid_modify, h.uuid_linkage,
            ))
        return HEADER1PLUS.pack(h)[: self.stored_size]


def version_text(version: int) -> str:
    """``major.minor`` of a pre-header version."""
    return f"{version >> 16}.{version & 0xFFFF}"


def read_header(file: ImageFile, path: Path) -> ParsedHeader:
    """Read the pre-header and the header (``vdiImageReadHeader``), without validating the values."""
    pre = PREHEADER.read(file, 0)
    if pre.signature != SIGNATURE:
        raise CorruptImage(path, f"not a VDI image: signature {pre.signature:#010x}, expected {SIGNATURE:#010x}",
                           structure="VDI pre-header", offset=64)
    if pre.version == VERSION_0:
        raw0 = HEADER0.read(file, PREHEADER_SIZE)
        blocks_offset = PREHEADER_SIZE + HEADER0_SIZE
        header = Header(
            cb_header=HEADER0_SIZE, image_type=raw0.image_type, flags=raw0.flags, comment=raw0.comment,
            off_blocks=blocks_offset, off_data=blocks_offset + 4 * raw0.blocks,
            legacy_cylinders=raw0.legacy_cylinders, legacy_heads=raw0.legacy_heads,
            legacy_sectors=raw0.legacy_sectors, legacy_sector_size=raw0.legacy_sector_size, dummy=0,
            disk_size=raw0.disk_size, block_size=raw0.block_size, block_extra=0, blocks=raw0.blocks,
            blocks_allocated=raw0.blocks_allocated, uuid_create=raw0.uuid_create, uuid_modify=raw0.uuid_modify,
            uuid_linkage=raw0.uuid_linkage, uuid_parent_modify=NULL_UUID,
            lchs_cylinders=0, lchs_heads=0, lchs_sectors=0, lchs_sector_size=0,
        )
        return ParsedHeader(VERSION_0, header, HEADER0_SIZE)
    if pre.version != VERSION_1_1:
        raise UnsupportedFeature(
            path, f"VDI version {version_text(pre.version)} is not supported "
            f"(VirtualBox and qemu write 1.1; VirtualBox also reads the old 0.2)",
            structure="VDI pre-header", offset=68,
        )
    cb_header = int.from_bytes(file.read(PREHEADER_SIZE, 4, "VDI header"), "little")
    if cb_header < HEADER1_SIZE:
        raise CorruptImage(path, f"header size {cb_header} is smaller than the {HEADER1_SIZE} bytes of a v1.1 header",
                           structure="VDI header", offset=PREHEADER_SIZE)
    stored = HEADER1PLUS_SIZE if cb_header >= HEADER1PLUS_SIZE else HEADER1_SIZE
    data = file.read(PREHEADER_SIZE, stored, "VDI header")
    return ParsedHeader(VERSION_1_1, HEADER1PLUS.unpack(data.ljust(HEADER1PLUS_SIZE, b"\0")), stored)


def _field_offset(name: str) -> int:
    """File offset of a v1.1 header field, for error messages."""
    offset = PREHEADER_SIZE
    sizes = {"comment": 256, "disk_size": 8}
    for field_name in HEADER1PLUS.field_names:
        if field_name == name:
            return offset
        offset += 16 if field_name.startswith("uuid_") else sizes.get(field_name, 4)
    raise KeyError(name)


def validate_header(parsed: ParsedHeader, file_size: int, path: Path) -> None:
    """Check every header value before it is used (``vdiValidateHeader``, ``vdi_open``, plus file bounds).

    Raises :class:`CorruptImage` (or a subclass) for values that break the
    format, :class:`UnsupportedFeature` for valid images polyvisor cannot use.
    """
    h = parsed.header
    v0 = parsed.version == VERSION_0

    def where(name: str) -> int | None:
        return None if v0 else _field_offset(name)

    def corrupt(message: str, name: str) -> CorruptImage:
        return CorruptImage(path, message, structure="VDI header", offset=where(name))

    if h.image_type not in TYPE_NAMES:
        raise corrupt(f"unknown image type {h.image_type}", "image_type")
    if h.image_type in (TYPE_UNDO, TYPE_DIFF) or h.uuid_linkage != NULL_UUID or h.uuid_parent_modify != NULL_UUID:
        raise UnsupportedFeature(
            path,
            f"{TYPE_NAMES[h.image_type]} VDI linked to a parent image (uuidLinkage "
            f"{format_uuid(h.uuid_linkage)}): VDI records only the parent's UUID, not its file name, so the "
            "parent must be given by the VM configuration (.vbox); polyvisor does not open differencing VDIs",
            structure="VDI header", offset=where("image_type"),
        )
    if h.block_size == 0 or not is_power_of_two(h.block_size):
        raise corrupt(f"block size {h.block_size} is not a power of two", "block_size")
    if not MIN_BLOCK_SIZE <= h.block_size <= MAX_BLOCK_SIZE:
        raise UnsupportedFeature(
            path, f"block size {h.block_size} is outside the {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes VirtualBox opens",
            structure="VDI header", offset=where("block_size"),
        )
    if h.block_extra != 0 and (not is_power_of_two(h.block_extra) or h.block_extra > MAX_BLOCK_SIZE):
        raise corrupt(f"block extra size {h.block_extra} is neither 0 nor a power of two up to {MAX_BLOCK_SIZE}",
                      "block_extra")
    if h.blocks > MAX_BLOCKS:
        raise LimitExceeded(path, f"{h.blocks} blocks exceed the {MAX_BLOCKS} a VDI block map may hold",
                            structure="VDI header", offset=where("blocks"))
    if h.disk_size > h.blocks * h.block_size:
        raise corrupt(f"disk size {h.disk_size} exceeds the {h.blocks} blocks of {h.block_size} bytes of the "
                      "block map", "disk_size")
    needed = -(-h.disk_size // h.block_size)
    if h.blocks > needed:
        raise corrupt(f"{h.blocks} blocks in the block map, but a disk of {h.disk_size} bytes needs {needed}",
                      "blocks")
    if h.blocks_allocated > h.blocks:
        raise corrupt(f"{h.blocks_allocated} blocks allocated, more than the {h.blocks} blocks of the disk",
                      "blocks_allocated")
    header_end = PREHEADER_SIZE + max(h.cb_header, HEADER1_SIZE if not v0 else HEADER0_SIZE)
    if h.off_blocks < header_end:
        raise CorruptImage(path, f"block map at {h.off_blocks} overlaps the header (which ends at {header_end}: "
                           f"header size {h.cb_header})", structure="VDI header", offset=where("off_blocks"))
    map_end = h.off_blocks + 4 * h.blocks
    if h.off_data < map_end:
        raise CorruptImage(path, f"data area at {h.off_data} overlaps the block map ({h.off_blocks}..{map_end})",
                           structure="VDI header", offset=where("off_data"))
    if map_end > file_size:
        raise TruncatedImage(path, f"block map of {h.blocks} entries ends at {map_end}, past the end of the file "
                             f"({file_size} bytes)", structure="VDI block map", offset=h.off_blocks)


def format_uuid(raw: bytes) -> str:
    """An ``RTUUID`` (first three fields little-endian) in the usual text form."""
    return str(uuid.UUID(bytes_le=raw))


def decode_text(raw: bytes) -> str:
    """A NUL-terminated UTF-8 field (comment, file info) as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
