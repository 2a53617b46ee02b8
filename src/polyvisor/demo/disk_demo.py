"""The main job's embedded default: a bootable disk carried through every format.

raw -> vmdk (streamOptimized) -> vhdx -> vdi -> vhd -> qcow2, each step converted
by polyvisor, compared with the original (guest-visible content), checked, and
finally booted under QEMU (TCG) to show the guest still starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from polyvisor.demo.boot import BootResult, boot_until_marker
from polyvisor.demo.bootdisk import build_boot_disk
from polyvisor.disk import CreateOptions, check_image, open_image
from polyvisor.disk.compare import compare
from polyvisor.disk.convert import convert

#: The conversion chain: (format, -o options) for each step after the raw original.
CHAIN: list[tuple[str, dict[str, str]]] = [
    ("vmdk", {"subformat": "streamOptimized", "adapter_type": "lsilogic"}),
    ("vhdx", {"subformat": "dynamic"}),
    ("vdi", {"subformat": "dynamic"}),
    ("vhd", {"subformat": "dynamic"}),
    ("qcow2", {"compat": "1.1"}),
]


@dataclass
class Step:
    """One conversion of the chain and what verified it."""

    source: Path
    destination: Path
    format: str
    subformat: str
    seconds: float
    actual_size: int
    identical: bool
    check_clean: bool


@dataclass
class DemoResult:
    """Everything the demo did."""

    original: Path
    steps: list[Step] = field(default_factory=list)
    boot: BootResult | None = None

    @property
    def ok(self) -> bool:
        """Every step identical and clean, and the boot (if attempted) succeeded."""
        steps_ok = all(s.identical and s.check_clean for s in self.steps)
        return steps_ok and (self.boot is None or self.boot.booted)


def run_demo(workdir: Path, *, boot: bool = True, say: Callable[[str], None] = print) -> DemoResult:
    """Build the disk in *workdir*, convert it along :data:`CHAIN`, verify, and boot the last image."""
    workdir.mkdir(parents=True, exist_ok=True)
    original = workdir / "bootdisk.raw"
    disk = build_boot_disk(original)
    say(f"built {original}: {disk.size >> 20} MiB raw disk (MBR, FAT16, syslinux, Debian kernel "
        f"{disk.kernel.name}, busybox initramfs printing {disk.marker!r} on ttyS0)")
    result = DemoResult(original=original)
    source, source_format = original, "raw"
    for number, (fmt, options) in enumerate(CHAIN, start=1):
        destination = workdir / f"step{number}.{fmt}"
        started = time.monotonic()
        convert(source, destination, fmt, CreateOptions.from_mapping(options), source_format=source_format)
        seconds = time.monotonic() - started
        identical = compare(original, destination, "raw", fmt).identical
        check = check_image(destination, fmt)
        with open_image(destination, fmt) as image:
            step = Step(source, destination, image.format_name, image.subformat, seconds, image.actual_size,
                        identical, check.clean)
        result.steps.append(step)
        verdict = "identical to the original" if identical else "DIFFERS from the original"
        checked = "check clean" if check.clean else f"check found {check.corruptions} errors, {check.leaks} leaks"
        say(f"step {number}: {source.name} -> {destination.name} ({step.format} {step.subformat}, "
            f"{step.actual_size >> 10} KiB on disk) in {seconds:.2f} s: {verdict}, {checked}")
        source, source_format = destination, fmt
    if boot:
        say(f"booting {source.name} with qemu-system-x86_64 -accel tcg ...")
        result.boot = boot_until_marker(source, source_format, disk.marker)
        if result.boot.booted:
            say(f"the guest printed {disk.marker!r} after {result.boot.seconds:.1f} s")
        else:
            tail = result.boot.console.strip().splitlines()[-5:]
            say(f"the guest did NOT print {disk.marker!r}; last console lines: {tail}")
    say("demo " + ("succeeded" if result.ok else "FAILED"))
    return result
