"""VMDK: every subformat both ways against qemu-img/qemu-io, descriptor features, deltas, hostile files."""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from polyvisor.disk import CreateOptions, ExtentKind, check_image, create_image, open_image, probe_format
from polyvisor.disk.convert import convert
from polyvisor.disk.formats.vmdk import SPLIT_EXTENT_SECTORS, VmdkImage
from polyvisor.disk.formats.vmdk_structs import Descriptor, ExtentLine, parse_descriptor
from polyvisor.errors import (
    BackingChainError,
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
from tests.patterns import apply_writes, qemu_io_commands, reference_raw, scattered_writes
from tests.peers import qemu_check, qemu_compare, qemu_create, qemu_img, qemu_info, qemu_io, qemu_to_raw

SUBFORMATS = ["monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat"]
MIB = 1 << 20
GRAIN = 64 << 10
SIZE = 8 * MIB


def read_all(path: Path) -> bytes:
    with open_image(path) as image:
        return image.read(0, image.virtual_size)


def details(path: Path) -> dict[str, object]:
    with open_image(path) as image:
        return image.info().as_dict()


# ----------------------------------------------------------------- crafting helpers


def header_field(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
        return value


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def grain_table_entry_offset(path: Path, grain_index: int) -> int:
    """File offset of the GTE of *grain_index* in a one-extent sparse file (primary GD)."""
    gd_offset = header_field(path, 56, "<Q")
    gt_sector = header_field(path, gd_offset * 512 + 4 * (grain_index // 512), "<I")
    return gt_sector * 512 + 4 * (grain_index % 512)


def rewrite_embedded_descriptor(path: Path, edit: Callable[[str], str]) -> None:
    """Replace the embedded descriptor text with ``edit(text)``."""
    offset = header_field(path, 28, "<Q") * 512
    size = header_field(path, 36, "<Q") * 512
    with open(path, "r+b") as f:
        f.seek(offset)
        text = f.read(size).split(b"\0", 1)[0].decode()
        new = edit(text).encode()
        assert len(new) <= size
        f.seek(offset)
        f.write(new + bytes(size - len(new)))


def make_image(path: Path, writes: list[tuple[int, bytes]], size: int = SIZE, **options: str) -> None:
    with create_image(path, "vmdk", size, CreateOptions.from_mapping(options)) as image:
        apply_writes(image, writes)


def write_descriptor(path: Path, extents: list[str], create_type: str = "monolithicFlat",
                     extra: str = "") -> None:
    # The comment right before the extent lines matters to qemu 7.2: its sscanf-based parser reads an
    # extent line twice when a blank line precedes it.
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678", "parentCID=ffffffff",
             f'createType="{create_type}"', extra, "", "# Extent description", *extents, "",
             '# The Disk Data Base', "#DDB",
             'ddb.adapterType = "lsilogic"', 'ddb.custom.vendorKey = "kept"']
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------- qemu writes, polyvisor reads


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_made_subformats_read_identically(subformat: str, workdir: Path) -> None:
    image = workdir / "q.vmdk"
    if subformat == "streamOptimized":
        source = workdir / "src.raw"
        qemu_create(source, "raw", SIZE)
        qemu_io(source, "raw", *qemu_io_commands(SIZE, seed=5))
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source), str(image))
    else:
        qemu_create(image, "vmdk", SIZE, f"subformat={subformat}")
        qemu_io(image, "vmdk", *qemu_io_commands(SIZE, seed=5))
    oracle = qemu_to_raw(image, "vmdk", workdir / "oracle.raw").read_bytes()
    assert read_all(image) == oracle
    info = qemu_info(image)["format-specific"]["data"]
    with open_image(image) as opened:
        assert opened.subformat == subformat
        mine = opened.info().details
        assert int(str(mine["cid"]), 16) == info["cid"]
        assert mine["create_type"] == info["create-type"] == subformat
        assert len(mine["extents"]) == len(info["extents"])
        assert mine["grain_size"] == (None if "Flat" in subformat else GRAIN)
        assert opened.check().clean


def test_qemu_zeroed_grain_entries(workdir: Path) -> None:
    image = workdir / "z.vmdk"
    qemu_create(image, "vmdk", SIZE, "zeroed_grain=on")
    qemu_io(image, "vmdk", f"write -P 0x41 0 {4 * MIB}", f"write -z {MIB} {2 * MIB}")
    assert header_field(image, 4, "<I") == 2
    assert header_field(image, 8, "<I") & 4
    assert header_field(image, grain_table_entry_offset(image, MIB // GRAIN), "<I") == 1
    oracle = qemu_to_raw(image, "vmdk", workdir / "oracle.raw").read_bytes()
    assert read_all(image) == oracle
    assert oracle[MIB : 3 * MIB] == bytes(2 * MIB)
    assert oracle[:MIB] == b"\x41" * MIB
    with open_image(image) as opened:
        kinds = [(e.offset, e.length, e.kind) for e in opened.extents()]
        assert (MIB, 2 * MIB, ExtentKind.ZERO) in kinds
        # qemu's zero write replaced allocated grains by GTE 1: their 2 MiB stay in the file, unreferenced
        result = opened.check()
        assert result.corruptions == 0
        assert result.leaks == 1
        assert "32 grain-sized areas" in result.problems[0].message
    # polyvisor zeroes allocated grains in place (nothing leaks) and leaves unallocated ones alone
    with open_image(image, writable=True) as opened:
        opened.write_zeroes(0, GRAIN)
        opened.write_zeroes(6 * MIB, GRAIN)
    assert header_field(image, grain_table_entry_offset(image, 0), "<I") > 1
    assert header_field(image, grain_table_entry_offset(image, 6 * MIB // GRAIN), "<I") == 0
    qemu_check(image, "vmdk")
    expected = bytearray(oracle)
    expected[:GRAIN] = bytes(GRAIN)
    reference = workdir / "ref.raw"
    reference.write_bytes(bytes(expected))
    qemu_compare(image, "vmdk", reference, "raw")


def test_qemu_delta_chain(workdir: Path) -> None:
    base = workdir / "base.vmdk"
    qemu_create(base, "vmdk", SIZE)
    qemu_io(base, "vmdk", *qemu_io_commands(SIZE, seed=1))
    delta = workdir / "delta.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(delta))
    qemu_io(delta, "vmdk", f"write -P 0x77 {GRAIN + 512} 1000", f"write -P 0x78 {5 * MIB} {MIB}")
    top = workdir / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "delta.vmdk", "-F", "vmdk", str(top))
    qemu_io(top, "vmdk", f"write -P 0x79 {5 * MIB + 4096} 4096")
    for image in (delta, top):
        oracle = qemu_to_raw(image, "vmdk", workdir / "oracle.raw").read_bytes()
        assert read_all(image) == oracle
    assert oracle[5 * MIB : 5 * MIB + 4096] == b"\x78" * 4096
    assert oracle[5 * MIB + 4096 : 5 * MIB + 8192] == b"\x79" * 4096
    with open_image(top) as opened:
        info = opened.info()
        assert [b["reference"] for b in info.backing if "reference" in b] == ["delta.vmdk", "base.vmdk"]
        assert info.details["parent_cid"] == details(delta)["cid"]
        depths = {e.depth for e in opened.map() if e.kind is ExtentKind.DATA}
        assert depths == {0, 1, 2}
        assert opened.check().clean


def test_qemu_flat_in_place_writes_by_polyvisor(workdir: Path) -> None:
    """Reopen qemu images writable: qemu still checks them clean and reads polyvisor's writes."""
    for subformat in ("monolithicSparse", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse"):
        image = workdir / f"{subformat}.vmdk"
        qemu_create(image, "vmdk", SIZE, f"subformat={subformat}")
        qemu_io(image, "vmdk", *qemu_io_commands(SIZE, seed=2))
        before = qemu_to_raw(image, "vmdk", workdir / "before.raw")
        cid = details(image)["cid"]
        writes = scattered_writes(SIZE, seed=9, count=10)
        with open_image(image, writable=True) as opened:
            apply_writes(opened, writes)
        assert details(image)["cid"] != cid
        qemu_check(image, "vmdk")
        qemu_compare(image, "vmdk", reference_raw(workdir / "ref.raw", SIZE, writes, base=before), "raw")


# ----------------------------------------------------------------- polyvisor writes, qemu reads


@pytest.mark.parametrize("adapter", ["ide", "lsilogic", "buslogic", "legacyESX"])
@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_polyvisor_subformats_descriptor_and_qemu(subformat: str, adapter: str, workdir: Path) -> None:
    size = 5 * MIB + 512
    image = workdir / "disk.vmdk"
    writes = scattered_writes(size, seed=3, count=8)
    make_image(image, writes, size, subformat=subformat, adapter_type=adapter)
    reference = reference_raw(workdir / "ref.raw", size, writes)
    qemu_check(image, "vmdk")
    qemu_compare(image, "vmdk", reference, "raw")
    qinfo = qemu_info(image)
    assert qinfo["format-specific"]["data"]["create-type"] == subformat
    mine = details(image)
    assert qinfo["format-specific"]["data"]["cid"] == int(str(mine["cid"]), 16)
    assert mine["adapter_type"] == adapter
    if subformat in ("monolithicSparse", "streamOptimized"):
        raw = image.read_bytes()[512 : 512 * 21].split(b"\0", 1)[0].decode()
    else:
        raw = image.read_text()
    assert 'encoding="UTF-8"' in raw
    assert f'ddb.adapterType = "{adapter}"' in raw
    assert f'ddb.geometry.heads = "{16 if adapter == "ide" else 255}"' in raw
    for key in ("ddb.virtualHWVersion", "ddb.toolsInstallType", "ddb.geometry.cylinders",
                "ddb.geometry.sectors", "ddb.longContentID", "ddb.uuid"):
        assert key in raw
    desc = parse_descriptor(raw.encode(), image)
    assert desc.ddb["ddb.longContentID"].endswith(f"{desc.cid:08x}")
    assert sum(e.sectors for e in desc.extents) == size // 512


def test_pvscsi_and_unknown_adapters_refused(workdir: Path) -> None:
    for adapter in ("pvscsi", "scsi"):
        with pytest.raises(UnsupportedOption, match="adapter_type"):
            create_image(workdir / "x.vmdk", "vmdk", MIB, adapter_type=adapter).abort()
    assert list(workdir.iterdir()) == []


def test_split_extents_are_2047_mib(workdir: Path) -> None:
    for subformat, letter in (("twoGbMaxExtentSparse", "s"), ("twoGbMaxExtentFlat", "f")):
        image = workdir / f"{letter}.vmdk"
        size = 5 << 30
        with create_image(image, "vmdk", size, subformat=subformat) as created:
            created.write(size - 512, b"\x5a" * 512)
            created.write((2 << 30) - 4096, b"\x5b" * 8192)  # crosses the first extent boundary
        names = sorted(p.name for p in workdir.glob(f"{letter}-*"))
        assert names == [f"{letter}-{letter}001.vmdk", f"{letter}-{letter}002.vmdk", f"{letter}-{letter}003.vmdk"]
        extents = qemu_info(image)["format-specific"]["data"]["extents"]
        assert [e["virtual-size"] for e in extents] == [SPLIT_EXTENT_SECTORS * 512] * 2 + [
            size - 2 * SPLIT_EXTENT_SECTORS * 512]
        qemu_check(image, "vmdk")
        qemu_io(image, "vmdk", f"read -P 0x5a {size - 512} 512", f"read -P 0x5b {(2 << 30) - 4096} 8192",
                writable=False)
        for f in workdir.iterdir():
            f.unlink()


def test_stream_in_order_and_out_of_order(workdir: Path) -> None:
    """Ordered writes compress on the fly; a backwards write moves to the scratch file; both read the same."""
    size = 6 * MIB + 1024
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ordered = workdir / "ordered.vmdk"
    with create_image(ordered, "vmdk", size, subformat="streamOptimized") as image:
        assert isinstance(image, VmdkImage)
        for pos in range(0, size, 100_000):  # unaligned chunks, in order
            image.write(pos, data[pos : pos + 100_000])
        assert image._stream is not None
        assert image._stream.scratch is None
    shuffled = workdir / "shuffled.vmdk"
    with create_image(shuffled, "vmdk", size, subformat="streamOptimized") as image:
        assert isinstance(image, VmdkImage)
        image.write(3 * MIB, data[3 * MIB :])
        image.write(0, data[: 3 * MIB])
        assert image._stream is not None
        assert image._stream.scratch is not None
    assert sorted(p.name for p in workdir.iterdir()) == ["ordered.vmdk", "shuffled.vmdk"]
    reference = workdir / "ref.raw"
    reference.write_bytes(data)
    for image_path in (ordered, shuffled):
        qemu_check(image_path, "vmdk")
        qemu_compare(image_path, "vmdk", reference, "raw")
        assert read_all(image_path) == data
        assert check_image(image_path).clean
    overhead = header_field(ordered, 64, "<Q") * 512
    assert ordered.read_bytes()[overhead:] == shuffled.read_bytes()[overhead:]  # the same stream after the header


def test_stream_layout_markers_and_footer(workdir: Path) -> None:
    image = workdir / "s.vmdk"
    make_image(image, [(0, b"\x01" * GRAIN), (40 * MIB, b"\x02" * 100)], size=64 * MIB,
                subformat="streamOptimized")
    raw = image.read_bytes()
    assert raw[:4] == b"KDMV"
    assert struct.unpack_from("<I", raw, 4)[0] == 3
    assert struct.unpack_from("<Q", raw, 56)[0] == 0xFFFFFFFFFFFFFFFF  # GD_AT_END
    flags = struct.unpack_from("<I", raw, 8)[0]
    assert flags & (1 << 16)
    assert flags & (1 << 17)
    footer_marker, footer, eos = raw[-1536:-1024], raw[-1024:-512], raw[-512:]
    assert struct.unpack_from("<QII", footer_marker) == (1, 0, 3)
    assert footer[:4] == b"KDMV"
    assert struct.unpack_from("<Q", footer, 56)[0] < len(raw) // 512
    assert eos == bytes(512)
    overhead = struct.unpack_from("<Q", raw, 64)[0]
    lba, size = struct.unpack_from("<QI", raw, overhead * 512)
    assert lba == 0
    assert zlib.decompress(raw[overhead * 512 + 12 : overhead * 512 + 12 + size]) == b"\x01" * GRAIN
    with pytest.raises(ReadOnlyImage):
        open_image(image, writable=True)


def test_compress_option(workdir: Path) -> None:
    with create_image(workdir / "c.vmdk", "vmdk", MIB, CreateOptions(compress=True)) as image:
        assert image.subformat == "streamOptimized"
    with pytest.raises(UnsupportedOption, match="streamOptimized"):
        create_image(workdir / "d.vmdk", "vmdk", MIB, CreateOptions(compress=True, subformat="monolithicFlat"))
    assert sorted(p.name for p in workdir.iterdir()) == ["c.vmdk"]


def test_convert_from_qemu_raw_to_every_subformat(workdir: Path) -> None:
    source = workdir / "src.raw"
    qemu_create(source, "raw", SIZE)
    qemu_io(source, "raw", *qemu_io_commands(SIZE, seed=8))
    for subformat in SUBFORMATS:
        out = workdir / f"{subformat}.vmdk"
        convert(source, out, "vmdk", CreateOptions(subformat=subformat))
        qemu_check(out, "vmdk")
        qemu_compare(out, "vmdk", source, "raw")


def test_polyvisor_delta_over_qemu_and_polyvisor_bases(workdir: Path) -> None:
    for maker in ("qemu", "polyvisor"):
        base = workdir / f"{maker}-base.vmdk"
        if maker == "qemu":
            qemu_create(base, "vmdk", SIZE)
            qemu_io(base, "vmdk", *qemu_io_commands(SIZE, seed=4))
        else:
            make_image(base, scattered_writes(SIZE, seed=4, count=12))
        base_raw = qemu_to_raw(base, "vmdk", workdir / "base.raw")
        delta = workdir / f"{maker}-delta.vmdk"
        writes = [(GRAIN + 100, b"\x99" * 300), (3 * MIB - 10, b"\x98" * 20), (SIZE - 4096, bytes(4096))]
        with create_image(delta, "vmdk", None, backing_file=base.name) as image:
            assert image.virtual_size == SIZE
            apply_writes(image, writes)
        qemu_check(delta, "vmdk")
        assert qemu_info(delta)["backing-filename"] == base.name
        reference = reference_raw(workdir / "ref.raw", SIZE, writes, base=base_raw)
        qemu_compare(delta, "vmdk", reference, "raw")
        assert read_all(delta) == reference.read_bytes()
        desc = details(delta)
        assert desc["parent_cid"] == details(base)["cid"]
        assert os.path.getsize(delta) < 2 * MIB  # only the touched grains


def test_delta_refuses_other_subformats_and_backing_formats(workdir: Path) -> None:
    make_image(workdir / "base.vmdk", [])
    with pytest.raises(UnsupportedOption, match="monolithicSparse"):
        create_image(workdir / "d.vmdk", "vmdk", None, backing_file="base.vmdk", subformat="monolithicFlat")
    qemu_create(workdir / "base.raw", "raw", SIZE)
    with pytest.raises(UnsupportedOption, match="must be a VMDK"):
        create_image(workdir / "e.vmdk", "vmdk", None, backing_file="base.raw", backing_fmt="raw")
    assert not (workdir / "d.vmdk").exists()
    assert not (workdir / "e.vmdk").exists()


def test_huge_sizes_refused_cleanly(workdir: Path) -> None:
    for subformat in SUBFORMATS:
        with pytest.raises(UsageError, match="limit"):
            create_image(workdir / "h.vmdk", "vmdk", 2 << 40, subformat=subformat).abort()
    assert list(workdir.iterdir()) == []


def test_write_zeroes_keeps_sparse(workdir: Path) -> None:
    image = workdir / "z.vmdk"
    with create_image(image, "vmdk", SIZE) as created:
        created.write(0, b"\x11" * GRAIN)
        created.write_zeroes(GRAIN, 4 * MIB)
        created.write_zeroes(100, 100)
    with open_image(image) as opened:
        assert [(e.kind, e.length) for e in opened.extents()] == [
            (ExtentKind.DATA, GRAIN), (ExtentKind.UNALLOCATED, SIZE - GRAIN)]
        assert opened.read(0, 300) == b"\x11" * 100 + bytes(100) + b"\x11" * 100


# ----------------------------------------------------------------- descriptor files


def test_zero_extent_descriptor(workdir: Path) -> None:
    (workdir / "a.bin").write_bytes(b"\x0a" * (2048 * 512))
    (workdir / "b.bin").write_bytes(b"\x0b" * (1024 * 512))
    desc = workdir / "z.vmdk"
    write_descriptor(desc, ['RW 2048 FLAT "a.bin" 0', "RW 4096 ZERO", 'RW 1024 FLAT "b.bin" 0'])
    assert probe_format(desc) == "vmdk"
    with open_image(desc) as image:
        assert image.virtual_size == 7168 * 512
        assert image.read(0, 7168 * 512) == b"\x0a" * 2048 * 512 + bytes(4096 * 512) + b"\x0b" * 1024 * 512
        assert [(e.kind, e.length) for e in image.extents()] == [
            (ExtentKind.DATA, 2048 * 512), (ExtentKind.ZERO, 4096 * 512), (ExtentKind.DATA, 1024 * 512)]
        info = image.info().details
        assert [e["type"] for e in info["extents"]] == ["FLAT", "ZERO", "FLAT"]
        assert info["ddb"]["ddb.custom.vendorKey"] == "kept"
        assert info["adapter_type"] == "lsilogic"
        assert image.check().clean
    with open_image(desc, writable=True) as image, pytest.raises(ReadOnlyImage):
        image.write(2048 * 512 + 10, b"x")


def test_vmfs_descriptor_and_flat_offset_match_qemu(workdir: Path) -> None:
    payload = os.urandom(3 * MIB)
    (workdir / "v-flat.vmdk").write_bytes(payload)
    vmfs = workdir / "v.vmdk"
    write_descriptor(vmfs, [f'RW {len(payload) // 512} VMFS "v-flat.vmdk"'], create_type="vmfs")
    assert read_all(vmfs) == qemu_to_raw(vmfs, "vmdk", workdir / "o1.raw").read_bytes() == payload
    assert details(vmfs)["subformat"] == "vmfs"
    offset = workdir / "o.vmdk"
    write_descriptor(offset, ['RW 2000 FLAT "v-flat.vmdk" 100', 'RW 1000 FLAT "v-flat.vmdk" 0'])
    assert read_all(offset) == qemu_to_raw(offset, "vmdk", workdir / "o2.raw").read_bytes()
    assert read_all(offset) == payload[51200 : 51200 + 2000 * 512] + payload[: 1000 * 512]


def test_rdonly_and_noaccess_extents(workdir: Path) -> None:
    (workdir / "a.bin").write_bytes(b"\x01" * 512 * 16)
    desc = workdir / "r.vmdk"
    write_descriptor(desc, ['RDONLY 16 FLAT "a.bin" 0', 'NOACCESS 16 FLAT "missing.bin" 0'])
    with open_image(desc, writable=True) as image:
        assert image.read(0, 16 * 512) == b"\x01" * 16 * 512
        with pytest.raises(ReadOnlyImage):
            image.write(0, b"x")
        with pytest.raises(UnsupportedFeature, match="NOACCESS"):
            image.read(16 * 512, 512)


def test_descriptor_parse_render_roundtrip(workdir: Path) -> None:
    text = ('# Disk DescriptorFile\r\nversion=1\r\nencoding="windows-1252"\r\nCID=0000abcd\r\nparentCID=ffffffff\r\n'
            'isNativeSnapshot="no"\r\ncreateType="twoGbMaxExtentSparse"\r\n\r\n'
            'RW 4192256 SPARSE "d\xe9-s001.vmdk"\r\nRDONLY 10 FLAT "x.bin" 7\r\nNOACCESS 5 ZERO\r\n'
            '#DDB\r\nddb.adapterType = "buslogic"\r\nddb.other = "x y"\r\n')
    desc = parse_descriptor(text.encode("cp1252"), workdir / "d.vmdk")
    assert (desc.cid, desc.create_type, desc.encoding) == (0xABCD, "twoGbMaxExtentSparse", "windows-1252")
    assert desc.extents == [ExtentLine("RW", 4192256, "SPARSE", "d\xe9-s001.vmdk"),
                            ExtentLine("RDONLY", 10, "FLAT", "x.bin", 7), ExtentLine("NOACCESS", 5, "ZERO")]
    assert desc.ddb == {"ddb.adapterType": "buslogic", "ddb.other": "x y"}
    again = parse_descriptor(desc.encode(), workdir / "d.vmdk")
    assert (again.extents, again.ddb, again.header["isNativeSnapshot"]) == (desc.extents, desc.ddb, "no")
    bom = parse_descriptor(b"\xef\xbb\xbf" + text.encode("cp1252"), workdir / "d.vmdk")
    assert bom.extents == desc.extents
    rendered = Descriptor(cid=1, create_type="monolithicFlat",
                          extents=[ExtentLine("RW", 8, "FLAT", "f.bin", 0)]).render()
    assert 'RW 8 FLAT "f.bin" 0' in rendered
    assert "CID=00000001" in rendered


@pytest.mark.parametrize("reference", ["/etc/passwd", "../outside.img", "sub/../../outside.img"])
def test_extent_escaping_the_directory_is_refused(reference: str, workdir: Path) -> None:
    (workdir.parent / "outside.img").write_bytes(b"secret" * 1000)
    desc = workdir / "evil.vmdk"
    write_descriptor(desc, [f'RW 8 FLAT "{reference}" 0'])
    with pytest.raises(UnsafeReference):
        open_image(desc)
    with pytest.raises(UnsafeReference):
        convert(desc, workdir / "out.raw", "raw")
    assert not (workdir / "out.raw").exists()


def test_symlinked_extent_leaving_the_directory_is_refused(workdir: Path) -> None:
    (workdir.parent / "outside.img").write_bytes(bytes(4096))
    (workdir / "link.img").symlink_to(workdir.parent / "outside.img")
    desc = workdir / "evil.vmdk"
    write_descriptor(desc, ['RW 8 FLAT "link.img" 0'])
    with pytest.raises(UnsafeReference):
        open_image(desc)


def test_unsupported_extent_kinds_named(workdir: Path) -> None:
    (workdir / "d.vmdk").write_bytes(b"COWD" + bytes(2044))
    for kind in ("VMFSSPARSE", "SESPARSE", "VMFSRDM"):
        desc = workdir / f"{kind}.vmdk"
        write_descriptor(desc, [f'RW 8 {kind} "d.vmdk"'], create_type="vmfsSparse")
        with pytest.raises(UnsupportedFeature, match=kind):
            open_image(desc)
    with pytest.raises(UnsupportedFeature, match="COWD"):
        open_image(workdir / "d.vmdk", "vmdk")


# ----------------------------------------------------------------- hostile files


def hostile(path: Path, error: type[PolyvisorError], match: str | None = None) -> PolyvisorError:
    """Opening and reading all of *path* fails with *error* within two seconds."""
    started = time.monotonic()
    with pytest.raises(error, match=match) as caught, open_image(path, "vmdk") as image:
        image.read(0, image.virtual_size)
    assert time.monotonic() - started < 2
    assert str(caught.value)
    return caught.value


@pytest.fixture
def sparse(workdir: Path) -> Path:
    path = workdir / "s.vmdk"
    make_image(path, [(0, os.urandom(GRAIN)), (3 * MIB, b"\x33" * 1000)])
    return path


@pytest.fixture
def stream(workdir: Path) -> Path:
    path = workdir / "st.vmdk"
    make_image(path, [(0, os.urandom(GRAIN)), (GRAIN, b"\x34" * GRAIN)], subformat="streamOptimized")
    return path


def test_hostile_bad_magic(sparse: Path) -> None:
    poke(sparse, 0, b"XXXX")
    assert probe_format(sparse) == "raw"
    hostile(sparse, CorruptImage, "magic")


@pytest.mark.parametrize(("value", "error"), [(0, CorruptImage), (1 << 40, LimitExceeded), (1 << 20, LimitExceeded)])
def test_hostile_grain_size(sparse: Path, value: int, error: type[PolyvisorError]) -> None:
    poke(sparse, 20, struct.pack("<Q", value))
    hostile(sparse, error, "grain")


@pytest.mark.parametrize(("value", "error"), [(0, CorruptImage), (513, LimitExceeded), (0xFFFFFFFF, LimitExceeded)])
def test_hostile_gtes_per_gt(sparse: Path, value: int, error: type[PolyvisorError]) -> None:
    poke(sparse, 44, struct.pack("<I", value))
    hostile(sparse, error, "grain tables")


def test_hostile_capacity(sparse: Path) -> None:
    poke(sparse, 12, struct.pack("<Q", 1 << 62))
    hostile(sparse, LimitExceeded, "grain directory entries")


def test_hostile_gd_offset_past_eof(sparse: Path) -> None:
    poke(sparse, 56, struct.pack("<Q", 1 << 30))
    hostile(sparse, TruncatedImage, "grain directory")
    poke(sparse, 56, struct.pack("<Q", 1 << 62))
    hostile(sparse, TruncatedImage, "grain directory")


def test_hostile_descriptor_offset_past_eof(sparse: Path) -> None:
    poke(sparse, 28, struct.pack("<Q", 1 << 60))
    hostile(sparse, TruncatedImage, "descriptor")


@pytest.mark.parametrize("entry", [5, 1, 0xFFFFFF])
def test_hostile_grain_table_entry(sparse: Path, entry: int) -> None:
    for gt_offset in (grain_table_entry_offset(sparse, 0), _redundant_gte_offset(sparse, 0)):
        poke(sparse, gt_offset, struct.pack("<I", entry))
    hostile(sparse, CorruptImage, "metadata" if entry < 0xFFFF else "past the end")
    result = check_image(sparse)
    assert result.corruptions
    assert not result.clean


def _redundant_gte_offset(path: Path, grain_index: int) -> int:
    rgd_offset = header_field(path, 48, "<Q")
    gt_sector = header_field(path, rgd_offset * 512 + 4 * (grain_index // 512), "<I")
    return gt_sector * 512 + 4 * (grain_index % 512)


def test_check_finds_redundant_table_mismatch_shared_grains_and_leaks(sparse: Path) -> None:
    assert check_image(sparse).clean
    first = header_field(sparse, grain_table_entry_offset(sparse, 0), "<I")
    poke(sparse, _redundant_gte_offset(sparse, 0), struct.pack("<I", first + 128))
    result = check_image(sparse)
    assert any("redundant copy" in p.message for p in result.problems)
    for offset in (grain_table_entry_offset(sparse, 7), _redundant_gte_offset(sparse, 7)):
        poke(sparse, offset, struct.pack("<I", first))
    poke(sparse, _redundant_gte_offset(sparse, 0), struct.pack("<I", first))
    result = check_image(sparse)
    assert any("used twice" in p.message for p in result.problems), result.problems
    with open(sparse, "ab") as f:
        f.write(os.urandom(2 * GRAIN))
    result = check_image(sparse)
    assert result.leaks == 1
    assert any("not referenced" in p.message for p in result.problems)


def test_hostile_compressed_grains(stream: Path) -> None:
    overhead = header_field(stream, 64, "<Q")
    grain_at = overhead * 512
    lba, size = struct.unpack("<QI", stream.read_bytes()[grain_at : grain_at + 12])
    assert (lba, size > 1000) == (0, True)
    bomb = zlib.compress(bytes(2 * GRAIN))
    poke(stream, grain_at, struct.pack("<QI", 0, len(bomb)) + bomb)
    hostile(stream, CorruptImage, "beyond")
    poke(stream, grain_at, struct.pack("<QI", 0, 0xFFFFFF00))
    hostile(stream, CorruptImage, "size")
    poke(stream, grain_at, struct.pack("<QI", 0, 100) + os.urandom(100))
    hostile(stream, CorruptImage, "inflate")
    short = zlib.compress(b"\x01" * 100)
    poke(stream, grain_at, struct.pack("<QI", 0, len(short)) + short)
    hostile(stream, CorruptImage, "inflates to 100")


def test_check_finds_stream_marker_problems(stream: Path) -> None:
    assert check_image(stream).clean
    overhead = header_field(stream, 64, "<Q")
    poke(stream, overhead * 512, struct.pack("<Q", 4096))
    result = check_image(stream)
    assert any("LBA 4096" in p.message for p in result.problems)


@pytest.mark.parametrize("cut", [512, 1024, 1536, 5000])
def test_hostile_stream_without_footer(stream: Path, cut: int) -> None:
    with open(stream, "r+b") as f:
        f.truncate(os.path.getsize(stream) - cut)
    hostile(stream, CorruptImage, "footer|end")


def test_hostile_huge_descriptors(workdir: Path, sparse: Path) -> None:
    big = workdir / "big.vmdk"
    write_descriptor(big, ['RW 8 FLAT "a.bin" 0'], extra="#" + "x" * (3 * MIB))
    hostile(big, LimitExceeded, "descriptor")
    poke(sparse, 36, struct.pack("<Q", 1 << 40))
    hostile(sparse, LimitExceeded, "descriptor")
    many = workdir / "many.vmdk"
    write_descriptor(many, ["RW 1 ZERO"] * 20000)
    hostile(many, LimitExceeded, "extents")


def test_hostile_newline_damage(sparse: Path) -> None:
    poke(sparse, 73, b"\r\n\r\n")
    hostile(sparse, CorruptImage, "text-mode")


def test_parent_cid_mismatch_and_loops(workdir: Path) -> None:
    base = workdir / "base.vmdk"
    make_image(base, [(0, b"\x01" * 512)])
    delta = workdir / "delta.vmdk"
    with create_image(delta, "vmdk", None, backing_file="base.vmdk") as image:
        image.write(GRAIN, b"\x02" * 512)
    assert read_all(delta)[:512] == b"\x01" * 512
    with pytest.raises(ReadOnlyImage, match="parent"):
        open_image(delta, writable=True, follow_backing=False)
    with open_image(base, writable=True) as image:  # the parent changes: a new CID
        image.write(0, b"\x03" * 512)
    hostile(delta, BackingChainError, "parentCID")
    # a -> b -> a
    a, b = workdir / "a.vmdk", workdir / "b.vmdk"
    make_image(a, [])
    make_image(b, [])
    cid_a, cid_b = str(details(a)["cid"]), str(details(b)["cid"])
    rewrite_embedded_descriptor(a, lambda t: t.replace("parentCID=ffffffff",
                                                       f'parentCID={cid_b}\nparentFileNameHint="b.vmdk"'))
    rewrite_embedded_descriptor(b, lambda t: t.replace("parentCID=ffffffff",
                                                       f'parentCID={cid_a}\nparentFileNameHint="a.vmdk"'))
    hostile(a, BackingChainError, "loops")
    # a parent outside the directory
    rewrite_embedded_descriptor(a, lambda t: t.replace('"b.vmdk"', '"../b.vmdk"'))
    hostile(a, UnsafeReference)


def test_absolute_windows_parent_hint_found_beside(workdir: Path) -> None:
    """VMware on Windows writes absolute hints; the parent beside the delta is used if its CID matches."""
    base = workdir / "base.vmdk"
    make_image(base, [(0, b"\x01" * 512)])
    delta = workdir / "delta.vmdk"
    with create_image(delta, "vmdk", None, backing_file="base.vmdk") as image:
        image.write(GRAIN, b"\x02" * 512)
    rewrite_embedded_descriptor(delta, lambda t: t.replace('"base.vmdk"', '"D:\\VMs\\old\\base.vmdk"'))
    data = read_all(delta)
    assert data[:512] == b"\x01" * 512
    assert data[GRAIN : GRAIN + 512] == b"\x02" * 512
    rewrite_embedded_descriptor(delta, lambda t: t.replace("base.vmdk", "other.vmdk"))
    hostile(delta, UnsafeReference)


def test_truncated_flat_extent_is_reported(workdir: Path) -> None:
    image = workdir / "f.vmdk"
    make_image(image, [(0, b"\x01" * 512)], subformat="monolithicFlat")
    with open(workdir / "f-flat.vmdk", "r+b") as f:
        f.truncate(4096)
    result = check_image(image)
    assert any("flat extent file holds 4096 bytes" in p.message for p in result.problems)
    hostile(image, TruncatedImage)


def test_missing_extent_is_a_clear_error(workdir: Path) -> None:
    desc = workdir / "m.vmdk"
    write_descriptor(desc, ['RW 8 FLAT "nope.bin" 0', 'RW 8 SPARSE "gone-s001.vmdk"'])
    hostile(desc, MissingReference, "not found")
    result = check_image(desc)
    assert [p.message.split(" not found")[0] for p in result.problems] == [
        "extent 'nope.bin'", "extent 'gone-s001.vmdk'"]


def test_stream_write_zeroes_and_gaps(workdir: Path) -> None:
    size = 4 * MIB
    image = workdir / "z.vmdk"
    with create_image(image, "vmdk", size, subformat="streamOptimized") as created:
        created.write(0, b"\x10" * 3000)
        created.write_zeroes(1000, 200_000)
        created.write(300_000, b"\x11" * GRAIN)
        created.write_zeroes(2 * MIB, MIB)
        created.write(3 * MIB + 7, b"\x12" * 10)
    expected = bytearray(size)
    expected[0:3000] = b"\x10" * 3000
    expected[1000:201_000] = bytes(200_000)
    expected[300_000 : 300_000 + GRAIN] = b"\x11" * GRAIN
    expected[3 * MIB + 7 : 3 * MIB + 17] = b"\x12" * 10
    reference = workdir / "ref.raw"
    reference.write_bytes(bytes(expected))
    qemu_check(image, "vmdk")
    qemu_compare(image, "vmdk", reference, "raw")
    assert read_all(image) == bytes(expected)


def test_check_finds_stream_table_marker_damage(stream: Path) -> None:
    raw = stream.read_bytes()
    gd_sector = struct.unpack_from("<Q", raw, len(raw) - 1024 + 56)[0]
    gt_sector = struct.unpack_from("<I", raw, gd_sector * 512)[0]
    assert struct.unpack_from("<QII", raw, (gt_sector - 1) * 512) == (4, 0, 1)
    poke(stream, (gt_sector - 1) * 512 + 12, struct.pack("<I", 7))
    result = check_image(stream)
    assert any("not preceded by its marker" in p.message for p in result.problems)


def test_descriptor_and_extent_capacity_mismatch(workdir: Path) -> None:
    image = workdir / "t.vmdk"
    make_image(image, [(0, b"\x01" * 512)], subformat="twoGbMaxExtentSparse")
    text = image.read_text()
    image.write_text(text.replace(f"RW {SIZE // 512} SPARSE", f"RW {SIZE // 512 - 8} SPARSE"))
    hostile(image, CorruptImage, "header")
    assert not check_image(image).clean


@pytest.mark.parametrize("subformat", [s for s in SUBFORMATS if s != "streamOptimized"])
def test_qemu_writes_into_polyvisor_images(subformat: str, workdir: Path) -> None:
    image = workdir / "p.vmdk"
    writes = scattered_writes(SIZE, seed=12, count=8)
    make_image(image, writes, subformat=subformat)
    qemu_io(image, "vmdk", *qemu_io_commands(SIZE, seed=13))
    qemu_check(image, "vmdk")
    oracle = qemu_to_raw(image, "vmdk", workdir / "oracle.raw").read_bytes()
    assert read_all(image) == oracle
    assert check_image(image).clean


def test_write_allocates_missing_grain_tables(workdir: Path) -> None:
    """A GD entry of 0 (no grain table yet): polyvisor appends the table (and its redundant copy)."""
    image = workdir / "g.vmdk"
    size = 64 * MIB
    make_image(image, [(0, b"\x01" * 4096)], size=size)
    for directory in (56, 48):  # GD, then redundant GD: entry of grain table 1 (32-64 MiB)
        gd = header_field(image, directory, "<Q") * 512
        poke(image, gd + 4, struct.pack("<I", 0))
    with open_image(image, writable=True) as opened:
        opened.write(40 * MIB + 3, b"\x02" * 100_000)
        opened.write(0, b"\x03" * 10)
        assert opened.check().clean  # while tables are still cached
    new_table = header_field(image, header_field(image, 56, "<Q") * 512 + 4, "<I")
    assert new_table >= header_field(image, 64, "<Q")  # appended after the preallocated metadata
    qemu_check(image, "vmdk")
    reference = reference_raw(workdir / "ref.raw", size, [(0, b"\x01" * 4096), (40 * MIB + 3, b"\x02" * 100_000),
                                                           (0, b"\x03" * 10)])
    qemu_compare(image, "vmdk", reference, "raw")
    result = check_image(image)
    assert result.clean, result.problems
    qemu_io(image, "vmdk", f"write -P 0x44 {50 * MIB} {MIB}")
    assert check_image(image).clean


def test_extents_sharing_a_file_are_read_only(workdir: Path) -> None:
    make_image(workdir / "t.vmdk", [(0, b"\x01" * 512)], size=MIB, subformat="twoGbMaxExtentSparse")
    shared = workdir / "shared.vmdk"
    write_descriptor(shared, [f'RW {MIB // 512} SPARSE "t-s001.vmdk"'] * 2, create_type="twoGbMaxExtentSparse")
    assert read_all(shared) == (b"\x01" * 512 + bytes(MIB - 512)) * 2
    with pytest.raises(ReadOnlyImage, match="shares its file"):
        open_image(shared, writable=True)
    itself = workdir / "itself.vmdk"
    write_descriptor(itself, ['RW 1 FLAT "itself.vmdk" 0'])
    with pytest.raises(ReadOnlyImage, match="shares its file"):
        open_image(itself, writable=True)
