"""Positional file access with errors that name the file, the structure and the offset.

:class:`ImageFile` wraps one OS file descriptor.  Sources are opened
``O_RDONLY`` and can never be written.  :class:`OutputFiles` gives newly
created images their crash safety: every file is written under a temporary
name in the destination directory and renamed to its final name only once it
is complete and flushed; an abandoned output leaves nothing under a final name.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from polyvisor.errors import OperationFailed, ReadOnlyImage, TruncatedImage
from polyvisor.records import record

#: Bytes handed to a single ``pread``; larger requests are split.
IO_CHUNK = 16 << 20
#: Bytes handed to a single ``pwrite``.  On the benchmark VM (Linux 6.18, ext4), copies written in 1 MiB
#: pieces were bimodal: raw -> vdi took 0.6 s or 0.9-2.0 s, the slow runs spending the time in the kernel
#: (probably large page-cache folios taken from memory the VM had handed back to its host).  In 256 KiB
#: pieces it took 0.57-0.83 s every time; 64 KiB pieces cost more in system calls than they saved.
WRITE_PIECE = 256 << 10
#: New output files start writing back to disk every this many bytes of large writes, so the fsync that
#: precedes the final rename finds little left to do (the disk works while polyvisor converts).
WRITEBACK_BATCH = 64 << 20
#: Writes at least this large count as data: new output files reserve their blocks first (see
#: :meth:`ImageFile.preallocate_now`) and durable ones start their writeback early.  Smaller writes are
#: metadata, left to the kernel and to the final fsync.
DATA_WRITE_MIN = 1 << 20
#: Whether new outputs reach stable storage (fsync) before they are renamed into place.  On by default;
#: ``create_image(..., durable=False)`` (``convert --no-sync``) lets the kernel write them back later, as
#: qemu-img does: still never a partial file under the final name if polyvisor is killed, but a power
#: failure may leave one.
DURABLE_OUTPUTS: contextvars.ContextVar[bool] = contextvars.ContextVar("durable_outputs", default=True)
#: No file offset polyvisor follows may reach this (os.pread overflows at 2^63; no real image is near it).
MAX_OFFSET = 1 << 62
#: Bytes of copied (not lent) data a :class:`WriteBehind` may hold before the caller waits.
WRITE_BEHIND_COPIED_BYTES = 32 << 20


def io_buffer(size: int, *, writable: bool = True) -> mmap.mmap:
    """A zero-filled buffer of *size* bytes that starts on a page boundary, for bulk reads and writes.

    Linux copies between user memory and the page cache with ``rep movsb``.  On the AMD EPYC machines
    polyvisor is benchmarked on, that copy runs about six times slower when the destination lies 1-31
    bytes past the source modulo 4 KiB, which is exactly where malloc puts large blocks (16 bytes into a
    page): reading into a ``bytearray`` took 2.6 ms per 4 MiB, into a page-aligned buffer 0.4 ms.  An
    anonymous mapping is page-aligned, costs nothing until touched, and reads as zeros; a read-only one
    is never backed by more than the shared zero page.
    """
    return mmap.mmap(-1, max(size, 1), prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


class ImageFile:
    """One open file of an image, read and written by absolute offset."""

    def __init__(self, path: Path, fd: int, *, writable: bool, display_path: Path | None = None) -> None:
        self.path = path
        #: The name shown in errors: the final name for files still under a temporary one.
        self.display_path = display_path or path
        self.fd = fd
        self.writable = writable
        self.closed = False
        #: Whether flush() waits for stable storage (fsync).
        self.durable = True
        #: Whether large writes start their writeback early (set for new durable output files).
        self.early_writeback = False
        #: Whether large writes reserve their blocks before writing (set for new output files; cleared
        #: when the filesystem cannot).
        self.preallocate = False
        self._unsynced: list[tuple[int, int]] = []
        self._unsynced_bytes = 0
        #: While set, writes are handed to this thread and everything else waits for them first.
        self.write_behind: WriteBehind | None = None
        self._data_segment: tuple[int, int] | None = None

    @classmethod
    def open(cls, path: Path, *, writable: bool = False) -> ImageFile:
        """Open an existing file (read-only unless *writable*)."""
        # O_NONBLOCK so that a FIFO named as an image cannot block the open; cleared once the type is known.
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise OperationFailed(f"{path}: cannot open: {exc.strerror}") from exc
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fd)
            raise OperationFailed(f"{path}: not a regular file or block device")
        os.set_blocking(fd, True)
        return cls(path, fd, writable=writable)

    @property
    def size(self) -> int:
        """Current length of the file in bytes."""
        self._settle()
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on disk (``st_blocks * 512``)."""
        self._settle()
        return os.fstat(self.fd).st_blocks * 512

    def read(self, offset: int, length: int, structure: str) -> bytes:
        """Read exactly *length* bytes at *offset*; a short read is a :class:`TruncatedImage`."""
        self._settle()
        if offset < 0 or length < 0 or offset + length > MAX_OFFSET:
            raise TruncatedImage(self.display_path, f"impossible position ({length} bytes)",
                                 structure=structure, offset=offset)
        if length == 0:
            return b""
        if length <= IO_CHUNK:
            try:
                data = os.pread(self.fd, length, offset)
            except OSError as exc:
                raise self._io_failed("read", length, offset, exc) from exc
        else:
            buf = io_buffer(length)
            got = self.readinto(offset, memoryview(buf)[:length])
            data = buf[:got]
        if len(data) != length:
            raise TruncatedImage(
                self.display_path,
                f"needs {length} bytes but the file ends after {len(data)}",
                structure=structure,
                offset=offset,
            )
        return data

    def read_upto(self, offset: int, length: int) -> bytes:
        """Read at most *length* bytes at *offset* (fewer at end of file)."""
        self._settle()
        if length <= 0 or offset < 0 or offset > MAX_OFFSET:
            return b""
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise self._io_failed("read", length, offset, exc) from exc

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill *buf* from *offset*; returns the bytes read (short only at end of file)."""
        self._settle()
        total = 0
        view = buf.cast("B") if buf.format != "B" else buf
        if offset < 0 or offset + len(view) > MAX_OFFSET:
            return 0
        while total < len(view):
            try:
                n = os.preadv(self.fd, [view[total : total + IO_CHUNK]], offset + total)
            except OSError as exc:
                raise self._io_failed("read", len(view) - total, offset + total, exc) from exc
            if n <= 0:
                break
            total += n
        return total

    def read_exact_into(self, offset: int, buf: memoryview, structure: str) -> None:
        """Fill *buf* completely from *offset* or raise :class:`TruncatedImage`."""
        got = self.readinto(offset, buf)
        if got != len(buf):
            raise TruncatedImage(
                self.display_path,
                f"needs {len(buf)} bytes but the file ends after {got}",
                structure=structure,
                offset=offset,
            )

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of *data* at *offset* (now, or by the :attr:`write_behind` thread)."""
        if not self.writable:
            raise ReadOnlyImage(self.display_path, "file is open read-only", offset=offset)
        view = memoryview(data).cast("B")
        if self.write_behind is not None:
            self.write_behind.submit(self, offset, view)
        else:
            self.write_now(offset, view)

    def write_now(self, offset: int, view: memoryview) -> None:
        """pwrite all of *view* at *offset*, in this thread."""
        done = 0
        if self.preallocate and len(view) >= DATA_WRITE_MIN:
            self.preallocate_now(offset, len(view))
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done : done + WRITE_PIECE], offset + done)
            except OSError as exc:
                raise self._io_failed("write", len(view) - done, offset + done, exc) from exc
            if n <= 0:
                raise OperationFailed(f"{self.display_path}: short write at offset {offset + done}")
            done += n
        if self.early_writeback and len(view) >= DATA_WRITE_MIN:
            self._unsynced.append((offset, len(view)))
            self._unsynced_bytes += len(view)
            if self._unsynced_bytes >= WRITEBACK_BATCH:
                self.start_writeback()

    def preallocate_now(self, offset: int, length: int) -> None:
        """Reserve the blocks of the range a large write is about to fill (``fallocate(2)``, mode 0).

        On ext4 a write into unallocated space goes through delayed allocation.  On the benchmark VM
        (Linux 6.18), writing 1 GiB into fresh page cache that way took 0.47-1.7 s, varying from run to
        run; with each 1 MiB range reserved first it took 0.35-0.56 s.  Only the range about to be
        written is reserved, so the output is exactly as sparse as without.  Where the filesystem
        cannot (or the call fails for any reason), this file stops trying and the write itself reports
        any real problem.  glibc's ``posix_fallocate`` is not used: where ``fallocate`` is missing it
        falls back to writing a byte into every block.
        """
        fallocate = _libc_fallocate()
        if fallocate is None or fallocate(self.fd, 0, offset, length) != 0:
            self.preallocate = False

    def _settle(self) -> None:
        """Wait for this file's handed-off writes, so what follows sees them (and their errors)."""
        if self.write_behind is not None:
            self.write_behind.drain()

    def start_writeback(self) -> None:
        """Ask the kernel to start writing the recent large writes to disk, without waiting.

        ``POSIX_FADV_DONTNEED`` starts writeback of dirty pages in the range (and drops clean ones from
        the page cache: a converted image should not push everything else out of it).
        """
        for offset, length in self._unsynced:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        self._unsynced.clear()
        self._unsynced_bytes = 0

    def truncate(self, length: int) -> None:
        """Set the file length (extending creates a hole), in order with the writes before it."""
        if not self.writable:
            raise ReadOnlyImage(self.display_path, "file is open read-only")
        if self.write_behind is not None:
            self.write_behind.submit_call(self, functools.partial(self.truncate_now, length))
        else:
            self.truncate_now(length)

    def truncate_now(self, length: int) -> None:
        """ftruncate in this thread."""
        try:
            os.ftruncate(self.fd, length)
        except OSError as exc:
            raise OperationFailed(f"{self.display_path}: cannot set its length to {length}: {exc.strerror}") from exc

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range so it reads as zeros, where the filesystem can."""
        # Linux fallocate(PUNCH_HOLE|KEEP_SIZE) is not in the os module; writing
        # zeros is the portable fallback and keeps the content right.
        self.write(offset, bytes(length))

    def seek_data(self, offset: int) -> int | None:
        """Next offset >= *offset* holding data (SEEK_DATA), or None past the last data.

        Where the file cannot say (no SEEK_DATA support, a block device), everything counts as data.
        """
        self._settle()
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            return None if exc.errno == errno.ENXIO else offset

    def seek_hole(self, offset: int) -> int:
        """Next hole at or after *offset* (SEEK_HOLE); end of file counts as a hole."""
        self._settle()
        try:
            return os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return self.size

    def data_segment(self, offset: int) -> tuple[int, int] | None:
        """The stretch ``[start, end)`` of data without holes that holds *offset* or follows it, or None
        past the last data. A read-only file remembers the last one: most files have few holes, and a
        map asks about one run after another."""
        known = self._data_segment
        if known is not None and known[0] <= offset < known[1]:
            return known
        start = self.seek_data(offset)
        if start is None:
            return None
        end = self.seek_hole(start)
        found = (start, end if end > start else self.size)
        if not self.writable:
            self._data_segment = found
        return found

    def flush(self) -> None:
        """Push written data to stable storage (only to the kernel for non-durable outputs)."""
        self._settle()
        if self.writable and self.durable and not self.closed:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise OperationFailed(f"{self.display_path}: cannot flush to disk: {exc.strerror}") from exc

    def _io_failed(self, what: str, length: int, offset: int, exc: OSError) -> OperationFailed:
        return OperationFailed(f"{self.display_path}: cannot {what} {length} bytes at offset {offset}: {exc.strerror}")

    def close(self) -> None:
        """Close the descriptor (idempotent), once the writes handed off so far are done or skipped."""
        if self.write_behind is not None:
            self.write_behind.forget(self)
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """The C library's ``fallocate(fd, mode, offset, length)``, or None where there is none (not Linux)."""
    try:
        import ctypes  # only outputs need it

        function = ctypes.CDLL(None).fallocate
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    fallocate: Callable[[int, int, int, int], int] = function
    return fallocate


class WriteBehind:
    """A thread that performs an output's writes while the caller prepares the next ones.

    ``pwrite`` releases the GIL, so the copy into the page cache runs on one core while format code (zero
    detection, table updates) runs on the other.  Writes and truncates happen in submission order.  Data
    the caller *lends* (see :meth:`lend`) is written from the caller's buffer, which the caller must leave
    unchanged until a callback queued with :meth:`after_writes` runs; other mutable data is copied on
    submission (at most :data:`WRITE_BEHIND_COPIED_BYTES` at a time).  The first error is raised in the
    caller's thread by the next :meth:`submit` or :meth:`drain`; writes after it are skipped.
    """

    def __init__(self) -> None:
        # SimpleQueue: a C queue, ~20x cheaper per item than queue.Queue; drain() waits on a barrier instead
        # of join().
        self._queue: queue.SimpleQueue[_Write | _Call | threading.Event | None] = queue.SimpleQueue()
        self._lent: list[object] = []
        self._copied = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="polyvisor-write-behind", daemon=True)
        self._thread.start()

    def attach(self, files: list[ImageFile]) -> None:
        """Route the writes of these (writable, open) files through this thread."""
        for f in files:
            if f.writable and not f.closed:
                f.write_behind = self

    def lend(self, buffer: bytearray | mmap.mmap) -> None:
        """Write views of *buffer* without copying; the caller keeps it unchanged until released."""
        self._lent.append(buffer)

    def submit(self, file: ImageFile, offset: int, view: memoryview) -> None:
        """Queue a write of *view* at *offset* of *file*."""
        self._check_running(file)
        owner = view.obj
        copied = 0
        if not isinstance(owner, bytes) and not any(owner is lent for lent in self._lent):
            copied = len(view)
            with self._room:
                while self._copied and self._copied + copied > WRITE_BEHIND_COPIED_BYTES:
                    if self._error is not None or not self._thread.is_alive():
                        break
                    self._room.wait(0.1)
                self._copied += copied
            view = memoryview(bytes(view))
        self._queue.put(_Write(file, offset, view, copied))

    def submit_call(self, file: ImageFile, operation: Callable[[], None]) -> None:
        """Queue another operation on *file* (a truncate), in order with its writes."""
        self._check_running(file)
        self._queue.put(_Call(operation, skip_after_error=True))

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Run *callback* (in the writing thread) once every write submitted so far is done."""
        self._raise_error()
        self._queue.put(_Call(callback, skip_after_error=False))

    def drain(self) -> None:
        """Wait until every submitted write is done; raise the first error."""
        self._barrier()
        self._raise_error()

    def forget(self, file: ImageFile) -> None:
        """Detach *file* once the writes submitted so far are done (errors stay for :meth:`drain`)."""
        self._barrier()
        file.write_behind = None

    def cancel(self, files: list[ImageFile]) -> None:
        """Skip the writes not yet done, end the thread and detach *files* (after an error elsewhere)."""
        self._cancelled = True
        self._detach(files)

    def close(self, files: list[ImageFile]) -> None:
        """Finish every write, end the thread and detach *files*; raise the first error."""
        try:
            self.drain()
        finally:
            self._detach(files)

    def _barrier(self) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            reached = threading.Event()
            self._queue.put(reached)
            while not reached.wait(0.1):
                if not self._thread.is_alive():
                    break

    def _detach(self, files: list[ImageFile]) -> None:
        for f in files:
            if f.write_behind is self:
                f.write_behind = None
        if self._thread.is_alive():
            self._queue.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def _check_running(self, file: ImageFile) -> None:
        self._raise_error()
        if self._cancelled or not self._thread.is_alive():
            raise OperationFailed(f"{file.display_path}: write after its writing thread ended")

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                if isinstance(item, _Call):
                    if not (item.skip_after_error and (self._error is not None or self._cancelled)):
                        item.operation()
                elif self._error is None and not self._cancelled:
                    item.file.write_now(item.offset, item.view)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = self._error or exc
            finally:
                if isinstance(item, _Write) and item.copied:
                    with self._room:
                        self._copied -= item.copied
                        self._room.notify_all()


@record(frozen=True, slots=True)
class _Write:
    """A write waiting for the :class:`WriteBehind` thread."""

    file: ImageFile
    offset: int
    view: memoryview
    copied: int  #: bytes copied on submission (0: lent or immutable data)


@record(frozen=True, slots=True)
class _Call:
    """Another operation for the :class:`WriteBehind` thread, in order with the writes."""

    operation: Callable[[], None]
    skip_after_error: bool


class OutputFiles:
    """The files of an image being created, kept under temporary names until :meth:`commit`.

    Files are renamed in the order they were added, so a format adds its data
    files (extents) first and its descriptor last: a reader that finds the
    descriptor under its final name always finds the extents it names.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[ImageFile, Path]] = []
        self.done = False
        self.durable = DURABLE_OUTPUTS.get()

    def create(self, final: Path, *, exist_ok: bool = True) -> ImageFile:
        """Create a new empty file that will become *final* on commit."""
        final = Path(final)
        directory = final.parent if str(final.parent) else Path(".")
        if not directory.is_dir():
            raise OperationFailed(f"{final}: directory {directory} does not exist")
        try:
            existing = os.lstat(final).st_mode
        except FileNotFoundError:
            existing = None
        if existing is not None and not exist_ok:
            raise OperationFailed(f"{final}: already exists")
        if existing is not None and not (stat.S_ISREG(existing) or stat.S_ISLNK(existing)):
            raise OperationFailed(f"{final}: exists and is not a regular file; name a file to create")
        tmp = directory / f".{final.name}.polyvisor-{os.urandom(4).hex()}.tmp"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(tmp, flags, 0o644)
        except OSError as exc:
            raise OperationFailed(f"{final}: cannot create: {exc.strerror}") from exc
        handle = ImageFile(tmp, fd, writable=True, display_path=final)
        handle.durable = handle.early_writeback = self.durable
        handle.preallocate = True
        self._pending.append((handle, final))
        return handle

    @property
    def files(self) -> list[ImageFile]:
        """The files created so far, in commit order."""
        return [handle for handle, _ in self._pending]

    def commit(self) -> None:
        """Flush every file, then rename each to its final name (data first, descriptor last)."""
        if self.done:
            return
        for handle, _ in self._pending:
            handle.flush()
        for handle, final in self._pending:
            handle.close()
            try:
                os.replace(handle.path, final)
            except OSError as exc:
                raise OperationFailed(f"{final}: cannot move the finished output into place: {exc.strerror}") from exc
            handle.path = final
        dirs = {final.parent for _, final in self._pending} if self.durable else set()
        for directory in dirs:
            with contextlib.suppress(OSError):
                dfd = os.open(directory or ".", os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        self.done = True

    def abort(self) -> None:
        """Close and delete every temporary file; nothing appears under a final name."""
        if self.done:
            return
        for handle, _ in self._pending:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handle.path)
        self.done = True
