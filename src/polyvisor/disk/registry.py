"""The format registry, ``open_image`` and ``create_image``.

Format modules live in :mod:`polyvisor.disk.formats`, one per format; each
registers its :class:`~polyvisor.disk.image.DiskImage` subclass with
:func:`register_format` when imported.  The registry imports them all the first
time a format is needed, so adding a format is adding a module.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from polyvisor import records
from polyvisor.disk.fileio import DURABLE_OUTPUTS, ImageFile
from polyvisor.disk.image import DiskImage, ProbeSample
from polyvisor.disk.paths import DEFAULT_POLICY, ChainGuard, ReferencePolicy, resolve_reference
from polyvisor.errors import UnknownFormat, UnsupportedOption, UsageError
from polyvisor.records import fields, record

D = TypeVar("D", bound=type[DiskImage])

_FORMATS: dict[str, type[DiskImage]] = {}
_ALIASES: dict[str, str] = {}
_loaded = False

PROBE_HEAD = 64 << 10
PROBE_TAIL = 512


def register_format(cls: D) -> D:
    """Class decorator: make a :class:`DiskImage` subclass available by its ``format_name``."""
    name = cls.format_name
    if name in _FORMATS and _FORMATS[name] is not cls:
        raise RuntimeError(f"disk format {name!r} registered twice")
    _FORMATS[name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = name
    return cls


def _load_formats() -> None:
    global _loaded  # noqa: PLW0603 - one-time import of the plug-in modules
    if _loaded:
        return
    import pkgutil  # only listing or probing loads every format: conversions naming theirs skip it

    import polyvisor.disk.formats as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _loaded = True


def registered_formats() -> dict[str, type[DiskImage]]:
    """Every registered format by name, in a stable order (raw first, then alphabetical)."""
    _load_formats()
    return dict(sorted(_FORMATS.items(), key=lambda item: (item[0] != "raw", item[0])))


def _load_format_module(key: str) -> None:
    """Import just the module named after a format (``formats/qcow2.py`` for qcow2), if there is one."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", key):
        return
    module = f"polyvisor.disk.formats.{key}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise


def get_format(name: str) -> type[DiskImage]:
    """The format class called *name* (or one of its aliases, e.g. ``vpc`` for ``vhd``).

    A format named explicitly loads only its own module; other names (aliases) load them all.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _FORMATS:
        _load_format_module(key)
    if key not in _FORMATS:
        _load_formats()
        key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _FORMATS[key]
    except KeyError:
        known = ", ".join(registered_formats())
        raise UnknownFormat(name, f"unknown disk format (known: {known})") from None


# ------------------------------------------------------------------ probing


def probe_sample(file: ImageFile) -> ProbeSample:
    """Read what probes look at from an open file."""
    size = file.size
    head = file.read_upto(0, PROBE_HEAD)
    tail = file.read_upto(max(0, size - PROBE_TAIL), min(size, PROBE_TAIL))
    return ProbeSample(path=file.path, size=size, head=head, tail=tail)


def probe_format(path: Path) -> str:
    """The format of the file at *path*: the most confident probe wins; no match means raw."""
    file = ImageFile.open(Path(path))
    try:
        sample = probe_sample(file)
    finally:
        file.close()
    best, best_score = "raw", 0
    for name, cls in registered_formats().items():
        if name == "raw":
            continue
        score = cls.probe(sample)
        if score > best_score:
            best, best_score = name, score
    return best


# ----------------------------------------------------------------- options


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``10G``, ``512``, ``1.5M``, ``64K``… (binary units, as qemu-img) into bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"invalid {what} {text!r}: use a number with an optional K, M, G, T, P or E suffix")
    number, unit = match.group(1), match.group(2).upper()
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if value != int(value):
        raise UsageError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


@record(frozen=True)
class CreateOptions:
    """Everything ``create`` can be asked for (the ``-o`` options and ``-c``)."""

    subformat: str | None = None
    compat: str | None = None
    cluster_size: int | None = None
    compression_type: str | None = None
    compress: bool = False
    block_size: int | None = None
    logical_sector_size: int | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    adapter_type: str | None = None

    _SIZED = frozenset({"cluster_size", "block_size", "logical_sector_size"})

    @classmethod
    def parse(cls, text: str | None, *, compress: bool = False) -> CreateOptions:
        """Parse ``key=value,key=value`` (commas inside values doubled, as qemu-img)."""
        values: dict[str, Any] = {}
        if text:
            for item in re.split(r"(?<!,),(?!,)", text):
                if not item:
                    continue
                key, sep, value = item.partition("=")
                key = key.strip().replace("-", "_")
                if not sep:
                    raise UsageError(f"option {item!r} needs a value (key=value)")
                values[key] = value.replace(",,", ",")
        return cls.from_mapping(values, compress=compress)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, compress: bool = False) -> CreateOptions:
        """Build from keyword values; sizes may be strings with suffixes."""
        known = {f.name for f in fields(cls)}
        converted: dict[str, Any] = {"compress": compress or bool(values.get("compress", False))}
        for key, value in values.items():
            if key == "compress":
                continue
            if key not in known:
                raise UnsupportedOption(f"unknown option {key!r} (known: {', '.join(sorted(known))})")
            if key in cls._SIZED and isinstance(value, str):
                value = parse_size(value, what=key)
            converted[key] = value
        return cls(**converted)

    def given(self) -> set[str]:
        """Names of the options that were set."""
        return {f.name for f in fields(self) if getattr(self, f.name) not in (None, False)}


# ------------------------------------------------------------ open / create


@record
class Opener:
    """How an image opens the other files it refers to (backing files, extents, parents)."""

    policy: ReferencePolicy
    guard: ChainGuard
    follow_backing: bool = True

    def resolve(self, image_path: Path, reference: str, *, what: str) -> Path:
        """Resolve a reference written in *image_path* under the reference policy."""
        return resolve_reference(Path(image_path), reference, self.policy, what=what)

    def open_backing(self, image_path: Path, reference: str, format: str | None,  # noqa: A002
                     *, what: str = "backing file") -> DiskImage | None:
        """Open the image *reference* names as the next layer down (None when not following)."""
        if not self.follow_backing:
            return None
        target = self.resolve(image_path, reference, what=what)
        self.guard.enter(target)
        return _open(target, format, writable=False, opener=self)


def _open(path: Path, format: str | None, *, writable: bool, opener: Opener) -> DiskImage:  # noqa: A002
    name = format or probe_format(path)
    return get_format(name).open(Path(path), writable=writable, opener=opener)


def open_image(
    path: str | os.PathLike[str],
    format: str | None = None,  # noqa: A002 - the CLI's -f
    *,
    writable: bool = False,
    policy: ReferencePolicy = DEFAULT_POLICY,
    follow_backing: bool = True,
) -> DiskImage:
    """Open an image; the format is probed unless given (an explicit format always wins).

    Sources are opened read-only unless *writable*.  Backing files are opened
    read-only, and only inside the image's directory unless *policy* allows more.
    """
    path = Path(path)
    opener = Opener(policy=policy, guard=ChainGuard(policy), follow_backing=follow_backing)
    opener.guard.enter(path)
    return _open(path, format, writable=writable, opener=opener)


def create_image(
    path: str | os.PathLike[str],
    format: str,  # noqa: A002 - the CLI's -O
    size: int | None,
    options: CreateOptions | None = None,
    *,
    policy: ReferencePolicy = DEFAULT_POLICY,
    durable: bool = True,
    **option_values: str | int | bool,
) -> DiskImage:
    """Create an image and return it open for writing.

    The files are written under temporary names and appear under their final
    names when the image is closed; :meth:`DiskImage.abort` (or leaving a
    ``with`` block by an exception) discards them.  *size* may be None when a
    ``backing_file`` gives it.  Sizes are rounded up to a multiple of 512.  With
    *durable* (the default) the files reach stable storage before they are renamed.
    """
    path = Path(path)
    cls = get_format(format)
    if options is None:
        options = CreateOptions.from_mapping(option_values)
    elif option_values:
        raise UsageError("pass either options or keyword option values, not both")
    allowed = set(cls.create_options) | ({"subformat"} if cls.subformats else set())
    if cls.supports_compression:
        allowed.add("compress")
    if cls.supports_backing:
        allowed |= {"backing_file", "backing_fmt"}
    for name in sorted(options.given() - allowed):
        if name == "compress":
            raise UnsupportedOption(f"{cls.format_name} does not support compression")
        raise UnsupportedOption(f"{cls.format_name} does not accept option {name!r}")
    if options.subformat is not None and options.subformat not in cls.subformats:
        raise UnsupportedOption(
            f"{cls.format_name} subformat {options.subformat!r} unknown (known: {', '.join(cls.subformats)})"
        )
    opener = Opener(policy=policy, guard=ChainGuard(policy))
    backing: DiskImage | None = None
    if options.backing_file:
        backing = opener.open_backing(path, options.backing_file, options.backing_fmt)
        if backing is not None and options.backing_fmt is None:
            options = records.replace(options, backing_fmt=backing.format_name)
    try:
        if size is None:
            if backing is None:
                raise UsageError(f"{path}: a size is needed (or a backing file to take it from)")
            size = backing.virtual_size
        if size < 0:
            raise UsageError(f"{path}: size must not be negative")
        size = -(-size // 512) * 512
        token = DURABLE_OUTPUTS.set(durable)
        try:
            return cls.create(path, size, options, opener, backing)
        finally:
            DURABLE_OUTPUTS.reset(token)
    except BaseException:
        if backing is not None:
            backing.close()
        raise

