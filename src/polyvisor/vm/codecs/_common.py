"""Small helpers shared by the codecs written after the first three (file names, package images, booleans)."""

from __future__ import annotations

import re
import uuid as uuid_module
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath

from polyvisor.errors import PackageError
from polyvisor.vm.codecs.codec import DiskSource, ReadOptions
from polyvisor.vm.model import DeviceKind, VmModel
from polyvisor.vm.safety import resolve_in_package

#: Namespace for the UUIDs polyvisor derives when a package type needs one and the model has none.
POLYVISOR_NS = uuid_module.UUID("6f1c3f9e-0d54-5d8a-9a4e-70c0ff1b2a11")


def file_stem(name: str) -> str:
    """A file name made from a VM name: letters, digits, ``-_.`` kept, the rest ``_``; never hidden, never empty."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return safe or "vm"


def derived_uuid(kind: str, name: str) -> str:
    """A stable UUID for a package that must carry one when the model has none (recognised on read)."""
    return str(uuid_module.uuid5(POLYVISOR_NS, f"{kind}:{name}"))


def truthy(value: str | None) -> bool:
    """``1``, ``true``, ``yes``, ``on`` (any case)."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class ImageFinder:
    """Turns the disk references written in a descriptor into package paths and :class:`DiskSource` entries.

    A reference is resolved against *home* (the package directory) under the
    read policy: ``..``, absolute paths outside the package and symlinks
    leading out of it are refused (:class:`~polyvisor.errors.UnsafePackage`).
    """

    def __init__(self, home: Path, source: Path, options: ReadOptions) -> None:
        self.home = home.resolve()
        self.source = source
        self.options = options
        self.sources: dict[str, DiskSource] = {}

    def add(self, reference: str, what: str, *, must_exist: bool | None = None) -> str:
        """Register *reference*; returns its package path (relative to *home*, or its name when outside)."""
        required = self.options.require_disks if must_exist is None else must_exist
        target = resolve_in_package(self.home, reference, source=self.source, what=what,
                                    policy=self.options.policy, must_exist=required)
        return self.register(target, what)

    def register(self, target: Path, what: str) -> str:
        """Register a resolved host path (already checked against the policy)."""
        try:
            name = target.relative_to(self.home).as_posix()
        except ValueError:
            name = target.name
        if name in self.sources and self.sources[name].path != target:
            raise PackageError(f"{what}: two images are both called {name!r}; rename one", path=self.source)
        self.sources[name] = DiskSource(target)
        return name


def windows_basename(reference: str) -> str | None:
    """The file name of a Windows absolute path (``C:\\VMs\\a.vhdx`` -> ``a.vhdx``); None for other paths."""
    if re.match(r"^[A-Za-z]:[\\/]", reference) or reference.startswith("\\\\"):
        return PureWindowsPath(reference).name or None
    return None


def disk_files(model: VmModel, disk_paths: Mapping[str, Path]) -> list[str]:
    """Every image the model names, in address order, each once (checked present in *disk_paths*)."""
    names: list[str] = []
    for disk in model.disks:
        if disk.path is None or disk.path in names:
            continue
        if disk.path not in disk_paths:
            raise PackageError(f"no file given for image {disk.path!r}")
        names.append(disk.path)
    return names


def is_removable(kind: DeviceKind) -> bool:
    """CD-ROM and floppy drives."""
    return kind != DeviceKind.DISK
