"""VDI against qemu-img/qemu-io: both directions, VirtualBox's layout, odd sizes, hostile and damaged images.

Header field offsets below are from VirtualBox's VDICore.h (``VDIPREHEADER``
then ``VDIHEADER1PLUS``), written out here independently of the
implementation so that the tests check the bytes, not the code's own idea of
them.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from polyvisor.disk import ExtentKind, check_image, create_image, open_image, probe_format
from polyvisor.disk.formats import vdi
from polyvisor.disk.image import ProbeSample
from polyvisor.errors import (
    CorruptImage,
    LimitExceeded,
    PolyvisorError,
    TruncatedImage,
    UnsupportedFeature,
    UsageError,
)
from tests.patterns import apply_writes, qemu_io_commands, reference_raw, scattered_writes
from tests.peers import qemu_check, qemu_compare, qemu_create, qemu_img, qemu_info, qemu_io, qemu_to_raw

MIB = 1 << 20
FREE = 0xFFFFFFFF
ZERO = 0xFFFFFFFE
SUBFORMATS = {"dynamic": "static=off", "fixed": "static=on"}

# File offsets of the v1.1 header fields (72-byte pre-header, then VDIHEADER1PLUS).
TEXT, SIGNATURE, VERSION = 0, 64, 68
CB_HEADER, IMAGE_TYPE, FLAGS, COMMENT = 72, 76, 80, 84
OFF_BLOCKS, OFF_DATA, LEGACY_GEOMETRY, DUMMY = 340, 344, 348, 364
DISK_SIZE, BLOCK_SIZE, BLOCK_EXTRA, BLOCKS, BLOCKS_ALLOCATED = 368, 376, 380, 384, 388
UUID_CREATE, UUID_MODIFY, UUID_LINKAGE, UUID_PARENT_MODIFY, LCHS_GEOMETRY = 392, 408, 424, 440, 456


# ------------------------------------------------------------------ helpers


def get32(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack("<I", f.read(4))[0]
        return value


def put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def put32(path: Path, offset: int, value: int) -> None:
    put(path, offset, struct.pack("<I", value))


def put64(path: Path, offset: int, value: int) -> None:
    put(path, offset, struct.pack("<Q", value))


def read_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def block_map(path: Path) -> list[int]:
    count = get32(path, BLOCKS)
    data = read_bytes(path, get32(path, OFF_BLOCKS), 4 * count)
    return list(struct.unpack(f"<{count}I", data))


def set_entry(path: Path, block: int, value: int) -> None:
    put32(path, get32(path, OFF_BLOCKS) + 4 * block, value)


def read_all(path: Path) -> bytes:
    with open_image(path) as image:
        return image.read(0, image.virtual_size)


def qemu_verdict(path: Path) -> dict[str, int]:
    """``qemu-img check``'s counts, without failing on a damaged image."""
    proc = qemu_img("check", "--output=json", "-f", "vdi", str(path), ok=(0, 1, 2, 3))
    report = json.loads(proc.stdout)
    return {"corruptions": report.get("corruptions", 0) + report.get("check-errors", 0),
            "leaks": report.get("leaks", 0)}


def qemu_image(workdir: Path, subformat: str = "dynamic", size: int = 6 * MIB) -> Path:
    """A qemu-img VDI with data in blocks 0, 2 and 5 (three allocated blocks when dynamic)."""
    path = workdir / f"qemu-{subformat}.vdi"
    qemu_create(path, "vdi", size, SUBFORMATS[subformat])
    qemu_io(path, "vdi", "write -P 0x11 0 4096", "write -P 0x22 2M 1M", "write -P 0x33 5242880 512")
    return path


def build_vdi(path: Path, *, block_size: int, disk_size: int, entries: list[int], data: list[bytes],
              extra: int = 0, version: int = 0x00010001) -> None:
    """Write a VDI by hand: v1.1 (384-byte header, map at 512) or the old 0.2 layout (map at 420)."""
    blocks = len(entries)
    pre = b"<<< test image >>>\n".ljust(64, b"\0") + struct.pack("<II", 0xBEDA107F, version)
    uuids = uuid.uuid4().bytes_le + uuid.uuid4().bytes_le + bytes(16)
    if version == 0x00000002:
        header = struct.pack("<2I256s4IQ3I", 1, 0, b"", 0, 0, 0, 512, disk_size, block_size, blocks,
                             len(data)) + uuids
        off_blocks = 72 + len(header)
        off_data = off_blocks + 4 * blocks
    else:
        off_blocks = 512
        off_data = (off_blocks + 4 * blocks + 511) // 512 * 512
        header = struct.pack("<3I256s2I4IIQ4I", 384, 1, 0, b"", off_blocks, off_data, 0, 0, 0, 512, 0,
                             disk_size, block_size, extra, blocks, len(data)) + uuids + bytes(16)
    with open(path, "wb") as f:
        f.write(pre + header)
        f.seek(off_blocks)
        f.write(struct.pack(f"<{blocks}I", *entries))
        for index, payload in enumerate(data):
            f.seek(off_data + index * (extra + block_size))
            f.write(b"\xee" * extra + payload)


# ------------------------------------------- qemu writes, polyvisor reads


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_images_read_identically(subformat: str, workdir: Path) -> None:
    size = 9 * MIB + 1536
    in_place = workdir / "in-place.vdi"
    qemu_create(in_place, "vdi", size, SUBFORMATS[subformat])
    qemu_io(in_place, "vdi", *qemu_io_commands(size, seed=5, count=20))
    source = workdir / "source.raw"
    qemu_create(source, "raw", size)
    qemu_io(source, "raw", *qemu_io_commands(size, seed=6))
    converted = workdir / "converted.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", "-o", SUBFORMATS[subformat], str(source), str(converted))
    for path in (in_place, converted):
        oracle = qemu_to_raw(path, "vdi", workdir / "oracle.raw").read_bytes()
        with open_image(path) as image:
            assert image.format_name == "vdi"
            assert image.subformat == subformat
            assert image.virtual_size == size == len(oracle)
            assert image.read(0, size) == oracle
            details = image.info().details
            assert details["version"] == "1.1"
            assert details["image_type"] == ("fixed" if subformat == "fixed" else "normal")
            assert details["header_size"] == 384  # qemu writes a VDIHEADER1, without LCHS geometry
            assert details["lchs_geometry"] is None
            assert details["block_size"] == MIB
            allocated = sum(1 for entry in block_map(path) if entry < ZERO)
            assert details["blocks_allocated"] == allocated == get32(path, BLOCKS_ALLOCATED)
            result = image.check()
            assert result.clean, result.problems
            assert result.allocated_units == allocated
            assert result.total_units == 10
        # polyvisor's own map agrees with qemu's on what is data (qemu: allocated and not a hole of the file).
        qemu_map = json.loads(qemu_img("map", "--output=json", "-f", "vdi", str(path)).stdout)
        qemu_data = [(e["start"], e["length"]) for e in qemu_map if e["data"] and not e["zero"]]
        with open_image(path) as image:
            ours = [(e.offset, e.length) for e in image.extents() if e.kind is ExtentKind.DATA]
        assert _merge(ours) == _merge(qemu_data)


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in sorted(extents):
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


# ------------------------------------------- polyvisor writes, qemu reads


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_polyvisor_images_pass_qemu(subformat: str, workdir: Path) -> None:
    size = 13 * MIB + 3584
    writes = scattered_writes(size, seed=21, count=30)
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", size, subformat=subformat) as image:
        apply_writes(image, writes)
        image.write(6 * MIB, bytes(range(256)) * (3 * MIB // 256))  # a multi-block write
    writes.append((6 * MIB, bytes(range(256)) * (3 * MIB // 256)))
    reference = reference_raw(workdir / "ref.raw", size, writes)
    qemu_check(path, "vdi")
    qemu_compare(path, "vdi", reference, "raw")
    info = qemu_info(path)
    assert info["format"] == "vdi"
    assert info["virtual-size"] == size
    assert read_all(path) == reference.read_bytes()


def test_multi_block_write_is_one_pwrite(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several MiB written at once into new blocks become a single write to the file."""
    calls: list[int] = []
    with create_image(workdir / "disk.vdi", "vdi", 16 * MIB) as image:
        original = image.files[0].write

        def counting(offset: int, data: bytes | bytearray | memoryview) -> None:
            calls.append(len(data))
            original(offset, data)

        monkeypatch.setattr(image.files[0], "write", counting)
        image.write(MIB + 512, b"\x5a" * (6 * MIB))
        assert calls == [6 * MIB]
    qemu_io(workdir / "disk.vdi", "vdi", f"read -P 0x5a {MIB + 512} {6 * MIB}", "read -P 0 0 1049088",
            writable=False)


# -------------------------------------------------------------- the layout


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_created_layout_is_virtualbox_s(subformat: str, workdir: Path) -> None:
    size = 300 << 30  # 307200 blocks: a block map of 1.2 MB, so the data area starts at 3 MiB
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", size, subformat=subformat) as image:
        image.write(3 * MIB + 10, b"a")  # block 3 first,
        image.write(MIB, b"b" * 100)  # then block 1
    blocks = 307200
    assert read_bytes(path, TEXT, 64) == b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    assert get32(path, SIGNATURE) == 0xBEDA107F
    assert get32(path, VERSION) == 0x00010001
    assert get32(path, CB_HEADER) == 400  # VDIHEADER1PLUS
    assert get32(path, IMAGE_TYPE) == (2 if subformat == "fixed" else 1)
    assert get32(path, FLAGS) == 0
    assert read_bytes(path, COMMENT, 256) == bytes(256)
    assert get32(path, OFF_BLOCKS) == MIB
    assert get32(path, OFF_DATA) == 3 * MIB == (MIB + 4 * blocks + MIB - 1) // MIB * MIB
    assert struct.unpack("<4I", read_bytes(path, LEGACY_GEOMETRY, 16)) == (0, 0, 0, 512)
    assert get32(path, DUMMY) == 0
    assert struct.unpack("<Q", read_bytes(path, DISK_SIZE, 8))[0] == size
    assert get32(path, BLOCK_SIZE) == MIB
    assert get32(path, BLOCK_EXTRA) == 0
    assert get32(path, BLOCKS) == blocks
    assert read_bytes(path, UUID_LINKAGE, 32) == bytes(32)
    assert struct.unpack("<4I", read_bytes(path, LCHS_GEOMETRY, 16)) == (0, 0, 0, 512)
    for offset in (UUID_CREATE, UUID_MODIFY):
        assert uuid.UUID(bytes_le=read_bytes(path, offset, 16)).version == 4
    entries = block_map(path)
    if subformat == "fixed":
        assert get32(path, BLOCKS_ALLOCATED) == blocks
        assert entries == list(range(blocks))
        assert path.stat().st_size == 3 * MIB + blocks * MIB
        assert path.stat().st_blocks * 512 < 16 * MIB  # sparse: 300 GiB are not written out
    else:
        assert get32(path, BLOCKS_ALLOCATED) == 2
        assert entries[:5] == [FREE, 1, FREE, 0, FREE]
        assert set(entries[5:]) == {FREE}
        assert path.stat().st_size == 3 * MIB + 2 * MIB
    qemu_check(path, "vdi")
    qemu_io(path, "vdi", f"read -P 0x61 {3 * MIB + 10} 1", f"read -P 0x62 {MIB} 100", f"read -P 0 {MIB + 100} 1000",
            writable=False)


def test_every_create_has_fresh_uuids(workdir: Path) -> None:
    seen: set[bytes] = set()
    for n in range(3):
        path = workdir / f"d{n}.vdi"
        create_image(path, "vdi", MIB).close()
        create, modify = read_bytes(path, UUID_CREATE, 16), read_bytes(path, UUID_MODIFY, 16)
        assert create != bytes(16)
        assert modify != bytes(16)
        assert create != modify
        seen |= {create, modify}
    assert len(seen) == 6


def test_details(workdir: Path) -> None:
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", 3 * MIB) as image:
        image.write(0, b"x")
    with open_image(path) as image:
        details = image.info().details
    assert details == {
        "version": "1.1",
        "image_type": "normal",
        "header_size": 400,
        "image_flags": 0,
        "block_size": MIB,
        "block_extra": 0,
        "blocks": 3,
        "blocks_allocated": 1,
        "uuid_create": str(uuid.UUID(bytes_le=read_bytes(path, UUID_CREATE, 16))),
        "uuid_modify": str(uuid.UUID(bytes_le=read_bytes(path, UUID_MODIFY, 16))),
        "uuid_linkage": "00000000-0000-0000-0000-000000000000",
        "uuid_parent_modify": "00000000-0000-0000-0000-000000000000",
        "comment": "",
        "block_map_offset": MIB,
        "data_offset": 2 * MIB,
        "legacy_geometry": {"cylinders": 0, "heads": 0, "sectors": 0, "sector_size": 512},
        "lchs_geometry": {"cylinders": 0, "heads": 0, "sectors": 0, "sector_size": 512},
    }


# --------------------------------------------------------------- odd sizes


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [512, MIB - 512, MIB + 512, 7 * MIB + 3584])
def test_odd_sizes_both_ways(subformat: str, size: int, workdir: Path) -> None:
    ours = workdir / "ours.vdi"
    writes = [(0, b"\x01" * min(size, 700)), (size - 1, b"\xfe"), (max(0, size - 3000), b"\x07" * min(size, 1000))]
    with create_image(ours, "vdi", size, subformat=subformat) as image:
        apply_writes(image, writes)
    assert get32(ours, BLOCKS) == -(-size // MIB)
    qemu_check(ours, "vdi")
    assert qemu_info(ours)["virtual-size"] == size
    qemu_compare(ours, "vdi", reference_raw(workdir / "ref.raw", size, writes), "raw")

    theirs = workdir / "theirs.vdi"
    qemu_create(theirs, "vdi", size, SUBFORMATS[subformat])
    qemu_io(theirs, "vdi", f"write -P 0x44 {size - 512} 512", "write -P 0x45 0 512")
    oracle = qemu_to_raw(theirs, "vdi", workdir / "oracle.raw").read_bytes()
    with open_image(theirs) as image:
        assert image.virtual_size == size
        assert image.check().clean
    assert read_all(theirs) == oracle


def test_disk_size_not_a_sector_multiple_is_rounded_up_like_qemu(workdir: Path) -> None:
    """VBoxManage convertfromraw can leave cbDisk unaligned; qemu rounds it up to a sector."""
    path = qemu_image(workdir)
    put64(path, DISK_SIZE, 6 * MIB - 700)
    assert qemu_info(path)["virtual-size"] == 6 * MIB - 512
    oracle = qemu_to_raw(path, "vdi", workdir / "oracle.raw").read_bytes()
    with open_image(path) as image:
        assert image.virtual_size == 6 * MIB - 512
    assert read_all(path) == oracle


def test_max_size_is_qemu_s(workdir: Path) -> None:
    limit = vdi.VdiImage.max_virtual_size
    proc = qemu_img("create", "-f", "vdi", str(workdir / "q.vdi"), str(limit + MIB), ok=(1,))
    assert f"max supported is {limit:#x}" in proc.stderr
    with pytest.raises(UsageError, match="exceed"):
        create_image(workdir / "p.vdi", "vdi", limit + MIB)
    assert [p.name for p in workdir.iterdir()] == ["q.vdi"]  # qemu leaves an empty file, polyvisor nothing


def test_terabyte_hole_is_walked_by_table(workdir: Path) -> None:
    path = workdir / "huge.vdi"
    size = (2 << 40) + MIB
    with create_image(path, "vdi", size) as image:
        image.write(0, b"\x11" * 4096)
        image.write(size - 512, b"\x33" * 512)
    start = time.monotonic()
    with open_image(path) as image:
        extents = list(image.extents())
        result = image.check()
    assert time.monotonic() - start < 5
    # The two blocks are allocated; the bytes never written in them are holes of the file, read as zeros.
    assert [(e.kind, e.length) for e in extents] == [
        (ExtentKind.DATA, 4096), (ExtentKind.ZERO, MIB - 4096), (ExtentKind.UNALLOCATED, size - 2 * MIB),
        (ExtentKind.ZERO, MIB - 4096), (ExtentKind.DATA, 4096)]
    assert result.clean
    assert result.allocated_units == 2


# ------------------------------------------------------ writing and zeros


def test_reopen_writable_renews_modify_uuid_only(workdir: Path) -> None:
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", 4 * MIB) as image:
        image.write(0, b"a" * 512)
    create, modify = read_bytes(path, UUID_CREATE, 16), read_bytes(path, UUID_MODIFY, 16)
    before = path.read_bytes()
    open_image(path, writable=True).close()  # no write: nothing changes
    assert path.read_bytes() == before
    with open_image(path, writable=True) as image:
        image.write(2 * MIB + 7, b"b" * 10)
        image.write(2 * MIB + 100, b"c" * 10)
    assert read_bytes(path, UUID_CREATE, 16) == create
    assert read_bytes(path, UUID_MODIFY, 16) not in (modify, bytes(16))
    assert get32(path, BLOCKS_ALLOCATED) == 2
    assert block_map(path) == [0, FREE, 1, FREE]
    qemu_check(path, "vdi")
    qemu_io(path, "vdi", "read -P 0x61 0 512", f"read -P 0x62 {2 * MIB + 7} 10", f"read -P 0x63 {2 * MIB + 100} 10",
            f"read -P 0 {2 * MIB + 110} 1000", writable=False)


def test_qemu_image_reopened_writable(workdir: Path) -> None:
    path = qemu_image(workdir)
    raw = qemu_to_raw(path, "vdi", workdir / "ref.raw")
    writes = scattered_writes(6 * MIB, seed=9, count=10)
    with open_image(path, writable=True) as image:
        apply_writes(image, writes)
    with open(raw, "r+b") as f:
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    qemu_check(path, "vdi")
    qemu_compare(path, "vdi", raw, "raw")


def test_write_zeroes_keeps_free_blocks_free(workdir: Path) -> None:
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", 8 * MIB) as image:
        image.write(0, b"\x01" * MIB)
        image.write(MIB, b"\x02" * 4096)
        image.write_zeroes(100, MIB + 50)  # most of block 0, the start of block 1
        image.write_zeroes(4 * MIB, 3 * MIB)  # unallocated blocks: nothing to do
        assert [e.kind for e in image.extents(4 * MIB, 3 * MIB)] == [ExtentKind.UNALLOCATED]
    assert get32(path, BLOCKS_ALLOCATED) == 2
    assert block_map(path) == [0, 1] + [FREE] * 6
    reference = reference_raw(workdir / "ref.raw", 8 * MIB,
                              [(0, b"\x01" * 100), (MIB + 150, b"\x02" * (4096 - 150))])
    qemu_check(path, "vdi")
    qemu_compare(path, "vdi", reference, "raw")


def test_zero_block_entries(workdir: Path) -> None:
    """VDI_IMAGE_BLOCK_ZERO reads as zeros for qemu and polyvisor, checks clean, and is allocated on write."""
    path = qemu_image(workdir)
    for block in (1, 3):
        set_entry(path, block, ZERO)
    assert qemu_verdict(path) == {"corruptions": 0, "leaks": 0}
    oracle = qemu_to_raw(path, "vdi", workdir / "oracle.raw")
    with open_image(path) as image:
        assert [(e.offset, e.kind) for e in image.extents(MIB, 3 * MIB)] == [
            (MIB, ExtentKind.ZERO), (2 * MIB, ExtentKind.DATA), (3 * MIB, ExtentKind.ZERO)]
        assert image.check().clean
    assert read_all(path) == oracle.read_bytes()
    with open_image(path, writable=True) as image:
        image.write(3 * MIB + 5, b"\x77" * 5)
    assert block_map(path)[3] == 3
    assert get32(path, BLOCKS_ALLOCATED) == 4
    with open(oracle, "r+b") as f:
        f.seek(3 * MIB + 5)
        f.write(b"\x77" * 5)
    qemu_check(path, "vdi")
    qemu_compare(path, "vdi", oracle, "raw")


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_paged_block_map(subformat: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of 4 entries and room for 2 pages, eviction and write-back keep the map right."""
    monkeypatch.setattr(vdi, "MAP_PAGE_ENTRIES", 4)
    monkeypatch.setattr(vdi, "MAP_CACHE_PAGES", 2)
    size = 37 * MIB + 512
    writes = scattered_writes(size, seed=17, count=40)
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", size, subformat=subformat) as image:
        apply_writes(image, writes)
    more = scattered_writes(size, seed=18, count=20)
    with open_image(path, writable=True) as image:
        apply_writes(image, more)
        image.flush()
        assert image.check().clean
    reference = reference_raw(workdir / "ref.raw", size, writes + more)
    qemu_check(path, "vdi")
    qemu_compare(path, "vdi", reference, "raw")
    assert read_all(path) == reference.read_bytes()


# --------------------------------------------- other versions, block sizes


def test_version_0_2_reads_and_writes(workdir: Path) -> None:
    """The old VDIHEADER0 layout (VirtualBox still accepts version 0x00000002); qemu does not read it."""
    path = workdir / "old.vdi"
    a, b = b"\xaa" * MIB, b"\xbb" * MIB
    build_vdi(path, block_size=MIB, disk_size=3 * MIB - 1024, entries=[1, FREE, 0], data=[a, b],
              version=0x00000002)
    qemu_img("info", "-f", "vdi", str(path), ok=(1,))
    with open_image(path) as image:
        assert image.info().details["version"] == "0.2"
        assert image.info().details["block_map_offset"] == 420
        assert image.virtual_size == 3 * MIB - 1024
        assert image.read(0, MIB) == b
        assert image.read(MIB, MIB) == bytes(MIB)
        assert image.read(2 * MIB, MIB - 1024) == a[: MIB - 1024]
        assert image.check().clean
    with open_image(path, writable=True) as image:
        image.write(MIB + 3, b"new")
    # VDIHEADER0: cBlocksAllocated right after cbDisk, cbBlock and cBlocks.
    assert get32(path, 72 + 4 + 4 + 256 + 16 + 8 + 4 + 4) == 3
    with open_image(path) as image:
        assert image.read(MIB, 6) == b"\0\0\0new"
        assert image.read(0, 4) == b"\xbb" * 4
        assert image.check().clean


@pytest.mark.parametrize("block_size", [128 << 10, 512 << 10, 2 * MIB])
def test_other_block_sizes(block_size: int, workdir: Path) -> None:
    """VirtualBox opens blocks of 128 KiB to 128 MiB; qemu only reads 1 MiB blocks."""
    path = workdir / "blocks.vdi"
    a, b = os.urandom(block_size), os.urandom(block_size)
    build_vdi(path, block_size=block_size, disk_size=3 * block_size, entries=[FREE, 1, 0], data=[a, b])
    if block_size != MIB:
        qemu_img("info", "-f", "vdi", str(path), ok=(1,))
    with open_image(path, writable=True) as image:
        assert image.read(0, 3 * block_size) == bytes(block_size) + b + a
        image.write(block_size // 2, b"xy")
        assert image.check().clean
    with open_image(path) as image:
        assert image.read(0, block_size) == bytes(block_size // 2) + b"xy" + bytes(block_size // 2 - 2)
        assert image.read(block_size, 2 * block_size) == b + a
    assert get32(path, BLOCKS_ALLOCATED) == 3


def test_block_extra_data_is_skipped(workdir: Path) -> None:
    """cbBlockExtra bytes of service data precede each data block (VirtualBox's offStartBlockData)."""
    path = workdir / "extra.vdi"
    a, b = b"\x0a" * MIB, b"\x0b" * MIB
    build_vdi(path, block_size=MIB, disk_size=2 * MIB, entries=[1, 0], data=[a, b], extra=4096)
    with open_image(path) as image:
        assert image.read(0, 2 * MIB) == b + a
        assert image.check().clean
    with open_image(path, writable=True) as image:
        image.write(MIB - 1, b"zz")
    with open_image(path) as image:
        assert image.read(MIB - 2, 4) == b"\x0bzz\x0a"
        assert image.check().clean


# ------------------------------------------------------------ hostile input


def _move_map(path: Path, offset: int) -> None:
    put32(path, OFF_BLOCKS, offset)
    put32(path, OFF_DATA, offset + MIB)


HOSTILE: dict[str, tuple[Callable[[Path], None], type[PolyvisorError]]] = {
    "bad signature": (lambda p: put32(p, SIGNATURE, 0xBEDA1070), CorruptImage),
    "version 2.0": (lambda p: put32(p, VERSION, 0x00020000), UnsupportedFeature),
    "version 1.0": (lambda p: put32(p, VERSION, 0x00010000), UnsupportedFeature),
    "version 0.0": (lambda p: put32(p, VERSION, 0), UnsupportedFeature),
    "header size absurd": (lambda p: put32(p, CB_HEADER, 0xFFFFFFFF), CorruptImage),
    "header size too small": (lambda p: put32(p, CB_HEADER, 10), CorruptImage),
    "blocks huge vs disk size": (lambda p: put32(p, BLOCKS, 0x1FFFFF00), CorruptImage),
    "blocks beyond any map": (lambda p: put32(p, BLOCKS, 0xFFFFFFF0), LimitExceeded),
    "blocks too few": (lambda p: put32(p, BLOCKS, 2), CorruptImage),
    "block size 0": (lambda p: put32(p, BLOCK_SIZE, 0), CorruptImage),
    "block size huge": (lambda p: put32(p, BLOCK_SIZE, 1 << 31), UnsupportedFeature),
    "block size not a power of two": (lambda p: put32(p, BLOCK_SIZE, 3 * MIB), CorruptImage),
    "block size tiny": (lambda p: put32(p, BLOCK_SIZE, 512), UnsupportedFeature),
    "block extra not a power of two": (lambda p: put32(p, BLOCK_EXTRA, 3), CorruptImage),
    "disk size 2^63": (lambda p: put64(p, DISK_SIZE, 1 << 63), CorruptImage),
    "more allocated than blocks": (lambda p: put32(p, BLOCKS_ALLOCATED, 7), CorruptImage),
    "block map past EOF": (lambda p: _move_map(p, 64 * MIB), TruncatedImage),
    "block map overlapping the header": (lambda p: put32(p, OFF_BLOCKS, 256), CorruptImage),
    "data overlapping the block map": (lambda p: put32(p, OFF_DATA, 520), CorruptImage),
    "unknown image type": (lambda p: put32(p, IMAGE_TYPE, 9), CorruptImage),
    "file shorter than the pre-header": (lambda p: os.truncate(p, 50), TruncatedImage),
    "file ending inside the header": (lambda p: os.truncate(p, 300), TruncatedImage),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_header_is_a_clear_error(case: str, workdir: Path) -> None:
    damage, expected = HOSTILE[case]
    path = qemu_image(workdir)
    damage(path)
    start = time.monotonic()
    with pytest.raises(expected) as caught:
        open_image(path, "vdi").close()
    assert str(path) in str(caught.value)
    if issubclass(expected, CorruptImage):
        result = check_image(path, "vdi")  # reported, not raised
        assert result.corruptions >= 1
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("image_type", [3, 4])
def test_differencing_vdi_needs_the_vm_configuration(image_type: int, workdir: Path) -> None:
    path = qemu_image(workdir)
    put32(path, IMAGE_TYPE, image_type)
    put(path, UUID_LINKAGE, uuid.uuid4().bytes_le)
    put(path, UUID_PARENT_MODIFY, uuid.uuid4().bytes_le)
    with pytest.raises(UnsupportedFeature, match=r"\.vbox"):
        open_image(path).close()
    assert not vdi.VdiImage.supports_backing


def test_parent_uuid_on_a_base_image_is_refused_like_qemu(workdir: Path) -> None:
    path = qemu_image(workdir)
    put(path, UUID_LINKAGE, uuid.uuid4().bytes_le)
    qemu_img("info", "-f", "vdi", str(path), ok=(1,))
    with pytest.raises(UnsupportedFeature, match="parent"):
        open_image(path).close()


def test_probe(workdir: Path) -> None:
    def sample(head: bytes) -> ProbeSample:
        return ProbeSample(path=workdir / "x", size=len(head), head=head, tail=head[-512:])

    assert vdi.VdiImage.probe(sample(b"")) == 0
    assert vdi.VdiImage.probe(sample(os.urandom(4096))) == 0
    good = qemu_image(workdir).read_bytes()[:4096]
    assert vdi.VdiImage.probe(sample(good)) == 100
    assert vdi.VdiImage.probe(sample(good[:70])) == 0
    assert vdi.VdiImage.probe(sample(good[:68] + struct.pack("<I", 0x00030000) + good[72:])) == 60
    assert probe_format(qemu_image(workdir)) == "vdi"


# -------------------------------------------- damaged block maps and check


def test_entry_beyond_the_disk_blocks(workdir: Path) -> None:
    """An entry past cBlocks: qemu and polyvisor both call it corruption; reading its data is an error."""
    path = qemu_image(workdir)
    set_entry(path, 4, 6 + 5)
    assert qemu_verdict(path)["corruptions"] >= 1
    result = check_image(path)
    assert result.corruptions >= 1
    assert any("beyond the 6 blocks" in p.message for p in result.problems)
    with open_image(path) as image:
        assert image.read(0, 4096) == b"\x11" * 4096
        with pytest.raises(TruncatedImage):
            image.read(4 * MIB, 512)
    with pytest.raises(CorruptImage, match="refusing to open for writing"):
        open_image(path, writable=True)


def test_entry_past_eof_within_the_allocation_count(workdir: Path) -> None:
    """cBlocksAllocated claims a block the file lacks: qemu's check does not look; polyvisor's does."""
    path = qemu_image(workdir)
    set_entry(path, 4, 3)
    put32(path, BLOCKS_ALLOCATED, 4)
    assert qemu_verdict(path) == {"corruptions": 0, "leaks": 0}
    result = check_image(path)
    assert result.corruptions >= 1
    assert any("past the end of the file" in p.message for p in result.problems)
    with open_image(path) as image, pytest.raises(TruncatedImage):
        image.read(4 * MIB, 512)


def test_shared_data_block(workdir: Path) -> None:
    path = qemu_image(workdir)
    set_entry(path, 3, block_map(path)[2])
    assert qemu_verdict(path)["corruptions"] >= 1
    result = check_image(path)
    assert result.exit_code == 2
    assert any("used twice" in p.message for p in result.problems)
    oracle = qemu_to_raw(path, "vdi", workdir / "oracle.raw").read_bytes()
    assert read_all(path) == oracle  # readable, as qemu reads it
    with pytest.raises(CorruptImage, match="used twice"):
        open_image(path, writable=True)


def test_entry_past_the_allocation_count(workdir: Path) -> None:
    """An entry at or past cBlocksAllocated would be overwritten by the next allocation."""
    path = qemu_image(workdir)
    entries = block_map(path)
    set_entry(path, 5, 4)
    assert entries[5] == 2
    assert qemu_verdict(path)["corruptions"] == 0  # qemu only compares counts, and they match
    result = check_image(path)
    assert any("beyond the 3 blocks allocated" in p.message for p in result.problems)
    assert any("data block 2 is allocated but no block uses it" in p.message for p in result.problems)
    with pytest.raises(CorruptImage):
        open_image(path, writable=True)


@pytest.mark.parametrize(("delta", "qemu_corrupt"), [(-1, True), (+1, True)])
def test_allocation_count_mismatch(delta: int, qemu_corrupt: bool, workdir: Path) -> None:
    path = qemu_image(workdir)
    put32(path, BLOCKS_ALLOCATED, 3 + delta)
    assert (qemu_verdict(path)["corruptions"] >= 1) == qemu_corrupt
    result = check_image(path)
    assert result.corruptions >= 1
    assert any("recorded as allocated" in p.message for p in result.problems)


def test_unreferenced_block_is_a_leak_and_a_count_mismatch(workdir: Path) -> None:
    path = qemu_image(workdir)
    set_entry(path, 2, FREE)
    assert qemu_verdict(path)["corruptions"] >= 1  # qemu: "allocated blocks mismatch"
    result = check_image(path)
    assert result.corruptions >= 1
    assert result.leaks == 1
    # Writing stays safe: the next block is appended after the leaked one.
    with open_image(path, writable=True) as image:
        image.write(3 * MIB, b"q")
    assert block_map(path)[3] == 3


@pytest.mark.parametrize("bitmap_chunk", [1, 1 << 20])
def test_leaked_blocks_are_named(bitmap_chunk: int, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vdi, "_BITMAP_CHUNK", bitmap_chunk)
    path = workdir / "disk.vdi"
    with create_image(path, "vdi", 20 * MIB) as image:
        for block in range(20):
            image.write(block * MIB, b"d")
    for block in (3, 9, 17):
        set_entry(path, block, FREE)
    result = check_image(path)
    leaked = [p.message for p in result.problems if p.kind.value == "leak"]
    assert leaked == [f"data block {n} is allocated but no block uses it" for n in (3, 9, 17)]
    assert result.allocated_units == 17


def test_trailing_bytes_are_a_leak(workdir: Path) -> None:
    path = qemu_image(workdir)
    with open(path, "ab") as f:
        f.write(b"\x99" * 4096)
    assert qemu_verdict(path) == {"corruptions": 0, "leaks": 0}
    result = check_image(path)
    assert result.corruptions == 0
    assert result.leaks == 1
    assert result.exit_code == 3
    # A new block over the trailing bytes reads as zeros around what is written.
    with open_image(path, writable=True) as image:
        image.write(MIB + 10, b"w")
    with open_image(path) as image:
        assert image.read(MIB, 20) == bytes(10) + b"w" + bytes(9)
        assert image.check().clean
    qemu_check(path, "vdi")


def test_truncated_data_area(workdir: Path) -> None:
    path = qemu_image(workdir)
    os.truncate(path, path.stat().st_size - MIB // 2)
    result = check_image(path)
    assert result.corruptions >= 1
    with open_image(path) as image:
        assert image.read(0, 4096) == b"\x11" * 4096
        with pytest.raises(TruncatedImage):
            image.read(6 * MIB - 512, 512)


def test_random_map_damage_never_escapes(workdir: Path) -> None:
    """Random block map entries: reads and checks give data or PolyvisorError, nothing else."""
    rng = random.Random(3)
    path = qemu_image(workdir)
    pristine = path.read_bytes()
    for _ in range(30):
        path.write_bytes(pristine)
        for _ in range(3):
            set_entry(path, rng.randrange(6), rng.choice([0, 1, 2, 3, 5, 6, 1000, ZERO, FREE, 0x7FFFFFFF]))
        outcome: PolyvisorError | None = None
        try:
            read_all(path)
        except PolyvisorError as exc:
            outcome = exc
        assert outcome is None or str(outcome)
        check_image(path)
