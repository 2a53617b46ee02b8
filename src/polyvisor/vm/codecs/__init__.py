"""The VM codec registry: find a codec by name or by probing a package, read and write packages.

Codec modules live in this package, one per package type; each registers
its :class:`~polyvisor.vm.codecs.codec.Codec` subclass with
:func:`register_codec` when imported.  The registry imports them all the
first time a codec is needed.  To add a codec, add a module here::

    @register_codec
    class XlCodec(Codec):
        name = "xl"
        description = "Xen xl.cfg"
        suffixes = (".cfg",)
        disk_formats = (("raw", None), ("qcow2", None))
        lossy = frozenset({"uuid"})
        target = "xen-pv"
        ...probe / read / write...

and add models it can express to the contract test corpus if they are new.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from polyvisor.errors import PackageError, UnknownCodec
from polyvisor.vm.codecs.codec import Codec, DiskSource, OutputFiles, ReadOptions, VmPackage, drop_fields
from polyvisor.vm.model import VmModel

C = TypeVar("C", bound=type[Codec])

_CODECS: dict[str, type[Codec]] = {}
_loaded = False

PROBE_HEAD = 64 << 10


def register_codec(cls: C) -> C:
    """Class decorator: make a codec available by its ``name``."""
    if cls.name in _CODECS and _CODECS[cls.name] is not cls:
        raise RuntimeError(f"VM codec {cls.name!r} registered twice")
    _CODECS[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded  # noqa: PLW0603 - one-time import of the plug-in modules
    if _loaded:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "codec":
            importlib.import_module(f"{__name__}.{module.name}")
    _loaded = True


def registered_codecs() -> dict[str, type[Codec]]:
    """Every registered codec by name, alphabetically."""
    _load()
    return dict(sorted(_CODECS.items()))


def get_codec(name: str) -> type[Codec]:
    """The codec called *name*."""
    _load()
    try:
        return _CODECS[name.lower()]
    except KeyError:
        raise UnknownCodec(f"unknown VM codec {name!r} (known: {', '.join(registered_codecs())})") from None


def probe_codec(path: str | os.PathLike[str]) -> type[Codec]:
    """The codec of the package at *path* (a file or a directory): the most confident probe wins."""
    path = Path(path)
    head = b""
    if path.is_file():
        try:
            with open(path, "rb") as handle:
                head = handle.read(PROBE_HEAD)
        except OSError as exc:
            raise PackageError(f"cannot read: {exc.strerror or exc}", path=path) from None
    elif not path.is_dir():
        raise PackageError("no such file or directory", path=path)
    best: type[Codec] | None = None
    best_score = 0
    for codec in registered_codecs().values():
        if not codec.can_read:
            continue
        score = codec.probe(path, head)
        if score > best_score:
            best, best_score = codec, score
    if best is None:
        raise UnknownCodec(f"not a VM package polyvisor knows (codecs: {', '.join(registered_codecs())})",
                           path=path)
    return best


def read_package(path: str | os.PathLike[str], codec: str | None = None,
                 options: ReadOptions | None = None) -> VmPackage:
    """Read a VM package; the codec is probed unless named."""
    cls = get_codec(codec) if codec else probe_codec(path)
    return cls.read(Path(path), options or ReadOptions())


def write_package(model: VmModel, codec: str, outdir: str | os.PathLike[str],
                  disk_paths: Mapping[str, str | os.PathLike[str]] | None = None) -> list[Path]:
    """Write *model* with codec *codec* into *outdir* (created if missing)."""
    cls = get_codec(codec)
    if not cls.can_write:
        raise UnknownCodec(f"codec {cls.name} cannot write packages")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    model.validate()
    return cls.write(model, out, {k: Path(v) for k, v in (disk_paths or {}).items()})


__all__ = [
    "Codec",
    "DiskSource",
    "OutputFiles",
    "ReadOptions",
    "VmPackage",
    "drop_fields",
    "get_codec",
    "probe_codec",
    "read_package",
    "register_codec",
    "registered_codecs",
    "write_package",
]
