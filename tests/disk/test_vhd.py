"""VHD against qemu-img/qemu-io (driver "vpc"): sizes by creator, dynamic, fixed, differencing, hostile files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from polyvisor import records
from polyvisor.disk import CreateOptions, ExtentKind, ReferencePolicy, create_image, open_image, probe_format
from polyvisor.disk.check import check_image
from polyvisor.disk.convert import convert
from polyvisor.disk.formats.vhd import MAX_DYNAMIC_SIZE, VhdImage
from polyvisor.disk.formats.vhd_structs import (
    FOOTER,
    FOOTER_CHECKSUM_AT,
    HEADER,
    HEADER_CHECKSUM_AT,
    LOCATOR,
    MAX_GEOMETRY,
    DynamicHeader,
    Footer,
    ParentLocator,
    chs_geometry,
    with_checksum,
)
from polyvisor.errors import (
    BackingChainError,
    ChecksumMismatch,
    CorruptImage,
    ImageError,
    LimitExceeded,
    MissingReference,
    PolyvisorError,
    TruncatedImage,
    UnsafeReference,
    UnsupportedFeature,
    UnsupportedOption,
    UsageError,
)
from tests.patterns import apply_writes, qemu_io_commands, reference_raw, scattered_writes
from tests.peers import qemu_compare, qemu_create, qemu_img, qemu_info, qemu_io, qemu_to_raw

MIB = 1 << 20
#: 6149 sectors: no CHS geometry multiplies out to it.
NON_CHS_SIZE = 6149 * 512
#: 91 x 4 x 17 sectors: what the spec's geometry gives for this size exactly.
CHS_SIZE = 91 * 4 * 17 * 512
SRC = Path(__file__).resolve().parents[2] / "src"


# ------------------------------------------------------------------ helpers


def read_all(path: Path, fmt: str | None = "vhd", policy: ReferencePolicy | None = None) -> bytes:
    kwargs: dict[str, Any] = {"policy": policy} if policy is not None else {}
    with open_image(path, fmt, **kwargs) as image:
        return image.read(0, image.virtual_size)


def peek(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def footer_of(path: Path, at: int | None = None) -> Footer:
    offset = path.stat().st_size - 512 if at is None else at
    return FOOTER.unpack(peek(path, offset, 512))


def put_footer(path: Path, footer: Footer, offsets: list[int]) -> None:
    raw = with_checksum(FOOTER.pack(records.replace(footer, checksum=0)), FOOTER_CHECKSUM_AT)
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(raw)


def patch_footer(path: Path, **changes: Any) -> None:
    """Change footer fields (both copies of a dynamic disk) and recompute the checksum."""
    size = path.stat().st_size
    footer = records.replace(footer_of(path), **changes)
    offsets = [size - 512]
    if peek(path, 0, 8) == b"conectix":
        offsets.append(0)
    put_footer(path, footer, offsets)


def header_of(path: Path) -> tuple[DynamicHeader, int]:
    offset = footer_of(path).data_offset
    return HEADER.unpack(peek(path, offset, HEADER.size)), offset


def patch_header(path: Path, *, keep_checksum: bool = False, **changes: Any) -> None:
    header, offset = header_of(path)
    header = records.replace(header, **changes)
    raw = HEADER.pack(header) if keep_checksum else with_checksum(
        HEADER.pack(records.replace(header, checksum=0)), HEADER_CHECKSUM_AT)
    poke(path, offset, raw)


def patch_bat(path: Path, index: int, value: int) -> None:
    header, _ = header_of(path)
    poke(path, header.table_offset + 4 * index, value.to_bytes(4, "big"))


def bat_entry(path: Path, index: int) -> int:
    header, _ = header_of(path)
    return int.from_bytes(peek(path, header.table_offset + 4 * index, 4), "big")


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_locators(path: Path, locators: list[tuple[bytes, bytes]], parent_name: str | None = None) -> None:
    """Rewrite a polyvisor differencing disk's locators (each data area is at most 512 bytes here)."""
    header, _ = header_of(path)
    first_area = header.table_offset + -(-4 * header.max_table_entries // 512) * 512  # polyvisor's layout
    areas = [first_area, first_area + 512]
    raw = b""
    for (code, data), area in zip(locators, areas, strict=False):
        assert len(data) <= 512
        poke(path, area, data + bytes(512 - len(data)))
        raw += LOCATOR.pack(ParentLocator(code, 512, len(data), 0, area))
    changes: dict[str, Any] = {"parent_locators": raw + bytes(192 - len(raw))}
    if parent_name is not None:
        encoded = parent_name.encode("utf-16-be")
        changes["parent_unicode_name"] = encoded + bytes(512 - len(encoded))
    patch_header(path, **changes)


def qemu_size(path: Path) -> int:
    return int(qemu_info(path, "vhd")["virtual-size"])


def details(path: Path, policy: ReferencePolicy | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"policy": policy} if policy is not None else {}
    with open_image(path, "vhd", **kwargs) as image:
        return image.info().details


def make_chain(workdir: Path, size: int = 6 * MIB) -> tuple[Path, Path, list[tuple[int, bytes]]]:
    """base.vhd (dynamic, filled by qemu-io) and child.vhd (differencing, scattered writes by polyvisor)."""
    base = workdir / "base.vhd"
    qemu_create(base, "vhd", size, "subformat=dynamic,force_size=on")
    qemu_io(base, "vhd", *qemu_io_commands(size, seed=5))
    child = workdir / "child.vhd"
    writes = scattered_writes(size, seed=9, count=12)
    with create_image(child, "vhd", None, backing_file="base.vhd") as image:
        assert image.subformat == "differencing"
        apply_writes(image, writes)
    return base, child, writes


# --------------------------------------------------- qemu writes, polyvisor reads


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("force_size", [False, True], ids=["chs", "force_size"])
def test_qemu_images_read_identically(subformat: str, force_size: bool, workdir: Path) -> None:
    image = workdir / "q.vhd"
    qemu_create(image, "vhd", NON_CHS_SIZE, f"subformat={subformat}" + (",force_size=on" if force_size else ""))
    size = qemu_size(image)
    if force_size:
        assert size == NON_CHS_SIZE
    else:  # qemu-img rounds up to the next CHS-representable size, and sizes by CHS
        assert size == CHS_SIZE
        cylinders, heads, sectors = chs_geometry(size // 512)
        assert cylinders * heads * sectors * 512 == size
    qemu_io(image, "vhd", *qemu_io_commands(size, seed=3))
    oracle = qemu_to_raw(image, "vhd", workdir / "oracle.raw").read_bytes()
    with open_image(image) as opened:  # probed: a fixed VHD is recognised by its footer
        assert opened.format_name == "vhd"
        assert opened.subformat == subformat
        assert opened.virtual_size == size
        assert opened.check().clean
        info = opened.info().details
    assert read_all(image) == oracle
    assert info["creator_application"] == ("qem2" if force_size else "qemu")
    assert info["size_source"] == ("current_size" if force_size else "chs")
    assert info["disk_type"] == subformat


def test_qemu_image_reopened_writable(workdir: Path) -> None:
    """polyvisor appends blocks to a qemu-made dynamic disk; qemu reads the result."""
    image = workdir / "q.vhd"
    size = 64 * MIB
    qemu_create(image, "vhd", size, "subformat=dynamic,force_size=on")
    qemu_io(image, "vhd", *qemu_io_commands(size, seed=8, count=6))
    before = qemu_to_raw(image, "vhd", workdir / "before.raw")
    writes = scattered_writes(size, seed=6, count=10)
    with open_image(image, writable=True) as opened:
        apply_writes(opened, writes)
        opened.flush()
        free = next(e for e in opened.extents() if e.kind is ExtentKind.UNALLOCATED)
        late = (free.offset + 100, b"\x01" * 100)
        opened.write(*late)  # a block allocated after a flush wrote the footer
    writes.append(late)
    reference = reference_raw(workdir / "ref.raw", size, writes, base=before)
    qemu_compare(image, "vhd", reference, "raw")
    assert check_image(image).clean
    assert image.read_bytes()[:512] == image.read_bytes()[-512:]


def test_qemu_convert_large_sparse_dynamic(workdir: Path) -> None:
    """A 200 GiB dynamic disk converted by qemu-img: max-CHS geometry, data at both ends."""
    source = workdir / "src.raw"
    size = 200 << 30
    qemu_create(source, "raw", size)
    qemu_io(source, "raw", "write -P 0x61 0 1M", f"write -P 0x62 {size - 3 * MIB} 3M", "write -P 0x63 100G 4k")
    image = workdir / "big.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(source), str(image))
    with open_image(image) as opened:
        assert opened.virtual_size == qemu_size(image) == size
        assert opened.info().details["size_source"] == "current_size"
        assert opened.read(0, MIB) == b"\x61" * MIB
        assert opened.read(size - 3 * MIB, 3 * MIB) == b"\x62" * (3 * MIB)
        assert opened.read(100 << 30, 4096) == b"\x63" * 4096
        extents = list(opened.extents())
        assert sum(e.length for e in extents if e.kind is ExtentKind.DATA) == 8 * MIB  # whole 2 MiB blocks
        assert len(extents) <= 7
        assert opened.check().clean


# --------------------------------------------------- polyvisor writes, qemu reads


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [NON_CHS_SIZE, CHS_SIZE, 16 * MIB, 130 << 30], ids=["non-chs", "chs", "mib", "130G"])
def test_polyvisor_images_read_by_qemu(subformat: str, size: int, workdir: Path) -> None:
    image = workdir / "p.vhd"
    writes = scattered_writes(size, seed=2, count=10)
    with create_image(image, "vhd", size, subformat=subformat) as created:
        apply_writes(created, writes)
    reference = reference_raw(workdir / "ref.raw", size, writes)
    assert qemu_size(image) == size
    qemu_compare(image, "vhd", reference, "raw")
    footer = footer_of(image)
    assert footer.current_size == footer.original_size == size
    assert footer.creator_application == b"pvsr"
    geometry = (footer.cylinders, footer.heads, footer.sectors_per_track)
    if size == CHS_SIZE:
        assert geometry == (91, 4, 17)  # exact: even Virtual PC reads the right size
    else:
        assert geometry == MAX_GEOMETRY
    if subformat == "fixed":
        assert image.stat().st_size == size + 512
        assert footer.data_offset == 0xFFFFFFFFFFFFFFFF
        assert image.stat().st_blocks * 512 < size or size < MIB  # sparse
    with open_image(image) as opened:
        assert opened.virtual_size == size
        assert opened.check().clean


def test_fixed_whole_mib_is_what_azure_expects(workdir: Path) -> None:
    image = workdir / "azure.vhd"
    with create_image(image, "vhd", 30 * MIB, subformat="fixed") as created:
        created.write(0, b"\x55" * 512)
    data = image.read_bytes()
    assert len(data) == 30 * MIB + 512  # a whole number of MiB, then the footer
    footer = footer_of(image)
    assert (footer.cookie, footer.disk_type, footer.current_size) == (b"conectix", 2, 30 * MIB)
    assert qemu_size(image) == 30 * MIB
    assert probe_format(image) == "vhd"
    assert qemu_info(image)["format"] == "raw"  # qemu does not probe fixed VHDs; polyvisor does


def test_block_size_option(workdir: Path) -> None:
    image = workdir / "small-blocks.vhd"
    size = 5 * MIB + 512
    writes = scattered_writes(size, seed=4, count=10)
    with create_image(image, "vhd", size, block_size="512K") as created:
        apply_writes(created, writes)
    assert header_of(image)[0].block_size == 512 << 10
    qemu_compare(image, "vhd", reference_raw(workdir / "ref.raw", size, writes), "raw")
    for bad in ("3M", "128K", "512M"):
        with pytest.raises(UsageError):
            create_image(workdir / "bad.vhd", "vhd", size, block_size=bad).abort()
    with pytest.raises(UnsupportedOption):
        create_image(workdir / "bad.vhd", "vhd", size, subformat="fixed", block_size="2M").abort()
    assert sorted(p.name for p in workdir.iterdir()) == ["ref.raw", "small-blocks.vhd"]


def test_zero_writes_do_not_allocate(workdir: Path) -> None:
    image = workdir / "z.vhd"
    with create_image(image, "vhd", 8 * MIB) as created:
        created.write(0, bytes(4 * MIB))
        created.write_zeroes(4 * MIB, 4 * MIB)
        created.write(6 * MIB + 1, b"x")
        created.write_zeroes(6 * MIB, 4096)
    assert bat_entry(image, 0) == bat_entry(image, 1) == 0xFFFFFFFF
    with open_image(image) as opened:
        assert opened.read(6 * MIB, 8192) == bytes(8192)
        assert [e.kind for e in opened.extents()] == [ExtentKind.UNALLOCATED, ExtentKind.DATA]
    qemu_io(image, "vhd", f"read -P 0 0 {8 * MIB}", writable=False)


def test_size_limits(workdir: Path) -> None:
    with pytest.raises(UsageError):
        create_image(workdir / "huge.vhd", "vhd", MAX_DYNAMIC_SIZE + 512).abort()
    image = workdir / "max.vhd"
    with create_image(image, "vhd", MAX_DYNAMIC_SIZE) as created:
        created.write(MAX_DYNAMIC_SIZE - 512, b"\x77" * 512)
    with open_image(image) as opened:
        assert opened.virtual_size == MAX_DYNAMIC_SIZE
        assert opened.read(MAX_DYNAMIC_SIZE - 1024, 1024) == bytes(512) + b"\x77" * 512
        assert opened.check().clean
    assert qemu_size(image) == MAX_DYNAMIC_SIZE  # qemu's limit is Hyper-V's too
    qemu_io(image, "vhd", f"read -P 0x77 {MAX_DYNAMIC_SIZE - 512} 512", writable=False)


# ------------------------------------------------------------ size by creator


@pytest.mark.parametrize(
    ("creator", "geometry", "source", "qemu_agrees"),
    [
        (b"vpc ", "chs", "chs", True),
        (b"qemu", "chs", "chs", True),
        (b"win ", "chs", "current_size", True),
        (b"d2v ", "chs", "current_size", True),
        (b"tap\0", "chs", "current_size", True),
        (b"CTXS", "chs", "current_size", True),
        (b"qem2", "chs", "current_size", True),
        (b"wa\0\0", "chs", "current_size", False),  # Azure: qemu 7.2 does not know it yet
        (b"abcd", "chs", "current_size", False),  # unknown: current_size, as Hyper-V and qemu >= 10
        (b"vpc ", "max", "current_size", True),  # maximum geometry always means current_size
    ],
    ids=["vpc", "qemu", "hyper-v", "disk2vhd", "xenserver", "xenconverter", "qem2", "azure", "unknown", "vpc-max-chs"],
)
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_virtual_size_by_creator(creator: bytes, geometry: str, source: str, qemu_agrees: bool, subformat: str,
                                 workdir: Path) -> None:
    image = workdir / "c.vhd"
    qemu_create(image, "vhd", NON_CHS_SIZE, f"subformat={subformat},force_size=on")
    qemu_io(image, "vhd", f"write -P 0x44 0 {NON_CHS_SIZE}")
    cylinders, heads, sectors = chs_geometry(NON_CHS_SIZE // 512) if geometry == "chs" else MAX_GEOMETRY
    chs_size = cylinders * heads * sectors * 512
    assert chs_size < NON_CHS_SIZE or geometry == "max"
    patch_footer(image, creator_application=creator, cylinders=cylinders, heads=heads, sectors_per_track=sectors)
    expected = chs_size if source == "chs" else NON_CHS_SIZE
    with open_image(image, "vhd") as opened:
        assert opened.virtual_size == expected
        info = opened.info().details
        assert info["size_source"] == source
        assert opened.check().clean
    assert read_all(image) == b"\x44" * expected
    assert (qemu_size(image) == expected) is qemu_agrees
    if not qemu_agrees:
        assert qemu_size(image) == chs_size
    assert info["geometry"]["size"] == chs_size
    assert info["current_size"] == NON_CHS_SIZE


def build_hyperv_like(path: Path, size: int, blocks: dict[int, bytes], *, block_size: int = 2 * MIB) -> None:
    """A dynamic VHD laid out as Hyper-V does: creator 'win ', exact current_size with the spec's (rounded-down)
    geometry, the BAT at 0x2000 after padding, blocks after the BAT padded to 4 KiB."""
    entries = -(-size // block_size)
    cylinders, heads, sectors = chs_geometry(size // 512)
    footer = Footer(b"conectix", 2, 0x00010000, 512, 0x2D5A1234, b"win ", 0x000A0000, b"Wi2k", size, size,
                    cylinders, heads, sectors, 3, 0, os.urandom(16), 0, bytes(427))
    footer_raw = with_checksum(FOOTER.pack(footer), FOOTER_CHECKSUM_AT)
    bat_offset = 0x2000
    data_start = bat_offset + -(-4 * entries // 4096) * 4096
    bat = bytearray(b"\xff" * (4 * entries))
    bitmap_size = -(-(block_size // 512) // 8 // 512) * 512
    body = bytearray()
    for index, data in sorted(blocks.items()):
        offset = data_start + len(body)
        bat[4 * index : 4 * index + 4] = (offset // 512).to_bytes(4, "big")
        body += b"\xff" * bitmap_size + data + bytes(block_size - len(data))
    header = DynamicHeader(b"cxsparse", 0xFFFFFFFFFFFFFFFF, bat_offset, 0x00010000, entries, block_size, 0,
                           bytes(16), 0, 0, bytes(512), bytes(192), bytes(256))
    header_raw = with_checksum(HEADER.pack(header), HEADER_CHECKSUM_AT)
    image = bytearray(data_start)
    image[:512] = footer_raw
    image[512:1536] = header_raw
    image[bat_offset : bat_offset + len(bat)] = bat
    path.write_bytes(bytes(image) + bytes(body) + footer_raw)


def test_hyperv_layout(workdir: Path) -> None:
    image = workdir / "hv.vhd"
    build_hyperv_like(image, NON_CHS_SIZE, {1: b"\x5a" * 4096})
    expected = bytearray(NON_CHS_SIZE)
    expected[2 * MIB : 2 * MIB + 4096] = b"\x5a" * 4096
    assert read_all(image) == bytes(expected)
    assert qemu_to_raw(image, "vhd", workdir / "hv.raw").read_bytes() == bytes(expected)
    info = details(image)
    assert (info["creator_application"], info["creator_version"], info["size_source"]) == ("win ", "10.0",
                                                                                             "current_size")
    result = check_image(image)
    assert result.clean, result.problems  # padding among the metadata is not a leak
    assert (result.allocated_units, result.total_units) == (1, 2)


def test_info_json_from_the_cli(workdir: Path) -> None:
    image = workdir / "d.vhd"
    qemu_create(image, "vhd", NON_CHS_SIZE, "subformat=dynamic")
    proc = subprocess.run([sys.executable, "-m", "polyvisor", "disk", "info", "--json", str(image)],
                          capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    info = json.loads(proc.stdout)
    assert info["format"] == "vhd"
    assert info["subformat"] == "dynamic"
    assert info["virtual_size"] == qemu_size(image)
    assert info["creator_application"] == "qemu"
    assert info["creator_version"] == "5.3"
    assert info["creator_host_os"] == "Wi2k"
    assert info["size_source"] == "chs"
    assert info["block_size"] == 2 * MIB
    assert info["geometry"]["size"] == info["virtual_size"]
    assert len(info["unique_id"]) == 36


# ------------------------------------------------------------- differencing


def test_differencing_chain(workdir: Path) -> None:
    size = 6 * MIB
    base, child, writes = make_chain(workdir, size)
    base_raw = qemu_to_raw(base, "vhd", workdir / "base.raw")
    reference = reference_raw(workdir / "ref.raw", size, writes, base=base_raw)
    assert read_all(child) == reference.read_bytes()
    with open_image(child) as opened:
        assert opened.subformat == "differencing"
        assert opened.backing is not None
        assert opened.backing.path == base.resolve()
        assert opened.check().clean
        info = opened.info()
        # the bitmap marks exactly the written sectors, whole-sector rounded
        written: set[int] = set()
        for offset, data in writes:
            written.update(range(offset // 512, -(-(offset + len(data)) // 512)))
        for ext in opened.extents():
            sectors = set(range(ext.offset // 512, ext.end // 512))
            assert (sectors <= written) if ext.kind is ExtentKind.DATA else not (sectors & written)
    parent = info.details["parent"]
    assert parent["unique_id"] == details(base)["unique_id"]
    assert parent["unicode_name"] == "base.vhd"
    assert {loc["platform"]: loc["path"] for loc in parent["locators"]} == {
        "W2ru": ".\\base.vhd", "W2ku": str(base.resolve()).replace("/", "\\")}
    assert info.backing == [{"filename": str(base.resolve()), "format": "vhd", "reference": "base.vhd"}]
    # polyvisor's conversion of the chain, checked by qemu-img against the reference
    flat = workdir / "flat.raw"
    convert(child, flat, "raw")
    qemu_compare(flat, "raw", reference, "raw")
    # the header's parent fields are what the spec asks for
    header, _ = header_of(child)
    assert header.parent_unique_id == footer_of(base).unique_id
    assert footer_of(child).disk_type == 4
    assert child.read_bytes()[:512] == child.read_bytes()[-512:]


def test_differencing_partial_sectors_and_reopen(workdir: Path) -> None:
    size = 4 * MIB
    base = workdir / "base.vhd"
    with create_image(base, "vhd", size) as created:
        created.write(0, bytes(range(256)) * (size // 256))
    child = workdir / "child.vhd"
    with create_image(child, "vhd", None, backing_file="base.vhd") as created:
        created.write(700, b"\xaa" * 3)  # inside sector 1: the rest of it comes from the parent
    with open_image(child, writable=True) as reopened:
        reopened.write(2 * MIB - 2, b"\xbb" * 4)  # across a block boundary, both halves partial
    expected = bytearray(bytes(range(256)) * (size // 256))
    expected[700:703] = b"\xaa" * 3
    expected[2 * MIB - 2 : 2 * MIB + 2] = b"\xbb" * 4
    assert read_all(child) == bytes(expected)
    with open_image(child) as opened:
        data = [(e.offset, e.length) for e in opened.extents() if e.kind is ExtentKind.DATA]
        assert data == [(512, 512), (2 * MIB - 512, 1024)]
        assert opened.check().clean
    # a grandchild on top
    grandchild = workdir / "grandchild.vhd"
    with create_image(grandchild, "vhd", None, backing_file="child.vhd") as created:
        created.write(0, b"\xcc" * 512)
    expected[:512] = b"\xcc" * 512
    assert read_all(grandchild) == bytes(expected)
    with open_image(grandchild) as opened:
        assert [img.path.name for img in opened.chain()] == ["grandchild.vhd", "child.vhd", "base.vhd"]


def test_differencing_create_refusals(workdir: Path) -> None:
    base = workdir / "base.vhd"
    with create_image(base, "vhd", 2 * MIB):
        pass
    with pytest.raises(UnsupportedOption):
        create_image(workdir / "c.vhd", "vhd", None, backing_file="base.vhd", subformat="fixed").abort()
    with pytest.raises(UsageError):
        create_image(workdir / "c.vhd", "vhd", 4 * MIB, backing_file="base.vhd").abort()
    raw = workdir / "base.raw"
    raw.write_bytes(bytes(MIB))
    with pytest.raises(UnsupportedFeature):
        create_image(workdir / "c.vhd", "vhd", None, backing_file="base.raw", backing_fmt="raw").abort()
    assert sorted(p.name for p in workdir.iterdir()) == ["base.raw", "base.vhd"]


# ----------------------------------------------------------- parent locators


def utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def test_locator_relative_only(workdir: Path) -> None:
    _, child, _ = make_chain(workdir)
    expected = read_all(child)
    set_locators(child, [(b"W2ru", utf16(".\\base.vhd"))], parent_name="")
    assert read_all(child) == expected


def test_locator_windows_absolute_falls_back_to_basename(workdir: Path) -> None:
    _, child, _ = make_chain(workdir)
    expected = read_all(child)
    set_locators(child, [(b"W2ku", utf16("C:\\VMs\\base.vhd"))], parent_name="")
    assert read_all(child) == expected
    assert details(child)["parent"]["reference"] == "base.vhd"
    # a stale relative locator first, then the absolute Windows path
    set_locators(child, [(b"W2ru", utf16("..\\moved\\base.vhd")), (b"W2ku", utf16("C:\\VMs\\base.vhd"))])
    assert read_all(child) == expected  # the relative path leaves the directory: refused, basename used


def test_locator_legacy_and_macx(workdir: Path) -> None:
    _, child, _ = make_chain(workdir)
    expected = read_all(child)
    set_locators(child, [(b"Wi2r", b".\\base.vhd")], parent_name="")
    assert read_all(child) == expected
    set_locators(child, [(b"MacX", b"file://./base.vhd")], parent_name="")
    assert read_all(child) == expected
    set_locators(child, [(b"MacX", f"file://{(workdir / 'base.vhd').resolve()}".encode())], parent_name="")
    assert read_all(child) == expected
    # a Mac OS alias cannot be followed, but it is no corruption either
    set_locators(child, [(b"Mac ", b"\0\x01alias-record"), (b"W2ru", utf16(".\\base.vhd"))], parent_name="")
    assert read_all(child) == expected
    assert check_image(child).clean
    assert "Mac OS alias" in details(child)["parent"]["locators"][0]["note"]


def test_locator_escaping_the_directory_is_refused(workdir: Path) -> None:
    parent_dir = workdir.parent / "parents"
    parent_dir.mkdir()
    base = parent_dir / "base.vhd"
    with create_image(base, "vhd", 2 * MIB) as created:
        created.write(0, b"\x42" * 4096)
    child = workdir / "child.vhd"
    anywhere = ReferencePolicy(allow_anywhere=True)
    with create_image(child, "vhd", None, CreateOptions(backing_file=str(base)), policy=anywhere) as created:
        created.write(4096, b"\x43" * 512)
    with pytest.raises(UnsafeReference, match="outside"):
        open_image(child)
    assert read_all(child, policy=anywhere)[:4608] == b"\x42" * 4096 + b"\x43" * 512
    assert details(child, anywhere)["parent"]["locators"][1]["path"] == "..\\parents\\base.vhd"
    # without locators that can be followed, a missing parent is a clear error
    set_locators(child, [(b"W2ku", utf16("D:\\elsewhere\\gone.vhd"))], parent_name="gone.vhd")
    with pytest.raises(MissingReference):
        open_image(child)


def test_parent_with_another_unique_id(workdir: Path) -> None:
    base, child, _ = make_chain(workdir)
    base.unlink()
    qemu_create(base, "vhd", 6 * MIB, "subformat=dynamic,force_size=on")
    with pytest.raises(BackingChainError, match="unique id"):
        open_image(child)
    result = check_image(child)  # the layer is sound; check reports the broken chain
    assert result.corruptions == 1
    assert "unique id" in result.problems[0].message


def test_parent_loop(workdir: Path) -> None:
    base, child, _ = make_chain(workdir)
    top = workdir / "top.vhd"
    with create_image(top, "vhd", None, backing_file="child.vhd"):
        pass
    shutil.copyfile(top, base)  # base.vhd now names child.vhd as its parent, which names base.vhd
    with pytest.raises(BackingChainError, match="loop"):
        open_image(top)
    shutil.copyfile(child, workdir / "self.vhd")
    set_locators(workdir / "self.vhd", [(b"W2ru", utf16(".\\self.vhd"))], parent_name="")
    with pytest.raises(BackingChainError, match="loop"):
        open_image(workdir / "self.vhd")


# ------------------------------------------------------- footers and checksums


def dynamic_image(workdir: Path, size: int = 4 * MIB) -> tuple[Path, bytes]:
    image = workdir / "d.vhd"
    qemu_create(image, "vhd", size, "subformat=dynamic,force_size=on")
    qemu_io(image, "vhd", f"write -P 0x31 0 {size // 2}", f"write -P 0x32 {size - 4096} 4096")
    return image, read_all(image)


def test_damaged_end_footer_uses_the_copy(workdir: Path) -> None:
    image, expected = dynamic_image(workdir)
    size = image.stat().st_size
    poke(image, size - 512 + 40, b"\x99")  # breaks the end footer's checksum only
    with open_image(image) as opened:
        assert opened.read(0, opened.virtual_size) == expected
        assert "copy at offset 0" in opened.info().details["footer_source"]
        result = opened.check()
    assert result.corruptions == 1
    assert result.problems[0].offset == size - 512
    # the copy repairs the footer when the image is written
    with open_image(image, writable=True) as opened:
        opened.write(MIB * 3, b"\x33" * 512)
    with open_image(image) as opened:
        assert opened.info().details["footer_source"] == "the footer at the end of the file"
        assert opened.check().clean
    qemu_io(image, "vhd", f"read -P 0x33 {3 * MIB} 512", writable=False)


def test_damaged_copy_is_reported(workdir: Path) -> None:
    image, expected = dynamic_image(workdir)
    poke(image, 40, b"\x99")
    assert read_all(image) == expected
    assert any("checksum" in p.message and p.offset == 0 for p in check_image(image).problems)
    image2, _ = dynamic_image(workdir)
    put_footer(image2, records.replace(footer_of(image2, 0), timestamp=12345), [0])
    problems = check_image(image2).problems
    assert [p.structure for p in problems] == ["VHD footer copy"]
    assert "differs" in problems[0].message


def timed_error(path: Path, expected: type[ImageError]) -> ImageError:
    """Opening and reading *path* fails with *expected*, quickly, with a message naming the file."""
    started = time.monotonic()
    with pytest.raises(expected) as caught:
        read_all(path)
    assert time.monotonic() - started < 5
    assert str(path) in str(caught.value)
    return caught.value


def test_hostile_footers(workdir: Path) -> None:
    fixed = workdir / "f.vhd"
    qemu_create(fixed, "vhd", 2 * MIB, "subformat=fixed,force_size=on")
    size = fixed.stat().st_size
    original = fixed.read_bytes()

    poke(fixed, size - 512 + 40, b"\x01")
    error = timed_error(fixed, ChecksumMismatch)
    assert error.offset == size - 512
    assert error.structure == "VHD footer"
    fixed.write_bytes(original)
    poke(fixed, size - 512, b"conectiX")
    timed_error(fixed, CorruptImage)
    assert probe_format(fixed) == "raw"
    fixed.write_bytes(original[:-100])  # truncated footer
    timed_error(fixed, CorruptImage)
    fixed.write_bytes(original[:300])
    timed_error(fixed, TruncatedImage)
    fixed.write_bytes(original)
    patch_footer(fixed, current_size=1 << 63)
    timed_error(fixed, TruncatedImage)
    patch_footer(fixed, current_size=2 * MIB, disk_type=7)
    timed_error(fixed, CorruptImage)
    patch_footer(fixed, disk_type=5)
    timed_error(fixed, UnsupportedFeature)
    patch_footer(fixed, disk_type=2, format_version=0x00020000)
    timed_error(fixed, UnsupportedFeature)

    image, _ = dynamic_image(workdir)
    good = image.read_bytes()
    poke(image, 40, b"\x01")
    poke(image, len(good) - 512 + 40, b"\x01")
    assert timed_error(image, ChecksumMismatch).offset == len(good) - 512
    image.write_bytes(good)
    patch_footer(image, current_size=1 << 63)
    timed_error(image, LimitExceeded)
    for data_offset in (0, len(good) - 512, 1 << 62, 100):  # loops back to a footer, past the end, into the copy
        image.write_bytes(good)
        patch_footer(image, data_offset=data_offset)
        timed_error(image, CorruptImage)


def test_hostile_headers(workdir: Path) -> None:
    image, expected = dynamic_image(workdir)
    good = image.read_bytes()

    def fails(expected: type[ImageError], *, keep_checksum: bool = False, **changes: Any) -> ImageError:
        image.write_bytes(good)
        patch_header(image, keep_checksum=keep_checksum, **changes)
        return timed_error(image, expected)

    error = fails(ChecksumMismatch, keep_checksum=True, block_size=1 << 20)
    assert (error.structure, error.offset) == ("VHD dynamic disk header", 512)
    fails(CorruptImage, cookie=b"cxsparsX")
    fails(LimitExceeded, block_size=1 << 31)
    fails(CorruptImage, block_size=3 * 512)
    fails(CorruptImage, block_size=0)
    fails(LimitExceeded, max_table_entries=0xFFFFFFFF)
    fails(TruncatedImage, max_table_entries=1 << 22)
    fails(CorruptImage, max_table_entries=1)
    fails(TruncatedImage, table_offset=len(good) + 512)
    fails(TruncatedImage, table_offset=1 << 63)
    fails(CorruptImage, table_offset=0)
    fails(UnsupportedFeature, header_version=0x00020000)
    # the header's own "next structure" offset is unused by the format and never followed
    image.write_bytes(good)
    patch_header(image, data_offset=512)
    assert read_all(image) == expected


def test_hostile_bat_entries(workdir: Path) -> None:
    image, expected = dynamic_image(workdir)
    patch_bat(image, 1, 0xFFFFFFF0)  # far past the end of the file
    with open_image(image) as opened:
        assert opened.read(0, 4096) == expected[:4096]
        with pytest.raises(TruncatedImage):
            opened.read(2 * MIB, 4096)
        assert any("beyond the end" in p.message for p in opened.check().problems)
    with pytest.raises(TruncatedImage):
        open_image(image, writable=True)


def test_random_damage_gives_only_polyvisor_errors(workdir: Path) -> None:
    """Bytes of the footers, header, BAT, locators and bitmaps flipped at random: readable or a PolyvisorError."""
    _, child, _ = make_chain(workdir, 4 * MIB)
    pristine = child.read_bytes()
    header, _ = header_of(child)
    first_block = min(bat_entry(child, i) for i in range(header.max_table_entries)) * 512
    targets = [*range(first_block + 512), *range(len(pristine) - 512, len(pristine))]
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        damaged = bytearray(pristine)
        for _ in range(rng.choice([1, 2, 8])):
            damaged[rng.choice(targets)] = rng.randrange(256)
        if rng.random() < 0.3:  # keep the structures' checksums valid so the fields themselves are tested
            damaged[-512:] = with_checksum(bytes(damaged[-512:]), FOOTER_CHECKSUM_AT)
            damaged[:512] = with_checksum(bytes(damaged[:512]), FOOTER_CHECKSUM_AT)
            damaged[512:1536] = with_checksum(bytes(damaged[512:1536]), HEADER_CHECKSUM_AT)
        child.write_bytes(bytes(damaged))
        started = time.monotonic()
        try:
            read_all(child)
            check_image(child)
            outcome = "ok"
        except PolyvisorError as exc:
            outcome = type(exc).__name__
        assert time.monotonic() - started < 5
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ok", 0) > 0
    assert len(outcomes) > 2, outcomes


def test_garbage_is_not_probed(workdir: Path) -> None:
    junk = workdir / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    assert probe_format(junk) == "raw"
    junk.write_bytes(b"conectix")
    assert probe_format(junk) == "vhd"
    with pytest.raises(PolyvisorError):
        read_all(junk)


# ------------------------------------------------------------------ check


def test_check_finds_damage(workdir: Path) -> None:
    image, _ = dynamic_image(workdir)
    good = image.read_bytes()
    header, _ = header_of(image)
    first = bat_entry(image, 0)

    def problems(**bat: int) -> list[str]:
        image.write_bytes(good)
        for index, value in bat.items():
            patch_bat(image, int(index[1:]), value)
        result = check_image(image)
        return [f"{p.kind.value}: {p.message}" for p in result.problems]

    found = problems(b1=first)  # two entries, one block
    assert any("corruption" in p and "overlaps block" in p for p in found)
    found = problems(b1=header.table_offset // 512)  # a block over the BAT
    assert any("overlaps the block allocation table" in p for p in found)
    found = problems(b1=1)  # a block over the dynamic header
    assert any("overlaps the dynamic disk header" in p for p in found)
    found = problems(b1=(len(good) - 1024) // 512)  # a block running into the footer
    assert any("extends past the end" in p for p in found)
    found = problems(b0=0xFFFFFFFF)  # the first block is no longer referenced
    assert found == [f"leak: {2 * MIB + 512} bytes at 2048..{2 * MIB + 2560} are not used by any block"]
    # an allocated entry beyond the disk's blocks: the disk shrinks to one block, the BAT keeps two
    image.write_bytes(good)
    assert check_image(image).clean
    patch_footer(image, current_size=2 * MIB)
    result = check_image(image)
    assert (result.corruptions, result.leaks) == (0, 1)
    assert "beyond the disk's 1 blocks" in result.problems[0].message
    # a BAT too small for the disk cannot be opened; check says why instead of failing
    image.write_bytes(good)
    patch_header(image, max_table_entries=1)
    result = check_image(image)
    assert result.corruptions == 1
    assert "the BAT has 1 entries" in result.problems[0].message
    # a misaligned BAT offset
    image.write_bytes(good)
    patch_header(image, table_offset=header.table_offset + 4, max_table_entries=1)
    patch_footer(image, current_size=2 * MIB)
    assert any("not aligned" in p.message for p in check_image(image).problems)


def test_check_unused_space_is_a_leak(workdir: Path) -> None:
    image = workdir / "g.vhd"
    with create_image(image, "vhd", 3 * MIB) as created:
        created.write(0, b"\x01" * 512)
    data = image.read_bytes()
    for gap, leaks in ((3584, 0), (2 * MIB + 512, 1)):  # alignment padding; room for a whole block
        image.write_bytes(data[:-512] + bytes(gap) + data[-512:])
        result = check_image(image)
        assert (result.corruptions, result.leaks) == (0, leaks), result.problems
        assert read_all(image)[:512] == b"\x01" * 512
    assert f"{2 * MIB + 512} bytes" in result.problems[0].message


def test_check_clean_on_polyvisor_and_qemu_images(workdir: Path) -> None:
    _, child, _ = make_chain(workdir)
    for path in workdir.glob("*.vhd"):
        result = check_image(path)
        assert result.clean, (path, result.problems)
        assert result.total_units is not None
    assert check_image(child).allocated_units == header_of(child)[0].max_table_entries


def test_vhd_class_attributes() -> None:
    assert VhdImage.format_name == "vhd"
    assert VhdImage.aliases == ("vpc",)
    assert VhdImage.subformats == ("dynamic", "fixed")
    assert VhdImage.create_options == frozenset({"block_size"})
    assert VhdImage.supports_backing
    assert VhdImage.max_virtual_size == 2040 << 30 < (2 << 40) + MIB
