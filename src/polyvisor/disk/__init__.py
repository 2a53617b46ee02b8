"""Portable disks: read, write, convert, check and compare raw, qcow2, VMDK, VHD, VHDX and VDI.

>>> from polyvisor.disk import open_image
>>> with open_image("disk.vmdk") as image:          # doctest: +SKIP
...     first_sector = image.read(0, 512)
"""

from polyvisor.disk.check import CheckProblem, CheckResult, ProblemKind, check_image
from polyvisor.disk.image import DiskImage, Extent, ExtentKind, ImageInfo
from polyvisor.disk.paths import DEFAULT_POLICY, ReferencePolicy
from polyvisor.disk.registry import (
    CreateOptions,
    create_image,
    get_format,
    open_image,
    parse_size,
    probe_format,
    register_format,
    registered_formats,
)

__all__ = [
    "DEFAULT_POLICY",
    "CheckProblem",
    "CheckResult",
    "CreateOptions",
    "DiskImage",
    "Extent",
    "ExtentKind",
    "ImageInfo",
    "ProblemKind",
    "ReferencePolicy",
    "check_image",
    "create_image",
    "get_format",
    "open_image",
    "parse_size",
    "probe_format",
    "register_format",
    "registered_formats",
]
