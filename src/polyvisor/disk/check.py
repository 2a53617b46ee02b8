"""Consistency checks: what each format's ``check`` reports, and ``check_image``.

Problems are *corruptions* (the image is wrong: overlapping or out-of-range
offsets, table loops, bad checksums, refcounts too low) or *leaks* (space
allocated that nothing uses: harmless, reclaimable).  Exit codes follow
``qemu-img check``: 0 clean, 2 corruptions, 3 leaks only, 1 the check itself
could not run.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from polyvisor.errors import ImageError, ReadOnlyImage
from polyvisor.records import field, record

#: Problems recorded before a check stops listing (it still counts them).
MAX_LISTED_PROBLEMS = 1000


class ProblemKind(enum.StrEnum):
    """How serious a finding is."""

    CORRUPTION = "corruption"
    LEAK = "leak"


@record(frozen=True)
class CheckProblem:
    """One finding: where and what."""

    kind: ProblemKind
    structure: str
    message: str
    offset: int | None = None

    def __str__(self) -> str:
        where = self.structure if self.offset is None else f"{self.structure} at offset {self.offset}"
        return f"{self.kind.value.upper()}: {where}: {self.message}"


@record
class CheckResult:
    """Everything a check found in one image file."""

    filename: str
    format: str
    problems: list[CheckProblem] = field(default_factory=list)
    corruptions: int = 0
    leaks: int = 0
    #: Allocated and total units (clusters, grains, blocks), when the format has them.
    allocated_units: int | None = None
    total_units: int | None = None
    #: Offset of the first byte past the last used byte of the file, when known.
    image_end_offset: int | None = None

    def corruption(self, structure: str, message: str, offset: int | None = None) -> None:
        """Record a corruption."""
        self.corruptions += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(CheckProblem(ProblemKind.CORRUPTION, structure, message, offset))

    def leak(self, structure: str, message: str, offset: int | None = None) -> None:
        """Record a leak."""
        self.leaks += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(CheckProblem(ProblemKind.LEAK, structure, message, offset))

    @property
    def clean(self) -> bool:
        """No corruption and no leak."""
        return self.corruptions == 0 and self.leaks == 0

    @property
    def exit_code(self) -> int:
        """``qemu-img check`` exit status: 0 clean, 2 corruptions, 3 leaks only."""
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.corruptions,
            "leaks": self.leaks,
            "problems": [
                {"kind": p.kind.value, "structure": p.structure, "offset": p.offset, "message": p.message}
                for p in self.problems
            ],
        }
        if self.allocated_units is not None:
            out["allocated-clusters"] = self.allocated_units
        if self.total_units is not None:
            out["total-clusters"] = self.total_units
        if self.image_end_offset is not None:
            out["image-end-offset"] = self.image_end_offset
        return out


def check_image(path: Path, format: str | None = None) -> CheckResult:  # noqa: A002 - CLI vocabulary
    """Check one image file.  A file too broken (or too unsafe) to open is reported, not raised."""
    from polyvisor.disk.registry import open_image, probe_format

    try:
        image = open_image(path, format, follow_backing=False)
    except ImageError as exc:
        if isinstance(exc, ReadOnlyImage):
            raise
        name = format or _probe_name(path, probe_format)
        result = CheckResult(filename=str(path), format=name)
        result.corruption(exc.structure or "image", exc.reason, exc.offset)
        return result
    with image:
        result = image.check()
    if image.backing_reference:
        try:
            open_image(path, format).close()
        except ImageError as exc:
            if isinstance(exc, ReadOnlyImage):
                raise
            result.corruption(exc.structure or "backing chain", str(exc), exc.offset)
    return result


def _probe_name(path: Path, probe: Any) -> str:
    try:
        return str(probe(path))
    except Exception:  # noqa: BLE001 - best effort naming of a broken file
        return "unknown"
