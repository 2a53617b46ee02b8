"""The contract every registered disk format passes, checked against qemu-img and qemu-io.

Each case runs over every registered (format, subformat) in ``peers.VARIANTS``:
polyvisor writes and qemu reads; qemu writes and polyvisor reads; sizes that
are not a multiple of any cluster, grain or block; sparse sizes above 4 GiB
and 2 TiB where the format allows them; hostile truncations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from polyvisor.disk import (
    CreateOptions,
    ExtentKind,
    create_image,
    get_format,
    open_image,
    probe_format,
    registered_formats,
)
from polyvisor.disk.fileio import ImageFile
from polyvisor.errors import PolyvisorError, ReadOnlyImage, UnsupportedFeature, UnsupportedOption
from tests.patterns import apply_writes, qemu_io_commands, reference_raw, scattered_writes
from tests.peers import (
    QEMU_CHECKS,
    QEMU_FORMAT,
    VARIANTS,
    Variant,
    qemu_check,
    qemu_compare,
    qemu_create,
    qemu_img,
    qemu_info,
    qemu_io,
    qemu_to_raw,
)

REGISTERED = [v for v in VARIANTS if v.format in registered_formats()]
IDS = [v.id for v in REGISTERED]

#: Not a multiple of any cluster, grain or block size (but of the 512-byte sector).
ODD_SIZE = (3 << 20) + 3 * 512
GIB = 1 << 30
TIB = 1 << 40


def read_all(path: Path, fmt: str | None = None, chunk: int = 4 << 20) -> bytes:
    """Every guest byte of an image, read by polyvisor."""
    with open_image(path, fmt) as image:
        out = bytearray()
        for pos in range(0, image.virtual_size, chunk):
            out += image.read(pos, min(chunk, image.virtual_size - pos))
        return bytes(out)


def test_every_registered_subformat_has_a_variant() -> None:
    covered = {(v.format, v.name) for v in VARIANTS}
    for name, cls in registered_formats().items():
        for sub in cls.subformats or (name,):
            assert (name, sub) in covered or name == "qcow2", f"{name}/{sub} missing from tests.peers.VARIANTS"


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
@pytest.mark.parametrize("size", [ODD_SIZE, 5 * GIB + 512], ids=["odd", "5G"])
def test_polyvisor_writes_qemu_reads(variant: Variant, size: int, workdir: Path) -> None:
    writes = scattered_writes(size)
    image_path = workdir / f"disk.{variant.format}"
    with create_image(image_path, variant.format, size, options=variant.create_options()) as image:
        apply_writes(image, writes)
        assert image.virtual_size >= size
    assert image_path.exists()
    reference = reference_raw(workdir / "ref.raw", size, writes)

    if variant.format in QEMU_CHECKS:
        qemu_check(image_path, variant.format)
    qemu_compare(image_path, variant.format, reference, "raw")
    if variant.name != "fixed" or variant.format != "vhd":  # qemu probes a fixed VHD as raw
        assert qemu_info(image_path)["format"] == QEMU_FORMAT[variant.format]

    assert probe_format(image_path) == variant.format
    with open_image(image_path) as reopened:
        assert reopened.format_name == variant.format
        assert reopened.subformat == variant.name
        result = reopened.check()
        assert result.clean, result.problems
        with open(reference, "rb") as ref:
            for offset, data in writes:
                ref.seek(offset)
                assert reopened.read(offset, len(data)) == ref.read(len(data)), f"at {offset}"
    if size < GIB:
        assert read_all(image_path)[:size] == reference.read_bytes()


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_qemu_writes_polyvisor_reads(variant: Variant, workdir: Path) -> None:
    """Images qemu-img makes: written in place by qemu-io, and converted by qemu-img from a raw."""
    size = 8 << 20
    source = workdir / "source.raw"
    qemu_create(source, "raw", size)
    qemu_io(source, "raw", *qemu_io_commands(size))
    converted = workdir / f"converted.{variant.format}"
    qemu_img("convert", "-f", "raw", "-O", QEMU_FORMAT[variant.format],
             *(["-o", variant.qemu_options] if variant.qemu_options else []), str(source), str(converted))
    candidates = [converted]
    if variant.name != "streamOptimized":  # a stream is written front to back only
        in_place = workdir / f"in-place.{variant.format}"
        qemu_create(in_place, variant.format, size, variant.qemu_options)
        qemu_io(in_place, variant.format, *qemu_io_commands(size, seed=11))
        candidates.append(in_place)
    for image_path in candidates:
        oracle = qemu_to_raw(image_path, variant.format, workdir / "oracle.raw").read_bytes()
        with open_image(image_path) as image:
            assert image.format_name == variant.format
            assert image.subformat == variant.name
            assert image.virtual_size == len(oracle)
            result = image.check()
            assert result.clean, result.problems
        assert read_all(image_path) == oracle, f"{image_path.name} reads differently from qemu-img"


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_huge_sparse_size(variant: Variant, workdir: Path) -> None:
    """2 TiB + 1 MiB where the format allows it; a clear refusal where it does not."""
    size = 2 * TIB + (1 << 20)
    cls = get_format(variant.format)
    image_path = workdir / f"huge.{variant.format}"
    if size > cls.max_virtual_size:
        with pytest.raises(PolyvisorError):
            create_image(image_path, variant.format, size, options=variant.create_options()).abort()
        assert not image_path.exists()
        return
    writes = [(0, b"\x11" * 4096), (2 * TIB - 700, b"\x22" * 1400), (size - 512, b"\x33" * 512)]
    with create_image(image_path, variant.format, size, options=variant.create_options()) as image:
        apply_writes(image, writes)
    if variant.format in QEMU_CHECKS:
        qemu_check(image_path, variant.format)
    qemu_io(
        image_path,
        variant.format,
        *(f"read -P {data[0]} {offset} {len(data)}" for offset, data in writes),
        writable=False,
    )
    with open_image(image_path) as image:
        assert image.virtual_size >= size
        for offset, data in writes:
            assert image.read(offset, len(data)) == data
        assert image.read(TIB, 1 << 20) == bytes(1 << 20)


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_reopen_writable(variant: Variant, workdir: Path) -> None:
    size = ODD_SIZE
    first, second = scattered_writes(size, seed=3), scattered_writes(size, seed=4, count=8)
    image_path = workdir / f"disk.{variant.format}"
    with create_image(image_path, variant.format, size, options=variant.create_options()) as image:
        apply_writes(image, first)
    if not get_format(variant.format).writable_reopen or variant.name == "streamOptimized":
        with pytest.raises((ReadOnlyImage, UnsupportedFeature)):
            open_image(image_path, writable=True).close()
        return
    with open_image(image_path, writable=True) as image:
        apply_writes(image, second)
    reference = reference_raw(workdir / "ref.raw", size, first + second)
    if variant.format in QEMU_CHECKS:
        qemu_check(image_path, variant.format)
    qemu_compare(image_path, variant.format, reference, "raw")


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_source_opened_read_only(variant: Variant, workdir: Path) -> None:
    image_path = workdir / f"disk.{variant.format}"
    with create_image(image_path, variant.format, ODD_SIZE, options=variant.create_options()) as image:
        image.write(0, b"x" * 512)
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    with open_image(image_path) as image, pytest.raises(ReadOnlyImage):
        image.write(0, b"y")
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_abort_leaves_nothing(variant: Variant, workdir: Path) -> None:
    image_path = workdir / f"gone.{variant.format}"

    def interrupted_write() -> None:
        with create_image(image_path, variant.format, ODD_SIZE, options=variant.create_options()) as image:
            image.write(4096, b"z" * 4096)
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        interrupted_write()
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_unknown_option_refused(variant: Variant, workdir: Path) -> None:
    with pytest.raises(UnsupportedOption):
        CreateOptions.from_mapping({"frobnicate": "1"})
    options = CreateOptions.from_mapping(
        {**variant.options, "adapter_type": "ide", "cluster_size": "64K", "block_size": "1M",
         "compat": "1.1", "logical_sector_size": "512", "compression_type": "zlib"}
    )
    with pytest.raises(UnsupportedOption):
        create_image(workdir / "x", variant.format, ODD_SIZE, options).abort()
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("variant", [v for v in REGISTERED if v.format != "raw"], ids=lambda v: v.id)
@pytest.mark.parametrize("keep", [0, 100, 512, 1536, 4096, 65536, 0.5, 0.9])
def test_truncated_image_is_a_clear_error(variant: Variant, keep: float, workdir: Path) -> None:
    """Truncated anywhere, an image is either still readable or a PolyvisorError — never anything else."""
    image_path = workdir / f"disk.{variant.format}"
    with create_image(image_path, variant.format, ODD_SIZE, options=variant.create_options()) as image:
        apply_writes(image, scattered_writes(ODD_SIZE, count=6))
    files = sorted(p for p in workdir.iterdir() if p.is_file())
    for victim in files:
        length = victim.stat().st_size
        cut = int(length * keep) if isinstance(keep, float) else min(int(keep), length)
        with open(victim, "r+b") as f:
            f.truncate(cut)
    outcome = attempt_read_and_check(image_path, variant.format)
    assert outcome is None or str(outcome), "errors must carry a message"


def attempt_read_and_check(image_path: Path, fmt: str) -> PolyvisorError | None:
    """Read every byte and run check; a PolyvisorError is returned, anything else propagates."""
    try:
        read_all(image_path, fmt)
        with open_image(image_path, fmt) as image:
            image.check()
    except PolyvisorError as exc:
        return exc
    return None


#: Variants whose guest bytes are stored verbatim in a file created sparse: unwritten ranges are its holes.
VERBATIM = {("raw", "raw"), ("vhd", "fixed"), ("vhdx", "fixed"), ("vmdk", "monolithicFlat"),
            ("vmdk", "twoGbMaxExtentFlat"), ("vdi", "fixed")}


@pytest.mark.parametrize("variant", REGISTERED, ids=IDS)
def test_reads_take_stored_bytes_and_the_map_finds_the_holes(variant: Variant, workdir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading never asks the filesystem where its holes are (they read as zeros); ``extents`` does."""
    size = 8 << 20
    data = bytes(range(256)) * 4096
    image_path = workdir / f"holes.{variant.format}"
    with create_image(image_path, variant.format, size, options=variant.create_options()) as image:
        image.write(3 << 20, data)
    searches: list[str] = []

    def counting(name: str) -> Any:
        original = getattr(ImageFile, name)

        def counted(self: ImageFile, offset: int) -> Any:
            searches.append(name)
            return original(self, offset)
        return counted

    for name in ("seek_data", "seek_hole"):
        monkeypatch.setattr(ImageFile, name, counting(name))
    with open_image(image_path) as image:
        searches.clear()
        assert image.read(0, size) == bytes(3 << 20) + data + bytes(4 << 20)
        assert searches == [], f"reading {variant.id} looked for holes"
        extents = list(image.extents(0, size))
    if (variant.format, variant.name) in VERBATIM:
        assert [(e.offset, e.length) for e in extents if e.kind is ExtentKind.DATA] == [(3 << 20, len(data))]
        assert searches, "the map of verbatim data comes from the file's holes"
