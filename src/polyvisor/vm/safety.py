"""Reading hostile packages safely: bounded reads, defused XML, paths that stay inside the package.

Every VM package is untrusted input.  The helpers here refuse, with an
:class:`~polyvisor.errors.UnsafePackage` naming the file and the problem:

* XML with a DOCTYPE (so no entity expansion — no billion laughs — and no
  external entities — no XXE): parsed only with defusedxml, DTDs forbidden;
* descriptors larger than a limit (16 MiB by default), read without ever
  holding more than the limit;
* references (disk paths) that are absolute, contain ``..``, or resolve
  (symlinks included) outside the package directory, unless the caller's
  :class:`~polyvisor.disk.paths.ReferencePolicy` allows the target.
"""

from __future__ import annotations

import os
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as defused_et  # noqa: N813 - the module, not a class

from polyvisor.disk.paths import ReferencePolicy
from polyvisor.errors import DescriptorTooLarge, PackageError, UnsafePackage
from polyvisor.vm.model import check_package_path

#: Largest descriptor (.ovf, .vmx, .mf, domain XML) polyvisor reads into memory.
MAX_DESCRIPTOR = 16 << 20


def read_limited(path: Path, limit: int = MAX_DESCRIPTOR, *, what: str = "descriptor") -> bytes:
    """The bytes of *path*, refusing files larger than *limit* (without reading past it)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise PackageError(f"cannot read {what}: {exc.strerror or exc}", path=path) from None
    if len(data) > limit:
        raise DescriptorTooLarge(f"{what} is larger than {limit} bytes; refusing to read it", path=path)
    return data


def parse_xml(data: bytes, *, source: str | os.PathLike[str]) -> ET.Element:
    """Parse untrusted XML: no DTD, no entities, no external references."""
    try:
        root = defused_et.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise UnsafePackage("XML with a DOCTYPE is refused (entity expansion and external entities)",
                            path=source) from None
    except (defusedxml.EntitiesForbidden, defusedxml.ExternalReferenceForbidden) as exc:
        raise UnsafePackage(f"XML entity refused: {exc}", path=source) from None
    except ET.ParseError as exc:
        raise PackageError(f"not well-formed XML: {exc}", path=source) from None
    assert isinstance(root, ET.Element)
    return root


def resolve_in_package(
    root: Path,
    reference: str,
    *,
    source: str | os.PathLike[str],
    what: str,
    policy: ReferencePolicy,
    must_exist: bool = True,
) -> Path:
    """Resolve *reference* (relative to the package directory *root*) to a host path inside it.

    Absolute references are accepted only when the policy allows their target.
    """
    if not reference or "\x00" in reference:
        raise UnsafePackage(f"{what} path {reference!r} is empty or contains NUL", path=source)
    candidate = Path(reference)
    if not candidate.is_absolute():
        why = check_package_path(reference)
        if why is not None:
            raise UnsafePackage(f"{what} path {reference!r} {why}", path=source)
        candidate = root / candidate
    target = candidate.resolve()
    if not policy.permits(target, root):
        raise UnsafePackage(
            f"{what} {reference!r} resolves to {target}, outside the package directory {root.resolve()}; "
            "allow that directory explicitly to read it",
            path=source,
        )
    if must_exist and not target.is_file():
        raise PackageError(f"{what} {reference!r} not found (looked for {target})", path=source)
    return target


def xml_bytes(root: ET.Element) -> bytes:
    """Serialise a tree polyvisor built, indented, with an XML declaration."""
    ET.indent(root, space="  ")
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def tar_members(path: Path, *, package: str, max_members: int, hint: str = "",
                name_problem: Callable[[str], str | None] | None = None) -> list[tarfile.TarInfo]:
    """The members of the tar archive *path* (an OVA, an XVA), which is never extracted.

    Only regular files with safe, unique names are accepted: links, devices, directories, sparse members,
    names with ``..`` or absolute, duplicates, more than *max_members* members, and (through *name_problem*)
    names the package type does not use are refused with :class:`UnsafePackage`; an unreadable, empty or
    truncated archive is a :class:`PackageError`.
    """
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed below; never extracted
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"not a readable uncompressed tar archive{hint}: {exc}", path=path) from None
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    try:
        for member in tar:
            if len(members) >= max_members:
                raise UnsafePackage(f"more than {max_members} members", path=path)
            kind = ("symbolic link" if member.issym() else "hard link" if member.islnk()
                    else "device" if member.isdev() else "directory" if member.isdir()
                    else "sparse file" if member.issparse() else None if member.isreg() else "special file")
            if kind is not None:
                raise UnsafePackage(f"member {member.name!r} is a {kind}; an {package} holds regular files only",
                                    path=path)
            why = check_package_path(member.name)
            if why is None and name_problem is not None:
                why = name_problem(member.name)
            if why is not None:
                raise UnsafePackage(f"member {member.name!r}: name {why}", path=path)
            if member.name in seen:
                raise UnsafePackage(f"member {member.name!r} appears twice", path=path)
            seen.add(member.name)
            members.append(member)
    except tarfile.TarError as exc:
        raise PackageError(f"corrupt tar archive: {exc}", path=path) from None
    finally:
        tar.close()
    if not members:
        raise PackageError("empty archive", path=path)
    if members[-1].offset_data + members[-1].size > path.stat().st_size:
        raise PackageError(f"member {members[-1].name!r} extends past the end of the archive", path=path)
    return members


def single_descriptor(path: Path, suffix: str) -> Path:
    """*path* itself, or for a directory the one ``*{suffix}`` file in it (a clear error if not exactly one)."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(path.glob(f"*{suffix}"))
    if len(found) != 1:
        raise PackageError(f"expected one {suffix} file in the directory, found {len(found)}", path=path)
    return found[0]
