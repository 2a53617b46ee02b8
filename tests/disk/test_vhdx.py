"""VHDX against qemu-img/qemu-io: both directions, every block size, logs, differencing chains, hostile files.

qemu 7.2 neither creates nor opens VHDX images with 4096-byte logical sectors
("Operation not supported") nor differencing VHDX images: those are checked
against raw references built from the same writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from polyvisor import records
from polyvisor.disk import DiskImage, ExtentKind, ReferencePolicy, check_image, create_image, open_image, probe_format
from polyvisor.disk.formats import vhdx_structs as vs
from polyvisor.disk.formats.vhdx import VhdxImage
from polyvisor.errors import (
    BackingChainError,
    ChecksumMismatch,
    CorruptImage,
    LimitExceeded,
    MissingReference,
    PolyvisorError,
    ReadOnlyImage,
    TruncatedImage,
    UnsafeReference,
    UnsupportedFeature,
    UnsupportedOption,
    UsageError,
)
from tests.disk import vhdx_tools as vt
from tests.patterns import apply_writes, qemu_io_commands, reference_raw, scattered_writes
from tests.peers import qemu_check, qemu_compare, qemu_create, qemu_img, qemu_info, qemu_io, qemu_to_raw

MIB = 1 << 20
BLOCK_SIZES = [1 << n for n in range(20, 29)]  # 1 MiB .. 256 MiB
BLOCK_IDS = [f"{b >> 20}M" for b in BLOCK_SIZES]
#: Not a multiple of any block size; several blocks at small block sizes.
SIZE = 40 * MIB + 3 * 512


def read_all(path: Path, policy: ReferencePolicy | None = None) -> bytes:
    with open_image(path, policy=policy or ReferencePolicy()) as image:
        return image.read(0, image.virtual_size)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def page(fill: int) -> bytes:
    return bytes([fill]) * 4096


# ------------------------------------------------------------------ qemu writes, polyvisor reads


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=BLOCK_IDS)
def test_qemu_images_read_identically(subformat: str, block_size: int, workdir: Path) -> None:
    image_path = workdir / "qemu.vhdx"
    qemu_create(image_path, "vhdx", SIZE, f"subformat={subformat},block_size={block_size}")
    qemu_io(image_path, "vhdx", *qemu_io_commands(SIZE, seed=block_size))
    oracle = qemu_to_raw(image_path, "vhdx", workdir / "oracle.raw").read_bytes()
    with open_image(image_path) as image:
        assert isinstance(image, VhdxImage)
        assert image.subformat == subformat
        assert image.virtual_size == len(oracle) == SIZE
        details = image.info().details
        assert details["block_size"] == block_size
        assert details["logical_sector_size"] == 512
        assert details["log"] == "clean"
        assert details["leave_blocks_allocated"] is (subformat == "fixed")
        result = image.check()
        assert result.clean, result.problems
        assert result.total_units == -(-SIZE // block_size)
        assert image.read(0, image.virtual_size) == oracle
        # Runs are whole stretches, not sectors: a hole-free map needs few extents.
        assert len(list(image.extents())) < 200


def test_qemu_converted_image_reads_identically(workdir: Path) -> None:
    source = workdir / "source.raw"
    qemu_create(source, "raw", SIZE)
    qemu_io(source, "raw", *qemu_io_commands(SIZE, seed=99))
    converted = workdir / "converted.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=2M", str(source), str(converted))
    assert read_all(converted) == source.read_bytes()


# ------------------------------------------------------------------ polyvisor writes, qemu reads


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=BLOCK_IDS)
def test_polyvisor_images_check_and_compare(subformat: str, block_size: int, workdir: Path) -> None:
    writes = scattered_writes(SIZE, seed=block_size)
    image_path = workdir / "disk.vhdx"
    with create_image(image_path, "vhdx", SIZE, subformat=subformat, block_size=str(block_size)) as image:
        apply_writes(image, writes)
    reference = reference_raw(workdir / "ref.raw", SIZE, writes)
    qemu_check(image_path, "vhdx")
    qemu_compare(image_path, "vhdx", reference, "raw")
    info = qemu_info(image_path)
    assert info["format"] == "vhdx"
    assert info["cluster-size"] == block_size
    assert info["virtual-size"] == SIZE
    with open_image(image_path) as image:
        assert image.subformat == subformat
        assert image.check().clean
        assert image.read(0, SIZE) == reference.read_bytes()
    if subformat == "fixed":
        blocks = -(-SIZE // block_size)
        ratio = (1 << 23) * 512 // block_size
        entries = [vt.bat_entry(image_path, b + b // ratio) for b in range(blocks)]
        assert all(e & 7 == vs.PAYLOAD_BLOCK_FULLY_PRESENT for e in entries)
        offsets = [vs.bat_offset(e) for e in entries]
        assert offsets == [offsets[0] + b * block_size for b in range(blocks)], "fixed blocks are contiguous"
        assert image_path.stat().st_size == offsets[0] + blocks * block_size
        assert image_path.stat().st_blocks * 512 < 24 * MIB, "a fixed image is a sparse file"


def test_default_block_size_is_32_mib(workdir: Path) -> None:
    with create_image(workdir / "d.vhdx", "vhdx", 3 * MIB) as image:
        assert image.info().details["block_size"] == 32 * MIB
        assert image.info().details["physical_sector_size"] == 4096
    assert qemu_info(workdir / "d.vhdx")["cluster-size"] == 32 * MIB


@pytest.mark.parametrize("bad", ["512K", "3M", "512M"])
def test_bad_block_size_refused(bad: str, workdir: Path) -> None:
    with pytest.raises(UsageError, match="block_size"):
        create_image(workdir / "x.vhdx", "vhdx", SIZE, block_size=bad).abort()
    assert list(workdir.iterdir()) == []


def test_bad_options_refused(workdir: Path) -> None:
    with pytest.raises(UsageError, match="logical_sector_size"):
        create_image(workdir / "x.vhdx", "vhdx", SIZE, logical_sector_size="1024").abort()
    with pytest.raises(UsageError, match="64 TiB"):
        create_image(workdir / "x.vhdx", "vhdx", (64 << 40) + 512).abort()
    with pytest.raises(UsageError, match="block_size"):  # 64 TiB at 1 MiB blocks: too large a BAT
        create_image(workdir / "x.vhdx", "vhdx", 64 << 40, block_size="1M").abort()
    with pytest.raises(UnsupportedOption):
        create_image(workdir / "x.vhdx", "vhdx", SIZE, cluster_size="64K").abort()
    assert list(workdir.iterdir()) == []


def test_qemu_writes_into_polyvisor_images(workdir: Path) -> None:
    """qemu-io writes into images polyvisor made, and polyvisor reads what qemu reads."""
    for subformat in ("dynamic", "fixed"):
        image_path = workdir / f"{subformat}.vhdx"
        with create_image(image_path, "vhdx", SIZE, subformat=subformat, block_size="4M") as image:
            apply_writes(image, scattered_writes(SIZE, seed=5, count=6))
        qemu_io(image_path, "vhdx", *qemu_io_commands(SIZE, seed=21))
        oracle = qemu_to_raw(image_path, "vhdx", workdir / "oracle.raw").read_bytes()
        with open_image(image_path) as image:
            assert image.check().clean
            assert image.read(0, SIZE) == oracle


def test_reopen_qemu_images_writable(workdir: Path) -> None:
    """qemu's images (ZERO-state blocks, even when fixed) take polyvisor's journaled writes."""
    for subformat in ("dynamic", "fixed"):
        image_path = workdir / f"{subformat}.vhdx"
        qemu_create(image_path, "vhdx", SIZE, f"subformat={subformat},block_size=1M")
        qemu_io(image_path, "vhdx", *qemu_io_commands(SIZE, seed=3))
        base = qemu_to_raw(image_path, "vhdx", workdir / "base.raw")
        writes = scattered_writes(SIZE, seed=8)
        with open_image(image_path, writable=True) as image:
            assert image.subformat == subformat
            apply_writes(image, writes)
        reference = reference_raw(workdir / "ref.raw", SIZE, writes, base=base)
        qemu_check(image_path, "vhdx")
        qemu_compare(image_path, "vhdx", reference, "raw")
        _, header = vt.current_header(image_path)
        assert header.log_guid == vs.ZERO_GUID


def test_write_zeroes_uses_zero_blocks(workdir: Path) -> None:
    image_path = workdir / "z.vhdx"
    with create_image(image_path, "vhdx", 8 * MIB, block_size="1M") as image:
        image.write(0, b"\x77" * (3 * MIB))
        image.write_zeroes(1 * MIB, 1 * MIB)  # allocated block: zeros written in place
        image.write_zeroes(5 * MIB, 2 * MIB)  # unallocated whole blocks: ZERO state
        image.write_zeroes(100, 200)  # partial, allocated
        image.write_zeroes(7 * MIB + 10, 5)  # partial, unallocated: nothing to do
    reference = bytearray(8 * MIB)
    reference[: 3 * MIB] = b"\x77" * (3 * MIB)
    reference[1 * MIB : 2 * MIB] = bytes(MIB)
    reference[100:300] = bytes(200)
    (workdir / "ref.raw").write_bytes(reference)
    qemu_check(image_path, "vhdx")
    qemu_compare(image_path, "vhdx", workdir / "ref.raw", "raw")
    assert [vt.bat_entry(image_path, b) & 7 for b in range(8)] == [6, 6, 6, 0, 0, 2, 2, 0]
    assert vs.bat_offset(vt.bat_entry(image_path, 5)) == 0, "ZERO blocks carry no file offset"
    with open_image(image_path) as image:
        kinds = [(e.offset, e.kind) for e in image.extents()]
        assert (5 * MIB, ExtentKind.ZERO) in kinds
        assert image.check().clean


# ------------------------------------------------------------------ 4096-byte logical sectors


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_4096_byte_sectors(subformat: str, workdir: Path) -> None:
    size = 20 * MIB + 512  # rounded up to a whole 4096-byte sector
    image_path = workdir / "big.vhdx"
    writes = scattered_writes(size, seed=12)
    with create_image(image_path, "vhdx", size, subformat=subformat, block_size="2M",
                      logical_sector_size="4096") as image:
        assert image.virtual_size == 20 * MIB + 4096
        apply_writes(image, writes)
    reference = reference_raw(workdir / "ref.raw", 20 * MIB + 4096, writes)
    with open_image(image_path) as image:
        details = image.info().details
        assert details["logical_sector_size"] == 4096
        assert image.subformat == subformat
        assert image.check().clean
        assert image.read(0, image.virtual_size) == reference.read_bytes()
    second = scattered_writes(size, seed=13, count=6)
    with open_image(image_path, writable=True) as image:
        apply_writes(image, second)
    reference = reference_raw(workdir / "ref2.raw", 20 * MIB + 4096, writes + second)
    assert read_all(image_path) == reference.read_bytes()


def test_4096_byte_sector_chunk_ratio(workdir: Path) -> None:
    """With 4096-byte sectors a sector bitmap covers 32 GiB: at 1 MiB blocks, 32768 payload entries per chunk."""
    size = 33 << 30
    image_path = workdir / "wide.vhdx"
    with create_image(image_path, "vhdx", size, block_size="1M", logical_sector_size="4096") as image:
        image.write(32 << 30, b"\x5a" * 4096)  # block 32768: the first of the second chunk
    entry = vt.bat_entry(image_path, 32768 + 1)  # one sector bitmap entry interleaved before it
    assert entry & 7 == vs.PAYLOAD_BLOCK_FULLY_PRESENT
    assert vt.bat_entry(image_path, 32768) == 0, "the sector bitmap entry of chunk 0"
    with open_image(image_path) as image:
        assert image.read(32 << 30, 4096) == b"\x5a" * 4096
        assert image.read((32 << 30) - 4096, 4096) == bytes(4096)


# ------------------------------------------------------------------ header updates


def test_read_only_open_never_writes(workdir: Path) -> None:
    image_path = workdir / "ro.vhdx"
    with create_image(image_path, "vhdx", SIZE) as image:
        image.write(0, b"a" * 1000)
    before, mtime = digest(image_path), image_path.stat().st_mtime_ns
    with open_image(image_path) as image:
        image.read(0, SIZE)
        image.check()
        with pytest.raises(ReadOnlyImage):
            image.write(0, b"b")
        with pytest.raises(ReadOnlyImage):
            image.write_zeroes(0, 512)
    assert digest(image_path) == before
    assert image_path.stat().st_mtime_ns == mtime


def test_writable_open_updates_headers_before_the_first_write(workdir: Path) -> None:
    image_path = workdir / "w.vhdx"
    with create_image(image_path, "vhdx", SIZE) as image:
        image.write(0, b"a" * 1000)
    before = vt.current_header(image_path)[1]
    untouched = digest(image_path)
    with open_image(image_path, writable=True):
        pass
    assert digest(image_path) == untouched, "no write, no header update"
    with open_image(image_path, writable=True) as image:
        image.write(5 * MIB, b"c" * 100)
    both = vt.headers(image_path)
    after = vt.current_header(image_path)[1]
    assert after.sequence_number > before.sequence_number
    assert after.file_write_guid != before.file_write_guid
    assert after.data_write_guid != before.data_write_guid
    assert after.log_guid == vs.ZERO_GUID
    assert {h.data_write_guid for h in both} == {after.data_write_guid}, "both copies carry the new GUIDs"
    with open_image(image_path) as image:
        details = image.info().details
        assert details["header_sequence_number"] == after.sequence_number
        assert details["data_write_guid"] == vs.guid_text(after.data_write_guid)
        assert details["file_write_guid"] == vs.guid_text(after.file_write_guid)


def test_current_header_is_the_valid_one_with_the_higher_sequence(workdir: Path) -> None:
    image_path = workdir / "h.vhdx"
    with create_image(image_path, "vhdx", SIZE):
        pass
    index, header = vt.current_header(image_path)
    other = records.replace(header, sequence_number=header.sequence_number + 5, data_write_guid=b"\x42" * 16)
    vt.write_header(image_path, 1 - index, other)
    with open_image(image_path) as image:
        assert image.info().details["data_write_guid"] == vs.guid_text(b"\x42" * 16)
        assert image.check().clean
    vt.patch(image_path, vs.HEADER_OFFSETS[1 - index] + 100, b"\xff")  # the newer copy is now invalid
    with open_image(image_path) as image:
        assert image.info().details["header_sequence_number"] == header.sequence_number
        problems = image.check().problems
        assert [p.structure for p in problems] == ["VHDX header"]
        assert "checksum" in problems[0].message


# ------------------------------------------------------------------ dirty logs


def dirty_qemu_image(workdir: Path) -> tuple[Path, Path]:
    """A qemu image whose last BAT update is only in its log, and what qemu reads after replaying it."""
    image_path = workdir / "dirty.vhdx"
    qemu_create(image_path, "vhdx", SIZE, "block_size=1M")
    qemu_io(image_path, "vhdx", "write -P 0x31 0 3M", "write -P 0x32 5M 100K")
    vt.qemu_dirty_log(image_path, "write -P 0x33 20M 70K")
    oracle = vt.qemu_replayed_raw(image_path, workdir / "oracle.raw")
    assert oracle.read_bytes()[20 * MIB : 20 * MIB + 70 * 1024] == b"\x33" * (70 * 1024)
    return image_path, oracle


def test_qemu_dirty_log_replayed_in_memory_read_only(workdir: Path) -> None:
    image_path, oracle = dirty_qemu_image(workdir)
    qemu_img("info", str(image_path), ok=(1,))  # qemu refuses to open it read-only
    before = digest(image_path)
    with open_image(image_path) as image:
        assert image.info().details["log"].startswith("replayed in memory (1 log entry, sequence 1..1)")
        assert image.read(0, SIZE) == oracle.read_bytes()
        result = image.check()
        assert [p.structure for p in result.problems] == ["VHDX log"]
    assert digest(image_path) == before


def test_qemu_dirty_log_replayed_on_disk_when_writable(workdir: Path) -> None:
    image_path, oracle = dirty_qemu_image(workdir)
    before = vt.current_header(image_path)[1]
    assert before.log_guid != vs.ZERO_GUID
    with open_image(image_path, writable=True) as image:
        assert image.info().details["log"].startswith("replayed on open")
        assert image.read(0, SIZE) == oracle.read_bytes()
    after = vt.current_header(image_path)[1]
    assert after.log_guid == vs.ZERO_GUID
    assert after.file_write_guid != before.file_write_guid
    assert after.sequence_number > before.sequence_number
    qemu_check(image_path, "vhdx")  # qemu opens it read-only again: the log is clean
    qemu_compare(image_path, "vhdx", oracle, "raw")
    with open_image(image_path) as image:
        assert image.info().details["log"] == "clean"
        assert image.check().clean


def handmade_log_image(workdir: Path) -> tuple[Path, bytes, list[vt.LogWrite]]:
    """A clean image, a fresh block appended to it, and log writes that would publish it.

    The writes: the BAT page mapping block 1 to the new block, 8 KiB of zeros
    and one 4 KiB sector of 0xCC over block 0's payload.
    """
    image_path = workdir / "log.vhdx"
    with create_image(image_path, "vhdx", 8 * MIB, block_size="1M") as image:
        image.write(0, b"\xaa" * MIB)
    host0 = vs.bat_offset(vt.bat_entry(image_path, 0))
    fresh = image_path.stat().st_size
    vt.patch(image_path, fresh, b"\xbb" * MIB)
    expected = bytearray(8 * MIB)
    expected[:MIB] = b"\xaa" * MIB
    expected[MIB : 2 * MIB] = b"\xbb" * MIB
    expected[4096:12288] = bytes(8192)
    expected[65536 : 65536 + 4096] = page(0xCC)
    writes: list[vt.LogWrite] = [
        vt.bat_page(image_path, 1, vs.bat_entry(vs.PAYLOAD_BLOCK_FULLY_PRESENT, fresh)),
        (host0 + 4096, 8192),
        (host0 + 65536, page(0xCC)),
    ]
    return image_path, bytes(expected), writes


def test_handmade_log_matches_qemu_replay(workdir: Path) -> None:
    """Two entries at the start of the log: polyvisor's replay (in memory, then on disk) equals qemu's."""
    image_path, expected, writes = handmade_log_image(workdir)
    size = image_path.stat().st_size
    log_guid = vs.new_guid()
    first = vt.log_entry(1, log_guid, writes[:1], tail=0, file_size=size)
    second = vt.log_entry(2, log_guid, writes[1:], tail=0, file_size=size)
    vt.put_in_log(image_path, 0, first)
    vt.put_in_log(image_path, len(first), second)
    vt.update_header(image_path, log_guid=log_guid)
    (workdir / "expected.raw").write_bytes(expected)
    oracle = vt.qemu_replayed_raw(image_path, workdir / "oracle.raw")
    assert oracle.read_bytes() == expected
    before = digest(image_path)
    assert read_all(image_path) == expected
    assert digest(image_path) == before
    with open_image(image_path, writable=True) as image:
        assert image.info().details["log"].startswith("replayed on open (2 log entries, sequence 1..2)")
    qemu_check(image_path, "vhdx")
    qemu_compare(image_path, "vhdx", workdir / "expected.raw", "raw")


def test_log_sequence_wraps_and_starts_at_the_tail(workdir: Path) -> None:
    """Entries wrapping around the end of the log; an older entry before the tail is not replayed;
    entries with a bad checksum or another LogGuid are ignored."""
    image_path, expected, writes = handmade_log_image(workdir)
    size = image_path.stat().st_size
    log_guid = vs.new_guid()
    length = vt.current_header(image_path)[1].log_length
    e1 = vt.log_entry(7, log_guid, [(vs.bat_offset(vt.bat_entry(image_path, 0)), page(0x99))], tail=0,
                      file_size=size)  # before the tail: already applied (here: must not be)
    start = length - 3 * 4096
    e2 = vt.log_entry(8, log_guid, writes[:1], tail=start, file_size=size)
    e3 = vt.log_entry(9, log_guid, writes[1:], tail=start, file_size=size)  # wraps past the end
    vt.put_in_log(image_path, start - len(e1), e1)
    vt.put_in_log(image_path, start, e2)
    vt.put_in_log(image_path, (start + len(e2)) % length, e3)
    stale = bytearray(vt.log_entry(50, log_guid, [(2 * MIB, page(1))], tail=64 * 4096, file_size=size))
    stale[200] ^= 1  # bad checksum, highest sequence number
    vt.put_in_log(image_path, 64 * 4096, bytes(stale))
    foreign = vt.log_entry(60, vs.new_guid(), [(2 * MIB, page(2))], tail=80 * 4096, file_size=size)
    vt.put_in_log(image_path, 80 * 4096, foreign)
    vt.update_header(image_path, log_guid=log_guid)
    with open_image(image_path) as image:
        assert image.info().details["log"].startswith("replayed in memory (2 log entries, sequence 8..9)")
        assert image.read(0, 8 * MIB) == expected


def corrupt_log(workdir: Path, mutate: str) -> Path:
    """A hand-made log broken in one way."""
    image_path, _, writes = handmade_log_image(workdir)
    size = image_path.stat().st_size
    log_guid = vs.new_guid()
    if mutate == "crc":
        entry = bytearray(vt.log_entry(1, log_guid, writes, tail=0, file_size=size))
        entry[4096 + 100] ^= 0xFF
        vt.put_in_log(image_path, 0, bytes(entry))
    elif mutate == "guid":
        vt.put_in_log(image_path, 0, vt.log_entry(1, vs.new_guid(), writes, tail=0, file_size=size))
    elif mutate == "sequence":  # the head's tail names an entry that does not chain to it
        first = vt.log_entry(1, log_guid, writes[:1], tail=100 * 4096, file_size=size)
        vt.put_in_log(image_path, 0, first)
        vt.put_in_log(image_path, len(first), vt.log_entry(3, log_guid, writes[1:], tail=0, file_size=size))
    elif mutate == "headers":
        vt.put_in_log(image_path, 0, vt.log_entry(1, log_guid, [(64 * 1024, page(0))], tail=0, file_size=size))
    elif mutate == "log":
        log_offset = vt.current_header(image_path)[1].log_offset
        vt.put_in_log(image_path, 0, vt.log_entry(1, log_guid, [(log_offset + 8192, page(0))], tail=0,
                                                  file_size=size))
    elif mutate == "past-end":
        vt.put_in_log(image_path, 0, vt.log_entry(1, log_guid, [(size + 64 * MIB, page(1))], tail=0,
                                                  file_size=size))
    elif mutate == "flushed":
        vt.put_in_log(image_path, 0, vt.log_entry(1, log_guid, writes, tail=0, file_size=size + 8 * MIB))
    vt.update_header(image_path, log_guid=log_guid)
    return image_path


def test_log_of_another_guid_has_nothing_to_replay(workdir: Path) -> None:
    """Per §2.3.3 entries of another log GUID are not part of the log: the image reads as it was, as qemu reads it."""
    image_path = corrupt_log(workdir, "guid")
    before = digest(image_path)
    with open_image(image_path) as image:
        assert "no valid sequence" in image.info().details["log"]
        data = image.read(0, 8 * MIB)
    assert data[MIB : 2 * MIB] == bytes(MIB), "block 1 was not published"
    assert data[:MIB] == b"\xaa" * MIB
    assert digest(image_path) == before
    assert data == qemu_to_raw(image_path, "vhdx", workdir / "oracle.raw").read_bytes()
    with open_image(image_path, writable=True) as image:  # the first write retires the stale LogGuid
        image.write(0, b"x")
    assert vt.current_header(image_path)[1].log_guid == vs.ZERO_GUID
    qemu_check(image_path, "vhdx")


@pytest.mark.parametrize("mutate", ["crc", "sequence"])
def test_corrupt_entries_of_the_current_log_are_refused(mutate: str, workdir: Path) -> None:
    """Entries of the current log that fail validation mean metadata may be stale: refused, never guessed.

    (The spec and qemu would read such an image as if the log were empty; polyvisor prefers a clear error.)
    """
    image_path = corrupt_log(workdir, mutate)
    before = digest(image_path)
    with pytest.raises(CorruptImage, match="no valid sequence"):
        open_image(image_path)
    assert check_image(image_path).corruptions == 1
    assert digest(image_path) == before


@pytest.mark.parametrize(("mutate", "error", "match"), [
    ("headers", CorruptImage, "file header"),
    ("log", CorruptImage, "log itself"),
    ("past-end", CorruptImage, "past the end"),
    ("flushed", TruncatedImage, "VHDX log"),
])
def test_dangerous_log_refused(mutate: str, error: type[PolyvisorError], match: str, workdir: Path) -> None:
    image_path = corrupt_log(workdir, mutate)
    before = digest(image_path)
    for writable in (False, True):
        started = time.monotonic()
        with pytest.raises(error, match=match):
            open_image(image_path, writable=writable).close()
        assert time.monotonic() - started < 5
    assert digest(image_path) == before


def test_oversized_log_refused(workdir: Path) -> None:
    image_path, _, _ = handmade_log_image(workdir)
    vt.update_header(image_path, log_guid=vs.new_guid(), log_length=1 << 31)
    with pytest.raises(LimitExceeded, match="log"):
        open_image(image_path).close()


def test_interrupted_journal_is_replayed_by_polyvisor_and_by_qemu(workdir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after polyvisor logged a BAT update but before it applied it: both replay the entry."""
    image_path = workdir / "j.vhdx"
    with create_image(image_path, "vhdx", SIZE, block_size="1M") as image:
        image.write(0, b"\x10" * MIB)
    image = open_image(image_path, writable=True)
    assert isinstance(image, VhdxImage)
    image.write(9 * MIB + 7, b"\x20" * 3 * MIB)  # allocates blocks 9..12
    bat = vt.bat_offset(image_path)
    original_write = image._file.write

    def crash_on_bat(offset: int, data: bytes | bytearray | memoryview) -> None:
        if bat <= offset < bat + MIB:
            raise OSError("simulated power failure")
        original_write(offset, data)

    monkeypatch.setattr(image._file, "write", crash_on_bat)
    with pytest.raises(OSError, match="power failure"):
        image.flush()
    image.abort()
    expected = bytearray(SIZE)
    expected[:MIB] = b"\x10" * MIB
    expected[9 * MIB + 7 : 12 * MIB + 7] = b"\x20" * 3 * MIB
    assert vt.current_header(image_path)[1].log_guid != vs.ZERO_GUID
    assert vt.bat_entry(image_path, 9) & 7 == vs.PAYLOAD_BLOCK_NOT_PRESENT, "the BAT itself was not updated"
    assert vt.qemu_replayed_raw(image_path, workdir / "oracle.raw").read_bytes() == expected
    assert read_all(image_path) == expected
    with open_image(image_path, writable=True):
        pass
    qemu_check(image_path, "vhdx")
    assert read_all(image_path) == expected


# ------------------------------------------------------------------ differencing


def make_chain(workdir: Path, *, qemu_base: bool, lss: int = 512) -> tuple[Path, Path, Path]:
    """base (written by qemu or polyvisor) <- middle <- top, polyvisor writing both children.

    Returns the top image and the raw references of the base and of the whole chain.
    """
    base = workdir / "base.vhdx"
    if qemu_base:
        qemu_create(base, "vhdx", SIZE, "block_size=2M")
        qemu_io(base, "vhdx", *qemu_io_commands(SIZE, seed=4))
        base_raw = qemu_to_raw(base, "vhdx", workdir / "base.raw")
    else:
        base_writes = scattered_writes(SIZE, seed=40)
        with create_image(base, "vhdx", SIZE, block_size="2M", logical_sector_size=str(lss)) as image:
            apply_writes(image, base_writes)
        base_raw = reference_raw(workdir / "base.raw", SIZE, base_writes)
    middle_writes = scattered_writes(SIZE, seed=41)
    with create_image(workdir / "middle.vhdx", "vhdx", None, backing_file="base.vhdx") as image:
        assert image.subformat == "differencing"
        apply_writes(image, middle_writes)
    top_writes = scattered_writes(SIZE, seed=42, count=10)
    with create_image(workdir / "top.vhdx", "vhdx", None, backing_file="middle.vhdx") as image:
        apply_writes(image, top_writes)
    chain_raw = reference_raw(workdir / "chain.raw", SIZE, middle_writes + top_writes, base=base_raw)
    return workdir / "top.vhdx", base_raw, chain_raw


@pytest.mark.parametrize("qemu_base", [True, False], ids=["qemu-base", "polyvisor-base"])
def test_differencing_chain(qemu_base: bool, workdir: Path) -> None:
    top, _, chain_raw = make_chain(workdir, qemu_base=qemu_base)
    assert probe_format(top) == "vhdx"
    with open_image(top) as image:
        assert image.subformat == "differencing"
        assert [layer.path.name for layer in image.chain()] == ["top.vhdx", "middle.vhdx", "base.vhdx"]
        info = image.info()
        assert info.backing[0]["reference"] == ".\\middle.vhdx"
        locator = info.details["parent_locator"]
        assert set(locator) == {"parent_linkage", "relative_path", "absolute_win32_path"}
        assert locator["absolute_win32_path"].endswith("\\middle.vhdx")
        assert info.details["has_parent"] is True
        assert image.read(0, SIZE) == chain_raw.read_bytes()
        for layer in image.chain():
            assert layer.check().clean, layer.path
    middle_bat = [vt.bat_entry(workdir / "middle.vhdx", i) & 7 for i in range(64)]
    assert vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT in middle_bat
    ratio = (1 << 23) * 512 // (2 * MIB)
    assert vt.bat_entry(workdir / "middle.vhdx", ratio) & 7 == vs.SB_BLOCK_PRESENT, "chunk 0's sector bitmap"


def test_differencing_partial_sectors_copy_the_parent(workdir: Path) -> None:
    base = workdir / "base.vhdx"
    with create_image(base, "vhdx", 4 * MIB, block_size="1M") as image:
        image.write(0, bytes(range(256)) * (4 * MIB // 256))
    child = workdir / "child.vhdx"
    with create_image(child, "vhdx", None, backing_file="base.vhdx") as image:
        image.write(700, b"\x01" * 10)  # inside sector 1
        image.write(MIB - 3, b"\x02" * 6)  # across a block boundary
        image.write(2 * MIB, b"\x03" * MIB)  # a whole block
    expected = bytearray(bytes(range(256)) * (4 * MIB // 256))
    expected[700:710] = b"\x01" * 10
    expected[MIB - 3 : MIB + 3] = b"\x02" * 6
    expected[2 * MIB : 3 * MIB] = b"\x03" * MIB
    states = [vt.bat_entry(child, i) & 7 for i in range(4)]
    assert states == [vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT, vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                      vs.PAYLOAD_BLOCK_FULLY_PRESENT, vs.PAYLOAD_BLOCK_NOT_PRESENT]
    with open_image(child) as image:
        assert image.read(0, 4 * MIB) == expected
        own = [(e.offset, e.length) for e in image.extents() if e.kind is ExtentKind.DATA]
        assert own == [(512, 512), (MIB - 512, 1024), (2 * MIB, MIB)], "only the written sectors are the child's"


def test_differencing_reopen_and_zeroes(workdir: Path) -> None:
    top, _, chain_raw = make_chain(workdir, qemu_base=False)
    reference = bytearray(chain_raw.read_bytes())
    more = scattered_writes(SIZE, seed=77, count=8)
    with open_image(top, writable=True) as image:
        apply_writes(image, more)
        image.write_zeroes(4 * MIB, 4 * MIB)  # whole blocks over parent data: ZERO blocks
        image.write_zeroes(10 * MIB + 100, 1000)  # partial: zeros written
    for offset, data in more:
        reference[offset : offset + len(data)] = data
    reference[4 * MIB : 8 * MIB] = bytes(4 * MIB)
    reference[10 * MIB + 100 : 10 * MIB + 1100] = bytes(1000)
    assert read_all(top) == bytes(reference)
    with open_image(top) as image:
        assert image.check().clean
        assert vt.current_header(top)[1].log_guid == vs.ZERO_GUID


def test_differencing_4096_byte_sectors(workdir: Path) -> None:
    top, _, chain_raw = make_chain(workdir, qemu_base=False, lss=4096)
    with open_image(top) as image:
        assert image.info().details["logical_sector_size"] == 4096
        assert image.read(0, SIZE) == chain_raw.read_bytes()


def test_parent_found_by_absolute_path_basename(workdir: Path) -> None:
    top, _, chain_raw = make_chain(workdir, qemu_base=False)
    linkage = vt.current_header(workdir / "middle.vhdx")[1].data_write_guid
    vt.replace_parent_locator(top, {"parent_linkage": "{" + vs.guid_text(linkage).upper() + "}",
                                    "absolute_win32_path": "C:\\Hyper-V\\Disks\\middle.vhdx"})
    with open_image(top) as image:
        assert image.backing is not None
        assert image.backing.path.name == "middle.vhdx"
        assert image.read(0, SIZE) == chain_raw.read_bytes()


def test_parent_missing(workdir: Path) -> None:
    top, _, _ = make_chain(workdir, qemu_base=False)
    (workdir / "middle.vhdx").rename(workdir / "elsewhere.vhdx")
    with pytest.raises(MissingReference, match="parent not found"):
        open_image(top).close()


def test_parent_locator_escaping_the_directory(workdir: Path) -> None:
    outside = workdir / "outside"
    outside.mkdir()
    base = outside / "base.vhdx"
    with create_image(base, "vhdx", SIZE) as image:
        image.write(0, b"\x61" * 512)
    inner = workdir / "inner"
    inner.mkdir()
    child = inner / "child.vhdx"
    policy = ReferencePolicy(allow_anywhere=True)
    with create_image(child, "vhdx", None, backing_file="../outside/base.vhdx", policy=policy) as image:
        image.write(512, b"\x62" * 512)
    with pytest.raises(UnsafeReference, match="outside"):
        open_image(child).close()
    with open_image(child, follow_backing=False) as image:
        assert image.read(512, 512) == b"\x62" * 512
    assert read_all(child, policy)[:1024] == b"\x61" * 512 + b"\x62" * 512


def test_parent_linkage_mismatch(workdir: Path) -> None:
    top, _, _ = make_chain(workdir, qemu_base=False)
    with open_image(workdir / "middle.vhdx", writable=True) as image:
        image.write(0, b"changed")  # a new DataWriteGuid: the child no longer matches
    with pytest.raises(BackingChainError, match="DataWriteGuid"):
        open_image(top).close()


def test_parent_loop(workdir: Path) -> None:
    top, _, _ = make_chain(workdir, qemu_base=False)
    middle = workdir / "middle.vhdx"
    linkage = vt.current_header(middle)[1].data_write_guid
    vt.replace_parent_locator(middle, {"parent_linkage": "{" + vs.guid_text(linkage) + "}",
                                       "relative_path": ".\\top.vhdx"})
    started = time.monotonic()
    with pytest.raises(BackingChainError, match="loops"):
        open_image(top).close()
    assert time.monotonic() - started < 5


def test_differencing_needs_a_vhdx_parent(workdir: Path) -> None:
    qemu_create(workdir / "base.qcow2", "qcow2", SIZE)
    with pytest.raises(UnsupportedFeature, match="VHDX parent"):
        create_image(workdir / "c.vhdx", "vhdx", None, backing_file="base.qcow2").abort()
    with create_image(workdir / "base.vhdx", "vhdx", SIZE):
        pass
    with pytest.raises(UnsupportedOption, match="fixed"):
        create_image(workdir / "c.vhdx", "vhdx", None, backing_file="base.vhdx", subformat="fixed").abort()
    assert not (workdir / "c.vhdx").exists()


# ------------------------------------------------------------------ hostile files


def fresh(workdir: Path, name: str = "h.vhdx") -> Path:
    path = workdir / name
    with create_image(path, "vhdx", 8 * MIB, block_size="1M") as image:
        image.write(0, b"\x5a" * (2 * MIB))
    return path


def assert_refused(path: Path, error: type[PolyvisorError], match: str) -> None:
    started = time.monotonic()
    with pytest.raises(error, match=match), open_image(path, "vhdx") as image:
        image.read(0, image.virtual_size)
    assert time.monotonic() - started < 5


def test_bad_identifier(workdir: Path) -> None:
    path = fresh(workdir)
    vt.patch(path, 0, b"vhdxfilf")
    assert probe_format(path) == "raw"
    assert_refused(path, CorruptImage, "vhdxfile")


def test_both_headers_bad(workdir: Path) -> None:
    path = fresh(workdir)
    for offset in vs.HEADER_OFFSETS:
        vt.patch(path, offset + 3000, b"\x01")
    assert_refused(path, ChecksumMismatch, "no valid header")


def test_region_table_absurd_entry_count(workdir: Path) -> None:
    path = fresh(workdir)
    vt.write_region_table(path, vt.region_table(path)[1], count=1 << 31)
    assert_refused(path, CorruptImage, "entries")


def test_region_table_both_copies_bad(workdir: Path) -> None:
    path = fresh(workdir)
    for offset in vs.REGION_TABLE_OFFSETS:
        vt.patch(path, offset + 1000, b"\x01")
    assert_refused(path, ChecksumMismatch, "region table")


def test_one_region_table_copy_bad(workdir: Path) -> None:
    path = fresh(workdir)
    vt.patch(path, vs.REGION_TABLE_OFFSETS[0] + 1000, b"\x01")
    with open_image(path) as image:
        assert image.read(0, 4) == b"\x5a" * 4
        assert [p.structure for p in image.check().problems] == ["VHDX region table"]


def test_overlapping_regions(workdir: Path) -> None:
    path = fresh(workdir)
    entries = vt.region_table(path)[1]
    metadata = next(e for e in entries if e.guid == vs.METADATA_REGION)
    moved = [records.replace(e, file_offset=metadata.file_offset) if e.guid == vs.BAT_REGION else e
             for e in entries]
    vt.write_region_table(path, moved)
    assert_refused(path, CorruptImage, "overlaps")


def test_region_inside_the_log(workdir: Path) -> None:
    path = fresh(workdir)
    entries = [records.replace(e, file_offset=MIB) if e.guid == vs.BAT_REGION else e
               for e in vt.region_table(path)[1]]
    vt.write_region_table(path, entries)
    assert_refused(path, CorruptImage, "overlaps the log")


def test_unknown_regions(workdir: Path) -> None:
    path = fresh(workdir)
    entries = vt.region_table(path)[1]
    extra = vs.RegionTableEntry(vs.new_guid(), 200 * MIB, MIB, 0)
    vt.write_region_table(path, [*entries, extra])
    assert read_all(path)[:4] == b"\x5a" * 4  # optional: ignored
    vt.write_region_table(path, [*entries, records.replace(extra, flags=vs.REGION_REQUIRED)])
    assert_refused(path, UnsupportedFeature, "required region")


def test_missing_bat_region(workdir: Path) -> None:
    path = fresh(workdir)
    vt.write_region_table(path, [e for e in vt.region_table(path)[1] if e.guid != vs.BAT_REGION])
    assert_refused(path, CorruptImage, "no BAT region")


@pytest.mark.parametrize("block_size", [0, 3 * MIB, 512 * 1024, 1 << 31])
def test_bad_block_size_in_file(block_size: int, workdir: Path) -> None:
    path = fresh(workdir)
    vt.patch(path, vt.metadata_item_offset(path, vs.FILE_PARAMETERS), block_size.to_bytes(4, "little"))
    assert_refused(path, CorruptImage, "block size")


@pytest.mark.parametrize(("size", "error", "match"), [
    (1 << 63, LimitExceeded, "64 TiB"),
    ((64 << 40) + 512, LimitExceeded, "64 TiB"),
    (8 * MIB + 100, CorruptImage, "multiple"),
])
def test_bad_virtual_size(size: int, error: type[PolyvisorError], match: str, workdir: Path) -> None:
    path = fresh(workdir)
    vt.patch(path, vt.metadata_item_offset(path, vs.VIRTUAL_DISK_SIZE), size.to_bytes(8, "little"))
    assert_refused(path, error, match)


def test_bad_sector_sizes(workdir: Path) -> None:
    path = fresh(workdir)
    vt.patch(path, vt.metadata_item_offset(path, vs.LOGICAL_SECTOR_SIZE), (1024).to_bytes(4, "little"))
    assert_refused(path, CorruptImage, "logical sector size")


def test_metadata_item_past_the_region(workdir: Path) -> None:
    path = fresh(workdir)
    vt.set_metadata_entry(path, vs.VIRTUAL_DISK_SIZE, offset=MIB - 4)
    assert_refused(path, CorruptImage, "outside")
    path = fresh(workdir, "h2.vhdx")
    vt.set_metadata_entry(path, vs.FILE_PARAMETERS, length=0xFFFFFFFF)
    assert_refused(path, CorruptImage, "outside")


def test_metadata_problems(workdir: Path) -> None:
    path = fresh(workdir)
    vt.set_metadata_entry(path, vs.PHYSICAL_SECTOR_SIZE, item_id=vs.new_guid(), flags=0)  # a required item goes
    assert_refused(path, CorruptImage, "physical sector size")
    path = fresh(workdir, "h2.vhdx")
    vt.set_metadata_entry(path, vs.VIRTUAL_DISK_ID, item_id=vs.new_guid(),
                          flags=vs.METADATA_IS_REQUIRED)  # an unknown required item
    assert_refused(path, UnsupportedFeature, "required metadata item")
    path = fresh(workdir, "h3.vhdx")
    vt.patch(path, vt.metadata_item_offset(path, vs.FILE_PARAMETERS) + 4, vs.HAS_PARENT.to_bytes(4, "little"))
    assert_refused(path, CorruptImage, "parent locator")


def test_parent_locator_hostile(workdir: Path) -> None:
    top, _, _ = make_chain(workdir, qemu_base=False)
    at = vt.metadata_item_offset(top, vs.PARENT_LOCATOR)
    original = vt.read(top, at, 64)
    vt.patch(top, at + 18, (5000).to_bytes(2, "little"))  # more entries than fit
    assert_refused(top, CorruptImage, "entries do not fit")
    vt.patch(top, at, original)
    vt.patch(top, at + 20, (1 << 30).to_bytes(4, "little"))  # key offset past the item
    assert_refused(top, CorruptImage, "string")
    vt.patch(top, at, original)
    vt.patch(top, at, vs.new_guid())  # another locator type
    assert_refused(top, UnsupportedFeature, "locator type")


def test_bat_entry_past_eof(workdir: Path) -> None:
    path = fresh(workdir)
    vt.set_bat_entry(path, 4, vs.bat_entry(vs.PAYLOAD_BLOCK_FULLY_PRESENT, 512 * MIB))
    with open_image(path) as image:
        assert image.read(0, 4) == b"\x5a" * 4
        with pytest.raises(TruncatedImage, match="block 4"):
            image.read(4 * MIB, 10)
        problems = image.check().problems
        assert any("past the end of the file" in p.message for p in problems)
    with pytest.raises(TruncatedImage):
        open_image(path, writable=True).close()


def test_bat_entry_into_metadata(workdir: Path) -> None:
    path = fresh(workdir)
    metadata = vt.region(path, vs.METADATA_REGION).file_offset
    vt.set_bat_entry(path, 5, vs.bat_entry(vs.PAYLOAD_BLOCK_FULLY_PRESENT, metadata))
    vt.set_bat_entry(path, 6, vs.bat_entry(vs.PAYLOAD_BLOCK_FULLY_PRESENT, 0))
    with open_image(path) as image:
        with pytest.raises(CorruptImage, match="overlaps the metadata region"):
            image.read(5 * MIB, 10)
        with pytest.raises(CorruptImage, match="header section"):
            image.read(6 * MIB, 10)
        messages = [p.message for p in image.check().problems]
        assert any("overlaps the header section, log or a region" in m for m in messages)
        assert any("points into the header section" in m for m in messages)
    with pytest.raises(CorruptImage):
        open_image(path, writable=True).close()


def test_check_finds_damage(workdir: Path) -> None:
    path = fresh(workdir)
    block0 = vt.bat_entry(path, 0)
    vt.set_bat_entry(path, 3, block0)  # two blocks share a place
    vt.set_bat_entry(path, 4, vs.bat_entry(vs.PAYLOAD_BLOCK_ZERO, 9 * MIB))  # ZERO with an offset: ignored
    vt.set_bat_entry(path, 5, vs.bat_entry(vs.PAYLOAD_BLOCK_PARTIALLY_PRESENT, 5 * MIB))  # no parent
    vt.set_bat_entry(path, 6, 4)  # reserved state
    vt.set_bat_entry(path, 7, 0x1000)  # reserved bits
    with open(path, "ab") as f:
        f.truncate(path.stat().st_size + 3 * MIB)  # space no block uses
    with open_image(path) as image:
        assert image.read(4 * MIB, 4) == bytes(4)
        with pytest.raises(CorruptImage, match="partially present"):
            image.read(5 * MIB, 4)
        with pytest.raises(CorruptImage, match="reserved state"):
            image.read(6 * MIB, 4)
        result = image.check()
    messages = " | ".join(p.message for p in result.problems)
    assert "overlaps another block" in messages
    assert "zero state carries a file offset" in messages
    assert "partially present in an image without a parent" in messages
    assert "reserved state 4" in messages
    assert "reserved bits" in messages
    assert result.leaks == 1
    assert "3 MiB" in messages
    assert result.exit_code == 2


def test_check_sector_bitmap_damage(workdir: Path) -> None:
    top, _, _ = make_chain(workdir, qemu_base=False)
    ratio = (1 << 23) * 512 // (2 * MIB)
    vt.set_bat_entry(top, ratio, 0)  # chunk 0 loses its sector bitmap
    with open_image(top) as image:
        with pytest.raises(CorruptImage, match="sector bitmap"):
            image.read(0, SIZE)
        messages = [p.message for p in image.check().problems]
    assert any("no sector bitmap block" in m for m in messages)


def test_truncated_bat_region(workdir: Path) -> None:
    path = fresh(workdir)
    with open(path, "r+b") as f:
        f.truncate(vt.bat_offset(path) + 100)
    assert_refused(path, TruncatedImage, "VHDX BAT")


@pytest.mark.parametrize("seed", range(6))
def test_random_damage_is_a_clear_error(seed: int, workdir: Path) -> None:
    """Bytes flipped in the metadata structures: the image is readable or a PolyvisorError, never a crash."""
    import random

    rng = random.Random(seed)
    top, _, _ = make_chain(workdir, qemu_base=False)
    targets = [vt.metadata_item_offset(top, vs.PARENT_LOCATOR), vt.bat_offset(top),
               vt.region(top, vs.METADATA_REGION).file_offset, vs.REGION_TABLE_OFFSETS[0]]
    for _ in range(20):
        vt.patch(top, rng.choice(targets) + rng.randrange(0, 512), bytes([rng.randrange(256)]))
    outcome: PolyvisorError | None = None
    try:
        with open_image(top) as image:
            image.read(0, SIZE)
            image.check()
    except PolyvisorError as exc:
        outcome = exc
    assert outcome is None or str(outcome)


def test_size_is_rounded_to_the_logical_sector(workdir: Path) -> None:
    with create_image(workdir / "a.vhdx", "vhdx", 1000) as image:
        assert image.virtual_size == 1024
    with create_image(workdir / "b.vhdx", "vhdx", 5000, logical_sector_size="4096") as image:
        assert image.virtual_size == 8192
    assert qemu_info(workdir / "a.vhdx")["virtual-size"] == 1024


def test_open_backing_not_followed(workdir: Path) -> None:
    """check_image-style opening without the parent: the child's own data, zeros elsewhere."""
    top, _, _ = make_chain(workdir, qemu_base=False)
    with open_image(top, follow_backing=False) as image:
        assert image.backing is None
        assert image.check().clean
        assert len(image.read(0, SIZE)) == SIZE


def test_chain_layers(workdir: Path) -> None:
    top, base_raw, _ = make_chain(workdir, qemu_base=True)
    with open_image(top) as image:
        base: DiskImage = image.chain()[-1]
        assert base.read(0, SIZE) == base_raw.read_bytes()
        assert base.subformat == "dynamic"


def test_os_level_copy_of_a_chain_keeps_working(workdir: Path) -> None:
    """The relative parent locator lets a chain move to another directory as a whole."""
    _, _, chain_raw = make_chain(workdir, qemu_base=False)
    moved = workdir / "moved"
    moved.mkdir()
    for name in ("base.vhdx", "middle.vhdx", "top.vhdx"):
        shutil.copy2(workdir / name, moved / name)
        os.unlink(workdir / name)
    assert read_all(moved / "top.vhdx") == chain_raw.read_bytes()


# ------------------------------------------------------------------ sector bitmap runs


def naive_runs(bitmap: bytes, first: int, count: int) -> list[tuple[bool, int, int]]:
    bits = [bool(bitmap[i >> 3] >> (i & 7) & 1) for i in range(first, first + count)]
    runs: list[tuple[bool, int, int]] = []
    for i, bit in enumerate(bits):
        if runs and runs[-1][0] == bit:
            runs[-1] = (bit, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((bit, i, 1))
    return runs


@pytest.mark.parametrize("seed", range(20))
def test_bit_runs_match_a_bit_by_bit_reading(seed: int) -> None:
    import random

    from polyvisor.disk.formats.vhdx import _bit_runs

    rng = random.Random(seed)
    pieces = [rng.choice([b"\x00" * rng.randrange(1, 40), b"\xff" * rng.randrange(1, 40),
                          bytes([rng.randrange(256)])]) for _ in range(30)]
    bitmap = b"".join(pieces)
    first = rng.randrange(0, 16)
    count = rng.randrange(1, len(bitmap) * 8 - first)
    assert list(_bit_runs(bitmap, first, count)) == naive_runs(bitmap, first, count)


def test_bit_runs_of_a_hostile_bitmap_stay_fast() -> None:
    """256 MiB blocks of 512-byte sectors: 2^19 bits; alternating bits are 2^19 runs, read in linear time."""
    from polyvisor.disk.formats.vhdx import _bit_runs

    started = time.monotonic()
    assert sum(1 for _ in _bit_runs(b"\x55" * (1 << 16), 0, 1 << 19)) == 1 << 19
    assert list(_bit_runs(b"\xff" * (1 << 16), 3, (1 << 19) - 3)) == [(True, 0, (1 << 19) - 3)]
    assert time.monotonic() - started < 5


def test_parent_linkage2_is_accepted(workdir: Path) -> None:
    top, _, chain_raw = make_chain(workdir, qemu_base=False)
    linkage = vt.current_header(workdir / "middle.vhdx")[1].data_write_guid
    vt.replace_parent_locator(top, {"parent_linkage": "{" + vs.guid_text(vs.new_guid()) + "}",
                                    "parent_linkage2": "{" + vs.guid_text(linkage) + "}",
                                    "relative_path": "middle.vhdx"})
    assert read_all(top) == chain_raw.read_bytes()


def test_unmapped_and_undefined_blocks_hide_the_parent(workdir: Path) -> None:
    """In a differencing image UNDEFINED and UNMAPPED blocks read as zeros, not as the parent's data."""
    base = workdir / "base.vhdx"
    with create_image(base, "vhdx", 4 * MIB, block_size="1M") as image:
        image.write(0, b"\x66" * (4 * MIB))
    child = workdir / "child.vhdx"
    with create_image(child, "vhdx", None, backing_file="base.vhdx"):
        pass
    vt.set_bat_entry(child, 1, vs.PAYLOAD_BLOCK_UNDEFINED)
    vt.set_bat_entry(child, 2, vs.bat_entry(vs.PAYLOAD_BLOCK_UNMAPPED, 300 * MIB))  # offset kept: allowed
    vt.set_bat_entry(child, 3, vs.PAYLOAD_BLOCK_ZERO)
    with open_image(child) as image:
        assert image.read(0, 4 * MIB) == b"\x66" * MIB + bytes(3 * MIB)
        assert image.check().clean
        assert [(e.kind, e.depth) for e in image.map()] == [(ExtentKind.DATA, 1), (ExtentKind.ZERO, 0)]


def test_new_blocks_go_past_a_last_block_cut_short(workdir: Path) -> None:
    """qemu once wrote files ending inside their last block: allocation must not reuse its tail."""
    image_path = workdir / "short.vhdx"
    with create_image(image_path, "vhdx", 3 * MIB, block_size="2M") as image:
        image.write(2 * MIB, b"\x71" * MIB)  # block 1: only its first MiB holds guest data
    host = vs.bat_offset(vt.bat_entry(image_path, 1))
    with open(image_path, "r+b") as f:
        f.truncate(host + MIB)
    qemu_check(image_path, "vhdx")
    with open_image(image_path, writable=True) as image:
        image.write(0, b"\x72" * 4096)
    assert vs.bat_offset(vt.bat_entry(image_path, 0)) == host + 2 * MIB
    with open_image(image_path) as image:
        assert image.check().clean
        assert image.read(0, 4096) == b"\x72" * 4096
        assert image.read(2 * MIB, MIB) == b"\x71" * MIB
    qemu_check(image_path, "vhdx")


def test_terabyte_holes_map_quickly(workdir: Path) -> None:
    """4 TiB at 1 MiB blocks: 4 Mi BAT entries, walked as runs of identical entries, not block by block."""
    image_path = workdir / "wide.vhdx"
    size = 4 << 40
    with create_image(image_path, "vhdx", size, block_size="1M") as image:
        image.write(3 << 40, b"\x01" * MIB)
    started = time.monotonic()
    with open_image(image_path) as image:
        extents = [(e.offset, e.length, e.kind) for e in image.extents()]
        assert extents == [(0, 3 << 40, ExtentKind.UNALLOCATED), (3 << 40, MIB, ExtentKind.DATA),
                           ((3 << 40) + MIB, (1 << 40) - MIB, ExtentKind.UNALLOCATED)]
        assert image.read((3 << 40) - 10, 20) == bytes(10) + b"\x01" * 10
    assert time.monotonic() - started < 3
    qemu_check(image_path, "vhdx")
