"""Declarative on-disk structures: a typed record beside its ``struct`` layout.

A format module declares each structure once::

    @record(slots=True)
    class Footer:
        cookie: bytes
        features: int
        ...

    FOOTER = Layout(Footer, ">8sII...", "VHD footer")

and gets ``FOOTER.unpack(buf)``, ``FOOTER.read(file, offset)`` and
``FOOTER.pack(footer)`` with the field list checked against the format string
when the module is imported.
"""

from __future__ import annotations

import struct
from typing import Any, Generic, TypeVar

from polyvisor import records
from polyvisor.disk.fileio import ImageFile
from polyvisor.errors import TruncatedImage

T = TypeVar("T")


class Layout(Generic[T]):
    """The binary layout of record *cls*, field by field, as a ``struct`` format."""

    def __init__(self, cls: type[T], fmt: str, name: str) -> None:
        self.cls = cls
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.name = name
        fields = records.fields(cls)
        self.field_names = tuple(f.name for f in fields)
        probe = self.struct.unpack(bytes(self.size))
        if len(fields) != len(probe):
            raise TypeError(f"{name}: {cls.__name__} has {len(fields)} fields, format {fmt!r} has {len(probe)}")

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0) -> T:
        """Decode one structure from *data* at *offset* (the caller checked the length)."""
        return self.cls(*self.struct.unpack_from(data, offset))

    def read(self, file: ImageFile, offset: int) -> T:
        """Read and decode one structure at *offset* of *file*."""
        data = file.read(offset, self.size, self.name)
        return self.unpack(data)

    def unpack_checked(self, data: bytes | bytearray | memoryview, offset: int, path: Any) -> T:
        """Decode at *offset* of an in-memory buffer, raising :class:`TruncatedImage` if it is short."""
        if offset < 0 or offset + self.size > len(data):
            raise TruncatedImage(path, f"needs {self.size} bytes, buffer holds {len(data) - offset}",
                                 structure=self.name, offset=offset)
        return self.unpack(data, offset)

    def pack(self, value: T) -> bytes:
        """Encode *value* to exactly :attr:`size` bytes."""
        return self.struct.pack(*(getattr(value, name) for name in self.field_names))


def align_up(value: int, alignment: int) -> int:
    """Round *value* up to a multiple of *alignment*."""
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    """Round *value* down to a multiple of *alignment*."""
    return value - value % alignment


def is_power_of_two(value: int) -> bool:
    """True for 1, 2, 4, 8…"""
    return value > 0 and value & (value - 1) == 0
