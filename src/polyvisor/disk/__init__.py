"""Portable disks: read, write, convert, check and compare raw, qcow2, VMDK, VHD, VHDX and VDI.

>>> from polyvisor.disk import open_image
>>> with open_image("disk.vmdk") as image:          # doctest: +SKIP
...     first_sector = image.read(0, 512)

The names below are imported from their modules on first use, so that a command
needing one module (``disk convert``) does not pay for importing the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives.
_EXPORTS = {
    "polyvisor.disk.check": ("CheckProblem", "CheckResult", "ProblemKind", "check_image"),
    "polyvisor.disk.image": ("DiskImage", "Extent", "ExtentKind", "ImageInfo"),
    "polyvisor.disk.paths": ("DEFAULT_POLICY", "ReferencePolicy"),
    "polyvisor.disk.registry": ("CreateOptions", "create_image", "get_format", "open_image", "parse_size",
                                "probe_format", "register_format", "registered_formats"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

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


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'polyvisor.disk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
