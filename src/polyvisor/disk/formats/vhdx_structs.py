"""[MS-VHDX] on-disk structures, their GUIDs, CRC-32C, and the metadata log's entries.

Section numbers (§) refer to Microsoft's [MS-VHDX] "Virtual Hard Disk v2 (VHDX)
File Format".  Every multi-byte field is little-endian; GUIDs are stored in
Microsoft's mixed-endian form (``uuid.UUID.bytes_le``).

The log functions here work on the log region as bytes: :func:`find_active_sequence`
finds the entries to replay (§2.3.3), :func:`resolve_replay` turns their
descriptors into the final bytes of each touched file range, and
:func:`build_log_entry` writes an entry for polyvisor's own journaled updates.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Sequence

import google_crc32c

from polyvisor.disk.structs import Layout
from polyvisor.records import record

KIB = 1 << 10
MIB = 1 << 20

# ----------------------------------------------------------------- layout (§2.1, §2.2)

#: The header section: file type identifier, two headers, two region tables (§2.2).
HEADER_SECTION_SIZE = 1 * MIB
FILE_IDENTIFIER_SIZE = 64 * KIB
HEADER_OFFSETS = (64 * KIB, 128 * KIB)
#: A header is 4 KiB; its checksum covers all of it (§2.2.2).
HEADER_SIZE = 4 * KIB
REGION_TABLE_OFFSETS = (192 * KIB, 256 * KIB)
#: A region table is 64 KiB; its checksum covers all of it (§2.2.3).
REGION_TABLE_SIZE = 64 * KIB
MAX_REGION_ENTRIES = 2047
#: Objects (regions, the log, blocks) are placed on 1 MiB boundaries (§2.1).
OBJECT_ALIGNMENT = 1 * MIB

#: The metadata table occupies the first 64 KiB of the metadata region (§2.6.1).
METADATA_TABLE_SIZE = 64 * KIB
MAX_METADATA_ENTRIES = 2047
MAX_METADATA_ITEM = 1 * MIB

MIN_BLOCK_SIZE = 1 * MIB
MAX_BLOCK_SIZE = 256 * MIB
#: Logical sectors described by one 1 MiB sector bitmap block (§2.4).
SECTORS_PER_BITMAP_BLOCK = 1 << 23
SECTOR_BITMAP_BLOCK_SIZE = 1 * MIB
#: The largest virtual disk the format allows (§2.6.2.2).
MAX_VIRTUAL_SIZE = 64 << 40

#: Log sectors are 4 KiB (§2.3).
LOG_SECTOR = 4 * KIB
#: Descriptor slots (32 bytes) per log sector; the entry header takes the first two of an entry.
DESCRIPTORS_PER_SECTOR = LOG_SECTOR // 32

ZERO_GUID = bytes(16)


def guid(text: str) -> bytes:
    """The on-disk (mixed-endian) bytes of a GUID written as text."""
    return uuid.UUID(text).bytes_le


def guid_text(raw: bytes) -> str:
    """The text form of an on-disk GUID."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


def new_guid() -> bytes:
    """A fresh random GUID in on-disk form."""
    return uuid.uuid4().bytes_le


# Known region GUIDs (§2.2.3.1).
BAT_REGION = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")

# Known metadata items (§2.6.2).
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")  #: page 83 data
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
#: The only parent locator type: a VHDX parent (§2.6.2.6.1).
VHDX_PARENT_LOCATOR_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

# Flags.
REGION_REQUIRED = 0x1  #: region table entry: the parser must understand it (§2.2.3.1)
METADATA_IS_USER = 0x1  #: metadata table entry flags (§2.6.1.2)
METADATA_IS_VIRTUAL_DISK = 0x2
METADATA_IS_REQUIRED = 0x4
LEAVE_BLOCKS_ALLOCATED = 0x1  #: file parameters flags (§2.6.2.1)
HAS_PARENT = 0x2

# BAT entry states (§2.5.1.1, §2.5.1.2).
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
#: The UNMAPPED value of the 0.95 draft; qemu still reads it as zeros.
PAYLOAD_BLOCK_UNMAPPED_V095 = 5
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
BAT_STATE_MASK = 0x7
#: FileOffsetMB occupies the top 44 bits; bits 3-19 are reserved (§2.5.1).
BAT_OFFSET_SHIFT = 20
BAT_RESERVED_MASK = 0xFFFF8


def bat_entry(state: int, file_offset: int = 0) -> int:
    """A BAT entry for *state* at byte offset *file_offset* (a multiple of 1 MiB)."""
    return (file_offset >> BAT_OFFSET_SHIFT) << BAT_OFFSET_SHIFT | state


def bat_offset(entry: int) -> int:
    """The byte offset a BAT entry's FileOffsetMB field names."""
    return (entry >> BAT_OFFSET_SHIFT) << BAT_OFFSET_SHIFT


# ----------------------------------------------------------------- CRC-32C


def crc32c_zeroed(data: bytes | bytearray | memoryview, at: int) -> int:
    """CRC-32C of *data* with its 4-byte checksum field at *at* taken as zero (§2.2.2)."""
    view = memoryview(data).cast("B")
    crc = google_crc32c.value(bytes(view[:at]))
    crc = google_crc32c.extend(crc, b"\0\0\0\0")
    return int(google_crc32c.extend(crc, bytes(view[at + 4 :])))


def checksum_ok(data: bytes | bytearray | memoryview, at: int = 4) -> bool:
    """Whether the checksum stored at *at* matches the data."""
    stored = int.from_bytes(bytes(memoryview(data)[at : at + 4]), "little")
    return crc32c_zeroed(data, at) == stored


def with_checksum(data: bytearray, at: int = 4) -> bytearray:
    """Store the CRC-32C of *data* into its checksum field at *at*; returns *data*."""
    data[at : at + 4] = crc32c_zeroed(data, at).to_bytes(4, "little")
    return data


# ----------------------------------------------------------------- structures


@record(slots=True)
class FileIdentifier:
    """§2.2.1: ``vhdxfile`` and the creator's name in UTF-16."""

    signature: bytes
    creator: bytes


FILE_IDENTIFIER = Layout(FileIdentifier, "<8s512s", "VHDX file type identifier")


@record(slots=True)
class Header:
    """§2.2.2: one of the two headers; the valid one with the higher sequence number is current."""

    signature: bytes
    checksum: int
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int


HEADER = Layout(Header, "<4sIQ16s16s16sHHIQ", "VHDX header")


@record(slots=True)
class RegionTableHeader:
    """§2.2.3: ``regi``, checksum over the 64 KiB table, entry count."""

    signature: bytes
    checksum: int
    entry_count: int
    reserved: int


REGION_TABLE_HEADER = Layout(RegionTableHeader, "<4sIII", "VHDX region table header")


@record(slots=True)
class RegionTableEntry:
    """§2.2.3.1: where a region (BAT, metadata) lives; bit 0 of *flags* is Required."""

    guid: bytes
    file_offset: int
    length: int
    flags: int


REGION_TABLE_ENTRY = Layout(RegionTableEntry, "<16sQII", "VHDX region table entry")


@record(slots=True)
class MetadataTableHeader:
    """§2.6.1.1: ``metadata`` and the entry count."""

    signature: bytes
    reserved: int
    entry_count: int
    reserved2: bytes


METADATA_TABLE_HEADER = Layout(MetadataTableHeader, "<8sHH20s", "VHDX metadata table header")


@record(slots=True)
class MetadataTableEntry:
    """§2.6.1.2: one metadata item, at *offset* from the start of the metadata region."""

    item_id: bytes
    offset: int
    length: int
    flags: int
    reserved: int


METADATA_TABLE_ENTRY = Layout(MetadataTableEntry, "<16sIIII", "VHDX metadata table entry")


@record(slots=True)
class FileParameters:
    """§2.6.2.1: block size, LeaveBlockAllocated (bit 0) and HasParent (bit 1)."""

    block_size: int
    flags: int


FILE_PARAMETERS_ITEM = Layout(FileParameters, "<II", "VHDX file parameters")


@record(slots=True)
class ParentLocatorHeader:
    """§2.6.2.6: the locator type and the number of key/value entries."""

    locator_type: bytes
    reserved: int
    key_value_count: int


PARENT_LOCATOR_HEADER = Layout(ParentLocatorHeader, "<16sHH", "VHDX parent locator header")


@record(slots=True)
class ParentLocatorEntry:
    """§2.6.2.6.2: offsets (from the locator's start) and byte lengths of a UTF-16 key and value."""

    key_offset: int
    value_offset: int
    key_length: int
    value_length: int


PARENT_LOCATOR_ENTRY = Layout(ParentLocatorEntry, "<IIHH", "VHDX parent locator entry")


@record(slots=True)
class LogEntryHeader:
    """§2.3.1.1: the 64-byte header opening every log entry."""

    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    reserved: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int


LOG_ENTRY_HEADER = Layout(LogEntryHeader, "<4sIIIQII16sQQ", "VHDX log entry header")


@record(slots=True)
class LogDescriptor:
    """§2.3.1.2-3: a zero descriptor (``zero``: *middle* is ZeroLength) or a data descriptor
    (``desc``: *trailing* and *leading* are bytes 4092-4095 and 0-7 of the sector)."""

    signature: bytes
    trailing: bytes
    middle: bytes
    file_offset: int
    sequence_number: int


LOG_DESCRIPTOR = Layout(LogDescriptor, "<4s4s8sQQ", "VHDX log descriptor")


@record(slots=True)
class LogDataSector:
    """§2.3.1.4: ``data``, the sequence number split around bytes 8-4091 of the logged sector."""

    signature: bytes
    sequence_high: int
    data: bytes
    sequence_low: int


LOG_DATA_SECTOR = Layout(LogDataSector, "<4sI4084sI", "VHDX log data sector")


# ----------------------------------------------------------------- the log (§2.3)


@record(slots=True)
class LogWrite:
    """One descriptor of a log entry: *length* bytes at *file_offset*, *data* or zeros (None)."""

    file_offset: int
    length: int
    data: bytes | None


@record(slots=True)
class LogEntry:
    """A structurally valid log entry whose checksum matched, at byte *position* of the log."""

    position: int
    header: LogEntryHeader
    writes: list[LogWrite]

    @property
    def sectors(self) -> int:
        """Log sectors the entry occupies."""
        return self.header.entry_length // LOG_SECTOR


def descriptor_sectors(count: int) -> int:
    """Sectors holding an entry header and *count* descriptors (never 0)."""
    return -(-(count + 2) // DESCRIPTORS_PER_SECTOR)


def _sector(log: bytes | bytearray, position: int, index: int) -> memoryview:
    """Sector *index* of an entry starting at *position*, wrapping around the circular log."""
    start = (position + index * LOG_SECTOR) % len(log)
    return memoryview(log)[start : start + LOG_SECTOR]


def parse_log_entry(log: bytes | bytearray, position: int, log_guid: bytes) -> LogEntry | None:
    """The entry at *position* if it is valid for *log_guid* (§2.3.1), else None.

    Every sector of a valid entry is checked to open with the right signature
    (``desc``/``zero`` for descriptor sectors, ``data`` for data sectors)
    before the checksum is computed, and the entry must consist of exactly its
    descriptor sectors and one data sector per data descriptor: so no sector
    of a valid entry can start another entry, and scanning a whole log costs
    time proportional to its length, whatever its contents.
    """
    log_sectors = len(log) // LOG_SECTOR
    first = _sector(log, position, 0)
    header = LOG_ENTRY_HEADER.unpack(first)
    if header.signature != b"loge" or header.log_guid != log_guid or header.sequence_number == 0:
        return None
    if header.entry_length == 0 or header.entry_length % LOG_SECTOR:
        return None
    total = header.entry_length // LOG_SECTOR
    count = header.descriptor_count
    desc_sectors = descriptor_sectors(count)
    if total > log_sectors or desc_sectors > total:
        return None
    sequence = header.sequence_number
    descriptors: list[LogDescriptor] = []
    for index in range(count):
        slot = index + 2
        sector = _sector(log, position, slot // DESCRIPTORS_PER_SECTOR)
        desc = LOG_DESCRIPTOR.unpack(sector, (slot % DESCRIPTORS_PER_SECTOR) * 32)
        if desc.signature not in (b"desc", b"zero") or desc.sequence_number != sequence:
            return None
        if desc.file_offset % LOG_SECTOR:
            return None
        if desc.signature == b"zero" and int.from_bytes(desc.middle, "little") % LOG_SECTOR:
            return None
        descriptors.append(desc)
    data_count = sum(1 for d in descriptors if d.signature == b"desc")
    if desc_sectors + data_count != total:
        return None
    writes: list[LogWrite] = []
    data_index = desc_sectors
    for desc in descriptors:
        if desc.signature == b"zero":
            writes.append(LogWrite(desc.file_offset, int.from_bytes(desc.middle, "little"), None))
            continue
        data = LOG_DATA_SECTOR.unpack(_sector(log, position, data_index))
        data_index += 1
        if data.signature != b"data" or (data.sequence_high << 32 | data.sequence_low) != sequence:
            return None
        writes.append(LogWrite(desc.file_offset, LOG_SECTOR, desc.middle + data.data + desc.trailing))
    crc = 0
    for index in range(total):
        chunk = bytes(_sector(log, position, index))
        if index == 0:
            chunk = chunk[:4] + b"\0\0\0\0" + chunk[8:]
        crc = google_crc32c.extend(crc, chunk)
    if crc != header.checksum:
        return None
    return LogEntry(position, header, writes)


def count_entry_headers(log: bytes | bytearray, log_guid: bytes) -> int:
    """Sectors that start like an entry of the log *log_guid* ("loge" and the GUID), valid or not."""
    count = 0
    for position in range(0, len(log), LOG_SECTOR):
        if log[position : position + 4] == b"loge" and LOG_ENTRY_HEADER.unpack(
            _sector(log, position, 0)
        ).log_guid == log_guid:
            count += 1
    return count


def find_active_sequence(log: bytes | bytearray, log_guid: bytes) -> list[LogEntry]:
    """The active log sequence to replay, oldest entry first; empty if there is none (§2.3.3).

    A sequence is a chain of valid entries, each starting where the previous one
    ends (circularly) with the next sequence number.  The active one is the chain
    with the highest sequence number whose last entry's Tail points at one of its
    entries; replay starts at that tail entry.
    """
    length = len(log)
    entries: dict[int, LogEntry] = {}
    for position in range(0, length, LOG_SECTOR):
        if log[position : position + 4] == b"loge":
            entry = parse_log_entry(log, position, log_guid)
            if entry is not None:
                entries[position] = entry
    successor: dict[int, int] = {}
    predecessor: dict[int, int] = {}
    for position, entry in entries.items():
        following = entries.get((position + entry.header.entry_length) % length)
        if following is not None and following.header.sequence_number == entry.header.sequence_number + 1:
            successor[position] = following.position
            predecessor[following.position] = position
    heads = sorted((p for p in entries if p not in successor),
                   key=lambda p: entries[p].header.sequence_number, reverse=True)
    for head_position in heads:
        tail = entries[head_position].header.tail
        chain = [head_position]
        while chain[-1] != tail and chain[-1] in predecessor:
            chain.append(predecessor[chain[-1]])
        if chain[-1] == tail:
            return [entries[p] for p in reversed(chain)]
    return []


def resolve_replay(entries: Sequence[LogEntry]) -> list[tuple[int, int, bytes | None]]:
    """The file ranges a replay writes, as sorted, disjoint ``(start, end, bytes or None for zeros)``.

    Descriptors are applied in log order, so where two overlap the later one
    wins; the result is computed with one sweep (no per-byte work).
    """
    writes = [w for e in entries for w in e.writes if w.length > 0]
    events: list[tuple[int, int, int]] = []  # (position, 0 = end / 1 = start, priority)
    for priority, write in enumerate(writes):
        events.append((write.file_offset, 1, priority))
        events.append((write.file_offset + write.length, 0, priority))
    events.sort()
    active: list[int] = []  # max-heap of priorities (negated)
    ended: set[int] = set()
    pieces: list[tuple[int, int, bytes | None]] = []
    index = 0
    while index < len(events):
        position = events[index][0]
        while index < len(events) and events[index][0] == position:
            _, kind, priority = events[index]
            if kind:
                heapq.heappush(active, -priority)
            else:
                ended.add(priority)
            index += 1
        while active and -active[0] in ended:
            heapq.heappop(active)
        if not active or index >= len(events):
            continue
        winner = writes[-active[0]]
        end = events[index][0]
        if winner.data is None:
            piece: bytes | None = None
        else:
            piece = winner.data[position - winner.file_offset : end - winner.file_offset]
        if pieces and pieces[-1][1] == position and pieces[-1][2] is None and piece is None:
            pieces[-1] = (pieces[-1][0], end, None)
        else:
            pieces.append((position, end, piece))
    return pieces


def build_log_entry(sequence: int, log_guid: bytes, pages: Sequence[tuple[int, bytes]], *,
                    tail: int, file_size: int) -> bytearray:
    """A log entry writing 4 KiB *pages* (``(file offset, bytes)``), checksummed (§2.3.1)."""
    desc_sectors = descriptor_sectors(len(pages))
    entry = bytearray((desc_sectors + len(pages)) * LOG_SECTOR)
    header = LogEntryHeader(
        signature=b"loge", checksum=0, entry_length=len(entry), tail=tail, sequence_number=sequence,
        descriptor_count=len(pages), reserved=0, log_guid=log_guid,
        flushed_file_offset=file_size, last_file_offset=file_size,
    )
    entry[: LOG_ENTRY_HEADER.size] = LOG_ENTRY_HEADER.pack(header)
    for index, (file_offset, page) in enumerate(pages):
        if len(page) != LOG_SECTOR or file_offset % LOG_SECTOR:
            raise ValueError("log pages are whole, aligned 4 KiB sectors")
        desc = LogDescriptor(b"desc", page[4092:], page[:8], file_offset, sequence)
        at = LOG_ENTRY_HEADER.size + index * LOG_DESCRIPTOR.size
        entry[at : at + LOG_DESCRIPTOR.size] = LOG_DESCRIPTOR.pack(desc)
        sector = LogDataSector(b"data", sequence >> 32, page[8:4092], sequence & 0xFFFFFFFF)
        at = (desc_sectors + index) * LOG_SECTOR
        entry[at : at + LOG_SECTOR] = LOG_DATA_SECTOR.pack(sector)
    return with_checksum(entry)
