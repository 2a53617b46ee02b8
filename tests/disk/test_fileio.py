"""ImageFile and the write-behind thread that convert uses for its outputs."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import pytest

from polyvisor.disk import fileio
from polyvisor.disk.fileio import DATA_WRITE_MIN, ImageFile, OutputFiles, WriteBehind
from polyvisor.errors import OperationFailed


def _new_file(path: Path) -> ImageFile:
    return ImageFile(path, os.open(path, os.O_RDWR | os.O_CREAT, 0o644), writable=True)


def test_copied_data_is_written_as_it_was_when_submitted(tmp_path: Path) -> None:
    """A caller's mutable buffer that was not lent may change right after write(): the file gets the old bytes."""
    file = _new_file(tmp_path / "out")
    behind = WriteBehind()
    behind.attach([file])
    scratch = bytearray(b"A" * 4096)
    for i in range(64):
        file.write(i * 4096, scratch)
        scratch[:] = bytes([66 + i % 20]) * 4096  # reused at once, as format code does with scratch buffers
    behind.close([file])
    assert file.write_behind is None
    data = file.read(0, 64 * 4096, "test")
    assert data[:4096] == b"A" * 4096
    assert all(data[i * 4096 : (i + 1) * 4096] == bytes([66 + (i - 1) % 20]) * 4096 for i in range(1, 64))
    file.close()


def test_lent_buffers_are_released_only_after_their_writes(tmp_path: Path) -> None:
    """after_writes callbacks run in order, after every write submitted before them."""
    file = _new_file(tmp_path / "out")
    behind = WriteBehind()
    lent = bytearray(1 << 20)
    behind.lend(lent)
    behind.attach([file])
    seen: list[bytes] = []
    released = threading.Event()

    def release(offset: int) -> None:  # runs on the writing thread: the write before it has reached the file
        seen.append(os.pread(file.fd, 1, offset))
        released.set()

    for round_ in range(8):
        lent[:] = bytes([round_ + 1]) * len(lent)
        file.write(round_ << 20, memoryview(lent)[: 1 << 20])
        released.clear()
        behind.after_writes(functools.partial(release, round_ << 20))
        assert released.wait(10)
    behind.close([file])
    assert seen == [bytes([r + 1]) for r in range(8)]
    file.close()


def test_reads_wait_for_the_writes_before_them(tmp_path: Path) -> None:
    """A format reading back what it just wrote (read-modify-write) sees it, and the file size includes it."""
    file = _new_file(tmp_path / "out")
    behind = WriteBehind()
    behind.attach([file])
    for i in range(32):
        file.write(i << 16, bytes([i]) * (1 << 16))
        assert file.read(i << 16, 1 << 16, "test") == bytes([i]) * (1 << 16)
    assert file.size == 32 << 16
    behind.close([file])
    file.close()


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path: Path) -> None:
    """The writing thread's error (here EBADF: the descriptor is read-only) names the file and the offset."""
    path = tmp_path / "out"
    path.write_bytes(b"")
    file = ImageFile(path, os.open(path, os.O_RDONLY), writable=True)
    behind = WriteBehind()
    behind.attach([file])
    file.write(12288, b"x" * 512)
    with pytest.raises(OperationFailed, match=r"out: cannot write 512 bytes at offset 12288"):
        behind.drain()
    with pytest.raises(OperationFailed):  # and again on the next write: nothing after it is written
        file.write(0, b"y")
    behind.cancel([file])
    file.close()


def test_no_write_after_cancel(tmp_path: Path) -> None:
    """After cancel the file writes directly again; a WriteBehind that ended refuses new writes."""
    file = _new_file(tmp_path / "out")
    behind = WriteBehind()
    behind.attach([file])
    behind.cancel([file])
    assert file.write_behind is None
    file.write(0, b"direct")
    assert file.read(0, 6, "test") == b"direct"
    file.write_behind = behind
    with pytest.raises(OperationFailed, match="writing thread ended"):
        file.write(0, b"late")
    file.write_behind = None
    file.close()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_an_existing_non_file_is_never_replaced(kind: str, tmp_path: Path) -> None:
    """Naming a directory or a device-like node as the output fails before any work, and leaves it alone."""
    final = tmp_path / "out.qcow2"
    if kind == "directory":
        final.mkdir()
    else:
        os.mkfifo(final)
    with pytest.raises(OperationFailed, match="exists and is not a regular file"):
        OutputFiles().create(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.qcow2"]
    assert final.is_dir() if kind == "directory" else final.is_fifo()


def test_a_failed_rename_is_an_error_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Something taking the final name meanwhile (here a directory) ends the commit with a clear error."""
    outputs = OutputFiles()
    file = outputs.create(tmp_path / "out.raw")
    file.write(0, b"data")
    (tmp_path / "out.raw").mkdir()
    with pytest.raises(OperationFailed, match="cannot move the finished output into place"):
        outputs.commit()
    outputs.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.raw"]


def test_truncates_happen_in_order_with_the_writes(tmp_path: Path) -> None:
    """A shrinking truncate between two writes cuts the first one and not the second (no barrier needed)."""
    file = _new_file(tmp_path / "out")
    behind = WriteBehind()
    behind.attach([file])
    for _ in range(20):
        file.write(0, b"a" * 8192)
        file.truncate(4096)
        file.write(8192, b"z")
    behind.close([file])
    assert file.read(0, 8193, "test") == b"a" * 4096 + bytes(4096) + b"z"
    assert file.size == 8193
    file.close()


def test_new_outputs_reserve_the_range_of_each_large_write_and_no_more(tmp_path: Path) -> None:
    """Data writes into a new output reserve their own range first; small writes and gaps stay unallocated."""
    outputs = OutputFiles()
    file = outputs.create(tmp_path / "out.raw")
    assert file.preallocate
    file.write(0, b"header")
    file.write(8 << 20, os.urandom(DATA_WRITE_MIN))
    file.truncate(64 << 20)
    assert file.preallocate, "fallocate works on the filesystem under the test directory"
    assert file.allocated_bytes() <= DATA_WRITE_MIN + (64 << 10)
    outputs.abort()


def test_preallocate_now_reserves_blocks_that_read_as_zeros(tmp_path: Path) -> None:
    file = _new_file(tmp_path / "out")
    file.preallocate_now(1 << 20, 2 << 20)
    assert file.size == 3 << 20
    assert file.allocated_bytes() >= 2 << 20
    assert file.read(0, 3 << 20, "test") == bytes(3 << 20)
    file.close()


def test_a_filesystem_without_fallocate_gets_plain_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When fallocate fails, the file stops asking and the data is written all the same."""
    calls: list[tuple[int, int, int, int]] = []

    def failing_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((fd, mode, offset, length))
        return -1

    monkeypatch.setattr(fileio, "_libc_fallocate", lambda: failing_fallocate)
    outputs = OutputFiles()
    file = outputs.create(tmp_path / "out.raw")
    data = os.urandom(DATA_WRITE_MIN)
    file.write(0, data)
    file.write(DATA_WRITE_MIN, data)
    assert len(calls) == 1
    assert not file.preallocate
    assert file.read(0, 2 * DATA_WRITE_MIN, "test") == data + data
    outputs.abort()
