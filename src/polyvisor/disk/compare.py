"""Guest-visible comparison of two images (``polyvisor disk compare``).

As ``qemu-img compare`` without ``-s``: images of different virtual sizes are
identical when their common part is, and the larger one holds only zeros
beyond it.  Ranges that read as zeros in both (per the chain-resolved maps)
are not read at all, so sparse terabyte images compare in moments.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from polyvisor.disk.fileio import io_buffer
from polyvisor.disk.image import DiskImage, Extent, ExtentKind, is_zero, same_bytes
from polyvisor.disk.paths import DEFAULT_POLICY, ReferencePolicy
from polyvisor.disk.registry import open_image
from polyvisor.records import record

CHUNK = 4 << 20


@record(frozen=True)
class CompareResult:
    """The outcome: identical, or where the first difference is."""

    identical: bool
    first_difference: int | None = None
    size_a: int = 0
    size_b: int = 0

    def __str__(self) -> str:
        if self.identical:
            note = " (sizes differ; the larger one is zero beyond the smaller)" if self.size_a != self.size_b else ""
            return f"Images are identical{note}."
        return f"Content mismatch at offset {self.first_difference}!"


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    a_format: str | None = None,
    b_format: str | None = None,
    *,
    policy: ReferencePolicy = DEFAULT_POLICY,
) -> CompareResult:
    """Compare the guest-visible contents of the images at *a* and *b*."""
    with open_image(a, a_format, policy=policy) as image_a, open_image(b, b_format, policy=policy) as image_b:
        return compare_images(image_a, image_b)


def compare_images(a: DiskImage, b: DiskImage) -> CompareResult:
    """Compare two open images."""
    common = min(a.virtual_size, b.virtual_size)
    diff = _first_difference(a, b, common)
    if diff is None:
        larger = a if a.virtual_size > b.virtual_size else b
        diff = _first_nonzero(larger, common, larger.virtual_size - common)
    return CompareResult(diff is None, diff, a.virtual_size, b.virtual_size)


def _segments(a: Iterator[Extent], b: Iterator[Extent]) -> Iterator[tuple[int, int, bool, bool]]:
    """Walk two maps of the same range together: (start, end, a has data, b has data)."""
    ea, eb = next(a, None), next(b, None)
    while ea is not None and eb is not None:
        start = max(ea.offset, eb.offset)
        end = min(ea.end, eb.end)
        yield start, end, ea.kind is ExtentKind.DATA, eb.kind is ExtentKind.DATA
        if ea.end == end:
            ea = next(a, None)
        if eb.end == end:
            eb = next(b, None)


def _first_difference(a: DiskImage, b: DiskImage, length: int) -> int | None:
    buf_a, buf_b = io_buffer(CHUNK), io_buffer(CHUNK)
    for start, end, a_data, b_data in _segments(a.map(0, length), b.map(0, length)):
        if not a_data and not b_data:
            continue
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            view_a, view_b = memoryview(buf_a)[:n], memoryview(buf_b)[:n]
            if a_data and b_data:
                a.readinto(pos, view_a)
                b.readinto(pos, view_b)
                if not same_bytes(view_a, view_b):
                    return pos + _mismatch(view_a, view_b)
            else:
                only = a if a_data else b
                view = view_a
                only.readinto(pos, view)
                if not is_zero(view):
                    return pos + _mismatch(view, memoryview(bytes(n)))
            pos += n
    return None


def _first_nonzero(image: DiskImage, offset: int, length: int) -> int | None:
    if length <= 0:
        return None
    buf = io_buffer(CHUNK)
    for ext in image.map(offset, length):
        if ext.kind is not ExtentKind.DATA:
            continue
        pos = ext.offset
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            view = memoryview(buf)[:n]
            image.readinto(pos, view)
            if not is_zero(view):
                return pos + _mismatch(view, memoryview(bytes(n)))
            pos += n
    return None


def _mismatch(x: memoryview, y: memoryview) -> int:
    """Index of the first differing byte of two equal-length views that differ."""
    lo, hi = 0, len(x)
    while hi - lo > 4096:  # bisect on memcmp, then scan the last page
        mid = (lo + hi) // 2
        if not same_bytes(x[lo:mid], y[lo:mid]):
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if x[i] != y[i]:
            return i
    return hi
