"""The codec protocol: one class per VM package type, reading and writing :class:`VmModel`.

A codec subclasses :class:`Codec`, fills in its class attributes (name,
suffixes, what it can do, native disk formats, the model fields it cannot
keep) and implements :meth:`Codec.probe`, :meth:`Codec.read` and
:meth:`Codec.write`.  It registers itself with
:func:`polyvisor.vm.codecs.register_codec` when its module is imported; the
registry imports every module of :mod:`polyvisor.vm.codecs` the first time a
codec is needed, so adding a codec is adding a module.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from polyvisor.disk.paths import DEFAULT_POLICY, ReferencePolicy
from polyvisor.errors import ManifestMismatch, PackageError, UnmappableModel, UsageError
from polyvisor.vm.model import Bus, Controller, ControllerModel, Cpu, DeviceKind, VmModel
from polyvisor.vm.safety import MAX_DESCRIPTOR

COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """``length`` bytes of a raw disk at guest offset ``offset``, stored at ``file_offset`` of the package file;
    ``digest`` is the package's ``(algorithm, hex digest)`` of those bytes (an XVA chunk and its checksum)."""

    offset: int
    file_offset: int
    length: int
    digest: tuple[str, str] | None = None


@dataclass(frozen=True)
class DiskSource:
    """Where the bytes of one of a package's disk images are on the host.

    For a directory package the image is the whole file ``path``; for an OVA it
    is ``size`` bytes at ``offset`` inside the archive.  ``digest`` is the
    manifest's ``(algorithm, hex digest)`` when the package had one (verified).
    For an XVA the image is a raw disk of ``size`` bytes assembled from
    ``pieces`` of the archive (zeros between them).
    """

    path: Path
    offset: int = 0
    size: int | None = None
    digest: tuple[str, str] | None = None
    pieces: tuple[Piece, ...] | None = None

    @property
    def is_member(self) -> bool:
        """True when the image is a slice of a larger file (an OVA member): extract it before opening."""
        return self.size is not None

    def open_stream(self) -> Iterator[bytes]:
        """The image's bytes, in chunks of at most 1 MiB."""
        if self.pieces is not None:
            yield from self._assembled()
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            remaining = self.size
            while remaining is None or remaining > 0:
                want = COPY_CHUNK if remaining is None else min(COPY_CHUNK, remaining)
                chunk = handle.read(want)
                if not chunk:
                    if remaining:
                        raise PackageError(f"ends {remaining} bytes early", path=self.path)
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def _assembled(self) -> Iterator[bytes]:
        assert self.pieces is not None
        assert self.size is not None
        position = 0
        with open(self.path, "rb") as handle:
            for piece in self.pieces:
                while position < piece.offset:
                    step = min(COPY_CHUNK, piece.offset - position)
                    yield bytes(step)
                    position += step
                yield read_piece(handle, piece, self.path)
                position += piece.length
        while position < self.size:
            step = min(COPY_CHUNK, self.size - position)
            yield bytes(step)
            position += step


def read_piece(handle: IO[bytes], piece: Piece, path: Path) -> bytes:
    """The bytes of *piece* from the open package file, re-checked against its digest."""
    handle.seek(piece.file_offset)
    data = handle.read(piece.length)
    if len(data) != piece.length:
        raise PackageError(f"ends inside the piece at offset {piece.file_offset}", path=path)
    if piece.digest is not None and _piece_digest(piece.digest[0], data) != piece.digest[1]:
        raise ManifestMismatch(f"the {piece.digest[0]} checksum of the data at offset {piece.file_offset} "
                               "changed after it was verified", path=path)
    return data


def _piece_digest(algorithm: str, data: bytes) -> str:
    if algorithm == "xxh64":
        try:
            import xxhash
        except ImportError:  # the checksums of newer XenServer exports (PyPI package xxhash)
            raise PackageError("verifying .xxhash (XXH64) checksums needs the Python package xxhash") from None

        return f"{xxhash.xxh64_intdigest(data):016X}"
    return hashlib.new(algorithm, data).hexdigest()


@dataclass(frozen=True)
class ReadOptions:
    """How a codec reads a package.

    ``policy`` says where disk references may lead (by default only inside
    the package directory).  With ``require_disks`` False, missing disk files
    are accepted (to inspect a descriptor alone).
    """

    policy: ReferencePolicy = DEFAULT_POLICY
    require_disks: bool = True
    max_descriptor: int = MAX_DESCRIPTOR


@dataclass
class VmPackage:
    """A package read from disk: the model and the images its disks reference."""

    model: VmModel
    codec: str
    source: Path
    disks: dict[str, DiskSource] = field(default_factory=dict)  #: by ``Disk.path``

    def extract(self, dest: Path) -> dict[str, Path]:
        """Copy every disk image into *dest* (a directory the caller controls), streaming and re-checking
        manifest digests; returns ``Disk.path -> file``.  Nothing is left behind on failure."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        out: dict[str, Path] = {}
        with OutputFiles(dest) as files:
            for name, src in sorted(self.disks.items()):
                if src.pieces is not None:
                    with files.open(name) as handle, open(src.path, "rb") as archive:
                        assert src.size is not None
                        for piece in src.pieces:  # written sparse: holes stay holes
                            handle.seek(piece.offset)
                            handle.write(read_piece(archive, piece, src.path))
                        handle.truncate(src.size)
                    out[name] = dest / name
                    continue
                with files.open(name) as handle:
                    hasher = hashlib.new(src.digest[0]) if src.digest else None
                    for chunk in src.open_stream():
                        if hasher is not None:
                            hasher.update(chunk)
                        handle.write(chunk)
                if hasher is not None and src.digest is not None and hasher.hexdigest() != src.digest[1]:
                    raise ManifestMismatch(f"{name}: digest changed while extracting", path=src.path)
                out[name] = dest / name
        return out


class OutputFiles:
    """Files of one package written under temporary names, renamed into place only when all succeeded."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = Path(outdir)
        self.pending: list[tuple[Path, Path]] = []
        self.done: list[Path] = []

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def target(self, name: str) -> Path:
        """The final path of package member *name* (a relative POSIX path)."""
        path = self.outdir / name
        if self.outdir.resolve() not in path.resolve().parents:
            raise UsageError(f"{name!r} would be written outside {self.outdir}")
        return path

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file to write member *name* into."""
        final = self.target(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
        self.pending.append((Path(tmp), final))
        with os.fdopen(fd, "wb") as handle:
            yield handle

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write member *name* with *data*."""
        with self.open(name) as handle:
            handle.write(data)

    def copy(self, name: str, source: Path) -> None:
        """Write member *name* as a streamed copy of *source* (skipped when it already is that file)."""
        final = self.target(name)
        if final.exists() and final.resolve() == Path(source).resolve():
            return
        with open(source, "rb") as src, self.open(name) as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)

    def commit(self) -> None:
        """Rename every temporary file into place."""
        for tmp, final in self.pending:
            os.replace(tmp, final)
            self.done.append(final)
        self.pending.clear()

    def abort(self) -> None:
        """Remove every temporary file."""
        for tmp, _ in self.pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.pending.clear()

    @property
    def names(self) -> list[Path]:
        """Final paths of the files written (committed or pending)."""
        return self.done + [final for _, final in self.pending]


class Codec(abc.ABC):
    """A VM package type.  Subclasses set the class attributes and implement the three class methods."""

    #: Short name (``libvirt``, ``ovf``, ``ova``, ``vmx``).
    name: ClassVar[str]
    #: One line for ``polyvisor vm codecs``.
    description: ClassVar[str]
    #: File suffixes (lower case, with the dot) a package of this type has.
    suffixes: ClassVar[tuple[str, ...]] = ()
    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = True
    #: Native (format, subformat) pairs for disk images, preferred first; v2v converts disks to the first.
    disk_formats: ClassVar[tuple[tuple[str, str | None], ...]] = ()
    #: Model fields a write/read round trip does not keep (``graphics``, ``disks.boot_order``, ``nics.mac``…).
    lossy: ClassVar[frozenset[str]] = frozenset()
    #: The :data:`polyvisor.vm.mapping.TARGETS` entry describing the hypervisor this codec feeds.
    target: ClassVar[str] = "kvm"

    @classmethod
    @abc.abstractmethod
    def probe(cls, path: Path, head: bytes) -> int:
        """How sure (0-100) the codec is that *path* (first bytes *head*; empty for directories) is its own."""

    @classmethod
    @abc.abstractmethod
    def read(cls, path: Path, options: ReadOptions) -> VmPackage:
        """Read the package at *path*; refuse anything unsafe before writing or extracting anything."""

    @classmethod
    @abc.abstractmethod
    def write(cls, model: VmModel, outdir: Path, disk_paths: Mapping[str, Path]) -> list[Path]:
        """Write *model* as a package in *outdir*; *disk_paths* maps each ``Disk.path`` to the image to
        include (already in one of :attr:`disk_formats`).  Returns the files written."""

    @classmethod
    def supports_format(cls, fmt: str | None, subformat: str | None) -> bool:
        """Whether a disk image of this format can go into the package."""
        return fmt is None or any(f == fmt and (s is None or s == subformat or subformat is None)
                                  for f, s in cls.disk_formats)

    @classmethod
    def check_disks(cls, model: VmModel, disk_paths: Mapping[str, Path]) -> None:
        """Raise unless every image the model names is given and in a format the package can carry."""
        for disk in model.disks:
            if disk.path is None:
                continue
            if disk.path not in disk_paths:
                raise UsageError(f"no file given for disk image {disk.path!r}")
            if not cls.supports_format(disk.format, disk.subformat):
                native = ", ".join(f"{f}{'/' + s if s else ''}" for f, s in cls.disk_formats)
                raise UnmappableModel(
                    f"{cls.name} packages carry {native} images, not {disk.format}"
                    f"{'/' + disk.subformat if disk.subformat else ''} ({disk.path}); convert it first"
                )


# ------------------------------------------------------------------ comparing through lossy codecs


def drop_fields(model: VmModel, paths: frozenset[str] | set[str]) -> VmModel:
    """*model* with every field named in *paths* reset to its default, to compare models through a lossy
    codec: ``disks.capacity`` resets every disk's capacity; ``cpu.threads`` folds threads into cores (the
    vCPU count stays); ``cpu.topology`` keeps only the vCPU count (as cores of one socket);
    ``disks.removable`` drops CD-ROM and floppy drives; ``disks.address`` puts every disk, in order, on one
    NVMe controller (for packages that list disks without saying where they sit); ``vendor`` drops all vendor
    keys."""
    result = model
    for path in sorted(paths, key=lambda p: (p != "disks.removable", p)):
        head, _, rest = path.partition(".")
        changes: dict[str, Any] = {}
        if path == "cpu.threads":
            cpu = result.cpu
            changes["cpu"] = Cpu(cpu.sockets, cpu.cores * cpu.threads, 1)
        elif path == "cpu.topology":
            changes["cpu"] = Cpu(1, result.cpu.count, 1)
        elif path == "disks.removable":
            kept = tuple(d for d in result.disks if d.device == DeviceKind.DISK)
            used = {(d.bus, d.controller) for d in kept}
            changes["disks"] = kept
            changes["controllers"] = tuple(c for c in result.controllers if (c.bus, c.index) in used)
        elif path == "disks.address":
            changes["disks"] = tuple(dataclasses.replace(d, bus=Bus.NVME, controller=0, unit=i)
                                     for i, d in enumerate(result.disks))
            changes["controllers"] = (Controller(ControllerModel.NVME, 0),) if result.disks else ()
        elif not rest:
            changes[head] = _field_default(VmModel, head)
        else:
            current = getattr(result, head)
            if isinstance(current, tuple):
                changes[head] = tuple(_reset(item, rest) for item in current)
            else:
                changes[head] = _reset(current, rest)
        result = dataclasses.replace(result, **changes)
    return result


def _reset(item: Any, name: str) -> Any:
    return dataclasses.replace(item, **{name: _field_default(type(item), name)})


def _field_default(cls: type[Any], name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__}.{name} has no default")


__all__ = ["Codec", "DiskSource", "OutputFiles", "Piece", "ReadOptions", "VmPackage", "drop_fields", "read_piece"]
