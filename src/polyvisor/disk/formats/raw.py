"""raw: the guest bytes, one for one, in a (usually sparse) file.

There is no metadata, so a raw file is never probed: it is what a file is when
no other format's probe claims it, or when ``-f raw`` says so.  Holes found
with ``SEEK_DATA``/``SEEK_HOLE`` (lseek(2)) are reported as zero extents, so
conversions skip them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Self

from polyvisor.disk.fileio import ImageFile, OutputFiles
from polyvisor.disk.image import DiskImage, ProbeSample, Run, file_run
from polyvisor.disk.registry import register_format

if TYPE_CHECKING:
    from polyvisor.disk.check import CheckResult
    from polyvisor.disk.registry import CreateOptions, Opener


@register_format
class RawImage(DiskImage):
    """A raw disk image file (or block device)."""

    format_name = "raw"

    @classmethod
    def probe(cls, sample: ProbeSample) -> int:
        """Raw is the fallback, never a probe result."""
        return 0

    @classmethod
    def open(cls, path: Path, *, writable: bool, opener: Opener) -> Self:
        """Open a raw file; its size is the virtual size."""
        file = ImageFile.open(path, writable=writable)
        size = os.lseek(file.fd, 0, os.SEEK_END)
        return cls(path, virtual_size=size, subformat="raw", files=[file], writable=writable)

    @classmethod
    def create(cls, path: Path, size: int, options: CreateOptions, opener: Opener,
               backing: DiskImage | None) -> Self:
        """A sparse file of *size* bytes."""
        outputs = OutputFiles()
        try:
            file = outputs.create(path)
            file.truncate(size)
            return cls(path, virtual_size=size, subformat="raw", files=[file], writable=True, outputs=outputs)
        except BaseException:
            outputs.abort()
            raise

    @property
    def _file(self) -> ImageFile:
        return self.files[0]

    def _map(self, offset: int, length: int) -> Iterator[Run]:
        yield file_run(self._file, offset, length, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes in place."""
        self._check_write(offset, len(data))
        self._file.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range; past the current end of a sparse file nothing needs writing."""
        self._check_write(offset, length)
        file_end = self._file.size
        if offset >= file_end:
            return
        super().write_zeroes(offset, min(length, file_end - offset))

    def check(self) -> CheckResult:
        """Raw files have no metadata to be inconsistent."""
        return self._new_check_result()
