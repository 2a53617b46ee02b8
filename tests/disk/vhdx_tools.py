"""Helpers for the VHDX tests: reading and rewriting structures of test images, hand-built logs,
and a real dirty log made by qemu-io through blkdebug."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from polyvisor import records
from polyvisor.disk.formats import vhdx_structs as vs
from tests.peers import qemu_img, require

MIB = 1 << 20


def patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def headers(path: Path) -> list[vs.Header]:
    """Both headers as stored (validity not checked)."""
    return [vs.HEADER.unpack(read(path, offset, vs.HEADER.size)) for offset in vs.HEADER_OFFSETS]


def current_header(path: Path) -> tuple[int, vs.Header]:
    """Index and contents of the header with the higher sequence number."""
    both = headers(path)
    index = 0 if both[0].sequence_number > both[1].sequence_number else 1
    return index, both[index]


def write_header(path: Path, index: int, header: vs.Header) -> None:
    """Store *header* in slot *index* with a correct checksum."""
    buf = bytearray(vs.HEADER_SIZE)
    buf[: vs.HEADER.size] = vs.HEADER.pack(records.replace(header, checksum=0))
    patch(path, vs.HEADER_OFFSETS[index], bytes(vs.with_checksum(buf)))


def update_header(path: Path, **changes: object) -> vs.Header:
    """The spec's header update: the changed current header, next sequence number, into the other slot."""
    index, header = current_header(path)
    new = records.replace(header, sequence_number=header.sequence_number + 1, **changes)
    write_header(path, 1 - index, new)
    return new


def region_table(path: Path) -> tuple[vs.RegionTableHeader, list[vs.RegionTableEntry]]:
    raw = read(path, vs.REGION_TABLE_OFFSETS[0], vs.REGION_TABLE_SIZE)
    header = vs.REGION_TABLE_HEADER.unpack(raw)
    entries = [vs.REGION_TABLE_ENTRY.unpack(raw, 16 + 32 * i) for i in range(min(header.entry_count, 2047))]
    return header, entries


def write_region_table(path: Path, entries: list[vs.RegionTableEntry], count: int | None = None) -> None:
    """Both region table copies with *entries* (and an entry count, possibly a false one), checksummed."""
    table = bytearray(vs.REGION_TABLE_SIZE)
    table[:16] = vs.REGION_TABLE_HEADER.pack(vs.RegionTableHeader(b"regi", 0, len(entries) if count is None
                                                                  else count, 0))
    for i, entry in enumerate(entries):
        table[16 + 32 * i : 48 + 32 * i] = vs.REGION_TABLE_ENTRY.pack(entry)
    vs.with_checksum(table)
    for offset in vs.REGION_TABLE_OFFSETS:
        patch(path, offset, bytes(table))


def region(path: Path, guid: bytes) -> vs.RegionTableEntry:
    return next(e for e in region_table(path)[1] if e.guid == guid)


def bat_offset(path: Path) -> int:
    return region(path, vs.BAT_REGION).file_offset


def bat_entry(path: Path, index: int) -> int:
    return int.from_bytes(read(path, bat_offset(path) + 8 * index, 8), "little")


def set_bat_entry(path: Path, index: int, value: int) -> None:
    patch(path, bat_offset(path) + 8 * index, value.to_bytes(8, "little"))


def metadata_entries(path: Path) -> dict[bytes, tuple[int, vs.MetadataTableEntry]]:
    """Metadata table entries by item GUID, with the file offset of each table entry."""
    base = region(path, vs.METADATA_REGION).file_offset
    table = read(path, base, vs.METADATA_TABLE_SIZE)
    count = vs.METADATA_TABLE_HEADER.unpack(table).entry_count
    out = {}
    for i in range(count):
        at = 32 + 32 * i
        entry = vs.METADATA_TABLE_ENTRY.unpack(table, at)
        out[entry.item_id] = (base + at, entry)
    return out


def metadata_item_offset(path: Path, guid: bytes) -> int:
    base = region(path, vs.METADATA_REGION).file_offset
    return base + metadata_entries(path)[guid][1].offset


def set_metadata_entry(path: Path, guid: bytes, **changes: int | bytes) -> None:
    at, entry = metadata_entries(path)[guid]
    patch(path, at, vs.METADATA_TABLE_ENTRY.pack(records.replace(entry, **changes)))


def replace_parent_locator(path: Path, locator: dict[str, str]) -> None:
    """Rewrite the parent locator item, appended after the other items of the metadata region."""
    from polyvisor.disk.formats.vhdx import _parent_locator_bytes

    data = _parent_locator_bytes(locator)
    entries = metadata_entries(path)
    end = max(e.offset + e.length for _, e in entries.values())
    base = region(path, vs.METADATA_REGION).file_offset
    patch(path, base + end, data)
    set_metadata_entry(path, vs.PARENT_LOCATOR, offset=end, length=len(data))


# ------------------------------------------------------------------ logs


LogWrite = tuple[int, bytes | int]  # (file offset, a 4 KiB sector or a zero length)


def log_entry(sequence: int, log_guid: bytes, writes: list[LogWrite], *, tail: int, file_size: int) -> bytes:
    """A log entry assembled field by field (independently of polyvisor's writer)."""
    count = len(writes)
    desc_sectors = -(-(count + 2) // 128)
    data = [w for w in writes if isinstance(w[1], bytes)]
    total = (desc_sectors + len(data)) * 4096
    buf = bytearray(total)
    buf[:64] = vs.LOG_ENTRY_HEADER.pack(vs.LogEntryHeader(b"loge", 0, total, tail, sequence, count, 0, log_guid,
                                                          file_size, file_size))
    sector = desc_sectors
    for i, (offset, payload) in enumerate(writes):
        if isinstance(payload, int):
            desc = vs.LogDescriptor(b"zero", bytes(4), payload.to_bytes(8, "little"), offset, sequence)
        else:
            desc = vs.LogDescriptor(b"desc", payload[4092:], payload[:8], offset, sequence)
            buf[sector * 4096 : (sector + 1) * 4096] = vs.LOG_DATA_SECTOR.pack(
                vs.LogDataSector(b"data", sequence >> 32, payload[8:4092], sequence & 0xFFFFFFFF))
            sector += 1
        buf[64 + 32 * i : 96 + 32 * i] = vs.LOG_DESCRIPTOR.pack(desc)
    return bytes(vs.with_checksum(buf))


def put_in_log(path: Path, position: int, entry: bytes) -> None:
    """Store an entry at *position* of the circular log, wrapping at its end."""
    _, header = current_header(path)
    first = min(len(entry), header.log_length - position)
    patch(path, header.log_offset + position, entry[:first])
    if first < len(entry):
        patch(path, header.log_offset, entry[first:])


def bat_page(path: Path, index: int, value: int) -> tuple[int, bytes]:
    """The 4 KiB BAT page holding entry *index*, with that entry changed: ``(file offset, bytes)``."""
    offset = bat_offset(path) + (index * 8 // 4096) * 4096
    page = bytearray(read(path, offset, 4096))
    at = index * 8 % 4096
    page[at : at + 8] = value.to_bytes(8, "little")
    return offset, bytes(page)


def qemu_dirty_log(image: Path, command: str) -> None:
    """Leave *image* with a dirty log made by qemu itself.

    qemu logs each BAT update, then writes it in place and clears the log.
    blkdebug fails that in-place write of the BAT page (once; writes only, as
    qemu reads the page to build the entry), so the log entry stays behind,
    unreplayed, with LogGuid set in the header.
    """
    _, entries = region_table(image)
    bat = next(e for e in entries if e.guid == vs.BAT_REGION).file_offset
    config = image.parent / "blkdebug.conf"
    rule = ['event = "pwritev"', 'iotype = "write"', 'errno = "5"', f'sector = "{bat // 512}"', 'once = "on"']
    config.write_text("[inject-error]\n" + "\n".join(rule) + "\n")
    spec = {"driver": "vhdx", "file": {"driver": "blkdebug", "config": str(config),
                                       "image": {"driver": "file", "filename": str(image)}}}
    proc = subprocess.run([require("qemu-io"), "-c", command, "json:" + json.dumps(spec)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "write failed" in proc.stdout + proc.stderr, proc
    config.unlink()


def qemu_replayed_raw(image: Path, out: Path) -> Path:
    """What qemu reads after replaying the log of a copy of *image* (``check -r all`` replays)."""
    copy = out.with_suffix(".replay.vhdx")
    shutil.copyfile(image, copy)
    qemu_img("check", "-q", "-r", "all", str(copy), ok=(0, 1, 2, 3))
    qemu_img("convert", "-f", "vhdx", "-O", "raw", str(copy), str(out))
    copy.unlink()
    return out
