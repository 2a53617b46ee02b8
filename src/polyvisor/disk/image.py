"""The ``DiskImage`` protocol every disk format implements.

A disk image presents a guest-visible byte range of :attr:`DiskImage.virtual_size`
bytes.  Each format module subclasses :class:`DiskImage`, registers itself with
:func:`polyvisor.disk.registry.register_format`, and supplies:

* ``probe`` — does a file look like this format (magic *and* sane header);
* ``open`` / ``create`` — class constructors;
* ``_map`` — where the bytes of a guest range live in *this layer*: a sequence
  of :class:`Run` objects (data at a host offset of one of its files, data that
  must be decoded such as a compressed cluster, zeros, or unallocated — which
  falls through to the backing image);
* ``write`` (and optionally ``write_zeroes``) for writable images;
* ``_finish`` to write trailing metadata before a created image is committed;
* ``check`` for the format's consistency checks; ``_details`` for ``info``.

Reading, extent maps, backing-chain fall-through, chain-resolved maps,
``info`` and closing are shared here so that every format behaves the same.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.errors import CorruptImage, ReadOnlyImage, UnsupportedFeature, UsageError
from polyvisor.records import field, record

if TYPE_CHECKING:
    from polyvisor.disk.check import CheckResult
    from polyvisor.disk.registry import CreateOptions, Opener

#: A shared block of zeros for filling buffers without allocating.
_ZEROS = bytes(1 << 20)


def fill_zero(view: memoryview) -> None:
    """Set every byte of *view* to zero."""
    pos = 0
    while pos < len(view):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos : pos + n] = _ZEROS[:n]
        pos += n


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte of *data* is zero (memcmp speed, no copy)."""
    view = memoryview(data).cast("B")
    pos = 0
    while pos < len(view):
        n = min(len(_ZEROS), len(view) - pos)
        # bytes.startswith takes any buffer and compares with memcmp; memoryview == memoryview does not
        if not _ZEROS.startswith(view[pos : pos + n]):
            return False
        pos += n
    return True


def same_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    """True if *a* and *b* hold the same bytes (memcmp speed; comparing memoryviews directly is ~25x slower)."""
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if len(va) != len(vb):
        return False
    step = 1 << 20
    return all(va[pos : pos + step].tobytes().startswith(vb[pos : pos + step]) for pos in range(0, len(va), step))


class ExtentKind(enum.StrEnum):
    """What a stretch of one layer holds."""

    DATA = "data"  #: bytes stored in this layer
    ZERO = "zero"  #: reads as zeros, recorded as such in this layer (zero cluster, sparse hole of raw)
    UNALLOCATED = "unallocated"  #: nothing here: reads fall through to the backing image, or zeros


@record(frozen=True, slots=True)
class Extent:
    """A stretch of the guest address space and what provides it.

    In a chain-resolved map (:meth:`DiskImage.map`) *depth* says which layer
    provides the bytes (0 = the top image); ``UNALLOCATED`` there means no
    layer holds anything and the range reads as zeros.
    """

    offset: int
    length: int
    kind: ExtentKind
    depth: int = 0

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.length


@record(slots=True)
class Run:
    """Where one stretch of a layer's guest bytes lives (yielded by ``_map``).

    ``DATA`` runs have either ``file``/``host_offset`` (the bytes are stored
    verbatim and contiguously) or ``decode``, a callable producing the decoded
    bytes of a whole unit (a compressed cluster or grain) that starts at guest
    offset ``unit_offset``. A ``sparse`` run is stored verbatim in a file whose
    holes read as zeros: reads take it whole, ``extents`` reports its holes as ``ZERO``.
    """

    offset: int
    length: int
    kind: ExtentKind
    file: ImageFile | None = None
    host_offset: int = 0
    decode: Callable[[], bytes | bytearray | memoryview] | None = None
    unit_offset: int = 0
    sparse: bool = False


def file_run(file: ImageFile, host: int, length: int, guest: int) -> Run:
    """The run of *length* guest bytes stored verbatim at *host* in *file*, starting at guest offset *guest*.

    A read of it is one read of the file; bytes past the end of the file are a TruncatedImage naming it.
    """
    return Run(guest, length, ExtentKind.DATA, file=file, host_offset=host, sparse=True)


def _split_at_holes(run: Run) -> Iterator[Run]:
    """*run* (a ``sparse`` one) split where its file has holes (SEEK_DATA/SEEK_HOLE); holes are ``ZERO``.

    Bytes past the end of the file stay data, so that reading them raises TruncatedImage.
    """
    file = run.file
    assert file is not None
    shift = run.offset - run.host_offset  # guest offset minus host offset
    pos, end = run.host_offset, run.host_offset + run.length
    while pos < end:
        segment = file.data_segment(pos)
        if segment is None:  # no data from here on: zeros up to the end of the file, then a truncation
            file_end = min(max(file.size, pos), end)
            if file_end > pos:
                yield Run(pos + shift, file_end - pos, ExtentKind.ZERO)
            if file_end < end:
                yield Run(file_end + shift, end - file_end, ExtentKind.DATA, file=file, host_offset=file_end)
            return
        start, stop = max(segment[0], pos), min(segment[1], end)
        if start > pos:
            yield Run(pos + shift, min(start, end) - pos, ExtentKind.ZERO)
            if start >= end:
                return
        if stop <= start:  # the file cannot say where its holes are, and this lies past its end
            yield Run(start + shift, end - start, ExtentKind.DATA, file=file, host_offset=start)
            return
        yield Run(start + shift, stop - start, ExtentKind.DATA, file=file, host_offset=start)
        pos = stop


@record
class ProbeSample:
    """What format probes look at: the start and the end of a file."""

    path: Path
    size: int
    head: bytes  #: the first bytes of the file (up to 64 KiB)
    tail: bytes  #: the last 512 bytes of the file (fewer if the file is smaller)


@record
class ImageInfo:
    """What ``polyvisor disk info`` prints."""

    filename: str
    format: str
    subformat: str
    virtual_size: int
    actual_size: int
    backing: list[dict[str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "filename": self.filename,
            "format": self.format,
            "subformat": self.subformat,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing": self.backing,
            "files": self.files,
            **self.details,
        }


class DiskImage(abc.ABC):
    """One layer of a disk: a guest-visible byte range stored in one or more files."""

    #: Registered name (``raw``, ``qcow2``, ``vmdk``, ``vhd``, ``vhdx``, ``vdi``).
    format_name: ClassVar[str]
    #: Other names accepted for the format (``vpc`` for VHD, as qemu-img calls it).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Subformats ``create`` accepts through ``subformat=``; the first is the default.
    subformats: ClassVar[tuple[str, ...]] = ()
    #: ``-o`` option names ``create`` accepts (besides ``subformat``).
    create_options: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``create`` accepts ``compress`` (``convert -c``).
    supports_compression: ClassVar[bool] = False
    #: Whether images of this format can have a backing file / parent.
    supports_backing: ClassVar[bool] = False
    #: Largest virtual size ``create`` accepts (the format's own limit).
    max_virtual_size: ClassVar[int] = 1 << 62
    #: Whether an existing image can be opened writable (False for append-only streams).
    writable_reopen: ClassVar[bool] = True

    def __init__(
        self,
        path: Path,
        *,
        virtual_size: int,
        subformat: str,
        files: list[ImageFile],
        writable: bool = False,
        backing: DiskImage | None = None,
        backing_reference: str | None = None,
        outputs: OutputFiles | None = None,
    ) -> None:
        self.path = Path(path)
        self.virtual_size = virtual_size
        self.subformat = subformat
        self.files = files
        self.writable = writable
        self.backing = backing
        #: The backing path as written in the image (not resolved).
        self.backing_reference = backing_reference
        self._outputs = outputs
        self.closed = False

    # ----------------------------------------------------------- construction

    @classmethod
    @abc.abstractmethod
    def probe(cls, sample: ProbeSample) -> int:
        """Confidence (0 = no, 100 = magic at the start and a sane header, 50 = trailer only)."""

    @classmethod
    @abc.abstractmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open an existing image; backing images are opened through *opener*."""

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """Create a new image of *size* bytes under a temporary name (see :class:`OutputFiles`)."""
        raise UnsupportedFeature(path, f"polyvisor cannot create {cls.format_name} images")

    # ------------------------------------------------------------- the layer

    @abc.abstractmethod
    def _map(self, offset: int, length: int) -> Iterator[Run]:
        """Yield contiguous runs covering exactly ``[offset, offset + length)`` of this layer."""

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """This layer's allocation, adjacent runs of the same kind merged (holes of verbatim data are ``ZERO``)."""
        if length is None:
            length = self.virtual_size - offset
        self._check_range(offset, length)
        pending: Extent | None = None
        for run in self._checked_runs(offset, length):
            for piece in _split_at_holes(run) if run.sparse else (run,):
                if pending is not None and pending.kind is piece.kind:
                    pending = Extent(pending.offset, pending.length + piece.length, piece.kind)
                    continue
                if pending is not None:
                    yield pending
                pending = Extent(piece.offset, piece.length, piece.kind)
        if pending is not None:
            yield pending

    def map(self, offset: int = 0, length: int | None = None, _depth: int = 0) -> Iterator[Extent]:
        """The chain-resolved map: which layer provides each stretch (``depth``), merged.

        ``UNALLOCATED`` here means no layer holds the range: it reads as zeros.
        """
        if length is None:
            length = self.virtual_size - offset
        pending: Extent | None = None
        for ext in self._resolved(offset, length, _depth):
            if pending is not None and pending.kind is ext.kind and pending.depth == ext.depth:
                pending = Extent(pending.offset, pending.length + ext.length, ext.kind, ext.depth)
                continue
            if pending is not None:
                yield pending
            pending = ext
        if pending is not None:
            yield pending

    def _resolved(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        for ext in self.extents(offset, length):
            if ext.kind is not ExtentKind.UNALLOCATED or self.backing is None:
                yield Extent(ext.offset, ext.length, ext.kind, depth)
                continue
            inside = max(0, min(ext.end, self.backing.virtual_size) - ext.offset)
            if inside:
                yield from self.backing._resolved(ext.offset, inside, depth + 1)
            if inside < ext.length:
                yield Extent(ext.offset + inside, ext.length - inside, ExtentKind.UNALLOCATED, depth + 1)

    def _checked_runs(self, offset: int, length: int) -> Iterator[Run]:
        """``_map`` with its contract enforced (contiguous, in range, complete)."""
        pos = offset
        for run in self._map(offset, length):
            if run.offset != pos or run.length <= 0 or run.offset + run.length > offset + length:
                raise CorruptImage(
                    self.path,
                    f"internal mapping error: run {run.offset}+{run.length} does not continue at {pos}",
                    structure=f"{self.format_name} map",
                )
            pos += run.length
            yield run
        if pos != offset + length:
            raise CorruptImage(
                self.path,
                f"internal mapping error: runs end at {pos}, expected {offset + length}",
                structure=f"{self.format_name} map",
            )

    # ---------------------------------------------------------------- reading

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(
                f"{self.path}: range {offset}+{length} outside the virtual size {self.virtual_size}"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Guest-visible bytes ``[offset, offset + length)``, backing chain included."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill *buf* with guest-visible bytes starting at *offset*."""
        length = len(buf)
        self._check_range(offset, length)
        if length == 0:
            return
        for run in self._checked_runs(offset, length):
            start = run.offset - offset
            target = buf[start : start + run.length]
            if run.kind is ExtentKind.DATA:
                if run.decode is not None:
                    unit = run.decode()
                    skip = run.offset - run.unit_offset
                    if skip < 0 or skip + run.length > len(unit):
                        raise CorruptImage(
                            self.path,
                            f"decoded unit of {len(unit)} bytes does not cover guest offset {run.offset}",
                            structure=f"{self.format_name} compressed data",
                        )
                    target[:] = memoryview(unit)[skip : skip + run.length]
                elif run.file is not None:
                    run.file.read_exact_into(run.host_offset, target, f"{self.format_name} data")
                else:
                    raise CorruptImage(self.path, "data run without a source",
                                       structure=f"{self.format_name} map")
            elif run.kind is ExtentKind.ZERO:
                fill_zero(target)
            else:
                self._read_backing_into(run.offset, target)

    def _read_backing_into(self, offset: int, target: memoryview) -> None:
        """Backing bytes for an unallocated range (zeros past the backing's end or without one)."""
        backing = self.backing
        if backing is None or offset >= backing.virtual_size:
            fill_zero(target)
            return
        inside = min(len(target), backing.virtual_size - offset)
        backing.readinto(offset, target[:inside])
        if inside < len(target):
            fill_zero(target[inside:])

    def read_backing(self, offset: int, length: int) -> bytes:
        """What the backing chain shows at a range (for copy-on-write of partial clusters)."""
        buf = bytearray(length)
        if self.backing is not None:
            self._read_backing_into(offset, memoryview(buf))
        return bytes(buf)

    # ---------------------------------------------------------------- writing

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest bytes at *offset*."""
        raise ReadOnlyImage(self.path, f"{self.format_name} image is not writable")

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros (formats with zero clusters override this)."""
        self._check_write(offset, length)
        chunk = 1 << 20
        pos = offset
        while pos < offset + length:
            n = min(chunk, offset + length - pos)
            self.write(pos, _ZEROS[:n])
            pos += n

    def _check_write(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnlyImage(self.path, f"{self.format_name} image is open read-only")
        self._check_range(offset, length)

    def flush(self) -> None:
        """Write cached metadata and push everything to stable storage."""
        for f in self.files:
            if f.writable and not f.closed:
                f.flush()

    def _finish(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Write the metadata a writable image keeps in memory (tables, footers); called on close."""

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Finish, flush and close; a newly created image appears under its final name now."""
        if self.closed:
            return
        try:
            if self.writable:
                self._finish()
                self.flush()
            if self._outputs is not None:
                self._outputs.commit()
        except BaseException:
            self.abort()
            raise
        self._close_files()

    def abort(self) -> None:
        """Abandon a newly created image: its temporary files are deleted.  Others are just closed."""
        if self.closed:
            return
        if self._outputs is not None:
            self._outputs.abort()
        self._close_files()

    def _close_files(self) -> None:
        self.closed = True
        for f in self.files:
            f.close()
        if self.backing is not None:
            self.backing.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self._outputs is not None:
            self.abort()
        else:
            self.close()

    # ------------------------------------------------------------ description

    def chain(self) -> list[DiskImage]:
        """This image followed by its backing images, top first."""
        images: list[DiskImage] = []
        image: DiskImage | None = self
        while image is not None:
            images.append(image)
            image = image.backing
        return images

    @property
    def actual_size(self) -> int:
        """Bytes this layer's files occupy on disk."""
        return sum(f.allocated_bytes() for f in self.files if not f.closed)

    def _details(self) -> dict[str, Any]:
        """Format-specific fields for ``info`` (cluster size, creator application…)."""
        return {}

    def info(self) -> ImageInfo:
        """A description of the image and its chain."""
        return ImageInfo(
            filename=str(self.path),
            format=self.format_name,
            subformat=self.subformat,
            virtual_size=self.virtual_size,
            actual_size=self.actual_size,
            backing=[
                {
                    "filename": str(img.path),
                    "format": img.format_name,
                    **({"reference": ref} if (ref := above.backing_reference) else {}),
                }
                for above, img in zip(self.chain(), self.chain()[1:], strict=False)
            ],
            files=[str(f.display_path) for f in self.files],
            details=self._details(),
        )

    @abc.abstractmethod
    def check(self) -> CheckResult:
        """Check this layer's metadata; never raises for corruption, reports it."""

    def _new_check_result(self) -> CheckResult:
        """An empty report for this layer (``check`` is imported by checks only, not by every conversion)."""
        from polyvisor.disk.check import CheckResult

        return CheckResult(filename=str(self.path), format=self.format_name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} {self.subformat} {self.virtual_size} bytes>"
