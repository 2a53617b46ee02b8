"""Following references from one image file to another, safely.

Backing files (qcow2), extents and parents (VMDK), parent locators (VHD, VHDX)
are paths written inside an image, so a hostile image chooses them.  qemu-img
follows them anywhere (it copies a host file named as a VMDK extent into its
output); polyvisor follows them only inside the referring image's own
directory unless the caller's :class:`ReferencePolicy` allows more.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from polyvisor.errors import BackingChainError, MissingReference, UnsafeReference, UnsupportedFeature
from polyvisor.records import field, record

#: Deepest backing chain polyvisor opens; deeper chains are refused as hostile.
MAX_CHAIN_DEPTH = 128

#: ``nbd:``, ``http://``, ``json:`` … (two or more letters, so ``C:`` drive letters are not protocols).
_PROTOCOL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]{1,15}:")


@record(frozen=True)
class ReferencePolicy:
    """Where references inside images may lead.

    By default only into the referring image's own directory (and its
    subdirectories).  ``allow_anywhere`` lifts the restriction;
    ``allowed_dirs`` adds specific directories.
    """

    allow_anywhere: bool = False
    allowed_dirs: tuple[Path, ...] = field(default_factory=tuple)
    max_chain_depth: int = MAX_CHAIN_DEPTH

    def permits(self, target: Path, home: Path) -> bool:
        """Whether the resolved *target* may be opened from an image living in *home*."""
        if self.allow_anywhere:
            return True
        roots = [real_path(home), *(real_path(d) for d in self.allowed_dirs)]
        return any(target == root or root in target.parents for root in roots)


DEFAULT_POLICY = ReferencePolicy()


def real_path(path: Path) -> Path:
    """The canonical path, symlinks followed; never raises (a symlink loop stays unresolved)."""
    return Path(os.path.realpath(path))


def resolve_reference(
    image_path: Path,
    reference: str,
    policy: ReferencePolicy,
    *,
    what: str,
    must_exist: bool = True,
) -> Path:
    """Turn *reference*, written inside *image_path*, into a path polyvisor may open.

    Relative references are relative to the image's directory.  The result is
    fully resolved (symlinks included) before the policy is checked, so a
    symlink inside the directory cannot lead out of it.
    """
    if not reference:
        raise MissingReference(image_path, f"{what} path is empty", structure=what)
    if "\x00" in reference:
        raise UnsafeReference(image_path, f"{what} path contains a NUL byte", structure=what)
    if _PROTOCOL.match(reference):
        raise UnsupportedFeature(
            image_path, f"{what} {reference!r} is a protocol reference, not a file", structure=what
        )
    home = Path(os.path.abspath(image_path)).parent
    candidate = Path(reference)
    if not candidate.is_absolute():
        candidate = home / candidate
    target = real_path(candidate)
    if not policy.permits(target, home):
        raise UnsafeReference(
            image_path,
            f"{what} {reference!r} resolves to {target}, outside the image's directory {real_path(home)}; "
            "allow it explicitly to follow it",
            structure=what,
        )
    if must_exist and not target.exists():
        raise MissingReference(image_path, f"{what} {reference!r} not found (looked for {target})",
                               structure=what)
    return target


def windows_path_to_relative(reference: str) -> str:
    """Reduce a Windows path from a VHD/VHDX parent locator to a POSIX relative or absolute form.

    ``.\\parent.vhd`` becomes ``parent.vhd``; ``C:\\VMs\\parent.vhd`` keeps its
    absolute meaning as ``/C:/VMs/parent.vhd`` so the policy refuses it unless
    allowed (callers usually fall back to the basename in the same directory).
    """
    if "\\" not in reference and ":" not in reference:
        return reference
    win = PureWindowsPath(reference)
    rest = win.parts[1:] if win.anchor else win.parts
    if win.anchor:
        return str(PurePosixPath("/", *([win.drive] if win.drive else []), *rest))
    return str(PurePosixPath(*rest))


class ChainGuard:
    """Detects loops and excessive depth while a backing chain is being opened."""

    def __init__(self, policy: ReferencePolicy) -> None:
        self.policy = policy
        self.seen: list[Path] = []

    def enter(self, path: Path) -> None:
        """Record that *path* is being opened as the next, deeper layer."""
        real = real_path(Path(path))
        if real in self.seen:
            chain = " -> ".join(str(p) for p in [*self.seen, real])
            raise BackingChainError(path, f"backing chain loops: {chain}", structure="backing chain")
        if len(self.seen) >= self.policy.max_chain_depth:
            raise BackingChainError(
                self.seen[0],
                f"backing chain deeper than {self.policy.max_chain_depth} images (stopped at {path})",
                structure="backing chain",
            )
        self.seen.append(real)
