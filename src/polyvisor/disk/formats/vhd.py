"""VHD: Virtual PC, Virtual Server, Hyper-V generation 1, XenServer and Azure disks ("vpc" to qemu).

Structures and their spec sections are in :mod:`polyvisor.disk.formats.vhd_structs`
(Microsoft's "Virtual Hard Disk Image Format Specification").  A *fixed* disk
is the guest bytes followed by a 512-byte footer; *dynamic* and *differencing*
disks start with a copy of the footer, then a dynamic disk header, a block
allocation table (BAT) of 32-bit sector offsets, and blocks, each a sector
bitmap followed by the block's data; the footer ends the file.

Virtual size
    The footer holds both a CHS geometry and a ``current_size``, and readers
    disagree on which one is the disk's size.  Virtual PC (creator ``vpc ``)
    and qemu without ``force_size`` (``qemu``) use cylinders x heads x sectors;
    Hyper-V (``win ``), Disk2vhd (``d2v ``), XenServer (``tap\\0``),
    XenConverter (``CTXS``), qemu with ``force_size`` (``qem2``) and Azure
    (``wa\\0\\0``) use ``current_size``, and so does everyone when the geometry
    is the maximum 65535/16/255.  polyvisor reads by that table; for creator
    codes it does not know it follows Hyper-V, VirtualBox and qemu 10 and uses
    ``current_size`` (qemu 7.2 used CHS there).  ``_details`` names the rule.

What polyvisor writes
    Creator application ``pvsr`` (polyvisor's own code, so images say who made
    them), creator version = polyvisor's major.minor, host OS ``Wi2k`` (the spec
    defines only ``Wi2k`` and ``Mac ``; the parent locators polyvisor writes are
    Windows ones).  The virtual size is always exactly the size asked for
    (rounded to 512 bytes) and is stored in ``current_size``.  So that every
    reader (qemu 7.2 included, which sizes unknown creators by CHS) sees that
    size, the geometry is the spec's CHS geometry when it multiplies out to
    exactly that size, and the maximum 65535/16/255 otherwise, which readers
    take to mean "use current_size" (qemu's own ``force_size`` does the same).
    Rounding the size up to a CHS size, as qemu-img and Virtual PC do, was
    rejected: conversions would change disk sizes, and Azure refuses fixed
    VHDs whose size is not a whole number of MiB.  Hence ``create -o
    subformat=fixed`` of a whole number of MiB gives a VHD Azure accepts (file
    size = size + 512, exact ``current_size``).  Only Virtual PC, discontinued
    with Windows 8, would see a different size for non-CHS sizes.

Sector bitmaps
    One bit per sector, most significant bit first.  In a differencing disk a
    clear bit means "read the parent"; in a dynamic disk the data of an
    allocated block is read directly (as qemu does), and polyvisor marks the
    whole block present when it allocates one (new blocks read as zeros).

Parents
    Followed only through ``opener.open_backing`` (confined to the image's
    directory unless allowed): relative locators first (W2ru, Wi2r, MacX),
    then absolute ones; a Windows path with a drive letter or UNC server
    cannot be followed here, so its basename (and the header's parent name)
    is looked for in the image's directory.  The parent's footer unique id
    must equal the header's parent unique id.

Limits
    Disks up to 2040 GiB, Hyper-V's and qemu's limit (a BAT holds 32-bit
    sector offsets, so a dynamic disk's file cannot pass 2 TiB).  Fixed disks
    have no BAT: larger ones (Azure data disks) are read, but not created.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote

import polyvisor
from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.disk.formats.vhd_structs import (
    BAT_UNUSED,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_FIXED,
    DISK_TYPE_NAMES,
    FEATURE_RESERVED,
    FOOTER,
    FOOTER_CHECKSUM_AT,
    FOOTER_COOKIE,
    HEADER,
    HEADER_CHECKSUM_AT,
    HEADER_COOKIE,
    HEADER_LOCATORS_AT,
    HEADER_PARENT_ID_AT,
    LOCATOR,
    LOCATOR_COUNT,
    MAX_GEOMETRY,
    NO_NEXT_STRUCTURE,
    PLATFORM_MAC,
    PLATFORM_MACX,
    PLATFORM_NONE,
    PLATFORM_W2KU,
    PLATFORM_W2RU,
    PLATFORM_WI2K,
    PLATFORM_WI2R,
    SECTOR,
    VERSION_1_0,
    DynamicHeader,
    Footer,
    ParentLocator,
    checksum,
    chs_geometry,
    code_text,
    uuid_text,
    vhd_time,
    vhd_time_now,
    vhd_time_text,
    with_checksum,
)
from polyvisor.disk.image import DiskImage, ExtentKind, ProbeSample, Run, file_run, is_zero
from polyvisor.disk.paths import windows_path_to_relative
from polyvisor.disk.registry import register_format
from polyvisor.disk.structs import align_up, is_power_of_two
from polyvisor.errors import (
    BackingChainError,
    ChecksumMismatch,
    CorruptImage,
    LimitExceeded,
    MissingReference,
    ReferenceError_,
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

GIB = 1 << 30

#: Block size of new dynamic and differencing disks (the spec's and Hyper-V's default).
DEFAULT_BLOCK_SIZE = 2 << 20
#: Block sizes ``create`` accepts (powers of two); Hyper-V itself uses 512 KiB and 2 MiB.
MIN_CREATE_BLOCK_SIZE = 512 << 10
#: Largest block size polyvisor opens (its sector bitmap is 64 KiB).
MAX_BLOCK_SIZE = 256 << 20
#: Largest dynamic or differencing disk (Hyper-V's documented limit).
MAX_DYNAMIC_SIZE = 2040 * GIB
#: Largest BAT polyvisor loads (64 MiB of entries; 2040 GiB in 512 KiB blocks needs 4 Mi).
MAX_BAT_ENTRIES = 1 << 24
#: Largest parent locator polyvisor reads (a Windows path is at most 32767 UTF-16 units).
MAX_LOCATOR_BYTES = 64 << 10
#: Largest BAT value: a block's sector offset must fit in 32 bits (and differ from BAT_UNUSED).
MAX_BLOCK_SECTOR = BAT_UNUSED - 1
#: Sector bitmaps kept in memory (differencing disks).
BITMAP_CACHE_BLOCKS = 256

#: What polyvisor writes in the footer (see the module docstring).
CREATOR_APPLICATION = b"pvsr"
CREATOR_HOST_OS = b"Wi2k"


def _creator_version() -> int:
    parts = [int(p) for p in re.findall(r"\d+", polyvisor.__version__)[:2]] + [0, 0]
    return (parts[0] & 0xFFFF) << 16 | (parts[1] & 0xFFFF)


CREATOR_VERSION = _creator_version()

#: Creator applications whose disks are sized by their CHS geometry.
CHS_CREATORS = {b"vpc ": "Microsoft Virtual PC", b"qemu": "QEMU (without force_size)"}
#: Creator applications known to size disks by current_size.
CURRENT_SIZE_CREATORS = {
    b"win ": "Microsoft Hyper-V",
    b"d2v ": "Sysinternals Disk2vhd",
    b"tap\0": "XenServer",
    b"CTXS": "Citrix XenConverter",
    b"qem2": "QEMU (force_size)",
    b"wa\0\0": "Microsoft Azure",
    CREATOR_APPLICATION: "polyvisor",
    b"vbox": "VirtualBox",
}

_NOT_UNUSED = re.compile(rb"[^\xff]")


# ----------------------------------------------------------------- helpers


def _footer_problem(raw: bytes) -> str | None:
    """Why *raw* is not a valid footer (cookie, checksum), or None."""
    if len(raw) < SECTOR or raw[:8] != FOOTER_COOKIE:
        return "no 'conectix' cookie"
    stored = int.from_bytes(raw[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4], "big")
    computed = checksum(raw[:SECTOR], FOOTER_CHECKSUM_AT)
    if stored != computed:
        return f"checksum {stored:#010x} does not match the computed {computed:#010x}"
    return None


@record(frozen=True)
class SizeRule:
    """Which footer field gives the virtual size, and why."""

    size: int
    source: str  #: "chs" or "current_size"
    reason: str


def size_rule(footer: Footer) -> SizeRule:
    """The virtual size of a disk with *footer*, by its creator application (see the module docstring)."""
    chs_size = footer.cylinders * footer.heads * footer.sectors_per_track * SECTOR
    app = footer.creator_application
    geometry = (footer.cylinders, footer.heads, footer.sectors_per_track)
    if geometry == MAX_GEOMETRY:
        return SizeRule(footer.current_size, "current_size",
                        "maximum CHS geometry 65535/16/255: the size is in current_size")
    if app in CHS_CREATORS:
        return SizeRule(chs_size, "chs", f"{CHS_CREATORS[app]} sizes disks by their CHS geometry")
    if app in CURRENT_SIZE_CREATORS:
        return SizeRule(footer.current_size, "current_size",
                        f"{CURRENT_SIZE_CREATORS[app]} sizes disks by current_size")
    note = "" if chs_size == footer.current_size else f" (qemu 7.2 uses the CHS size, {chs_size} bytes)"
    return SizeRule(footer.current_size, "current_size",
                    f"unknown creator {code_text(app)!r}: current_size, as Hyper-V and VirtualBox read it{note}")


def _decode_utf16le(data: bytes) -> str:
    return data.decode("utf-16-le").split("\0", 1)[0]


def _decode_legacy(data: bytes) -> str:
    """Wi2r/Wi2k data: UTF-16LE when it looks like it (every odd byte zero), else UTF-8."""
    if len(data) >= 2 and len(data) % 2 == 0 and not any(data[1::2]):
        return _decode_utf16le(data)
    return data.decode("utf-8").split("\0", 1)[0]


def _file_url_path(url: str) -> str:
    """The path of a MacX locator's file URL (``file://localhost/a/b``, ``file:///a/b``, ``file://./b``)."""
    if url.lower().startswith("file://"):
        rest = url[7:]
        if rest.lower().startswith("localhost/"):
            rest = rest[9:]
        url = rest
    return unquote(url)


@record
class Locator:
    """A parent locator entry and its decoded path."""

    index: int
    entry: ParentLocator
    path: str | None = None
    problem: str | None = None  #: the entry or its data is damaged (check reports it)
    note: str | None = None  #: valid, but not a path polyvisor can follow

    @property
    def platform(self) -> str:
        """The platform code as text."""
        return code_text(self.entry.platform_code).rstrip()

    @property
    def reserved_bytes(self) -> int:
        """Room reserved for the data: the spec counts sectors, Virtual PC and Hyper-V write bytes."""
        space = self.entry.data_space
        return space * SECTOR if space < SECTOR else space


@record
class DynamicLayout:
    """The dynamic-disk structures of a dynamic or differencing VHD, kept in memory."""

    header: DynamicHeader
    header_offset: int
    block_size: int
    bitmap_size: int
    bat: bytearray  #: the BAT as stored (big-endian 32-bit sector offsets)
    locators: list[Locator] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Number of BAT entries (max_table_entries)."""
        return len(self.bat) // 4

    @property
    def bat_offset(self) -> int:
        """Where the BAT starts in the file."""
        return self.header.table_offset

    def entry(self, index: int) -> int:
        """The BAT value of block *index*."""
        return int.from_bytes(self.bat[4 * index : 4 * index + 4], "big")

    def allocated(self) -> Iterator[tuple[int, int]]:
        """(block index, sector offset) of every allocated BAT entry."""
        values = array("I", bytes(self.bat))
        if sys.byteorder == "little":
            values.byteswap()
        for index, value in enumerate(values):
            if value != BAT_UNUSED:
                yield index, value

    def next_allocated(self, start: int, limit: int) -> int:
        """The first allocated block index in ``[start, limit)``, or *limit*."""
        found = _NOT_UNUSED.search(self.bat, 4 * start, 4 * limit)
        return limit if found is None else found.start() // 4


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set the bits of sectors ``[first, last)`` (most significant bit first)."""
    i = first
    while i < last and i % 8:
        bitmap[i // 8] |= 0x80 >> (i % 8)
        i += 1
    whole = (last - i) // 8
    if whole > 0:
        bitmap[i // 8 : i // 8 + whole] = b"\xff" * whole
        i += whole * 8
    while i < last:
        bitmap[i // 8] |= 0x80 >> (i % 8)
        i += 1


def _bits_text(bitmap: bytes | bytearray) -> str:
    """The bitmap as a string of '0'/'1', sector 0 first."""
    return format(int.from_bytes(bitmap, "big"), f"0{len(bitmap) * 8}b")


# ------------------------------------------------------------------ the format


@register_format
class VhdImage(DiskImage):
    """A VHD file: fixed, dynamic or differencing."""

    format_name = "vhd"
    aliases = ("vpc",)
    subformats = ("dynamic", "fixed")
    create_options = frozenset({"block_size"})
    supports_backing = True
    max_virtual_size = MAX_DYNAMIC_SIZE

    def __init__(
        self,
        path: Path,
        *,
        virtual_size: int,
        subformat: str,
        files: list[ImageFile],
        footer: Footer,
        rule: SizeRule,
        layout: DynamicLayout | None,
        writable: bool = False,
        backing: DiskImage | None = None,
        backing_reference: str | None = None,
        outputs: OutputFiles | None = None,
        footer_note: str | None = None,
        problems: list[tuple[str, str, int | None]] | None = None,
    ) -> None:
        super().__init__(path, virtual_size=virtual_size, subformat=subformat, files=files, writable=writable,
                         backing=backing, backing_reference=backing_reference, outputs=outputs)
        self.footer = footer
        self.rule = rule
        self.layout = layout
        #: Set when the footer came from the copy at offset 0.
        self.footer_note = footer_note
        #: Problems found while opening that did not prevent it (reported by check).
        self.open_problems = problems or []
        self._bitmaps: OrderedDict[int, bytearray] = OrderedDict()
        self._data_end: int | None = None  #: where the next block goes (writable dynamic disks)
        self._tail_trimmed = False
        self._bat_dirty: tuple[int, int] | None = None
        self._footer_dirty = False

    @property
    def _file(self) -> ImageFile:
        return self.files[0]

    @property
    def differencing(self) -> bool:
        """Whether this is a differencing disk."""
        return self.footer.disk_type == DISK_DIFFERENCING

    # ------------------------------------------------------------- probing

    @classmethod
    def probe(cls, sample: ProbeSample) -> int:
        """100 for a footer copy at offset 0 (dynamic, differencing); 50 for a valid footer at the end (fixed)."""
        if sample.head[:8] == FOOTER_COOKIE:
            return 100
        if sample.size >= SECTOR and len(sample.tail) == SECTOR and _footer_problem(sample.tail) is None:
            return 50
        return 0

    # ------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open a VHD; a differencing disk's parent is opened through *opener*."""
        file = ImageFile.open(path, writable=writable)
        try:
            image = cls._open_file(Path(path), file, writable=writable, opener=opener)
        except BaseException:
            file.close()
            raise
        return image

    @classmethod
    def _open_file(cls, path: Path, file: ImageFile, *, writable: bool, opener: Opener) -> Self:
        size = file.size
        footer, footer_at, note, problems = cls._read_footers(path, file, size)
        kind = DISK_TYPE_NAMES.get(footer.disk_type)
        if kind is None:
            error = UnsupportedFeature if footer.disk_type in (0, 1, 5, 6) else CorruptImage
            raise error(path, f"disk type {footer.disk_type} is not fixed (2), dynamic (3) or differencing (4)",
                        structure=FOOTER.name, offset=footer_at + 60)
        if footer.format_version >> 16 != 1:
            raise UnsupportedFeature(path, f"file format version {footer.format_version:#010x} (polyvisor reads 1.x)",
                                     structure=FOOTER.name, offset=footer_at + 12)
        rule = size_rule(footer)
        virtual_size = rule.size - rule.size % SECTOR
        if footer.disk_type == DISK_FIXED:
            if virtual_size > footer_at:
                raise TruncatedImage(
                    path, f"the footer gives a virtual size of {virtual_size} bytes ({rule.source}) but the file "
                    f"holds {footer_at} bytes of data before it", structure="VHD fixed disk data", offset=footer_at)
            return cls(path, virtual_size=virtual_size, subformat="fixed", files=[file], footer=footer, rule=rule,
                       layout=None, writable=writable, problems=problems)
        if virtual_size > MAX_DYNAMIC_SIZE:
            raise LimitExceeded(path, f"virtual size {virtual_size} bytes ({rule.source}) exceeds the 2040 GiB "
                                "limit of dynamic VHDs", structure=FOOTER.name, offset=footer_at + 48)
        layout = cls._read_layout(path, file, footer, footer_at=footer_at, virtual_size=virtual_size)
        image = cls(path, virtual_size=virtual_size, subformat=kind, files=[file], footer=footer, rule=rule,
                    layout=layout, writable=writable, footer_note=note, problems=problems)
        try:
            if footer.disk_type == DISK_DIFFERENCING:
                image._open_parent(opener)
            if writable:
                image._prepare_writes()
        except BaseException:
            if image.backing is not None:  # the caller closes the file itself
                image.backing.close()
            raise
        return image

    @staticmethod
    def _read_footers(path: Path, file: ImageFile,
                      size: int) -> tuple[Footer, int, str | None, list[tuple[str, str, int | None]]]:
        """The footer to use, its offset, a note if it is the copy, and problems for check (spec: footer)."""
        if size < SECTOR:
            raise TruncatedImage(path, f"{size} bytes is too small to hold a VHD footer", structure=FOOTER.name,
                                 offset=0)
        end_at = size - SECTOR
        end_raw = file.read(end_at, SECTOR, FOOTER.name)
        end_problem = _footer_problem(end_raw)
        copy_raw = file.read(0, SECTOR, "VHD footer copy") if end_at >= SECTOR else b""
        copy_present = copy_raw[:8] == FOOTER_COOKIE
        copy_problem = _footer_problem(copy_raw) if copy_present else "missing"
        problems: list[tuple[str, str, int | None]] = []
        if end_problem is None:
            footer = FOOTER.unpack(end_raw)
            if footer.disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
                if copy_problem is not None:
                    problems.append(("VHD footer copy", copy_problem, 0))
                elif copy_raw != end_raw:
                    problems.append(("VHD footer copy", f"differs from the footer at offset {end_at}", 0))
            return footer, end_at, None, problems
        if copy_problem is None:
            footer = FOOTER.unpack(copy_raw)
            if footer.disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
                problems.append((FOOTER.name, f"damaged at the end of the file ({end_problem}); the copy at offset "
                                 "0 is good", end_at))
                note = (f"the footer at the end of the file (offset {end_at}) is damaged ({end_problem}); "
                        "read using its copy at offset 0")
                return footer, 0, note, problems
        if end_raw[:8] == FOOTER_COOKIE:
            raise ChecksumMismatch(path, end_problem, structure=FOOTER.name, offset=end_at)
        if copy_present:
            raise ChecksumMismatch(path, f"{copy_problem}, and there is no valid footer at the end of the file",
                                   structure="VHD footer copy", offset=0)
        raise CorruptImage(path, "not a VHD: no 'conectix' footer at the end of the file or at offset 0",
                           structure=FOOTER.name, offset=end_at)

    @staticmethod
    def _read_layout(path: Path, file: ImageFile, footer: Footer, *, footer_at: int,
                     virtual_size: int) -> DynamicLayout:
        """Read and validate the dynamic disk header and the BAT (spec: "Dynamic Disk Header Format")."""
        size = file.size
        offset = footer.data_offset
        if offset < SECTOR or offset == NO_NEXT_STRUCTURE:
            raise CorruptImage(path, f"dynamic disk header offset {offset:#x} points into the footer copy",
                               structure=FOOTER.name, offset=footer_at + 16)
        if offset + HEADER.size > size:
            raise TruncatedImage(path, f"dynamic disk header at {offset} ends past the end of the file ({size} bytes)",
                                 structure=HEADER.name, offset=offset)
        raw = file.read(offset, HEADER.size, HEADER.name)
        if raw[:8] != HEADER_COOKIE:
            raise CorruptImage(path, "no 'cxsparse' cookie where the footer places the dynamic disk header",
                               structure=HEADER.name, offset=offset)
        stored = int.from_bytes(raw[HEADER_CHECKSUM_AT : HEADER_CHECKSUM_AT + 4], "big")
        computed = checksum(raw, HEADER_CHECKSUM_AT)
        if stored != computed:
            raise ChecksumMismatch(path, f"checksum {stored:#010x} does not match the computed {computed:#010x}",
                                   structure=HEADER.name, offset=offset)
        header = HEADER.unpack(raw)
        if header.header_version >> 16 != 1:
            raise UnsupportedFeature(path, f"header version {header.header_version:#010x} (polyvisor reads 1.x)",
                                     structure=HEADER.name, offset=offset + 24)
        block_size = header.block_size
        if not is_power_of_two(block_size) or block_size < SECTOR:
            raise CorruptImage(path, f"block size {block_size} is not a power of two of at least 512 bytes",
                               structure=HEADER.name, offset=offset + 32)
        if block_size > MAX_BLOCK_SIZE:
            raise LimitExceeded(path, f"block size {block_size} exceeds polyvisor's limit of {MAX_BLOCK_SIZE}",
                                structure=HEADER.name, offset=offset + 32)
        entries = header.max_table_entries
        needed = -(-virtual_size // block_size)
        if entries > MAX_BAT_ENTRIES:
            raise LimitExceeded(path, f"{entries} BAT entries exceed polyvisor's limit of {MAX_BAT_ENTRIES}",
                                structure=HEADER.name, offset=offset + 28)
        if entries < needed:
            raise CorruptImage(path, f"the BAT has {entries} entries but {virtual_size} bytes in {block_size}-byte "
                               f"blocks need {needed}", structure=HEADER.name, offset=offset + 28)
        bat_offset = header.table_offset
        if bat_offset < SECTOR:
            raise CorruptImage(path, f"BAT offset {bat_offset} points into the footer copy",
                               structure=HEADER.name, offset=offset + 16)
        if bat_offset + 4 * entries > size:
            raise TruncatedImage(path, f"the BAT ({entries} entries at {bat_offset}) ends past the end of the file "
                                 f"({size} bytes)", structure="VHD block allocation table", offset=bat_offset)
        bat = bytearray(file.read(bat_offset, 4 * entries, "VHD block allocation table"))
        bitmap_size = align_up(-(-(block_size // SECTOR) // 8), SECTOR)
        layout = DynamicLayout(header=header, header_offset=offset, block_size=block_size,
                               bitmap_size=bitmap_size, bat=bat)
        if footer.disk_type == DISK_DIFFERENCING:
            layout.locators = VhdImage._read_locators(file, size, layout)
        return layout

    @staticmethod
    def _read_locators(file: ImageFile, size: int, layout: DynamicLayout) -> list[Locator]:
        """Decode the parent locator entries in use (spec: "Parent Locator Entries")."""
        locators = []
        raw = layout.header.parent_locators
        for index in range(LOCATOR_COUNT):
            entry = LOCATOR.unpack(raw, index * LOCATOR.size)
            if entry.platform_code == PLATFORM_NONE:
                continue
            locator = Locator(index, entry)
            locators.append(locator)
            if entry.data_length > MAX_LOCATOR_BYTES:
                locator.problem = f"{entry.data_length} bytes of locator data exceed {MAX_LOCATOR_BYTES}"
                continue
            if entry.data_offset + entry.data_length > size:
                locator.problem = f"data at {entry.data_offset} ({entry.data_length} bytes) ends past the end of file"
                continue
            if entry.platform_code == PLATFORM_MAC:
                locator.note = "a Mac OS alias, which polyvisor cannot follow"
                continue
            data = file.read(entry.data_offset, entry.data_length, "VHD parent locator data")
            try:
                if entry.platform_code in (PLATFORM_W2KU, PLATFORM_W2RU):
                    locator.path = _decode_utf16le(data)
                elif entry.platform_code in (PLATFORM_WI2K, PLATFORM_WI2R):
                    locator.path = _decode_legacy(data)
                elif entry.platform_code == PLATFORM_MACX:
                    locator.path = _file_url_path(data.decode("utf-8").split("\0", 1)[0])
                else:
                    locator.note = "unknown platform code"
            except UnicodeDecodeError as exc:
                locator.problem = f"path is not valid text: {exc.reason}"
            if locator.path == "":
                locator.path, locator.problem = None, "empty path"
        return locators

    # --------------------------------------------------------------- parents

    def parent_name(self) -> str:
        """The header's parent unicode name (UTF-16 big-endian, spec: "Parent Unicode Name")."""
        assert self.layout is not None
        try:
            return self.layout.header.parent_unicode_name.decode("utf-16-be").split("\0", 1)[0]
        except UnicodeDecodeError:
            return ""

    def parent_references(self) -> list[str]:
        """References to try for the parent, best first (relative, absolute, then basenames here)."""
        assert self.layout is not None
        relative: list[str] = []
        absolute: list[str] = []
        basenames: list[str] = []
        order = {PLATFORM_W2RU: 0, PLATFORM_WI2R: 1, PLATFORM_MACX: 2, PLATFORM_W2KU: 3, PLATFORM_WI2K: 4}
        usable = [loc for loc in self.layout.locators if loc.path is not None]
        for loc in sorted(usable, key=lambda loc: order.get(loc.entry.platform_code, 9)):
            text = loc.path or ""
            if loc.entry.platform_code == PLATFORM_MACX:
                reference = text
            else:
                windows = PureWindowsPath(text)
                if windows.drive:  # C:\... or \\server\share\...: not a path on this host
                    basenames.append(windows.name)
                    continue
                reference = windows_path_to_relative(text)
            (absolute if PurePosixPath(reference).is_absolute() else relative).append(reference)
        name = self.parent_name()
        if name:
            basenames.append(PureWindowsPath(name).name)
        unique: list[str] = []
        for reference in relative + absolute + basenames:
            if reference and reference not in unique:
                unique.append(reference)
        return unique

    def _open_parent(self, opener: Opener) -> None:
        """Find and open the parent (spec: "Identification of the Parent Hard Disk Image")."""
        assert self.layout is not None
        references = self.parent_references()
        if not references:
            raise CorruptImage(self.path, "differencing disk without a usable parent locator or parent name",
                               structure=HEADER.name, offset=self.layout.header_offset + HEADER_LOCATORS_AT)
        self.backing_reference = references[0]
        refused: list[ReferenceError_] = []
        for reference in references:
            try:
                parent = opener.open_backing(self.path, reference, "vhd", what="VHD parent")
            except (MissingReference, UnsafeReference) as exc:
                refused.append(exc)
                continue
            self.backing_reference = reference
            if parent is None:
                return
            self.backing = parent
            expected = self.layout.header.parent_unique_id
            found = parent.footer.unique_id if isinstance(parent, VhdImage) else b""
            if found != expected:
                raise BackingChainError(
                    self.path, f"parent {parent.path} has unique id {uuid_text(found) if found else 'none'}, but "
                    f"this differencing disk was made from {uuid_text(expected)}",
                    structure="VHD parent unique id", offset=self.layout.header_offset + HEADER_PARENT_ID_AT)
            return
        unsafe = [exc for exc in refused if isinstance(exc, UnsafeReference)]
        if unsafe:
            raise unsafe[0]
        tried = ", ".join(repr(r) for r in references)
        raise MissingReference(self.path, f"VHD parent not found (tried {tried})", structure="VHD parent locator")

    # ------------------------------------------------------------- creating

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """Create a fixed, dynamic or (with a backing file) differencing VHD."""
        subformat = options.subformat or cls.subformats[0]
        if backing is not None:
            if subformat != "dynamic":
                raise UnsupportedOption(f"{path}: a VHD with a parent is a differencing disk; subformat "
                                        f"{subformat!r} cannot have one")
            if not isinstance(backing, VhdImage):
                raise UnsupportedFeature(path, f"a VHD differencing disk's parent must be a VHD, not "
                                         f"{backing.format_name}", structure="VHD parent")
            if size != backing.virtual_size:
                raise UsageError(f"{path}: a differencing VHD has its parent's size ({backing.virtual_size} "
                                 f"bytes), not {size}")
        if size > MAX_DYNAMIC_SIZE:
            raise UsageError(f"{path}: {size} bytes exceeds the VHD limit of 2040 GiB")
        if subformat == "fixed" and options.block_size is not None:
            raise UnsupportedOption("vhd: block_size applies to dynamic and differencing disks, not fixed ones")
        block_size = options.block_size or DEFAULT_BLOCK_SIZE
        if not is_power_of_two(block_size) or not MIN_CREATE_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise UsageError(f"{path}: VHD block_size must be a power of two from 512K to 256M, not {block_size}")
        disk_type = DISK_FIXED if subformat == "fixed" else DISK_DYNAMIC
        if backing is not None:
            disk_type = DISK_DIFFERENCING
        footer = cls._new_footer(size, disk_type)
        outputs = OutputFiles()
        try:
            file = outputs.create(path)
            if disk_type == DISK_FIXED:
                file.truncate(size + SECTOR)
                file.write(size, FOOTER.pack(footer))
                return cls(path, virtual_size=size, subformat="fixed", files=[file], footer=footer,
                           rule=size_rule(footer), layout=None, writable=True, outputs=outputs)
            parent = backing if isinstance(backing, VhdImage) else None
            layout, data_end, reference = cls._write_dynamic_metadata(
                path, file, footer, size=size, block_size=block_size, parent=parent)
        except BaseException:
            outputs.abort()
            raise
        image = cls(path, virtual_size=size, subformat=DISK_TYPE_NAMES[disk_type], files=[file], footer=footer,
                    rule=size_rule(footer), layout=layout, writable=True, backing=backing,
                    backing_reference=reference, outputs=outputs)
        image._data_end = data_end
        image._tail_trimmed = True
        image._footer_dirty = True
        return image

    @staticmethod
    def _new_footer(size: int, disk_type: int) -> Footer:
        """A footer for a new disk of exactly *size* bytes (see the module docstring on the geometry)."""
        geometry = chs_geometry(size // SECTOR)
        if geometry[0] * geometry[1] * geometry[2] * SECTOR != size:
            geometry = MAX_GEOMETRY
        footer = Footer(
            cookie=FOOTER_COOKIE, features=FEATURE_RESERVED, format_version=VERSION_1_0,
            data_offset=NO_NEXT_STRUCTURE if disk_type == DISK_FIXED else SECTOR, timestamp=vhd_time_now(),
            creator_application=CREATOR_APPLICATION, creator_version=CREATOR_VERSION,
            creator_host_os=CREATOR_HOST_OS, original_size=size, current_size=size,
            cylinders=geometry[0], heads=geometry[1], sectors_per_track=geometry[2], disk_type=disk_type,
            checksum=0, unique_id=os.urandom(16), saved_state=0, reserved=bytes(427),
        )
        footer.checksum = checksum(FOOTER.pack(footer), FOOTER_CHECKSUM_AT)
        return footer

    @staticmethod
    def _write_dynamic_metadata(path: Path, file: ImageFile, footer: Footer, *, size: int, block_size: int,
                                parent: VhdImage | None) -> tuple[DynamicLayout, int, str | None]:
        """Footer copy, header, BAT and parent locators of a new dynamic or differencing disk."""
        entries = -(-size // block_size)
        header_offset = SECTOR
        bat_offset = header_offset + HEADER.size
        bat_region = align_up(4 * entries, SECTOR)
        end = bat_offset + bat_region
        locator_entries = b""
        locator_data: list[tuple[int, bytes]] = []
        parent_id = bytes(16)
        parent_time = 0
        parent_name = bytes(512)
        reference: str | None = None
        if parent is not None:
            home = Path(os.path.abspath(path)).parent.resolve()
            target = Path(parent.path).resolve()
            relative = os.path.relpath(target, home).replace("/", "\\")
            if not relative.startswith(".."):
                relative = ".\\" + relative
            absolute = str(target).replace("/", "\\")
            reference = windows_path_to_relative(relative)
            for code, text in ((PLATFORM_W2KU, absolute), (PLATFORM_W2RU, relative)):
                data = text.encode("utf-16-le")
                space = align_up(max(len(data), 1), SECTOR)
                locator_entries += LOCATOR.pack(ParentLocator(code, space, len(data), 0, end))
                locator_data.append((end, data))
                end += space
            parent_id = parent.footer.unique_id
            parent_time = vhd_time(os.stat(target).st_mtime)
            name = target.name.encode("utf-16-be")[:510]
            parent_name = name + bytes(512 - len(name))
        header = DynamicHeader(
            cookie=HEADER_COOKIE, data_offset=NO_NEXT_STRUCTURE, table_offset=bat_offset,
            header_version=VERSION_1_0, max_table_entries=entries, block_size=block_size, checksum=0,
            parent_unique_id=parent_id, parent_timestamp=parent_time, reserved1=0, parent_unicode_name=parent_name,
            parent_locators=locator_entries + bytes(192 - len(locator_entries)), reserved2=bytes(256),
        )
        header_raw = with_checksum(HEADER.pack(header), HEADER_CHECKSUM_AT)
        header = HEADER.unpack(header_raw)
        footer_raw = FOOTER.pack(footer)
        bat = bytearray(b"\xff" * (4 * entries))
        file.write(0, footer_raw)
        file.write(header_offset, header_raw)
        file.write(bat_offset, b"\xff" * bat_region)
        for offset, data in locator_data:
            file.write(offset, data)
        file.write(end, footer_raw)
        layout = DynamicLayout(header=header, header_offset=header_offset, block_size=block_size,
                               bitmap_size=align_up(-(-(block_size // SECTOR) // 8), SECTOR), bat=bat)
        return layout, end, reference

    # --------------------------------------------------------------- mapping

    def _map(self, offset: int, length: int) -> Iterator[Run]:
        if self.layout is None:
            yield from self._map_fixed(offset, length)
            return
        layout = self.layout
        block_size = layout.block_size
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // block_size
            value = layout.entry(index)
            if value == BAT_UNUSED:
                next_index = layout.next_allocated(index + 1, -(-end // block_size))
                stop = min(end, next_index * block_size)
                yield Run(pos, stop - pos, ExtentKind.UNALLOCATED)
                pos = stop
                continue
            block_start = index * block_size
            stop = min(end, block_start + block_size)
            self._refuse_block_on_metadata(index, value)
            data_host = value * SECTOR + layout.bitmap_size
            if not self.differencing:
                yield Run(pos, stop - pos, ExtentKind.DATA, file=self._file, host_offset=data_host + pos - block_start)
            else:
                yield from self._map_bitmap(index, pos, stop, data_host)
            pos = stop

    def _refuse_block_on_metadata(self, index: int, value: int) -> None:
        """A block (bitmap + data) must not overlap the footer copy, the dynamic header or the BAT."""
        assert self.layout is not None
        layout = self.layout
        start = value * SECTOR
        end = start + layout.bitmap_size + layout.block_size
        for name, meta_start, meta_size in (
            ("the footer copy", 0, FOOTER.size),
            ("the dynamic disk header", layout.header_offset, HEADER.size),
            ("the BAT", layout.bat_offset, 4 * layout.entries),
        ):
            if start < meta_start + meta_size and meta_start < end:
                raise CorruptImage(self.path, f"block {index} at {start} overlaps {name} at {meta_start}",
                                   structure=f"VHD BAT entry {index}", offset=layout.bat_offset + 4 * index)

    def _map_bitmap(self, index: int, pos: int, stop: int, data_host: int) -> Iterator[Run]:
        """Runs of a differencing block: set bits are here, clear bits read the parent."""
        assert self.layout is not None
        block_start = index * self.layout.block_size
        bits = _bits_text(self._bitmap(index))
        sector = (pos - block_start) // SECTOR
        last = -(-(stop - block_start) // SECTOR)
        while sector < last:
            present = bits[sector] == "1"
            following = bits.find("0" if present else "1", sector, last)
            if following < 0:
                following = last
            start = max(pos, block_start + sector * SECTOR)
            end = min(stop, block_start + following * SECTOR)
            if present:
                yield Run(start, end - start, ExtentKind.DATA, file=self._file,
                          host_offset=data_host + start - block_start)
            else:
                yield Run(start, end - start, ExtentKind.UNALLOCATED)
            sector = following

    def _map_fixed(self, offset: int, length: int) -> Iterator[Run]:
        """A fixed disk's data is the start of the file; holes of a sparse file read as zeros."""
        yield file_run(self._file, offset, length, offset)

    def _bitmap(self, index: int) -> bytearray:
        """The sector bitmap of allocated block *index* (cached)."""
        assert self.layout is not None
        cached = self._bitmaps.get(index)
        if cached is not None:
            self._bitmaps.move_to_end(index)
            return cached
        offset = self.layout.entry(index) * SECTOR
        bitmap = bytearray(self._file.read(offset, self.layout.bitmap_size, "VHD sector bitmap"))
        self._remember_bitmap(index, bitmap)
        return bitmap

    def _remember_bitmap(self, index: int, bitmap: bytearray) -> None:
        self._bitmaps[index] = bitmap
        self._bitmaps.move_to_end(index)
        while len(self._bitmaps) > BITMAP_CACHE_BLOCKS:
            self._bitmaps.popitem(last=False)

    # --------------------------------------------------------------- writing

    def _prepare_writes(self) -> None:
        """Find where new blocks go: after every structure the file uses (spec: "Implementing a Dynamic Disk")."""
        layout = self.layout
        if layout is None:
            return
        end = max(layout.header_offset + HEADER.size, layout.bat_offset + 4 * layout.entries)
        for locator in layout.locators:
            end = max(end, locator.entry.data_offset + max(locator.entry.data_length, locator.reserved_bytes))
        for _, value in layout.allocated():
            end = max(end, value * SECTOR + layout.bitmap_size + layout.block_size)
        end = align_up(end, SECTOR)
        if end > self._file.size:
            raise TruncatedImage(self.path, f"blocks or metadata end at {end}, past the end of the file "
                                 f"({self._file.size} bytes); refusing to write",
                                 structure="VHD block allocation table", offset=layout.bat_offset)
        self._data_end = end
        self._footer_dirty = self.footer_note is not None  # a damaged end footer is rewritten from the copy

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest bytes: in place for fixed disks, block by block for dynamic and differencing ones."""
        self._check_write(offset, len(data))
        if self.layout is None:
            self._file.write(offset, data)
            return
        view = memoryview(data).cast("B")
        block_size = self.layout.block_size
        done = 0
        while done < len(view):
            guest = offset + done
            index = guest // block_size
            within = guest - index * block_size
            n = min(block_size - within, len(view) - done)
            if self.differencing:
                self._write_differencing(index, within, view[done : done + n])
            else:
                self._write_dynamic(index, within, view[done : done + n])
            done += n

    def _write_dynamic(self, index: int, within: int, chunk: memoryview) -> None:
        assert self.layout is not None
        value = self.layout.entry(index)
        if value == BAT_UNUSED:
            if is_zero(chunk):
                return  # an unallocated block already reads as zeros
            value = self._allocate(index, b"\xff" * self.layout.bitmap_size)
        self._file.write(value * SECTOR + self.layout.bitmap_size + within, chunk)

    def _write_differencing(self, index: int, within: int, chunk: memoryview) -> None:
        """Write whole sectors (partial ones completed from what the chain shows) and set their bits."""
        assert self.layout is not None
        block_start = index * self.layout.block_size
        end = within + len(chunk)
        head = within - within % SECTOR
        tail = align_up(end, SECTOR)
        payload: bytes | bytearray | memoryview = chunk
        if head != within or tail != end:
            merged = bytearray(tail - head)
            if head != within:
                merged[:SECTOR] = self.read(block_start + head, SECTOR)
            if tail != end:
                merged[-SECTOR:] = self.read(block_start + tail - SECTOR, SECTOR)
            merged[within - head : end - head] = chunk
            payload = merged
        value = self.layout.entry(index)
        if value == BAT_UNUSED:
            bitmap = bytearray(self.layout.bitmap_size)
            value = self._allocate(index, bitmap)
            self._remember_bitmap(index, bitmap)
        else:
            bitmap = self._bitmap(index)
        self._file.write(value * SECTOR + self.layout.bitmap_size + head, payload)
        _set_bits(bitmap, head // SECTOR, tail // SECTOR)
        self._file.write(value * SECTOR, bitmap)

    def _allocate(self, index: int, bitmap: bytes | bytearray) -> int:
        """Append a block for BAT entry *index* (spec: "Implementing a Dynamic Disk"); returns its sector offset."""
        assert self.layout is not None
        assert self._data_end is not None
        if not self._tail_trimmed:
            self._file.truncate(self._data_end)  # the old footer and anything unused after the data
            self._tail_trimmed = True
        start = self._data_end
        if start // SECTOR > MAX_BLOCK_SECTOR:
            raise LimitExceeded(self.path, "the file has reached the 2 TiB a BAT's 32-bit sector offsets can address",
                                structure="VHD block allocation table", offset=self.layout.bat_offset + 4 * index)
        self._data_end = start + self.layout.bitmap_size + self.layout.block_size
        self._file.truncate(self._data_end)  # the block reads as zeros until written
        self._file.write(start, bitmap)
        value = start // SECTOR
        self.layout.bat[4 * index : 4 * index + 4] = value.to_bytes(4, "big")
        low, high = self._bat_dirty or (index, index + 1)
        self._bat_dirty = (min(low, index), max(high, index + 1))
        self._footer_dirty = True
        return value

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range; unallocated blocks of a dynamic disk already read as zeros and are skipped."""
        self._check_write(offset, length)
        if self.layout is None or self.differencing:
            super().write_zeroes(offset, length)
            return
        layout = self.layout
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // layout.block_size
            if layout.entry(index) == BAT_UNUSED:
                next_index = layout.next_allocated(index + 1, -(-end // layout.block_size))
                pos = min(end, next_index * layout.block_size)
                continue
            stop = min(end, (index + 1) * layout.block_size)
            super().write_zeroes(pos, stop - pos)
            pos = stop

    def _write_metadata(self) -> None:
        """Write the BAT entries changed since the last flush and the footer at the new end of the file."""
        layout = self.layout
        if layout is None or not self.writable or self._file.closed:
            return
        if self._bat_dirty is not None:
            low, high = self._bat_dirty
            self._file.write(layout.bat_offset + 4 * low, layout.bat[4 * low : 4 * high])
            self._bat_dirty = None
        if self._footer_dirty and self._data_end is not None:
            self._file.write(self._data_end, FOOTER.pack(self.footer))
            self._file.truncate(self._data_end + SECTOR)
            self._footer_dirty = False

    def _finish(self) -> None:
        self._write_metadata()

    def flush(self) -> None:
        """Write the in-memory BAT and the footer, then push everything to stable storage."""
        if not self.closed:
            self._write_metadata()
        super().flush()

    # ------------------------------------------------------------- checking

    def check(self) -> CheckResult:
        """Footer and footer copy, header, BAT entries (range, metadata, overlaps), bitmaps, leaks."""
        result = self._new_check_result()
        for structure, message, offset in self.open_problems:
            result.corruption(structure, message, offset)
        if self.footer.current_size % SECTOR:
            result.corruption(FOOTER.name, f"current size {self.footer.current_size} is not a whole number of "
                              "sectors", None)
        for locator in self.layout.locators if self.layout is not None else []:
            if locator.problem is not None:
                result.corruption(f"VHD parent locator {locator.index} ({locator.platform})", locator.problem,
                                  locator.entry.data_offset)
        if self.layout is not None:
            self._check_layout(result)
        return result

    def _check_layout(self, result: CheckResult) -> None:
        layout = self.layout
        assert layout is not None
        file_size = self._file.size
        data_limit = file_size if self.footer_note else file_size - SECTOR
        if layout.header_offset % SECTOR:
            result.corruption(HEADER.name, "not aligned to a sector", layout.header_offset)
        if layout.bat_offset % SECTOR:
            result.corruption("VHD block allocation table", "not aligned to a sector", layout.bat_offset)
        metadata: list[tuple[int, int, str]] = [
            (0, SECTOR, "footer copy"),
            (layout.header_offset, layout.header_offset + HEADER.size, "dynamic disk header"),
            (layout.bat_offset, layout.bat_offset + 4 * layout.entries, "block allocation table"),
        ]
        metadata_end = max(layout.header_offset + HEADER.size, layout.bat_offset + 4 * layout.entries)
        for locator in layout.locators:
            start = locator.entry.data_offset
            metadata.append((start, start + locator.entry.data_length, f"parent locator {locator.index} data"))
            metadata_end = max(metadata_end, start + max(locator.entry.data_length, locator.reserved_bytes))
        for i, (a_start, a_end, a_name) in enumerate(metadata):
            for b_start, b_end, b_name in metadata[i + 1 :]:
                if a_start < b_end and b_start < a_end and a_end > a_start and b_end > b_start:
                    result.corruption(f"VHD {b_name}", f"overlaps the {a_name}", b_start)
        needed = -(-self.virtual_size // layout.block_size)
        span = layout.bitmap_size + layout.block_size
        blocks: list[tuple[int, int, int]] = []
        allocated = 0
        for index, value in layout.allocated():
            start = value * SECTOR
            end = start + span
            where = layout.bat_offset + 4 * index
            structure = f"VHD BAT entry {index}"
            if index >= needed:
                result.leak(structure, f"allocates a block at {start} beyond the disk's {needed} blocks", where)
            else:
                allocated += 1
            if start >= data_limit:
                result.corruption(structure, f"sector bitmap at {start} lies beyond the end of the data "
                                  f"({data_limit})", where)
                continue
            if end > data_limit:
                result.corruption(structure, f"block {start}..{end} extends past the end of the data ({data_limit})",
                                  where)
            for m_start, m_end, m_name in metadata:
                if start < m_end and m_start < end and m_end > m_start:
                    result.corruption(structure, f"block {start}..{end} overlaps the {m_name}", where)
            blocks.append((start, end, index))
        blocks.sort()
        for (a_start, a_end, a_index), (b_start, _, b_index) in itertools.pairwise(blocks):
            if b_start < a_end:
                result.corruption(f"VHD BAT entry {b_index}", f"block at {b_start} overlaps block {a_index} "
                                  f"({a_start}..{a_end})", layout.bat_offset + 4 * b_index)
        self._report_gaps(result, align_up(metadata_end, SECTOR), [(start, end) for start, end, _ in blocks],
                          data_limit, span)
        result.allocated_units = allocated
        result.total_units = needed
        result.image_end_offset = file_size

    @staticmethod
    def _report_gaps(result: CheckResult, metadata_end: int, blocks: list[tuple[int, int]], data_limit: int,
                     span: int) -> None:
        """Unused space between the metadata and the footer that could hold a block is leaked.

        Smaller gaps are alignment padding (writers align metadata and blocks differently).
        """
        pos = metadata_end
        for start, end in [*blocks, (data_limit, data_limit)]:
            if start - pos >= span:
                result.leak("VHD file", f"{start - pos} bytes at {pos}..{start} are not used by any block", pos)
            pos = max(pos, end)

    # ------------------------------------------------------------- describing

    def _details(self) -> dict[str, Any]:
        footer = self.footer
        details: dict[str, Any] = {
            "disk_type": DISK_TYPE_NAMES[footer.disk_type],
            "creator_application": code_text(footer.creator_application),
            "creator_version": f"{footer.creator_version >> 16}.{footer.creator_version & 0xFFFF}",
            "creator_host_os": code_text(footer.creator_host_os),
            "size_source": self.rule.source,
            "size_rule": self.rule.reason,
            "current_size": footer.current_size,
            "original_size": footer.original_size,
            "geometry": {"cylinders": footer.cylinders, "heads": footer.heads,
                         "sectors_per_track": footer.sectors_per_track,
                         "size": footer.cylinders * footer.heads * footer.sectors_per_track * SECTOR},
            "unique_id": uuid_text(footer.unique_id),
            "timestamp": vhd_time_text(footer.timestamp),
            "saved_state": bool(footer.saved_state),
            "footer_source": self.footer_note or "the footer at the end of the file",
        }
        layout = self.layout
        if layout is not None:
            details["block_size"] = layout.block_size
            details["max_table_entries"] = layout.entries
            details["allocated_blocks"] = sum(1 for _ in layout.allocated())
        if self.differencing and layout is not None:
            details["parent"] = {
                "unique_id": uuid_text(layout.header.parent_unique_id),
                "timestamp": vhd_time_text(layout.header.parent_timestamp),
                "unicode_name": self.parent_name(),
                "locators": [
                    {"platform": loc.platform, "path": loc.path,
                     **({"problem": loc.problem} if loc.problem else {}), **({"note": loc.note} if loc.note else {})}
                    for loc in layout.locators
                ],
                "reference": self.backing_reference,
                "opened": str(self.backing.path) if self.backing is not None else None,
            }
        return details
