"""polyvisor's one exception tree.

Every error polyvisor raises on purpose is a :class:`PolyvisorError`; anything
else escaping the library is a bug.  The CLI prints ``str(error)`` on one line
of stderr and exits non-zero.

::

    PolyvisorError
    ├── UsageError                 bad arguments or options from the caller
    │   └── UnsupportedOption      an option a format/codec does not accept
    ├── ImageError                 a problem with one image file (names file, structure, offset)
    │   ├── UnknownFormat          no format recognised / no such format name
    │   ├── CorruptImage           the file breaks its format's rules
    │   │   ├── TruncatedImage     a structure extends past the end of the file
    │   │   ├── ChecksumMismatch   a stored checksum does not match the bytes
    │   │   └── LimitExceeded      a field asks for more than polyvisor will allocate or follow
    │   ├── UnsupportedFeature     valid for the format, not supported by polyvisor (e.g. encryption)
    │   ├── ReadOnlyImage          a write to an image opened (or only openable) read-only
    │   └── ReferenceError_        base for references from one file to another
    │       ├── UnsafeReference    a backing/extent/parent path leaving the image's directory
    │       ├── MissingReference   the referenced file does not exist
    │       └── BackingChainError  loops or over-deep backing chains
    ├── OperationFailed            an operation ran but could not complete (I/O, compare of unequal sizes…)
    ├── VmError                    a problem with a VM description or package (names file, where, what is wrong)
    │   ├── InvalidModel           a VM model (JSON or built in code) breaks the model's rules
    │   ├── UnknownCodec           no codec recognises a package / no codec has that name
    │   ├── PackageError           a VM package (descriptor, OVA, .vmx, domain XML) is malformed
    │   │   ├── UnsafePackage      hostile content: entity tricks, unsafe tar members, paths leaving the package
    │   │   ├── ManifestMismatch   a manifest digest differs, or the manifest misses or adds a file
    │   │   └── DescriptorTooLarge a descriptor or member over polyvisor's size limit
    │   └── UnmappableModel        a codec cannot express the model (e.g. a raw disk in OVF), on write
    └── HypervisorError            a hypervisor or its driver refused or failed an operation (names driver, VM)
        ├── UnsupportedOperation   the driver does not declare that capability
        ├── ConnectionFailed       the hypervisor could not be reached or the URI is malformed
        ├── UnknownDriver          no driver handles a URI
        ├── VmNotFound             no VM of that name on that hypervisor
        ├── VmExists               defining a VM whose name is taken
        ├── InvalidState           the operation does not apply in the VM's current state
        ├── SnapshotNotFound       no snapshot of that name
        ├── OperationTimeout       the hypervisor did not finish in the time allowed
        └── MigrationFailed        a migration failed (and was rolled back where possible)

``ReferenceError_`` carries a trailing underscore so as not to shadow the
builtin :class:`ReferenceError`.
"""

from __future__ import annotations

import os


class PolyvisorError(Exception):
    """Root of every error polyvisor raises deliberately."""


class UsageError(PolyvisorError):
    """The caller asked for something malformed (bad size, unknown option value…)."""


class UnsupportedOption(UsageError):
    """An option the chosen format or codec does not accept."""


class OperationFailed(PolyvisorError):
    """An operation started but could not be completed."""


class ImageError(PolyvisorError):
    """A problem tied to one image file.

    The message reads ``FILE: STRUCTURE at offset N: what is wrong`` so that a
    user can find the bad bytes with a hex editor.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str,
        *,
        structure: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.structure = structure
        self.offset = offset
        self.reason = message
        where = self.path
        if structure is not None:
            where += f": {structure}"
        if offset is not None:
            where += f" at offset {offset}"
            if offset > 0xFFFF:
                where += f" ({offset:#x})"
        super().__init__(f"{where}: {message}")


class UnknownFormat(ImageError):
    """The file matches no known format, or the format name is unknown."""


class CorruptImage(ImageError):
    """The file violates its format's specification."""


class TruncatedImage(CorruptImage):
    """A structure extends past the end of the file."""


class ChecksumMismatch(CorruptImage):
    """A stored checksum does not match the data it covers."""


class LimitExceeded(CorruptImage):
    """A field asks for more memory, depth or size than polyvisor allows."""


class UnsupportedFeature(ImageError):
    """A valid feature of the format that polyvisor does not implement."""


class ReadOnlyImage(ImageError):
    """A write was attempted on an image that is not writable."""


class ReferenceError_(ImageError):  # noqa: N801 - trailing underscore avoids the builtin
    """Base for problems following a reference from one image file to another."""


class UnsafeReference(ReferenceError_):
    """A referenced path leaves the image's own directory and the user did not allow it."""


class MissingReference(ReferenceError_):
    """A referenced file (backing file, extent, parent) does not exist."""


class BackingChainError(ReferenceError_):
    """A backing chain loops or is deeper than allowed."""


class VmError(PolyvisorError):
    """A problem with a VM description or a VM package.

    The message reads ``FILE: WHERE: what is wrong`` (each part only when
    known), e.g. ``vm.ova: member '../evil': path leaves the package``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        where: str | None = None,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.where = where
        self.reason = message
        prefix = ""
        if self.path is not None:
            prefix += f"{self.path}: "
        if where is not None:
            prefix += f"{where}: "
        super().__init__(f"{prefix}{message}")


class InvalidModel(VmError):
    """A VM model breaks the model's rules (bad JSON, wrong type, inconsistent fields)."""


class UnknownCodec(VmError):
    """No codec recognises the package, or no codec has the given name."""


class PackageError(VmError):
    """A VM package is malformed (descriptor syntax, missing references, bad values)."""


class UnsafePackage(PackageError):
    """A package tries something hostile: XML entity tricks, unsafe tar members, paths leaving the package."""


class ManifestMismatch(PackageError):
    """A manifest digest does not match a file, or the manifest misses or names extra files."""


class DescriptorTooLarge(PackageError):
    """A descriptor (or another member read into memory) is larger than polyvisor's limit."""


class UnmappableModel(VmError):
    """A codec cannot express part of the model it was asked to write."""


class HypervisorError(PolyvisorError):
    """A hypervisor, or polyvisor's driver for it, refused or failed an operation.

    The message reads ``DRIVER: VM: what went wrong`` when a VM is concerned.
    """

    def __init__(self, driver: str, message: str, *, vm: str | None = None) -> None:
        self.driver = driver
        self.vm = vm
        self.reason = message
        where = driver if vm is None else f"{driver}: {vm}"
        super().__init__(f"{where}: {message}")


class UnsupportedOperation(HypervisorError):
    """The driver does not declare the capability an operation needs."""

    def __init__(self, driver: str, operation: str, *, vm: str | None = None) -> None:
        self.operation = operation
        super().__init__(driver, f"the {driver} driver does not support {operation!r}", vm=vm)


class ConnectionFailed(HypervisorError):
    """The hypervisor could not be reached, or the connection URI is malformed."""


class UnknownDriver(HypervisorError):
    """No registered driver handles a connection URI."""


class VmNotFound(HypervisorError):
    """No VM of that name exists on the hypervisor."""


class VmExists(HypervisorError):
    """A VM of that name already exists."""


class InvalidState(HypervisorError):
    """The operation does not apply in the VM's current state (e.g. pause a stopped VM)."""


class SnapshotNotFound(HypervisorError):
    """No snapshot of that name exists for the VM."""


class OperationTimeout(HypervisorError):
    """The hypervisor did not complete the operation in the time allowed."""


class MigrationFailed(HypervisorError):
    """A migration failed; the source VM was left (or put back) running where possible."""
