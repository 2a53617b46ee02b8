"""qcow2 against qemu-img/qemu-io, both directions, plus hostile and damaged images.

qemu writes and polyvisor reads (every cluster size, v2/v3, zero clusters,
zlib/zstd compression, extended L2 entries, snapshots, backing chains,
refcount widths); polyvisor writes and qemu reads and checks (every cluster
size, compat, compression, write_zeroes, backing files, writable reopen of
qemu's images); crafted images fail with clear errors; damaged images get the
same verdict from ``check()`` as from ``qemu-img check``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from polyvisor.disk import CreateOptions, ExtentKind, create_image, open_image, probe_format
from polyvisor.disk.convert import convert
from polyvisor.disk.formats import qcow2 as qcow2_module
from polyvisor.disk.formats.qcow2 import Qcow2Image
from polyvisor.disk.formats.qcow2_structs import Header, compress_clusters
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
    UsageError,
)
from tests.patterns import apply_writes, qemu_io_commands, reference_raw, scattered_writes
from tests.peers import qemu_check, qemu_compare, qemu_create, qemu_img, qemu_info, qemu_io, qemu_to_raw

CLUSTER_SIZES = [512 << i for i in range(13)]  # 512 B .. 2 MiB
COMPATS = {"v2": "0.10", "v3": "1.1"}
MIB = 1 << 20
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63


# ---------------------------------------------------------------- helpers


def read_all(path: Path, fmt: str | None = "qcow2") -> bytes:
    with open_image(path, fmt) as image:
        return image.read(0, image.virtual_size)


def assert_reads_like_qemu(path: Path, workdir: Path) -> None:
    """polyvisor reads what qemu-img reads, and its check finds nothing."""
    oracle = qemu_to_raw(path, "qcow2", workdir / f"{path.name}.oracle").read_bytes()
    assert read_all(path) == oracle, f"{path.name}: polyvisor reads differently from qemu-img"
    with open_image(path) as image:
        result = image.check()
        assert result.clean, result.problems


def qemu_check_report(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` whatever its verdict."""
    proc = qemu_img("check", "--output=json", "-f", "qcow2", str(path), ok=(0, 2, 3))
    report: dict[str, Any] = json.loads(proc.stdout)
    report["exit"] = proc.returncode
    return report


def qemu_map(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return entries


def header_of(path: Path) -> Header:
    with open(path, "rb") as f:
        return Header.unpack(f.read(512))


def get64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def put(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def l2_entry_offset(path: Path, guest_offset: int) -> int:
    """File offset of the L2 entry mapping *guest_offset* (standard L2 entries)."""
    header = header_of(path)
    cs = 1 << header.cluster_bits
    per_table = cs // 8
    l2 = get64(path, header.l1_table_offset + 8 * (guest_offset // cs // per_table)) & OFFSET_MASK
    assert l2, "no L2 table there"
    return l2 + 8 * (guest_offset // cs % per_table)


def refcount_offset(path: Path, cluster: int) -> int:
    """File offset of a cluster's 16-bit refcount."""
    header = header_of(path)
    per_block = (1 << header.cluster_bits) // 2
    block = get64(path, header.refcount_table_offset + 8 * (cluster // per_block))
    assert block, "no refcount block there"
    return block + 2 * (cluster % per_block)


def small_qemu_image(workdir: Path, name: str = "small.qcow2", options: str = "") -> Path:
    """An 8 MiB v3 image with data in its first 256 KiB and at 4 MiB."""
    path = workdir / name
    qemu_create(path, "qcow2", 8 * MIB, options)
    qemu_io(path, "qcow2", "write -P 0x11 0 256K", "write -P 0x22 4M 64K")
    return path


def patterned_raw(path: Path, size: int, *, seed: int = 5) -> Path:
    """Compressible text, random (incompressible) stretches, zeros and constant runs."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randrange(2, 9))) for _ in range(300)]
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, MIB):
            kind = (pos // MIB) % 4
            if kind == 0:
                chunk = bytearray()
                while len(chunk) < MIB:
                    chunk += rng.choice(words) + b" "
                data = bytes(chunk[:MIB])
            elif kind == 1:
                data = rng.randbytes(MIB // 2) + bytes(MIB // 2)
            elif kind == 2:
                continue
            else:
                data = bytes([pos // MIB % 251 + 1]) * (MIB - 1000)
            f.seek(pos)
            f.write(data[: size - pos])
    return path


# ================================================ qemu writes, polyvisor reads


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_qemu_images_of_every_cluster_size_read_identically(cluster_size: int, compat: str, workdir: Path) -> None:
    size = 8 * MIB + 3 * 512
    path = workdir / "q.qcow2"
    qemu_create(path, "qcow2", size, f"cluster_size={cluster_size},compat={COMPATS[compat]}")
    qemu_io(path, "qcow2", *qemu_io_commands(size, seed=cluster_size))
    with open_image(path) as image:
        assert image.subformat == compat
        assert image.info().details["cluster_size"] == cluster_size
        result = image.check()
        qemu = qemu_check(path, "qcow2")
        assert result.allocated_units == qemu["allocated-clusters"]
        assert result.total_units == qemu["total-clusters"]
        assert result.image_end_offset == qemu["image-end-offset"]
    assert_reads_like_qemu(path, workdir)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width_reads_checks_and_reopens(refcount_bits: int, workdir: Path) -> None:
    path = workdir / "rc.qcow2"
    qemu_create(path, "qcow2", 8 * MIB, f"refcount_bits={refcount_bits}")
    qemu_io(path, "qcow2", *qemu_io_commands(8 * MIB, seed=refcount_bits))
    with open_image(path) as image:
        assert image.info().details["refcount_bits"] == refcount_bits
    assert_reads_like_qemu(path, workdir)
    reference = qemu_to_raw(path, "qcow2", workdir / "ref.raw")
    writes = scattered_writes(8 * MIB, seed=refcount_bits, count=10)
    with open_image(path, writable=True) as image:
        apply_writes(image, writes)
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref2.raw", 8 * MIB, writes, base=reference), "raw")


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
def test_qemu_zero_clusters(backing: bool, workdir: Path) -> None:
    """``write -z`` keeps a preallocated zero cluster; ``write -z -u`` leaves a plain zero cluster."""
    path = workdir / "z.qcow2"
    if backing:
        base = workdir / "base.raw"
        qemu_create(base, "raw", 4 * MIB)
        qemu_io(base, "raw", "write -P 0x77 0 4M")
        qemu_create(path, "qcow2", 4 * MIB, "backing_file=base.raw,backing_fmt=raw")
    else:
        qemu_create(path, "qcow2", 4 * MIB)
    qemu_io(path, "qcow2", "write -P 1 0 1M", "write -z 64K 128K", "write -z -u 512K 64K", "write -z 2M 1M",
            "write -z 3M 4K")
    with open_image(path) as image:
        extents = list(image.extents())
    zero = [(e.offset, e.end) for e in extents if e.kind is ExtentKind.ZERO]
    assert (64 << 10, 192 << 10) in zero
    assert any(start <= 512 << 10 and end >= 576 << 10 for start, end in zero)
    if backing:
        assert any(start <= 2 * MIB and end >= 3 * MIB for start, end in zero)
    data = read_all(path)
    assert data[64 << 10 : 192 << 10] == bytes(128 << 10)
    assert data[2 * MIB : 3 * MIB] == bytes(MIB)
    assert data[3 * MIB : 3 * MIB + 4096] == bytes(4096)
    if backing:
        assert data[3 * MIB + 4096 : 3 * MIB + 8192] == b"\x77" * 4096
    assert_reads_like_qemu(path, workdir)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 * MIB])
def test_qemu_compressed_images(cluster_size: int, compression: str, workdir: Path) -> None:
    source = patterned_raw(workdir / "src.raw", 12 * MIB + 512)
    path = workdir / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cluster_size},compression_type={compression}", str(source), str(path))
    report = qemu_check(path, "qcow2")
    assert report["compressed-clusters"] > 0
    with open_image(path) as image:
        assert image.info().details["compression_type"] == compression
    assert read_all(path) == source.read_bytes()
    assert_reads_like_qemu(path, workdir)


def test_qemu_compressed_image_reopened_writable(workdir: Path) -> None:
    """Writes over compressed clusters (whole and partial) turn them into normal clusters."""
    source = patterned_raw(workdir / "src.raw", 8 * MIB)
    path = workdir / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", str(source), str(path))
    writes = [(100, b"a" * 300), (65536, b"b" * 65536), (3 * MIB - 10, b"c" * 20000), (7 * MIB, b"d" * 5)]
    with open_image(path, writable=True) as image:
        apply_writes(image, writes)
        image.write_zeroes(MIB, 2 * 65536)
    writes.append((MIB, bytes(2 * 65536)))
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", 8 * MIB, writes, base=source), "raw")


@pytest.mark.parametrize("cluster_size", [16384, 65536, 2 * MIB])
def test_qemu_extended_l2_subclusters(cluster_size: int, workdir: Path) -> None:
    sub = cluster_size // 32
    base = workdir / "base.raw"
    qemu_create(base, "raw", 8 * MIB)
    qemu_io(base, "raw", "write -P 0x44 0 8M")
    path = workdir / "ext.qcow2"
    qemu_create(path, "qcow2", 8 * MIB,
                f"extended_l2=on,cluster_size={cluster_size},backing_file=base.raw,backing_fmt=raw")
    qemu_io(path, "qcow2", f"write -P 1 {sub} {sub}", f"write -z {4 * sub} {2 * sub}", f"write -P 2 {7 * sub} 100",
            f"write -z {cluster_size} {cluster_size}", f"write -P 3 {3 * cluster_size} {cluster_size}",
            f"write -P 5 {5 * MIB + sub * 3} {sub * 5}")
    with open_image(path) as image:
        assert image.info().details["extended_l2"] is True
        extents = [(e.offset, e.length, e.kind) for e in image.extents(0, cluster_size)]
    assert extents[:4] == [
        (0, sub, ExtentKind.UNALLOCATED),
        (sub, sub, ExtentKind.DATA),
        (2 * sub, 2 * sub, ExtentKind.UNALLOCATED),
        (4 * sub, 2 * sub, ExtentKind.ZERO),
    ]
    data = read_all(path)
    assert data[:sub] == b"\x44" * sub
    assert data[sub : 2 * sub] == b"\x01" * sub
    assert data[4 * sub : 6 * sub] == bytes(2 * sub)
    assert_reads_like_qemu(path, workdir)
    with pytest.raises(UnsupportedFeature, match="extended L2"):
        open_image(path, writable=True)


def test_internal_snapshots_are_tolerated_and_kept_intact(workdir: Path) -> None:
    path = workdir / "snap.qcow2"
    qemu_create(path, "qcow2", 8 * MIB)
    qemu_io(path, "qcow2", "write -P 1 0 2M", "write -P 9 6M 64K")
    qemu_img("snapshot", "-c", "first", str(path))
    qemu_io(path, "qcow2", "write -P 2 1M 64K", "write -z 6M 64K")
    qemu_img("snapshot", "-c", "second", str(path))
    first = workdir / "first.raw"
    qemu_img("convert", "-l", "snapshot.name=first", "-O", "raw", str(path), str(first))
    with open_image(path) as image:
        assert image.info().details["snapshots"] == 2
    assert_reads_like_qemu(path, workdir)
    active = qemu_to_raw(path, "qcow2", workdir / "active.raw")
    # Writes over clusters and L2 tables shared with the snapshots are copied, not made in place.
    writes = [(0, b"x" * 100), (MIB + 5, b"y" * 70000), (6 * MIB, b"z" * 65536), (7 * MIB, b"w" * 512)]
    with open_image(path, writable=True) as image:
        apply_writes(image, writes)
        image.write_zeroes(64 << 10, 128 << 10)
    writes.append((64 << 10, bytes(128 << 10)))
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", 8 * MIB, writes, base=active), "raw")
    again = workdir / "first-again.raw"
    qemu_img("convert", "-l", "snapshot.name=first", "-O", "raw", str(path), str(again))
    assert again.read_bytes() == first.read_bytes()
    with open_image(path) as image:
        assert image.check().clean


def test_qemu_backing_chain_with_relative_paths(workdir: Path) -> None:
    """qcow2 over qcow2 over raw, each naming the next by a relative path."""
    (workdir / "layers").mkdir()
    base = workdir / "layers" / "base.raw"
    qemu_create(base, "raw", 6 * MIB)
    qemu_io(base, "raw", "write -P 1 0 6M")
    middle = workdir / "layers" / "middle.qcow2"
    qemu_create(middle, "qcow2", 6 * MIB, "backing_file=base.raw,backing_fmt=raw")
    qemu_io(middle, "qcow2", "write -P 2 1M 1M", "write -z 4M 64K")
    top = workdir / "top.qcow2"
    qemu_create(top, "qcow2", 8 * MIB, "backing_file=layers/middle.qcow2,backing_fmt=qcow2,cluster_size=4096")
    qemu_io(top, "qcow2", "write -P 3 1536K 1000", "write -P 4 7M 4096")
    with open_image(top) as image:
        assert [layer.format_name for layer in image.chain()] == ["qcow2", "qcow2", "raw"]
        assert image.backing_reference == "layers/middle.qcow2"
        assert image.info().details["backing_format"] == "qcow2"
        depths = {ext.depth for ext in image.map()}
        assert depths == {0, 1, 2}
    data = read_all(top)
    assert data[:MIB] == b"\x01" * MIB
    assert data[4 * MIB : 4 * MIB + 65536] == bytes(65536)
    assert data[6 * MIB : 7 * MIB] == bytes(MIB)  # past the backing file's end
    assert_reads_like_qemu(top, workdir)


def test_backing_file_outside_the_directory_is_refused(workdir: Path) -> None:
    base = workdir / "base.qcow2"
    qemu_create(base, "qcow2", MIB)
    (workdir / "sub").mkdir()
    child = workdir / "sub" / "child.qcow2"
    qemu_create(child, "qcow2", MIB, "backing_file=../base.qcow2,backing_fmt=qcow2")
    with pytest.raises(UnsafeReference):
        open_image(child)
    absolute = workdir / "sub" / "absolute.qcow2"
    qemu_create(absolute, "qcow2", MIB, "backing_file=/etc/hostname,backing_fmt=raw")
    with pytest.raises(UnsafeReference):
        open_image(absolute)
    with open_image(child, follow_backing=False) as image:
        assert image.backing is None
        assert image.backing_reference == "../base.qcow2"


def test_backing_loop_and_missing_backing_are_refused(workdir: Path) -> None:
    a, b = workdir / "a.qcow2", workdir / "b.qcow2"
    qemu_create(b, "qcow2", MIB)
    qemu_create(a, "qcow2", MIB, "backing_file=b.qcow2,backing_fmt=qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    with pytest.raises(BackingChainError):
        open_image(a)
    self_loop = workdir / "self.qcow2"
    qemu_create(self_loop, "qcow2", MIB)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", str(self_loop))
    with pytest.raises(BackingChainError):
        open_image(self_loop)
    orphan = workdir / "orphan.qcow2"
    qemu_create(b, "qcow2", MIB)
    qemu_create(orphan, "qcow2", MIB, "backing_file=b.qcow2,backing_fmt=qcow2")
    b.unlink()
    with pytest.raises(MissingReference):
        open_image(orphan)


# ================================================ polyvisor writes, qemu reads


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_polyvisor_images_of_every_cluster_size(cluster_size: int, compat: str, workdir: Path) -> None:
    size = 8 * MIB + 3 * 512
    writes = scattered_writes(size, seed=cluster_size, count=12)
    path = workdir / "p.qcow2"
    options = CreateOptions(compat=COMPATS[compat], cluster_size=cluster_size)
    with create_image(path, "qcow2", size, options) as image:
        assert image.subformat == compat
        apply_writes(image, writes)
    report = qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", size, writes), "raw")
    info = qemu_info(path)
    assert info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == COMPATS[compat]
    with open_image(path) as image:
        result = image.check()
        assert result.clean, result.problems
        assert result.allocated_units == report["allocated-clusters"]
        assert result.image_end_offset == report["image-end-offset"]


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MIB])
def test_polyvisor_compressed_conversion(cluster_size: int, compression: str, workdir: Path) -> None:
    source = patterned_raw(workdir / "src.raw", 9 * MIB + 1536, seed=cluster_size)
    path = workdir / "c.qcow2"
    options = CreateOptions(cluster_size=cluster_size, compression_type=compression, compress=True)
    convert(source, path, "qcow2", options)
    report = qemu_check(path, "qcow2")
    assert report["compressed-clusters"] > 0
    assert qemu_info(path)["format-specific"]["data"]["compression-type"] == compression
    qemu_compare(path, "qcow2", source, "raw")
    by_qemu = workdir / "qemu.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cluster_size},compression_type={compression}", str(source), str(by_qemu))
    assert path.stat().st_blocks <= by_qemu.stat().st_blocks * 1.1 + 64
    with open_image(path) as image:
        result = image.check()
        assert result.clean, result.problems
        assert result.image_end_offset == report["image-end-offset"]
    assert read_all(path) == source.read_bytes()


def test_compressed_v2_image_and_zstd_needs_v3(workdir: Path) -> None:
    source = patterned_raw(workdir / "src.raw", 4 * MIB)
    path = workdir / "c2.qcow2"
    convert(source, path, "qcow2", CreateOptions(compat="0.10", compress=True))
    assert qemu_check(path, "qcow2")["compressed-clusters"] > 0
    qemu_compare(path, "qcow2", source, "raw")
    with pytest.raises(UsageError, match=r"compat=1\.1"):
        create_image(workdir / "bad.qcow2", "qcow2", MIB, CreateOptions(compat="0.10", compression_type="zstd"))
    assert not (workdir / "bad.qcow2").exists()


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
def test_compressed_partial_writes_are_buffered(backing: bool, workdir: Path) -> None:
    """Parts of clusters arrive in any order; an incomplete cluster is padded with the backing file (or zeros)."""
    cs, size = 65536, 2 * MIB
    options: dict[str, Any] = {"compress": True, "cluster_size": cs}
    base_path: Path | None = None
    if backing:
        base_path = workdir / "base.raw"
        qemu_create(base_path, "raw", size)
        qemu_io(base_path, "raw", "write -P 0x66 0 2M")
        options.update(backing_file="base.raw", backing_fmt="raw")
    rng = random.Random(3)
    writes: list[tuple[int, bytes]] = []
    for cluster in range(8):
        pieces = [(cluster * cs + i * 4096, bytes([cluster + 1]) * 4096) for i in range(16)]
        rng.shuffle(pieces)
        writes += pieces if cluster != 5 else pieces[:7]  # cluster 5 stays incomplete until close
    path = workdir / "c.qcow2"
    with create_image(path, "qcow2", size, CreateOptions(**options)) as image:
        apply_writes(image, writes)
        assert image.read(5 * cs, cs) == _overlay(base_path, 5 * cs, cs, writes)  # readable while buffered
        image.write(cs + 10, b"late")  # cluster 1 was already compressed: becomes a normal cluster
    writes.append((cs + 10, b"late"))
    report = qemu_check(path, "qcow2")
    assert report["compressed-clusters"] == 7
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", size, writes, base=base_path), "raw")


def _overlay(base: Path | None, offset: int, length: int, writes: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(base.read_bytes()[offset : offset + length] if base else bytes(length))
    for at, piece in writes:
        lo, hi = max(at, offset), min(at + len(piece), offset + length)
        if lo < hi:
            data[lo - offset : hi - offset] = piece[lo - at : hi - at]
    return bytes(data)


@pytest.mark.parametrize("compat", COMPATS)
def test_polyvisor_backing_file_with_copy_on_write(compat: str, workdir: Path) -> None:
    base = workdir / "base.qcow2"
    qemu_create(base, "qcow2", 4 * MIB)
    qemu_io(base, "qcow2", "write -P 0x55 0 4M")
    child = workdir / "child.qcow2"
    options = CreateOptions(compat=COMPATS[compat], backing_file="base.qcow2", backing_fmt="qcow2")
    writes = [(100, b"q" * 10), (65536 * 3 - 5, b"r" * 10), (2 * MIB, b"s" * 65536)]
    with create_image(child, "qcow2", None, options) as image:
        assert image.virtual_size == 4 * MIB
        apply_writes(image, writes)
    info = qemu_info(child)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    qemu_check(child, "qcow2")
    reference = reference_raw(workdir / "ref.raw", 4 * MIB, writes, base=qemu_to_raw(base, "qcow2",
                                                                                     workdir / "b.raw"))
    qemu_compare(child, "qcow2", reference, "raw")
    assert read_all(child) == reference.read_bytes()


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
def test_long_writes_over_a_mix_of_new_and_allocated_clusters(backing: bool, workdir: Path) -> None:
    """A write spanning runs of unallocated clusters (allocated together) around allocated and zero clusters."""
    size = 8 * MIB + 4096
    base_path = None
    if backing:
        qemu_create(workdir / "base.qcow2", "qcow2", size)
        qemu_io(workdir / "base.qcow2", "qcow2", "write -P 0x77 0 8M")
        base_path = qemu_to_raw(workdir / "base.qcow2", "qcow2", workdir / "b.raw")
    options = CreateOptions(cluster_size=4096, backing_file="base.qcow2" if backing else None,
                            backing_fmt="qcow2" if backing else None)
    writes = [(3 * 4096, b"a" * 4096), (9 * 4096 + 100, b"b" * 50), (40 * 4096, b"c" * 8192),
              (2 * 4096 + 7, bytes(range(256)) * 1024), (0, b"d" * (6 * MIB + 123)), (7 * MIB, b"e" * (MIB + 4096))]
    image = workdir / "mixed.qcow2"
    with create_image(image, "qcow2", size, options) as created:
        created.write_zeroes(50 * 4096, 8 * 4096)  # zero clusters inside the long write below
        apply_writes(created, writes)
    qemu_check(image, "qcow2")
    reference = reference_raw(workdir / "ref.raw", size, writes, base=base_path)
    qemu_compare(image, "qcow2", reference, "raw")


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
@pytest.mark.parametrize("compat", COMPATS)
def test_write_zeroes(compat: str, backing: bool, workdir: Path) -> None:
    size = 6 * MIB
    base_path: Path | None = None
    options: dict[str, Any] = {"compat": COMPATS[compat], "cluster_size": 65536}
    if backing:
        base_path = workdir / "base.raw"
        qemu_create(base_path, "raw", size)
        qemu_io(base_path, "raw", "write -P 0x31 0 6M")
        options.update(backing_file="base.raw", backing_fmt="raw")
    path = workdir / "z.qcow2"
    with create_image(path, "qcow2", size, CreateOptions(**options)) as image:
        image.write(0, b"\x99" * (3 * MIB))
        image.write_zeroes(65536, 2 * 65536)  # whole allocated clusters
        image.write_zeroes(MIB + 100, 1000)  # inside one cluster
        image.write_zeroes(2 * MIB + 30000, MIB)  # partial, whole, partial; over data then unallocated
        image.write_zeroes(4 * MIB, 2 * MIB)  # unallocated
    writes = [(0, b"\x99" * (3 * MIB)), (65536, bytes(2 * 65536)), (MIB + 100, bytes(1000)),
              (2 * MIB + 30000, bytes(MIB)), (4 * MIB, bytes(2 * MIB))]
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", size, writes, base=base_path), "raw")
    mapped = qemu_map(path)

    def entry_at(offset: int) -> dict[str, Any]:
        return next(e for e in mapped if e["start"] <= offset < e["start"] + e["length"])

    if compat == "v3":  # zero clusters, hiding the backing file
        assert (entry_at(65536)["zero"], entry_at(65536)["data"], entry_at(65536)["depth"]) == (True, False, 0)
        assert (entry_at(5 * MIB)["zero"], entry_at(5 * MIB)["depth"]) == (True, 0)
        assert entry_at(5 * MIB)["present"] == backing  # without a backing file nothing needs recording
    elif not backing:  # no zero clusters in v2: deallocated
        assert (entry_at(65536)["data"], entry_at(65536)["present"]) == (False, False)
        assert not entry_at(5 * MIB)["present"]
    else:  # v2 over a backing file: the zeros are data
        assert (entry_at(65536)["data"], entry_at(5 * MIB)["data"]) == (True, True)
    with open_image(path) as image:
        assert image.check().clean


def test_writable_reopen_of_qemu_image(workdir: Path) -> None:
    path = workdir / "q.qcow2"
    size = 16 * MIB
    qemu_create(path, "qcow2", size, "cluster_size=4096,lazy_refcounts=on")
    qemu_io(path, "qcow2", *qemu_io_commands(size, seed=2))
    before = qemu_to_raw(path, "qcow2", workdir / "before.raw")
    writes = scattered_writes(size, seed=9, count=20)
    with open_image(path, writable=True) as image:
        assert image.info().details["lazy_refcounts"] is True
        apply_writes(image, writes)
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", size, writes, base=before), "raw")


def test_refcount_table_grows(workdir: Path) -> None:
    """512-byte clusters: the one-cluster refcount table covers 8 MiB of file; 24 MiB of data moves it."""
    path = workdir / "grow.qcow2"
    size = 40 * MIB
    writes = [(offset, bytes([offset // MIB + 1]) * MIB) for offset in range(0, 24 * MIB, MIB)]
    with create_image(path, "qcow2", size, CreateOptions(cluster_size=512)) as image:
        apply_writes(image, writes)
    header = header_of(path)
    assert header.refcount_table_clusters > 1
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", size, writes), "raw")
    more = [(30 * MIB, b"m" * (4 * MIB))]
    with open_image(path, writable=True) as image:
        apply_writes(image, more)
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref2.raw", size, writes + more), "raw")


def test_size_limits_follow_the_l1_limit(workdir: Path) -> None:
    """qemu's 32 MiB L1 limit: 512-byte clusters stop at 128 GiB; 2 MiB clusters go to 2 EiB."""
    with pytest.raises(UsageError, match="L1"):
        create_image(workdir / "big.qcow2", "qcow2", 2 << 40, CreateOptions(cluster_size=512))
    assert not (workdir / "big.qcow2").exists()
    with create_image(workdir / "ok.qcow2", "qcow2", 128 << 30, CreateOptions(cluster_size=512)) as image:
        image.write((128 << 30) - 512, b"e" * 512)
    qemu_check(workdir / "ok.qcow2", "qcow2")
    qemu_io(workdir / "ok.qcow2", "qcow2", f"read -P 0x65 {(128 << 30) - 512} 512", writable=False)
    with create_image(workdir / "huge.qcow2", "qcow2", 1 << 60, CreateOptions(cluster_size=2 * MIB)) as image:
        image.write((1 << 60) - 4096, b"h" * 4096)
    qemu_check(workdir / "huge.qcow2", "qcow2")
    with pytest.raises(UsageError):
        create_image(workdir / "x.qcow2", "qcow2", 1 << 62, CreateOptions(cluster_size=2 * MIB))


def test_small_caches_write_back_in_order(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """With four cached L2 tables and refcount blocks, evictions happen on nearly every write."""
    monkeypatch.setattr(qcow2_module, "L2_CACHE_BYTES", 0)
    monkeypatch.setattr(qcow2_module, "REFBLOCK_CACHE_BYTES", 0)
    size = 24 * MIB
    writes = scattered_writes(size, seed=13, count=60)
    path = workdir / "evict.qcow2"
    with create_image(path, "qcow2", size, CreateOptions(cluster_size=512)) as image:
        assert isinstance(image, Qcow2Image)
        assert image._l2_cache_tables == 4
        apply_writes(image, writes)
        image.write_zeroes(MIB, 3 * MIB)
    writes.append((MIB, bytes(3 * MIB)))
    qemu_check(path, "qcow2")
    reference = reference_raw(workdir / "ref.raw", size, writes)
    qemu_compare(path, "qcow2", reference, "raw")
    more = scattered_writes(size, seed=14, count=30)
    with open_image(path, writable=True) as image:
        apply_writes(image, more)
        assert image.read(0, size) == _overlay(reference, 0, size, more)
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref2.raw", size, writes + more), "raw")


def test_check_in_several_windows_matches_one(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    path = small_qemu_image(workdir)
    _damage_shared_cluster(path)
    _damage_leak(path)
    with open_image(path) as image:
        whole = image.check()
    monkeypatch.setattr(qcow2_module, "CHECK_WINDOW_CLUSTERS", 3)
    with open_image(path) as image:
        windowed = image.check()
    assert (windowed.corruptions, windowed.leaks, windowed.image_end_offset, windowed.allocated_units) == (
        whole.corruptions, whole.leaks, whole.image_end_offset, whole.allocated_units)
    assert (whole.corruptions, whole.leaks) == (1, 2)
    monkeypatch.setattr(qcow2_module, "CHECK_MAX_ENTRIES", 10)
    with open_image(path) as image:
        stopped = image.check()
    assert any("check stopped" in p.message for p in stopped.problems)


def test_compression_uses_both_workers_and_keeps_order(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    threads: set[str] = set()
    busy = [0, 0]  # now, most at once
    lock = threading.Lock()
    real = compress_clusters

    def observed(blocks: list[bytes], compression_type: int) -> list[bytes | None]:
        with lock:
            threads.add(threading.current_thread().name)
            busy[0] += 1
            busy[1] = max(busy[1], busy[0])
        time.sleep(0.01)
        try:
            return real(blocks, compression_type)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(qcow2_module, "compress_clusters", observed)
    source = patterned_raw(workdir / "src.raw", 16 * MIB)
    path = workdir / "c.qcow2"
    convert(source, path, "qcow2", CreateOptions(compress=True))
    assert len(threads) == qcow2_module.COMPRESS_WORKERS == 2
    assert busy[1] == 2
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", source, "raw")


def test_map_yields_large_runs(workdir: Path) -> None:
    path = workdir / "seq.qcow2"
    with create_image(path, "qcow2", 64 * MIB) as image:
        for offset in range(0, 32 * MIB, 4 * MIB):
            image.write(offset, b"\x01" * (4 * MIB))
    with open_image(path) as image:
        runs = list(image._map(0, 64 * MIB))
    assert [(r.kind, r.length) for r in runs] == [(ExtentKind.DATA, 32 * MIB), (ExtentKind.UNALLOCATED, 32 * MIB)]


def test_info_details_match_qemu(workdir: Path) -> None:
    base = workdir / "base.raw"
    qemu_create(base, "raw", MIB)
    path = workdir / "i.qcow2"
    qemu_create(path, "qcow2", 4 * MIB, "cluster_size=16384,refcount_bits=8,lazy_refcounts=on,"
                "compression_type=zstd,backing_file=base.raw,backing_fmt=raw")
    qemu_img("snapshot", "-c", "s", str(path))
    qemu_data = qemu_info(path)["format-specific"]["data"]
    with open_image(path) as image:
        details = image.info().details
        assert image.info().backing[0]["reference"] == "base.raw"
    assert details == {
        "cluster_size": 16384,
        "compat": qemu_data["compat"],
        "compression_type": qemu_data["compression-type"],
        "refcount_bits": qemu_data["refcount-bits"],
        "lazy_refcounts": qemu_data["lazy-refcounts"],
        "dirty": False,
        "corrupt": qemu_data["corrupt"],
        "extended_l2": qemu_data["extended-l2"],
        "snapshots": 1,
        "bitmaps": 0,
        "backing_format": "raw",
    }
    assert Qcow2Image.subformats == ()
    assert Qcow2Image.create_options == {"compat", "cluster_size", "compression_type"}


def test_bitmaps_are_counted_by_check_and_block_writing(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    qemu_img("bitmap", "--add", str(path), "dirty")
    qemu_io(path, "qcow2", "write -P 3 1M 64K")
    with open_image(path) as image:
        assert image.info().details["bitmaps"] == 1
        assert image.check().clean
    with pytest.raises(UnsupportedFeature, match="bitmap"):
        open_image(path, writable=True)


def test_probe(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    assert probe_format(path) == "qcow2"
    garbage = workdir / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    assert probe_format(garbage) == "raw"
    bad_version = workdir / "v9.qcow2"
    shutil.copy(path, bad_version)
    put(bad_version, 4, ">I", 9)
    assert probe_format(bad_version) == "qcow2"
    with pytest.raises(UnsupportedFeature, match="version 9"):
        open_image(bad_version)


# ================================================================= hostile


def _set_field(offset: int, fmt: str, value: int, *more: tuple[int, str, int]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        for at, field_format, field_value in ((offset, fmt, value), *more):
            put(path, at, field_format, field_value)

    return damage


HOSTILE: dict[str, tuple[Callable[[Path], None], type[PolyvisorError], str]] = {
    "bad-magic": (_set_field(0, ">I", 0x514649FA), CorruptImage, "magic"),
    "version-1": (_set_field(4, ">I", 1), UnsupportedFeature, "version"),
    "cluster-bits-8": (_set_field(20, ">I", 8), CorruptImage, "cluster_bits"),
    "cluster-bits-22": (_set_field(20, ">I", 22), CorruptImage, "cluster_bits"),
    "cluster-bits-huge": (_set_field(20, ">I", 0xFFFFFFFF), CorruptImage, "cluster_bits"),
    "l1-size-absurd": (_set_field(36, ">I", 0xFFFFFFFF), LimitExceeded, "L1"),
    "l1-past-eof": (_set_field(40, ">Q", 1 << 40), TruncatedImage, "L1"),
    "l1-unaligned": (_set_field(40, ">Q", 0x30008), CorruptImage, "aligned"),
    "l1-in-header": (_set_field(40, ">Q", 0), CorruptImage, "header"),
    "size-2-63": (_set_field(24, ">Q", 1 << 63), CorruptImage, "L1"),
    "reftable-at-0": (_set_field(48, ">Q", 0), CorruptImage, "header"),
    "reftable-on-l1": (_set_field(48, ">Q", 0x30000), CorruptImage, "overlaps the L1"),
    "reftable-huge": (_set_field(56, ">I", 0x10000000), LimitExceeded, "refcount table"),
    "reftable-none": (_set_field(56, ">I", 0), CorruptImage, "refcount table"),
    "snapshots-too-many": (_set_field(60, ">I", 1 << 20), LimitExceeded, "snapshots"),
    "header-length-huge": (_set_field(100, ">I", 1 << 20), CorruptImage, "header_length"),
    "refcount-order-7": (_set_field(96, ">I", 7), CorruptImage, "refcount_order"),
    "backing-name-long": (_set_field(8, ">Q", 0x200, (16, ">I", 5000)), CorruptImage, "backing"),
    "backing-offset-far": (_set_field(8, ">Q", 1 << 30, (16, ">I", 10)), CorruptImage, "backing"),
    "extension-too-long": (_set_field(0x74, ">I", 0x10000), CorruptImage, "header extension"),
    "extension-past-cluster": (_set_field(0x74, ">I", 0xFFFFFFF0), CorruptImage, "header extension"),
    "unknown-incompatible": (_set_field(72, ">Q", 1 << 20), UnsupportedFeature, "incompatible"),
    "external-data-file": (_set_field(72, ">Q", 1 << 2), UnsupportedFeature, "external data file"),
    "aes-encryption": (_set_field(32, ">I", 1), UnsupportedFeature, "encrypted"),
    "compression-type-unknown": (_set_field(72, ">Q", 1 << 3, (104, ">B", 7)), UnsupportedFeature,
                                 "compression type"),
    "compression-type-without-bit": (_set_field(104, ">B", 1), CorruptImage, "compression type"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_fail_clearly(case: str, workdir: Path) -> None:
    path = small_qemu_image(workdir)
    damage, error, words = HOSTILE[case]
    damage(path)
    started = time.monotonic()
    with pytest.raises(error, match=words) as caught:
        read_all(path)
    assert time.monotonic() - started < 2
    assert str(path.name) in str(caught.value)


def _hostile_read(path: Path) -> PolyvisorError:
    started = time.monotonic()
    with pytest.raises(PolyvisorError) as caught:
        read_all(path)
    assert time.monotonic() - started < 2
    return caught.value


def test_l2_table_in_the_header_or_tables(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    header = header_of(path)
    put(path, header.l1_table_offset, ">Q", COPIED | header.refcount_table_offset)
    assert isinstance(_hostile_read(path), CorruptImage)
    cs_path = small_qemu_image(workdir, "cs.qcow2", "cluster_size=4096")
    put(cs_path, header_of(cs_path).l1_table_offset, ">Q", COPIED)  # a flag but no table: unallocated
    assert read_all(cs_path)[:4096] == bytes(4096)
    put(cs_path, header_of(cs_path).l1_table_offset, ">Q", COPIED | 0x3200)
    assert "unaligned" in str(_hostile_read(cs_path))


def test_data_cluster_pointing_into_metadata(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    header = header_of(path)
    entry = l2_entry_offset(path, 0)
    put(path, entry, ">Q", COPIED | header.l1_table_offset)
    assert "L1 table" in str(_hostile_read(path))
    put(path, entry, ">Q", COPIED | header.refcount_table_offset)
    assert "refcount table" in str(_hostile_read(path))
    put(path, entry, ">Q", COPIED | 0x10200)
    assert "unaligned" in str(_hostile_read(path))
    put(path, entry, ">Q", COPIED | (1 << 45))
    assert isinstance(_hostile_read(path), TruncatedImage)
    put(path, entry, ">Q", COPIED)
    assert "COPIED" in str(_hostile_read(path))
    small = small_qemu_image(workdir, "v2.qcow2", "compat=0.10")
    put(small, l2_entry_offset(small, 0), ">Q", 1)
    assert "version 2" in str(_hostile_read(small))


def _compressed_image(workdir: Path, compression: str) -> tuple[Path, int]:
    source = workdir / "src.raw"
    source.write_bytes(b"compress me " * (MIB // 12) + bytes(MIB % 12))
    path = workdir / f"{compression}.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={compression}",
             str(source), str(path))
    return path, l2_entry_offset(path, 0)


def _compressed_entry(offset: int, length: int, cluster_bits: int = 16) -> int:
    shift = 62 - (cluster_bits - 8)
    sectors = ((offset + length - 1) >> 9) - (offset >> 9)
    return (1 << 62) | (sectors << shift) | offset


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_hostile_compressed_clusters(compression: str, workdir: Path) -> None:
    path, entry_at = _compressed_image(workdir, compression)
    pristine = workdir / "pristine.qcow2"
    shutil.copy(path, pristine)
    # Descriptor past the end of the file.
    put(path, entry_at, ">Q", _compressed_entry(1 << 40, 1000))
    assert isinstance(_hostile_read(path), TruncatedImage)
    # Descriptor into the header.
    put(path, entry_at, ">Q", _compressed_entry(100, 1000))
    assert "header" in str(_hostile_read(path))
    # Data inflating beyond the cluster (a bomb of 64 cluster sizes), appended at the end of the file.
    bomb = (zlib.compress(bytes(64 << 16), 9, -12) if compression == "zlib"
            else zstandard.ZstdCompressor().compress(bytes(64 << 16)))
    end = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bomb + bytes(1024))
    put(path, entry_at, ">Q", _compressed_entry(end, len(bomb)))
    assert "cluster" in str(_hostile_read(path))
    # Garbage instead of compressed data.
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(os.urandom(len(bomb)))
    assert isinstance(_hostile_read(path), CorruptImage)
    # Too little data: decodes to less than a cluster.
    short = (zlib.compress(b"x" * 1000, 9, -12) if compression == "zlib"
             else zstandard.ZstdCompressor().compress(b"x" * 1000))
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(short)
    put(path, entry_at, ">Q", _compressed_entry(end, len(short)))
    assert "cluster" in str(_hostile_read(path))
    assert read_all(pristine) == (workdir / "src.raw").read_bytes()


def test_zstd_frame_declaring_a_huge_size_is_refused_without_allocating(workdir: Path) -> None:
    path, entry_at = _compressed_image(workdir, "zstd")
    bomb = zstandard.ZstdCompressor().compress(bytes(512 * MIB))
    end = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bomb)
    put(path, entry_at, ">Q", _compressed_entry(end, len(bomb)))
    assert "536870912" in str(_hostile_read(path))


def test_corrupt_and_dirty_bits(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    expected = read_all(path)
    put(path, 72, ">Q", 1 << 1)  # corrupt
    assert read_all(path) == expected
    with pytest.raises(ReadOnlyImage, match="corrupt"):
        open_image(path, writable=True)
    put(path, 72, ">Q", 1 << 0)  # dirty
    assert read_all(path) == expected
    with open_image(path) as image:
        assert image.info().details["dirty"] is True
    with pytest.raises(UnsupportedFeature, match="dirty"):
        open_image(path, writable=True)


def test_real_encryption_and_data_file_are_refused(workdir: Path) -> None:
    encrypted = workdir / "luks.qcow2"
    for _attempt in range(3):  # qemu's PBKDF benchmark fails now and then on a loaded machine
        created = qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=polyvisor", "-o",
                           "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", str(encrypted),
                           "1M", ok=(0, 1))
        if created.returncode == 0:
            break
        encrypted.unlink(missing_ok=True)
    assert encrypted.exists(), created.stderr
    with pytest.raises(UnsupportedFeature, match="LUKS"):
        open_image(encrypted)
    external = workdir / "external.qcow2"
    qemu_create(external, "qcow2", MIB, "data_file=external.raw")
    with pytest.raises(UnsupportedFeature, match="external data file"):
        open_image(external)


def test_feature_name_table_names_unknown_features(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    data = path.read_bytes()
    table = data.index(b"extended L2 entries")
    put(path, table - 2, ">BB", 0, 9)  # rename bit 4's entry to describe bit 9
    put(path, 72, ">Q", 1 << 9)
    with pytest.raises(UnsupportedFeature, match="extended L2 entries"):
        open_image(path)


def test_reftable_loops_refuse_writing_and_are_reported(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    header = header_of(path)
    put(path, header.refcount_table_offset + 8, ">Q", header.refcount_table_offset)
    with pytest.raises(CorruptImage, match="refcount table"):
        open_image(path, writable=True)
    with open_image(path) as image:
        result = image.check()
    report = qemu_check_report(path)
    assert result.exit_code == report["exit"] == 2
    assert result.corruptions == report["corruptions"]
    duplicate = small_qemu_image(workdir, "dup.qcow2")
    header = header_of(duplicate)
    put(duplicate, header.refcount_table_offset + 8, ">Q", get64(duplicate, header.refcount_table_offset))
    with pytest.raises(CorruptImage, match="also refcount block 0"):
        open_image(duplicate, writable=True)


@pytest.mark.parametrize("keep", [512, 4096, 100000, 200000, 300000])
def test_truncated_qemu_image(keep: int, workdir: Path) -> None:
    path = small_qemu_image(workdir)
    with open(path, "r+b") as f:
        f.truncate(keep)
    outcome: PolyvisorError | None = None
    try:
        read_all(path)
        with open_image(path) as image:
            image.check()
    except PolyvisorError as exc:
        outcome = exc
    assert outcome is None or str(outcome)


# ========================================================= check vs qemu-img


def _damage_leak(path: Path) -> None:
    cs = 65536
    end = -(-path.stat().st_size // cs)
    with open(path, "r+b") as f:
        f.truncate((end + 1) * cs)
    put(path, refcount_offset(path, end), ">H", 1)


def _damage_refcount_too_low(path: Path) -> None:
    host = get64(path, l2_entry_offset(path, 0)) & OFFSET_MASK
    put(path, refcount_offset(path, host >> 16), ">H", 0)


def _damage_refcount_too_high(path: Path) -> None:
    host = get64(path, l2_entry_offset(path, 0)) & OFFSET_MASK
    put(path, refcount_offset(path, host >> 16), ">H", 2)


def _damage_copied_flag(path: Path) -> None:
    at = l2_entry_offset(path, 65536)
    put(path, at, ">Q", get64(path, at) & ~COPIED)


def _damage_shared_cluster(path: Path) -> None:
    put(path, l2_entry_offset(path, 65536), ">Q", get64(path, l2_entry_offset(path, 0)))


def _damage_data_on_l1(path: Path) -> None:
    put(path, l2_entry_offset(path, 65536), ">Q", COPIED | header_of(path).l1_table_offset)


def _damage_data_past_eof(path: Path) -> None:
    put(path, l2_entry_offset(path, 65536), ">Q", COPIED | (1 << 40))


def _damage_unaligned(path: Path) -> None:
    at = l2_entry_offset(path, 65536)
    put(path, at, ">Q", get64(path, at) + 512)


DAMAGE = {
    "leak": _damage_leak,
    "refcount-too-low": _damage_refcount_too_low,
    "refcount-too-high": _damage_refcount_too_high,
    "copied-flag": _damage_copied_flag,
    "shared-cluster": _damage_shared_cluster,
    "data-on-l1-table": _damage_data_on_l1,
    "data-past-eof": _damage_data_past_eof,
    "unaligned-data": _damage_unaligned,
}


@pytest.mark.parametrize("case", DAMAGE)
def test_check_agrees_with_qemu_img(case: str, workdir: Path) -> None:
    path = small_qemu_image(workdir)
    DAMAGE[case](path)
    report = qemu_check_report(path)
    with open_image(path) as image:
        result = image.check()
    assert result.exit_code == report["exit"], (result.problems, report)
    assert result.exit_code in (2, 3)
    assert result.leaks == report.get("leaks", 0), (result.problems, report)
    if case != "data-past-eof":  # qemu counts the reference past the end; polyvisor reports the offset itself
        assert result.corruptions == report.get("corruptions", 0), (result.problems, report)
        assert result.image_end_offset == report["image-end-offset"]
    assert all(p.message for p in result.problems)


def test_check_counts_snapshot_references(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io(path, "qcow2", "write -P 9 0 64K")
    with open_image(path) as image:
        assert image.check().clean
    # The snapshot shares cluster 0's old data: dropping its refcount to 1 is caught.
    header = header_of(path)
    snapshot_l1 = get64(path, header.snapshots_offset)
    l2 = get64(path, snapshot_l1) & OFFSET_MASK
    host = get64(path, l2 + 8) & OFFSET_MASK  # guest cluster 1, still shared by both tables
    put(path, refcount_offset(path, host >> 16), ">H", 1)
    report = qemu_check_report(path)
    with open_image(path) as image:
        result = image.check()
    assert result.exit_code == report["exit"] == 2
    assert result.corruptions == report["corruptions"]


def test_check_survives_an_l1_full_of_one_table(workdir: Path) -> None:
    path = workdir / "wide.qcow2"
    qemu_create(path, "qcow2", 1 << 40)  # 2048 L1 entries
    qemu_io(path, "qcow2", "write -P 1 0 64K")
    header = header_of(path)
    l1_entry = get64(path, header.l1_table_offset)
    with open(path, "r+b") as f:
        f.seek(header.l1_table_offset)
        f.write(struct.pack(">Q", l1_entry) * header.l1_size)
    started = time.monotonic()
    with open_image(path) as image:
        result = image.check()
        assert image.read(1 << 39, 65536) == b"\x01" * 65536  # every L1 entry now maps the same data
    assert time.monotonic() - started < 5
    report = qemu_check_report(path)
    assert result.exit_code == report["exit"] == 2
    assert any("reference=2048" in p.message for p in result.problems)


def test_check_reports_broken_snapshot_tables(workdir: Path) -> None:
    path = small_qemu_image(workdir)
    qemu_img("snapshot", "-c", "s1", str(path))
    header = header_of(path)
    pristine = workdir / "pristine.qcow2"
    shutil.copy(path, pristine)
    put(path, header.snapshots_offset, ">Q", 1 << 50)  # the snapshot's L1 table, far past the end
    with open_image(path) as image:
        assert read_all(path) == read_all(pristine)
        result = image.check()
    assert result.corruptions
    assert any("snapshot" in p.message for p in result.problems)
    shutil.copy(pristine, path)
    put(path, 60, ">I", 5000)  # more snapshots than the table holds
    with open_image(path) as image:
        result = image.check()
    assert result.corruptions
    assert any(p.structure == "qcow2 snapshot table" for p in result.problems)


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize("preallocation", ["metadata", "falloc", "full"])
def test_qemu_preallocated_images(preallocation: str, compat: str, workdir: Path) -> None:
    path = workdir / "pre.qcow2"
    qemu_create(path, "qcow2", 8 * MIB, f"preallocation={preallocation},compat={COMPATS[compat]},cluster_size=4096")
    qemu_io(path, "qcow2", "write -P 3 100K 300K")
    assert_reads_like_qemu(path, workdir)
    before = qemu_to_raw(path, "qcow2", workdir / "before.raw")
    writes = scattered_writes(8 * MIB, seed=8, count=10)
    with open_image(path, writable=True) as image:
        apply_writes(image, writes)
        image.write_zeroes(MIB, 2 * MIB)
    writes.append((MIB, bytes(2 * MIB)))
    qemu_check(path, "qcow2")
    qemu_compare(path, "qcow2", reference_raw(workdir / "ref.raw", 8 * MIB, writes, base=before), "raw")


def test_preallocated_clusters_never_written_map_as_zeros(workdir: Path) -> None:
    """preallocation=metadata points every L2 entry at a cluster the file leaves as a hole: the map reports
    those as zeros (as qemu-img map does), so a conversion reads only the written megabyte."""
    size = 64 * MIB
    path = workdir / "metadata.qcow2"
    qemu_create(path, "qcow2", size, "preallocation=metadata")
    qemu_io(path, "qcow2", "write -P 0x5a 5M 1M")
    with open_image(path) as image:
        extents = list(image.extents())
        assert ExtentKind.UNALLOCATED not in {e.kind for e in extents}
        assert [(e.offset, e.length) for e in extents if e.kind is ExtentKind.DATA] == [(5 * MIB, MIB)]
        assert image.read(5 * MIB - 4096, MIB + 8192) == bytes(4096) + b"\x5a" * MIB + bytes(4096)
    qemu_data = [(e["start"], e["length"]) for e in qemu_map(path) if e["data"] and not e["zero"]]
    assert qemu_data == [(5 * MIB, MIB)]
    out = workdir / "out.raw"
    convert(path, out, "raw")
    qemu_compare(path, "qcow2", out, "raw")
    assert out.stat().st_blocks * 512 <= 2 * MIB


def test_image_left_dirty_by_a_crash(workdir: Path) -> None:
    """lazy_refcounts and qemu-io aborting: the data is there, the refcounts are not, and check says so."""
    path = workdir / "lazy.qcow2"
    qemu_create(path, "qcow2", 8 * MIB, "lazy_refcounts=on")
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 1M", "-c", "write -P 6 3M 64K", "-c",
                           "abort", str(path)], capture_output=True, check=False)
    assert proc.returncode != 0
    assert header_of(path).incompatible_features & 1
    with open_image(path) as image:
        assert image.info().details["dirty"] is True
        assert image.read(0, MIB) == b"\x05" * MIB
        assert image.read(3 * MIB, 65536) == b"\x06" * 65536
        result = image.check()
    report = qemu_check_report(path)
    assert result.exit_code == report["exit"] == 2
    assert result.corruptions == report["corruptions"]
    with pytest.raises(UnsupportedFeature, match="dirty"):
        open_image(path, writable=True)
