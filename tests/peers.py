"""The real peers tests check polyvisor against: Debian's qemu-img and qemu-io.

``.ci/run`` installs them (package qemu-utils).  A missing peer fails the test
that needs it with a clear message; it is never silently skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyvisor.disk import CreateOptions

#: polyvisor format name -> qemu's driver name.
QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}


@dataclass(frozen=True)
class Variant:
    """One way to create an image: polyvisor's options and the qemu-img options for the same thing."""

    format: str
    name: str  #: the subformat (or, for qcow2, the compat level)
    options: dict[str, str] = field(default_factory=dict)
    qemu_options: str = ""

    def create_options(self) -> CreateOptions:
        """The options as polyvisor takes them."""
        return CreateOptions.from_mapping(self.options)

    @property
    def id(self) -> str:
        """pytest id."""
        return f"{self.format}-{self.name}"


#: Every (format, subformat) the contract tests exercise; every registered format and subformat must be here.
VARIANTS = [
    Variant("raw", "raw"),
    Variant("qcow2", "v3", {"compat": "1.1"}, "compat=1.1"),
    Variant("qcow2", "v2", {"compat": "0.10"}, "compat=0.10"),
    *(
        Variant("vmdk", sub, {"subformat": sub}, f"subformat={sub}")
        for sub in ("monolithicSparse", "streamOptimized", "monolithicFlat",
                    "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
    ),
    Variant("vhd", "dynamic", {"subformat": "dynamic"}, "subformat=dynamic,force_size=on"),
    Variant("vhd", "fixed", {"subformat": "fixed"}, "subformat=fixed,force_size=on"),
    Variant("vhdx", "dynamic", {"subformat": "dynamic"}, "subformat=dynamic"),
    Variant("vhdx", "fixed", {"subformat": "fixed"}, "subformat=fixed"),
    Variant("vdi", "dynamic", {"subformat": "dynamic"}, "static=off"),
    Variant("vdi", "fixed", {"subformat": "fixed"}, "static=on"),
]

#: Formats whose qemu driver implements ``qemu-img check``.
QEMU_CHECKS = {"qcow2", "vmdk", "vhdx", "vdi"}


REPO = Path(__file__).resolve().parents[1]


def polyvisor_env() -> dict[str, str]:
    """Environment for a subprocess running this checkout's polyvisor (not whatever the venv installed)."""
    paths = [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def polyvisor_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m polyvisor ARGS`` in a separate process, as a user would."""
    return subprocess.run([sys.executable, "-m", "polyvisor", *args], capture_output=True, text=True,
                          cwd=cwd, env=polyvisor_env(), check=False, timeout=timeout)


def require(tool: str) -> str:
    """Path of *tool*, or a failure naming the package that provides it."""
    found = shutil.which(tool)
    if found is None:
        raise AssertionError(f"{tool} is not installed; run scripts/setup.sh (Debian package qemu-utils)")
    return found


def run(argv: Sequence[str], *, ok: Sequence[int] = (0,), timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a peer; fail with its output if the exit status is not in *ok*."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode not in ok:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def qemu_img(*args: str, ok: Sequence[int] = (0,), timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img`` with *args*."""
    return run([require("qemu-img"), *args], ok=ok, timeout=timeout)


def qemu_io(image: Path, fmt: str, *commands: str, writable: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-io -f FMT -c CMD...`` on *image* (fmt in polyvisor's naming)."""
    argv = [require("qemu-io"), "-f", QEMU_FORMAT[fmt]]
    if not writable:
        argv.append("-r")
    for command in commands:
        argv += ["-c", command]
    argv.append(str(image))
    proc = run(argv)
    if "error" in proc.stdout.lower() or "failed" in proc.stdout.lower():
        raise AssertionError(f"qemu-io reported a failure: {proc.stdout}")
    return proc


def qemu_create(image: Path, fmt: str, size: int | str, options: str = "") -> None:
    """``qemu-img create`` in polyvisor's format naming."""
    argv = ["create", "-q", "-f", QEMU_FORMAT[fmt]]
    if options:
        argv += ["-o", options]
    qemu_img(*argv, str(image), str(size))


def qemu_check(image: Path, fmt: str) -> dict[str, Any]:
    """``qemu-img check --output=json``; fails the test on errors or leaks."""
    proc = qemu_img("check", "--output=json", "-f", QEMU_FORMAT[fmt], str(image), ok=(0, 2, 3))
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report.get("check-errors", 0) == 0, f"qemu-img check found errors in {image}: {report}"
    assert report.get("corruptions", 0) == 0, f"qemu-img check found corruptions in {image}: {report}"
    assert report.get("leaks", 0) == 0, f"qemu-img check found leaks in {image}: {report}"
    return report


def qemu_compare(a: Path, a_fmt: str, b: Path, b_fmt: str) -> None:
    """``qemu-img compare``; fails the test unless the guest-visible contents are identical."""
    proc = qemu_img("compare", "-f", QEMU_FORMAT[a_fmt], "-F", QEMU_FORMAT[b_fmt], str(a), str(b), ok=(0, 1))
    assert proc.returncode == 0, f"qemu-img compare: {a} and {b} differ: {proc.stdout}{proc.stderr}"


def qemu_to_raw(image: Path, fmt: str, out: Path) -> Path:
    """qemu-img's reading of *image*, as a raw file (the oracle for polyvisor's reader)."""
    qemu_img("convert", "-f", QEMU_FORMAT[fmt], "-O", "raw", str(image), str(out))
    return out


def qemu_info(image: Path, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json``."""
    argv = ["info", "--output=json"]
    if fmt:
        argv += ["-f", QEMU_FORMAT[fmt]]
    info: dict[str, Any] = json.loads(qemu_img(*argv, str(image)).stdout)
    return info
