"""On-disk structures of the VHD format, from Microsoft's "Virtual Hard Disk Image Format Specification".

Every field is big-endian ("network byte order", spec: Introduction).  The
structures are the hard disk footer (spec: "Hard Disk Footer Format"), the
dynamic disk header with its eight parent locator entries (spec: "Dynamic
Disk Header Format"), and the CHS geometry algorithm of the spec's appendix
("CHS Calculation").  :mod:`polyvisor.disk.formats.vhd` builds the format on
top of them.
"""

from __future__ import annotations

import datetime
import uuid

from polyvisor.disk.structs import Layout
from polyvisor.records import record

SECTOR = 512

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"

#: Disk types (spec: footer "Disk Type"); 1, 5 and 6 are deprecated, 0 is "none".
DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

#: Footer "Features": bit 1 is reserved and must always be set; bit 0 marks a temporary disk.
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2

#: File format / header version 1.0 (major in the upper 16 bits).
VERSION_1_0 = 0x00010000

#: "Data Offset" of a fixed disk's footer and of the dynamic header: no next structure.
NO_NEXT_STRUCTURE = 0xFFFFFFFFFFFFFFFF

#: A BAT entry for a block that is not allocated.
BAT_UNUSED = 0xFFFFFFFF

#: Seconds between the Unix epoch and the VHD epoch (January 1, 2000 00:00:00 UTC).
VHD_EPOCH = 946684800

#: The largest geometry the appendix's algorithm produces (about 127 GiB).  Readers
#: (qemu among them) take a footer with exactly this geometry to mean "use current size".
MAX_GEOMETRY = (65535, 16, 255)


@record(slots=True)
class Footer:
    """The 512-byte hard disk footer (spec: "Hard Disk Footer Format").

    Fixed disks have it only at the end of the file; dynamic and differencing
    disks also keep a copy at offset 0.
    """

    cookie: bytes
    features: int
    format_version: int
    data_offset: int  #: absolute offset of the dynamic disk header (all ones for fixed disks)
    timestamp: int  #: creation time, seconds since the VHD epoch
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int
    reserved: bytes


FOOTER = Layout(Footer, ">8sIIQI4sI4sQQHBBII16sB427s", "VHD footer")
#: Offset of the checksum inside the footer.
FOOTER_CHECKSUM_AT = 64


@record(slots=True)
class DynamicHeader:
    """The 1024-byte dynamic disk header (spec: "Dynamic Disk Header Format")."""

    cookie: bytes
    data_offset: int  #: unused by the format; all ones
    table_offset: int  #: absolute offset of the block allocation table
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes
    parent_timestamp: int
    reserved1: int
    parent_unicode_name: bytes  #: UTF-16 big-endian, NUL padded
    parent_locators: bytes  #: eight :class:`ParentLocator` entries
    reserved2: bytes


HEADER = Layout(DynamicHeader, ">8sQQIIII16sII512s192s256s", "VHD dynamic disk header")
HEADER_CHECKSUM_AT = 36
#: Offset of the parent unique id inside the header.
HEADER_PARENT_ID_AT = 40
#: Offset of the first parent locator entry inside the header.
HEADER_LOCATORS_AT = 576


@record(slots=True)
class ParentLocator:
    """One of the eight parent locator entries of the dynamic header (spec: "Parent Locator Entries")."""

    platform_code: bytes  #: W2ku, W2ru, Wi2r, Wi2k, Mac, MacX, or zeros for an unused entry
    data_space: int  #: room reserved for the locator (sectors per the spec, bytes as Hyper-V writes it)
    data_length: int  #: bytes of locator data
    reserved: int
    data_offset: int  #: absolute offset of the locator data


LOCATOR = Layout(ParentLocator, ">4sIIIQ", "VHD parent locator")
LOCATOR_COUNT = 8

#: Platform codes (spec: "Parent Locator Entries").
PLATFORM_NONE = b"\0\0\0\0"
PLATFORM_W2RU = b"W2ru"  #: relative Windows path, UTF-16LE
PLATFORM_W2KU = b"W2ku"  #: absolute Windows path, UTF-16LE
PLATFORM_WI2R = b"Wi2r"  #: deprecated relative Windows path
PLATFORM_WI2K = b"Wi2k"  #: deprecated absolute Windows path
PLATFORM_MAC = b"Mac "  #: Mac OS alias (a binary blob)
PLATFORM_MACX = b"MacX"  #: file URL, UTF-8 (RFC 2396)


def checksum(data: bytes | bytearray | memoryview, checksum_at: int) -> int:
    """The one's complement of the byte sum, the checksum field counted as zero (spec: footer "Checksum")."""
    view = memoryview(data).cast("B")
    total = sum(view) - sum(view[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


def with_checksum(data: bytes, checksum_at: int) -> bytes:
    """*data* with its checksum field filled in."""
    value = checksum(data, checksum_at)
    return data[:checksum_at] + value.to_bytes(4, "big") + data[checksum_at + 4 :]


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """Cylinders, heads and sectors per track for a disk of *total_sectors* (spec: "Appendix: CHS Calculation").

    The product may fall short of *total_sectors*: the geometry rounds down.
    """
    sectors = min(total_sectors, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cylinder_heads = sectors // per_track
    else:
        per_track = 17
        cylinder_heads = sectors // per_track
        heads = max(4, (cylinder_heads + 1023) // 1024)
        if cylinder_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cylinder_heads = sectors // per_track
        if cylinder_heads >= heads * 1024:
            per_track, heads = 63, 16
            cylinder_heads = sectors // per_track
    return cylinder_heads // heads, heads, per_track


def vhd_time_now() -> int:
    """The current time as a VHD timestamp."""
    return vhd_time(datetime.datetime.now(datetime.UTC).timestamp())


def vhd_time(unix_seconds: float) -> int:
    """A Unix time as a VHD timestamp (clamped to the 32-bit field)."""
    return min(max(int(unix_seconds) - VHD_EPOCH, 0), 0xFFFFFFFF)


def vhd_time_text(timestamp: int) -> str:
    """A VHD timestamp as ISO 8601 UTC text."""
    moment = datetime.datetime.fromtimestamp(VHD_EPOCH + timestamp, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def code_text(code: bytes) -> str:
    """A four-character code (creator application, host OS, platform) as printable text."""
    return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in code).replace("\\x00", "\\0")


def uuid_text(raw: bytes) -> str:
    """A 16-byte unique id as a UUID string."""
    return str(uuid.UUID(bytes=bytes(raw)))
