"""The hostile-image corpus: crafted images of every format, generated here (no binary blobs in git).

Each case starts from a valid image made by qemu-img/qemu-io (or written from
the spec) and breaks one thing: truncated headers and tables, offsets past EOF
or into metadata, overlapping and looping tables, absurd sizes, bad checksums,
over-inflating compressed data, dirty logs with corrupt entries, references
escaping the image's directory, looping and 1,000-deep backing chains, a
descriptor megabytes long.  Every case must end in a clear ``PolyvisorError``
within a second and with bounded memory (tests/hostile/test_hostile.py).

``python -m tests.hostile.corpus OUTDIR`` writes the whole corpus to OUTDIR
(one folder per case) for manual study or other tools.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One hostile input: how to build it, which format to open it as."""

    name: str
    format: str
    build: Callable[[Path], Path]  #: writes the files into a folder, returns the image to open
    what: str
    #: "read": reading must fail.  "write": the bytes read are well defined (qemu reads them too), but
    #: opening the image writable must be refused, since a write would land on other data.
    refused: str = "read"
    #: Whether ``check`` (metadata only, like qemu-img check) can see the problem; False for bad *data*
    #: such as a compressed cluster that inflates too far, which only reading finds.
    check_finds: bool = True


CASES: list[Case] = []


def case(fmt: str, what: str, *, refused: str = "read",
         check_finds: bool = True) -> Callable[[Callable[[Path], Path]], Callable[[Path], Path]]:
    """Register a builder as a corpus case."""

    def register(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
        name = build.__name__.lstrip("_").removeprefix(f"{fmt}_")
        CASES.append(Case(f"{fmt}-{name}", fmt, build, what, refused, check_finds))
        return build

    return register


# ------------------------------------------------------------------ helpers


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def made_by_qemu(folder: Path, name: str, fmt: str, size: int = 8 * MIB, options: str = "",
                 writes: tuple[str, ...] = ("write -P 0x11 0 65536", "write -P 0x22 4194304 65536")) -> Path:
    """A valid image made by qemu-img create and filled by qemu-io."""
    path = folder / name
    _run("qemu-img", "create", "-q", "-f", QEMU_FORMAT[fmt], *(["-o", options] if options else []),
         str(path), str(size))
    if writes:
        _run("qemu-io", "-f", QEMU_FORMAT[fmt], *[a for w in writes for a in ("-c", w)], str(path))
    return path


def converted_by_qemu(folder: Path, name: str, fmt: str, options: str = "", *, compress: bool = False,
                      size: int = 8 * MIB) -> Path:
    """A valid image converted by qemu-img from a patterned raw file."""
    raw = made_by_qemu(folder, f".{name}.raw", "raw", size)
    path = folder / name
    _run("qemu-img", "convert", *(["-c"] if compress else []), "-f", "raw", "-O", QEMU_FORMAT[fmt],
         *(["-o", options] if options else []), str(raw), str(path))
    raw.unlink()
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def truncate(path: Path, length: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(length)


# qcow2 (docs/interop/qcow2.txt, "Header")
def qcow2_header(path: Path) -> dict[str, int]:
    fields = struct.unpack(">4sIQIIQIIQQIIQ", read_at(path, 0, 72))
    names = ["magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
             "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
             "nb_snapshots", "snapshots_offset"]
    return {n: v for n, v in zip(names, fields, strict=True) if n != "magic"}


def qcow2_l2_offset(path: Path, l1_index: int = 0) -> int:
    header = qcow2_header(path)
    entry: int = struct.unpack(">Q", read_at(path, header["l1_table_offset"] + 8 * l1_index, 8))[0]
    return entry & 0x00FFFFFFFFFFFE00


# VHD ("Virtual Hard Disk Image Format Specification": hard disk footer, dynamic disk header)
def vhd_checksum(block: bytes, field: int) -> bytes:
    """One's complement of the byte sum, with the checksum field itself taken as zero."""
    total = sum(block[:field]) + sum(block[field + 4 :])
    return struct.pack(">I", ~total & 0xFFFFFFFF)


def vhd_fix_footer(path: Path, offset: int) -> None:
    footer = read_at(path, offset, 512)
    patch(path, offset + 64, vhd_checksum(footer, 64))


def vhd_fix_dynamic_header(path: Path, offset: int = 512) -> None:
    header = read_at(path, offset, 1024)
    patch(path, offset + 36, vhd_checksum(header, 36))


def vhd_fix_all(path: Path) -> None:
    size = path.stat().st_size
    vhd_fix_footer(path, size - 512)
    if read_at(path, 0, 8) == b"conectix":
        vhd_fix_footer(path, 0)
        vhd_fix_dynamic_header(path)


# VHDX ([MS-VHDX] 2.2: header at 64 KiB and 128 KiB, region tables at 192 KiB and 256 KiB)
def _guid_bytes(text: str) -> str:
    """On-disk (mixed-endian) bytes, as hex, of a GUID written 8-4-4-4-12."""
    return uuid.UUID(text).bytes_le.hex()


#: GUIDs of [MS-VHDX] 2.2.3.1 (BAT region) and 2.6.2 (metadata items).
VHDX_FILE_PARAMETERS = _guid_bytes("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_VIRTUAL_DISK_SIZE = _guid_bytes("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VHDX_BAT_REGION = _guid_bytes("2DC27766-F623-4200-9D64-115E9BFD4A08")


def vhdx_fix_crc(path: Path, offset: int, length: int) -> None:
    """Recompute a CRC-32C stored at offset+4 over [offset, offset+length) with the field zeroed."""
    block = bytearray(read_at(path, offset, length))
    block[4:8] = b"\0\0\0\0"
    patch(path, offset + 4, struct.pack("<I", google_crc32c.value(bytes(block))))


def vhdx_regions(path: Path) -> dict[str, tuple[int, int]]:
    table = read_at(path, 192 * 1024, 64 * 1024)
    count = struct.unpack_from("<I", table, 8)[0]
    out: dict[str, tuple[int, int]] = {}
    for i in range(min(count, 16)):
        guid, offset, length, _ = struct.unpack_from("<16sQII", table, 16 + 32 * i)
        out["bat" if guid == bytes.fromhex(VHDX_BAT_REGION) else f"region{i}"] = (offset, length)
    return out


def vhdx_metadata_region(path: Path) -> tuple[int, int]:
    regions = vhdx_regions(path)
    return next(v for k, v in regions.items() if k != "bat")


def vhdx_metadata_item(path: Path, item_guid_hex: str) -> int:
    """File offset of a metadata item's data ([MS-VHDX] 2.6.1 metadata table)."""
    region_offset, _ = vhdx_metadata_region(path)
    table = read_at(path, region_offset, 64 * 1024)
    count = struct.unpack_from("<H", table, 10)[0]
    wanted = bytes.fromhex(item_guid_hex)
    for i in range(count):
        guid, offset, _length, _flags = struct.unpack_from("<16sIII", table, 32 + 32 * i)
        if guid == wanted:
            return region_offset + int(offset)
    raise LookupError(item_guid_hex)


# VMDK ("Virtual Disk Format 5.0": SparseExtentHeader)
def vmdk_header(path: Path) -> dict[str, int]:
    values = struct.unpack("<4sIIQQQQIQQQ", read_at(path, 0, 72))
    names = ["magic", "version", "flags", "capacity", "grain_size", "descriptor_offset", "descriptor_size",
             "num_gtes_per_gt", "rgd_offset", "gd_offset", "overhead"]
    return {n: v for n, v in zip(names, values, strict=True) if n != "magic"}


# ======================================================================= raw


@case("raw", "a FIFO named as the image: must not block")
def _fifo(folder: Path) -> Path:
    path = folder / "disk.img"
    os.mkfifo(path)
    return path


@case("raw", "a directory named as the image")
def _directory(folder: Path) -> Path:
    path = folder / "disk.img"
    path.mkdir()
    return path


@case("raw", "a symlink loop named as the image")
def _symlink_loop(folder: Path) -> Path:
    path = folder / "disk.img"
    os.symlink("disk.img", path)
    return path


# ===================================================================== qcow2


@case("qcow2", "header cut short after 40 bytes")
def _truncated_header(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    truncate(path, 40)
    return path


@case("qcow2", "version 4")
def _version_4(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 4, struct.pack(">I", 4))
    return path


@case("qcow2", "cluster_bits 8 (256-byte clusters)")
def _cluster_bits_small(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 20, struct.pack(">I", 8))
    return path


@case("qcow2", "cluster_bits 40 (1 TiB clusters)")
def _cluster_bits_huge(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 20, struct.pack(">I", 40))
    return path


@case("qcow2", "virtual size 2^63")
def _size_2_63(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 24, struct.pack(">Q", 1 << 63))
    return path


@case("qcow2", "L1 size 2^31 - 1 entries")
def _l1_size_absurd(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 36, struct.pack(">I", 0x7FFFFFFF))
    return path


@case("qcow2", "L1 table offset past the end of the file")
def _l1_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 40, struct.pack(">Q", 1 << 40))
    return path


@case("qcow2", "L1 table offset not cluster aligned")
def _l1_unaligned(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 40, struct.pack(">Q", qcow2_header(path)["l1_table_offset"] + 8))
    return path


@case("qcow2", "refcount table offset not cluster aligned")
def _reftable_unaligned(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 48, struct.pack(">Q", qcow2_header(path)["refcount_table_offset"] + 512))
    return path


@case("qcow2", "refcount table of 2^32 - 1 clusters")
def _reftable_huge(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 56, struct.pack(">I", 0xFFFFFFFF))
    return path


@case("qcow2", "L2 table past the end of the file")
def _l2_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, qcow2_header(path)["l1_table_offset"], struct.pack(">Q", (1 << 63) | (1 << 40)))
    return path


@case("qcow2", "L2 table placed on the L1 table (a table loop)")
def _l2_on_l1(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    l1 = qcow2_header(path)["l1_table_offset"]
    patch(path, l1, struct.pack(">Q", (1 << 63) | l1))
    return path


@case("qcow2", "L2 table placed on the header cluster")
def _l2_on_header(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    # offset 0 would mean "unallocated"; the header cluster is addressed through a refcount-table alias instead
    refcount_table = qcow2_header(path)["refcount_table_offset"]
    patch(path, qcow2_header(path)["l1_table_offset"], struct.pack(">Q", (1 << 63) | refcount_table))
    return path


@case("qcow2", "data cluster past the end of the file")
def _data_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, qcow2_l2_offset(path), struct.pack(">Q", (1 << 63) | (1 << 40)))
    return path


@case("qcow2", "data cluster overlapping the L1 table")
def _data_on_l1(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, qcow2_l2_offset(path), struct.pack(">Q", (1 << 63) | qcow2_header(path)["l1_table_offset"]))
    return path


@case("qcow2", "compressed cluster descriptor pointing past the end of the file")
def _compressed_past_eof(folder: Path) -> Path:
    path = converted_by_qemu(folder, "disk.qcow2", "qcow2", compress=True)
    # cluster_bits 16: host offset in bits 0..53, sector count above ([qcow2.txt] "Compressed Clusters Descriptor")
    patch(path, qcow2_l2_offset(path), struct.pack(">Q", (1 << 62) | (1 << 40)))
    return path


@case("qcow2", "compressed cluster inflating beyond its cluster", check_finds=False)
def _compressed_bomb(folder: Path) -> Path:
    path = converted_by_qemu(folder, "disk.qcow2", "qcow2", compress=True)
    (entry,) = struct.unpack(">Q", read_at(path, qcow2_l2_offset(path), 8))
    host = entry & ((1 << 54) - 1)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(bytes(16 * MIB)) + compressor.flush()  # 16 MiB of zeros in ~16 KiB
    sectors = (len(bomb) + (host % 512) + 511) // 512
    end = path.stat().st_size
    patch(path, end, bomb)  # place it at the end of the file
    patch(path, qcow2_l2_offset(path), struct.pack(">Q", (1 << 62) | ((sectors - 1) << 54) | end))
    return path


@case("qcow2", "header extension longer than the header cluster")
def _extension_too_long(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    header_length = struct.unpack(">I", read_at(path, 100, 4))[0]
    patch(path, header_length, struct.pack(">II", 0x12345678, 0x00FFFFFF))
    return path


@case("qcow2", "refcount_order 7")
def _refcount_order_7(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 96, struct.pack(">I", 7))
    return path


@case("qcow2", "unknown incompatible feature bit")
def _unknown_incompatible(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 72, struct.pack(">Q", 1 << 40))
    return path


@case("qcow2", "encrypted (crypt_method 1)")
def _encrypted(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 32, struct.pack(">I", 1))
    return path


@case("qcow2", "snapshot table of 65536 entries past the end of the file")
def _snapshots_absurd(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    patch(path, 60, struct.pack(">IQ", 65536, 1 << 40))
    return path


@case("qcow2", "backing file name escaping the image's directory")
def _backing_escapes(folder: Path) -> Path:
    inner = folder / "inner"
    inner.mkdir()
    made_by_qemu(folder, "outside.qcow2", "qcow2")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../outside.qcow2", "-F", "qcow2",
         str(inner / "disk.qcow2"))
    return inner / "disk.qcow2"


@case("qcow2", "backing file name absolute (/etc/passwd as raw)")
def _backing_absolute(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.qcow2", "qcow2")
    _run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(path))
    return path


@case("qcow2", "backing chain looping a -> b -> a")
def _backing_loop(folder: Path) -> Path:
    made_by_qemu(folder, "b.qcow2", "qcow2")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(folder / "a.qcow2"))
    _run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(folder / "b.qcow2"))
    return folder / "a.qcow2"


@case("qcow2", "backing chain 1,000 images deep")
def _backing_1000_deep(folder: Path) -> Path:
    made_by_qemu(folder, "d0000.qcow2", "qcow2", size=MIB, writes=())
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "d0000.qcow2", "-F", "qcow2",
         str(folder / "template.qcow2"))
    template = (folder / "template.qcow2").read_bytes()
    (folder / "template.qcow2").unlink()
    for i in range(1, 1001):  # same-length names: patch the backing file name in the template
        (folder / f"d{i:04d}.qcow2").write_bytes(template.replace(b"d0000.qcow2", f"d{i - 1:04d}.qcow2".encode()))
    return folder / "d1000.qcow2"


# ====================================================================== vmdk


@case("vmdk", "bad magic")
def _vmdk_bad_magic(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    patch(path, 0, b"XDMV")
    return path


@case("vmdk", "grain size 0")
def _grain_zero(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    patch(path, 20, struct.pack("<Q", 0))
    return path


@case("vmdk", "grain size 2^40 sectors")
def _grain_huge(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    patch(path, 20, struct.pack("<Q", 1 << 40))
    return path


@case("vmdk", "2^31 grain table entries per table")
def _gtes_absurd(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    patch(path, 44, struct.pack("<I", 1 << 31))
    return path


@case("vmdk", "grain directory past the end of the file")
def _gd_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    patch(path, 56, struct.pack("<Q", 1 << 40))
    patch(path, 48, struct.pack("<Q", 1 << 40))
    return path


@case("vmdk", "capacity 2^62 sectors")
def _vmdk_capacity(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    patch(path, 12, struct.pack("<Q", 1 << 62))
    return path


@case("vmdk", "grain table entry pointing into the header")
def _gte_into_header(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vmdk", "vmdk")
    header = vmdk_header(path)
    for gd in (header["gd_offset"], header["rgd_offset"]):
        (gt_sector,) = struct.unpack("<I", read_at(path, gd * 512, 4))
        patch(path, gt_sector * 512, struct.pack("<I", 2))  # sector 2: inside the embedded descriptor
    return path


@case("vmdk", "descriptor file 8 MiB long")
def _descriptor_megabytes(folder: Path) -> Path:
    path = folder / "disk.vmdk"
    lines = ["# Disk DescriptorFile", "version=1", 'createType="monolithicFlat"', "CID=fffffffe",
             "parentCID=ffffffff", 'RW 16 FLAT "disk-flat.vmdk" 0']
    padding = "# " + "x" * 1000 + "\n"
    path.write_text("\n".join(lines) + "\n" + padding * (8 * 1024))
    (folder / "disk-flat.vmdk").write_bytes(bytes(8192))
    return path


@case("vmdk", "flat extent escaping the directory through ..")
def _extent_dotdot(folder: Path) -> Path:
    inner = folder / "inner"
    inner.mkdir()
    (folder / "secret.img").write_bytes(b"secret" * 1000)
    path = inner / "disk.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 8 FLAT "../secret.img" 0\n')
    return path


@case("vmdk", "flat extent naming /etc/passwd (qemu-img copies it into its output)")
def _extent_absolute(folder: Path) -> Path:
    path = folder / "disk.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 8 FLAT "/etc/passwd" 0\n')
    return path


@case("vmdk", "unknown createType")
def _create_type_unknown(folder: Path) -> Path:
    path = folder / "disk.vmdk"
    (folder / "disk-flat.vmdk").write_bytes(bytes(4096))
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="quantumSparse"\nRW 8 FLAT "disk-flat.vmdk" 0\n')
    return path


@case("vmdk", "streamOptimized grain inflating beyond its grain")
def _stream_bomb(folder: Path) -> Path:
    path = converted_by_qemu(folder, "disk.vmdk", "vmdk", "subformat=streamOptimized")
    data = bytearray(path.read_bytes())
    # The first grain marker follows the header/descriptor: find the zlib stream of the first grain.
    start = data.find(b"\x78", 65536)
    marker = start - 12
    bomb = zlib.compress(bytes(32 * MIB), 9)
    lba, _size = struct.unpack_from("<QI", data, marker)
    data[marker : marker + 12] = struct.pack("<QI", lba, len(bomb))
    data[start : start + len(bomb)] = bomb
    path.write_bytes(bytes(data))
    return path


@case("vmdk", "streamOptimized whose grain directory is in the footer, without the footer")
def _stream_no_footer(folder: Path) -> Path:
    path = converted_by_qemu(folder, "disk.vmdk", "vmdk", "subformat=streamOptimized")
    patch(path, 56, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))  # GD_AT_END: the footer's header says where
    truncate(path, path.stat().st_size - 1536)  # drop footer marker, footer and end-of-stream marker
    return path


@case("vmdk", "delta whose parentCID does not match its parent")
def _parent_cid_mismatch(folder: Path) -> Path:
    made_by_qemu(folder, "base.vmdk", "vmdk")
    _run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(folder / "delta.vmdk"))
    path = folder / "delta.vmdk"
    data = path.read_bytes()
    at = data.find(b"parentCID=")
    patch(path, at, b"parentCID=12345678")
    return path


@case("vmdk", "delta chain looping through parentFileNameHint")
def _vmdk_parent_loop(folder: Path) -> Path:
    made_by_qemu(folder, "b.vmdk", "vmdk")
    _run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "b.vmdk", "-F", "vmdk", str(folder / "a.vmdk"))
    _run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "a.vmdk", "-F", "vmdk", str(folder / "c.vmdk"))
    data = (folder / "c.vmdk").read_bytes()  # c names a; make b name a too, and a names b: a <-> b
    (folder / "b.vmdk").write_bytes(data)
    return folder / "a.vmdk"


# ======================================================================= vhd


@case("vhd", "fixed VHD cut to 300 bytes")
def _vhd_truncated(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd", options="subformat=fixed")
    truncate(path, 300)
    return path


@case("vhd", "dynamic disk header checksum wrong")
def _vhd_header_checksum(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 512 + 36, b"\x12\x34\x56\x78")
    return path


@case("vhd", "both footers' checksums wrong")
def _vhd_footer_checksum(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 64, b"\x12\x34\x56\x78")
    patch(path, path.stat().st_size - 512 + 64, b"\x12\x34\x56\x78")
    return path


@case("vhd", "dynamic header cookie wrong (checksums valid)")
def _vhd_header_cookie(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 512, b"cxspars_")
    vhd_fix_all(path)
    return path


@case("vhd", "block size 3 bytes (checksums valid)")
def _vhd_block_size_odd(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 512 + 32, struct.pack(">I", 3))
    vhd_fix_all(path)
    return path


@case("vhd", "block size 2 GiB (checksums valid)")
def _vhd_block_size_huge(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 512 + 32, struct.pack(">I", 1 << 31))
    vhd_fix_all(path)
    return path


@case("vhd", "BAT of 2^32 - 1 entries (checksums valid)")
def _vhd_max_table_entries(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 512 + 28, struct.pack(">I", 0xFFFFFFFF))
    vhd_fix_all(path)
    return path


@case("vhd", "BAT offset past the end of the file (checksums valid)")
def _vhd_bat_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    patch(path, 512 + 16, struct.pack(">Q", 1 << 40))
    vhd_fix_all(path)
    return path


@case("vhd", "BAT entry pointing past the end of the file")
def _vhd_block_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    (table,) = struct.unpack(">Q", read_at(path, 512 + 16, 8))
    patch(path, table, struct.pack(">I", 0x7FFFFFF0))
    return path


@case("vhd", "BAT entry pointing at the footer copy in sector 0")
def _vhd_block_on_footer(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    (table,) = struct.unpack(">Q", read_at(path, 512 + 16, 8))
    patch(path, table, struct.pack(">I", 0))
    return path


@case("vhd", "current size 2^63 (checksums valid)")
def _vhd_size_2_63(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    for footer in (0, path.stat().st_size - 512):
        patch(path, footer + 48, struct.pack(">Q", 1 << 63))
        patch(path, footer + 56, struct.pack(">HBB", 65535, 16, 255))  # max CHS: size from current_size
    vhd_fix_all(path)
    return path


@case("vhd", "data offset pointing back at the footer copy (a header loop)")
def _vhd_header_loop(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhd", "vhd")
    for footer in (0, path.stat().st_size - 512):
        patch(path, footer + 16, struct.pack(">Q", 0))
    vhd_fix_all(path)
    return path


# ====================================================================== vhdx


@case("vhdx", "file type identifier wrong")
def _vhdx_identifier(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    patch(path, 0, b"vhdxfilX")
    return path


@case("vhdx", "both headers with bad CRC-32C")
def _vhdx_headers_crc(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    patch(path, 64 * 1024 + 4, b"\xde\xad\xbe\xef")
    patch(path, 128 * 1024 + 4, b"\xde\xad\xbe\xef")
    return path


@case("vhdx", "both region tables with bad CRC-32C")
def _vhdx_regions_crc(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    patch(path, 192 * 1024 + 4, b"\xde\xad\xbe\xef")
    patch(path, 256 * 1024 + 4, b"\xde\xad\xbe\xef")
    return path


@case("vhdx", "region table claiming 2^32 - 1 entries (CRC valid)")
def _vhdx_region_count(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    for table in (192 * 1024, 256 * 1024):
        patch(path, table + 8, struct.pack("<I", 0xFFFFFFFF))
        vhdx_fix_crc(path, table, 64 * 1024)
    return path


@case("vhdx", "BAT region overlapping the headers (CRC valid)")
def _vhdx_region_overlap(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    for table in (192 * 1024, 256 * 1024):
        data = read_at(path, table, 64 * 1024)
        count = struct.unpack_from("<I", data, 8)[0]
        for i in range(count):
            if data[16 + 32 * i : 32 + 32 * i] == bytes.fromhex(VHDX_BAT_REGION):
                patch(path, table + 16 + 32 * i + 16, struct.pack("<Q", 64 * 1024))
        vhdx_fix_crc(path, table, 64 * 1024)
    return path


@case("vhdx", "block size 0")
def _vhdx_block_size_zero(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    patch(path, vhdx_metadata_item(path, VHDX_FILE_PARAMETERS), struct.pack("<I", 0))
    return path


@case("vhdx", "block size 3 MiB (not a power of two)")
def _vhdx_block_size_odd(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    patch(path, vhdx_metadata_item(path, VHDX_FILE_PARAMETERS), struct.pack("<I", 3 * MIB))
    return path


@case("vhdx", "virtual disk size 2^63")
def _vhdx_size_2_63(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    patch(path, vhdx_metadata_item(path, VHDX_VIRTUAL_DISK_SIZE), struct.pack("<Q", 1 << 63))
    return path


@case("vhdx", "BAT entry pointing past the end of the file")
def _vhdx_bat_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    bat_offset, _ = vhdx_regions(path)["bat"]
    # state 6 (FULLY_PRESENT), file offset in MiB in bits 20..63 ([MS-VHDX] 2.5.1)
    patch(path, bat_offset, struct.pack("<Q", 6 | ((1 << 30) << 20)))
    return path


@case("vhdx", "dirty log whose entries are corrupt")
def _vhdx_dirty_log(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vhdx", "vhdx")
    for header in (64 * 1024, 128 * 1024):
        patch(path, header + 48, bytes.fromhex("00112233445566778899aabbccddeeff"))  # LogGuid: dirty
        vhdx_fix_crc(path, header, 4096)
    (log_offset,) = struct.unpack("<Q", read_at(path, 64 * 1024 + 72, 8))
    # a log entry header ("loge") with a plausible layout but a wrong checksum
    entry = struct.pack("<4sIIIQII16sQQQ", b"loge", 0xDEADBEEF, 4096, 0, 1, 1, 0,
                        bytes.fromhex("00112233445566778899aabbccddeeff"), 1 << 40, 0, 1 << 40)
    patch(path, log_offset, entry)
    return path


# ======================================================================= vdi


@case("vdi", "signature wrong")
def _vdi_signature(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 64, struct.pack("<I", 0xBEDA1070))
    return path


@case("vdi", "version 2.0")
def _vdi_version(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 68, struct.pack("<I", 0x00020000))
    return path


@case("vdi", "header size 2^31")
def _vdi_header_size(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 72, struct.pack("<I", 1 << 31))
    return path


@case("vdi", "block size 0")
def _vdi_block_zero(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 376, struct.pack("<I", 0))
    return path


@case("vdi", "block size 2 GiB")
def _vdi_block_huge(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 376, struct.pack("<I", 1 << 31))
    return path


@case("vdi", "2^32 - 1 blocks for an 8 MiB disk")
def _vdi_blocks_absurd(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 384, struct.pack("<I", 0xFFFFFFFF))
    return path


@case("vdi", "block map past the end of the file")
def _vdi_map_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 340, struct.pack("<I", 0x7FFFFE00))
    return path


@case("vdi", "block map overlapping the header")
def _vdi_map_on_header(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 340, struct.pack("<I", 0))
    return path


@case("vdi", "block map entry pointing past the end of the file")
def _vdi_entry_past_eof(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    (blocks_offset,) = struct.unpack("<I", read_at(path, 340, 4))
    patch(path, blocks_offset, struct.pack("<I", 4000))
    return path


@case("vdi", "two block map entries sharing one data block", refused="write")
def _vdi_duplicate_entries(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    (blocks_offset,) = struct.unpack("<I", read_at(path, 340, 4))
    first = read_at(path, blocks_offset, 4)
    patch(path, blocks_offset + 4 * 4, first)  # block 4 (4 MiB) now shares block 0's data
    return path


@case("vdi", "disk size 2^63")
def _vdi_size(folder: Path) -> Path:
    path = made_by_qemu(folder, "disk.vdi", "vdi")
    patch(path, 368, struct.pack("<Q", 1 << 63))
    return path


def write_corpus(outdir: Path) -> None:
    """Build every case into OUTDIR/<case name>/."""
    outdir.mkdir(parents=True, exist_ok=True)
    for item in CASES:
        folder = outdir / item.name
        folder.mkdir()
        image = item.build(folder)
        print(f"{item.name}: {image.relative_to(outdir)} ({item.format}) - {item.what}")


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1]))
