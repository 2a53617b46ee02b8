"""Every format to every format, checked by qemu-img; sparseness, compression, -B style backing."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from polyvisor.disk import CreateOptions, ExtentKind, create_image, open_image, registered_formats
from polyvisor.disk.compare import compare
from polyvisor.disk.convert import ZERO_GRANULE, convert
from polyvisor.errors import TruncatedImage, UnsupportedOption, UsageError
from tests.patterns import apply_writes, reference_raw, scattered_writes
from tests.peers import QEMU_CHECKS, VARIANTS, Variant, polyvisor_env, qemu_check, qemu_compare

REGISTERED = [v for v in VARIANTS if v.format in registered_formats()]
SIZE = (6 << 20) + 7 * 512


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same patterned content in every registered variant, written by polyvisor."""
    root = tmp_path_factory.mktemp("sources")
    writes = scattered_writes(SIZE, seed=21)
    out = {"reference": reference_raw(root / "reference.raw", SIZE, writes)}
    for variant in REGISTERED:
        folder = root / variant.id
        folder.mkdir()
        path = folder / f"source.{variant.format}"
        with create_image(path, variant.format, SIZE, variant.create_options()) as image:
            apply_writes(image, writes)
        out[variant.id] = path
    return out


@pytest.mark.parametrize("target", REGISTERED, ids=lambda v: f"to-{v.id}")
@pytest.mark.parametrize("source", REGISTERED, ids=lambda v: f"from-{v.id}")
def test_any_to_any(source: Variant, target: Variant, sources: dict[str, Path], workdir: Path) -> None:
    destination = workdir / f"out.{target.format}"
    result = convert(sources[source.id], destination, target.format, target.create_options())
    assert result.format == target.format
    assert result.subformat == target.name
    if target.format in QEMU_CHECKS:
        qemu_check(destination, target.format)
    qemu_compare(destination, target.format, sources["reference"], "raw")
    assert compare(destination, sources["reference"], target.format, "raw").identical


def test_zero_runs_are_not_written(workdir: Path) -> None:
    """A 64 MiB source holding 1 MiB of data converts to a raw file holding only that 1 MiB."""
    source = workdir / "mostly-zero.raw"
    with open(source, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(20 << 20)
        f.write(bytes(4 << 20))  # explicit zeros: data on disk, zeros to the guest
    result = convert(source, workdir / "copy.raw", "raw")
    assert result.data_bytes_written == 1 << 20
    assert (workdir / "copy.raw").stat().st_blocks * 512 <= (1 << 20) + (64 << 10)
    with open_image(workdir / "copy.raw") as copy:
        data = [e for e in copy.extents() if e.kind is ExtentKind.DATA]
    assert sum(e.length for e in data) == 1 << 20


@pytest.mark.parametrize("target", ["raw", "qcow2"])
def test_a_granule_is_written_if_any_byte_is_nonzero(target: str, workdir: Path) -> None:
    """Zero detection looks at every byte of a granule, not only its first, in a chunk that starts mid-granule."""
    g = ZERO_GRANULE
    image = bytearray(14 * g)
    image[3 * g // 2 : 27 * g // 2] = os.urandom(12 * g)  # data from the middle of granule 1 to that of 13
    image[3 * g // 2] = 1
    image[2 * g : 3 * g] = bytes(g)  # granule 2: zeros
    image[3 * g] = 0  # granule 3: zero first byte, data after it
    image[4 * g : 5 * g] = bytes(g - 1) + b"x"  # granule 4: data in its last byte only
    image[6 * g : 8 * g] = bytes(2 * g)  # granules 6 and 7: zeros
    image[9 * g : 10 * g] = b"\x5a" + bytes(g - 1)  # granule 9: data in its first byte only
    source = workdir / "granules-source.raw"
    with open(source, "wb") as f:
        f.truncate(len(image))  # granule 0 and the first half of granule 1 stay a hole
        f.seek(3 * g // 2)
        f.write(image[3 * g // 2 :])
    destination = workdir / f"granules.{target}"
    result = convert(source, destination, target)
    assert result.data_bytes_written == 19 * g // 2  # the data half of 1; 3, 4, 5; 8 to 13 (13 ends in zeros)
    qemu_compare(destination, target, source, "raw")


def test_sparse_terabyte_source_is_walked_not_read(workdir: Path) -> None:
    source = workdir / "huge.raw"
    with open(source, "wb") as f:
        f.truncate(1 << 40)
        f.seek((1 << 40) - 4096)
        f.write(b"\x7f" * 4096)
    result = convert(source, workdir / "huge-copy.raw", "raw")
    assert result.data_bytes_read <= 1 << 20
    assert compare(source, workdir / "huge-copy.raw").identical


def test_convert_refuses_to_overwrite_its_source(workdir: Path) -> None:
    source = workdir / "self.raw"
    source.write_bytes(b"\x01" * 4096)
    with pytest.raises(UsageError):
        convert(source, source, "raw")
    assert source.read_bytes() == b"\x01" * 4096


def test_compression_refused_where_unsupported(workdir: Path) -> None:
    source = workdir / "src.raw"
    source.write_bytes(b"\x01" * 4096)
    with pytest.raises(UnsupportedOption):
        convert(source, workdir / "dst.raw", "raw", CreateOptions(compress=True))
    assert sorted(p.name for p in workdir.iterdir()) == ["src.raw"]


@pytest.mark.parametrize("fmt", [name for name, cls in registered_formats().items() if cls.supports_compression])
def test_compressed_output(fmt: str, sources: dict[str, Path], workdir: Path) -> None:
    destination = workdir / f"compressed.{fmt}"
    convert(sources["reference"], destination, fmt, CreateOptions(compress=True))
    if fmt in QEMU_CHECKS:
        qemu_check(destination, fmt)
    qemu_compare(destination, fmt, sources["reference"], "raw")


@pytest.mark.parametrize("fmt", [name for name, cls in registered_formats().items() if cls.supports_backing])
def test_convert_onto_a_backing_file_stores_only_differences(fmt: str, workdir: Path) -> None:
    base_writes = scattered_writes(SIZE, seed=5)
    base = reference_raw(workdir / "base.raw", SIZE, base_writes)
    base_fmt = fmt if fmt in ("vmdk", "vhd", "vhdx") else "raw"  # VHD and VHDX parents are VHD and VHDX
    if base_fmt != "raw":
        convert(base, workdir / f"base.{base_fmt}", base_fmt)
    top_writes = [*base_writes[:3], (4096, b"\x00" * 4096), (SIZE - 512, b"\x44" * 512)]
    wanted = reference_raw(workdir / "wanted.raw", SIZE, top_writes, base=base)
    options = CreateOptions(backing_file=f"base.{base_fmt}", backing_fmt=base_fmt)
    result = convert(wanted, workdir / f"top.{fmt}", fmt, options)
    assert result.data_bytes_written < SIZE // 4
    with open_image(workdir / f"top.{fmt}") as top:
        assert top.backing is not None
        assert top.read(0, SIZE) == wanted.read_bytes()
    if fmt in QEMU_CHECKS and fmt != "vhdx":  # qemu opens no differencing VHDX
        qemu_check(workdir / f"top.{fmt}", fmt)
    if fmt in ("qcow2", "vmdk"):  # qemu opens backing files only for these
        qemu_compare(workdir / f"top.{fmt}", fmt, wanted, "raw")


def test_no_sync_output_is_the_same_image(sources: dict[str, Path], workdir: Path) -> None:
    """``durable=False`` (``convert --no-sync``) skips only the wait for the disk, never content."""
    destination = workdir / "fast.qcow2"
    convert(sources["reference"], destination, "qcow2", durable=False)
    qemu_check(destination, "qcow2")
    qemu_compare(destination, "qcow2", sources["reference"], "raw")
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


def test_read_errors_in_the_read_ahead_thread_reach_the_caller(workdir: Path) -> None:
    """A source that fails half-way (a flat extent cut short) fails the conversion, leaving nothing."""
    source = workdir / "broken.vmdk"
    with create_image(source, "vmdk", 8 << 20, subformat="monolithicFlat") as image:
        image.write(6 << 20, b"\x01" * (1 << 20))
    with open(workdir / "broken-flat.vmdk", "r+b") as f:
        f.truncate(5 << 20)
    with pytest.raises(TruncatedImage):
        convert(source, workdir / "out.raw", "raw")
    assert sorted(p.name for p in workdir.iterdir()) == ["broken-flat.vmdk", "broken.vmdk"]


def test_a_raw_source_reads_its_holes_as_zeros_and_fails_cleanly_when_it_shrinks(workdir: Path) -> None:
    """Raw reads go straight to the file: holes come back as zeros, and bytes gone since opening are an error."""
    path = workdir / "shrinking.raw"
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(data)
    with open_image(path, "raw") as image:
        assert image.read((4 << 20) - 4096, (1 << 20) + 8192) == bytes(4096) + data + bytes(4096)
        os.truncate(path, 5 << 20)
        with pytest.raises(TruncatedImage, match=r"shrinking\.raw.*the file ends after 1048576") as caught:
            image.read(4 << 20, 2 << 20)
        assert caught.value.offset == 4 << 20


def _limit_file_size() -> None:
    """In the child: files may not grow past 2 MiB; a write beyond fails with EFBIG (as on a full disk)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("variant", REGISTERED, ids=lambda v: v.id)
def test_write_errors_reach_the_caller_and_leave_nothing(variant: Variant, workdir: Path) -> None:
    """A write that fails on the writing thread ends the CLI with one line naming the output, and no file."""
    source = workdir / "random.raw"
    source.write_bytes(os.urandom(SIZE))
    argv = [sys.executable, "-m", "polyvisor", "disk", "convert", "-f", "raw", "-O", variant.format]
    options = ",".join(f"{k}={v}" for k, v in variant.options.items())
    if options:
        argv += ["-o", options]
    proc = subprocess.run([*argv, str(source), str(workdir / "out.img")], capture_output=True, text=True,
                          env=polyvisor_env(), preexec_fn=_limit_file_size, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("polyvisor: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "/out" in proc.stderr, proc.stderr  # out.img or its extent out-f001.img
    assert "File too large" in proc.stderr, proc.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["random.raw"]
