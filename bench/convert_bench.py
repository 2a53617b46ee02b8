"""Conversion speed and memory: ``polyvisor disk convert`` against ``qemu-img convert``, same files, same run.

Run it with one command from the repository root::

    bash bench/run.sh                 # or: .venv/bin/python -m bench.convert_bench --runs 3

It builds its inputs once (in ``--workdir``, default ``/var/tmp/polyvisor-bench``):

* ``mixed.raw`` — 2 GiB alternating 1 MiB of random data and 1 MiB of zeros;
* ``realistic.raw`` — a tar of ``/usr`` written onto a raw disk (compressible, real-world bytes);
* ``sparse-1t.raw`` — 1 TiB sparse, holding 1 GiB of random data in 1 MiB pieces scattered over it;

then times each case four ways, rotating which goes first, over several runs,
and prints one table of medians (MB/s of virtual size), the median ratio and
the ratio of the best runs ("best": on a noisy machine outside disturbances only
ever add time, so the fastest run of each tool is the least disturbed one), and
the peak RSS of each tool.  polyvisor's default output is durable (fsync before the rename), which
qemu-img does not do, so it is compared with qemu-img followed by fdatasync of
its output; ``polyvisor --no-sync`` (kernel writeback later, like qemu-img) is
compared with plain qemu-img.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    """One conversion measured with both tools."""

    name: str
    source: str  #: input file name in the work directory
    source_format: str
    target_format: str
    polyvisor_options: list[str] = field(default_factory=list)
    qemu_options: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """One timed run of one tool."""

    seconds: float
    max_rss_kib: int


def _uncompressed_targets() -> list[tuple[str, str, str]]:
    """(label, format, -o options) for every format and subformat written uncompressed."""
    return [
        ("raw", "raw", ""),
        ("qcow2", "qcow2", ""),
        ("vmdk monolithicSparse", "vmdk", "subformat=monolithicSparse"),
        ("vmdk monolithicFlat", "vmdk", "subformat=monolithicFlat"),
        ("vmdk twoGbMaxExtentSparse", "vmdk", "subformat=twoGbMaxExtentSparse"),
        ("vmdk twoGbMaxExtentFlat", "vmdk", "subformat=twoGbMaxExtentFlat"),
        ("vhd dynamic", "vhd", "subformat=dynamic"),
        ("vhd fixed", "vhd", "subformat=fixed"),
        ("vhdx dynamic", "vhdx", "subformat=dynamic"),
        ("vhdx fixed", "vhdx", "subformat=fixed"),
        ("vdi dynamic", "vdi", ""),
        ("vdi fixed", "vdi", "static=on"),
    ]


def _polyvisor_opts(fmt: str, qemu_opts: str) -> str:
    """The same request in polyvisor's option vocabulary."""
    if fmt == "vdi":
        return "subformat=fixed" if qemu_opts == "static=on" else "subformat=dynamic"
    return qemu_opts


def cases() -> list[Case]:
    """Every case of the benchmark."""
    out: list[Case] = []
    for label, fmt, opts in _uncompressed_targets():
        p_opts = _polyvisor_opts(fmt, opts)
        out.append(Case(f"raw -> {label}", "mixed.raw", "raw", fmt,
                        ["-o", p_opts] if p_opts else [], ["-o", opts] if opts else []))
    for fmt in ("qcow2", "vmdk", "vhd", "vhdx", "vdi"):
        out.append(Case(f"{fmt} -> raw", f"mixed.{fmt}", fmt, "raw"))
    out.append(Case("realistic -> vmdk streamOptimized", "realistic.raw", "raw", "vmdk",
                    ["-o", "subformat=streamOptimized"], ["-o", "subformat=streamOptimized"]))
    out.append(Case("realistic -> qcow2 -c (zlib)", "realistic.raw", "raw", "qcow2", ["-c"], ["-c"]))
    out.append(Case("realistic -> qcow2 -c (zstd)", "realistic.raw", "raw", "qcow2",
                    ["-c", "-o", "compression_type=zstd"], ["-c", "-o", "compression_type=zstd"]))
    out.append(Case("1 TiB sparse raw -> qcow2", "sparse-1t.raw", "raw", "qcow2"))
    out.append(Case("1 TiB sparse raw -> vhdx", "sparse-1t.raw", "raw", "vhdx"))
    return out


# ------------------------------------------------------------------ inputs


def build_inputs(workdir: Path, *, mixed_size: int, realistic_size: int, say: bool = True) -> None:
    """Create the input files (kept between runs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    mixed = workdir / "mixed.raw"
    if not mixed.exists() or mixed.stat().st_size != mixed_size:
        if say:
            print(f"building {mixed} ({mixed_size >> 20} MiB, 1 MiB random / 1 MiB zero)", file=sys.stderr)
        tmp = mixed.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.truncate(mixed_size)
            for offset in range(0, mixed_size, 2 * MIB):
                f.seek(offset)
                f.write(os.urandom(min(MIB, mixed_size - offset)))
        tmp.replace(mixed)
        for fmt in ("qcow2", "vmdk", "vhd", "vhdx", "vdi"):
            (workdir / f"mixed.{fmt}").unlink(missing_ok=True)
    for fmt in ("qcow2", "vmdk", "vhd", "vhdx", "vdi"):
        converted = workdir / f"mixed.{fmt}"
        if not converted.exists():  # made by qemu-img so both tools read the same, neutral file
            subprocess.run(["qemu-img", "convert", "-O", QEMU_FORMAT[fmt], str(mixed), str(converted)], check=True)
    realistic = workdir / "realistic.raw"
    if not realistic.exists() or realistic.stat().st_size != realistic_size:
        if say:
            print(f"building {realistic} (a tar of /usr, {realistic_size >> 20} MiB)", file=sys.stderr)
        tmp = realistic.with_suffix(".tmp")
        tar = subprocess.Popen(["tar", "-cf", "-", "/usr"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert tar.stdout is not None
        with open(tmp, "wb") as f:
            f.truncate(realistic_size)
            written = 0
            while written < realistic_size and (chunk := tar.stdout.read(min(MIB, realistic_size - written))):
                f.write(chunk)
                written += len(chunk)
        tar.kill()
        tar.wait()
        tar.stdout.close()
        tmp.replace(realistic)
    sparse = workdir / "sparse-1t.raw"
    if not sparse.exists():
        if say:
            print(f"building {sparse} (1 TiB sparse, 1 GiB of data in 1 MiB pieces)", file=sys.stderr)
        rng = random.Random(1)
        tmp = sparse.with_suffix(".tmp")
        slots = rng.sample(range((1 << 40) // MIB), 1024)
        with open(tmp, "wb") as f:
            f.truncate(1 << 40)
            for slot in sorted(slots):
                f.seek(slot * MIB)
                f.write(os.urandom(MIB))
        tmp.replace(sparse)


# ------------------------------------------------------------------ timing


def _timed(argv: list[str], outdir: Path, *, sync_after: bool) -> Sample:
    """Run *argv* once into an empty *outdir*; its wall time (plus fdatasync of its outputs if asked) and RSS."""
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    os.sync()  # start every run with no earlier run's writeback or discards in flight (not timed)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode(errors="replace")  # small: only errors are printed
    _, status, usage = os.wait4(proc.pid, 0)
    if sync_after:  # what it takes for the output to be on disk, as polyvisor's default guarantees
        for path in outdir.iterdir():
            fd = os.open(path, os.O_RDONLY)
            os.fdatasync(fd)
            os.close(fd)
    seconds = time.monotonic() - started
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {stderr.strip()}")
    return Sample(seconds, usage.ru_maxrss)


#: The four ways each case is run: (label, tool, polyvisor --no-sync, fdatasync the output after qemu-img).
VARIANTS = [
    ("polyvisor", "polyvisor", False, False),
    ("qemu-img+sync", "qemu-img", False, True),
    ("polyvisor --no-sync", "polyvisor", True, False),
    ("qemu-img", "qemu-img", False, False),
]


def run_case(case: Case, workdir: Path, runs: int) -> dict[str, list[Sample]]:
    """Time every variant of *case*, rotating which runs first."""
    source = workdir / case.source
    name = f"out.{case.target_format}"
    samples: dict[str, list[Sample]] = {label: [] for label, *_ in VARIANTS}
    for run in range(runs):
        order = VARIANTS[run % len(VARIANTS):] + VARIANTS[: run % len(VARIANTS)]
        for label, tool, no_sync, sync_after in order:
            outdir = workdir / "out" / label.replace(" ", "_")
            if tool == "polyvisor":
                argv = [str(REPO / ".venv" / "bin" / "polyvisor"), "disk", "convert", "-f", case.source_format,
                        "-O", case.target_format, *(["--no-sync"] if no_sync else []), *case.polyvisor_options,
                        str(source), str(outdir / name)]
            else:
                argv = ["qemu-img", "convert", "-f", QEMU_FORMAT[case.source_format],
                        "-O", QEMU_FORMAT[case.target_format], *case.qemu_options, str(source), str(outdir / name)]
            # every run starts alike: no other variant's output waiting in the page cache to be written back
            shutil.rmtree(workdir / "out", ignore_errors=True)
            samples[label].append(_timed(argv, outdir, sync_after=sync_after))
    shutil.rmtree(workdir / "out")
    return samples


def _virtual_size(path: Path, fmt: str) -> int:
    proc = subprocess.run(["qemu-img", "info", "--output=json", "-f", QEMU_FORMAT[fmt], str(path)],
                          capture_output=True, text=True, check=True)
    return int(json.loads(proc.stdout)["virtual-size"])


def main(argv: list[str] | None = None) -> int:
    """Build inputs, run every case, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/polyvisor-bench"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mixed-size", type=int, default=2 * GIB)
    parser.add_argument("--realistic-size", type=int, default=1 * GIB)
    parser.add_argument("-k", dest="only", help="run only cases whose name contains this text")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    build_inputs(args.workdir, mixed_size=args.mixed_size, realistic_size=args.realistic_size)
    header = ["case", "polyvisor", "qemu-img+sync", "ratio", "best", "pv --no-sync", "qemu-img", "ratio", "best",
              "RSS pv", "RSS qemu"]
    widths = [38, 10, 14, 7, 6, 13, 9, 7, 6, 8, 9]
    print("MB/s of virtual size; ratio > 1 means polyvisor is faster; RSS in MiB")
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    rows: list[list[str]] = []
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        size = _virtual_size(args.workdir / case.source, case.source_format)
        samples = run_case(case, args.workdir, args.runs)
        med = {label: statistics.median(s.seconds for s in runs) for label, runs in samples.items()}
        best = {label: min(s.seconds for s in runs) for label, runs in samples.items()}
        rss_pv = max(s.max_rss_kib for s in samples["polyvisor"] + samples["polyvisor --no-sync"]) / 1024
        rss_q = max(s.max_rss_kib for s in samples["qemu-img"]) / 1024
        row = [
            case.name,
            f"{size / med['polyvisor'] / 1e6:.0f}",
            f"{size / med['qemu-img+sync'] / 1e6:.0f}",
            f"{med['qemu-img+sync'] / med['polyvisor']:.2f}",
            f"{best['qemu-img+sync'] / best['polyvisor']:.2f}",
            f"{size / med['polyvisor --no-sync'] / 1e6:.0f}",
            f"{size / med['qemu-img'] / 1e6:.0f}",
            f"{med['qemu-img'] / med['polyvisor --no-sync']:.2f}",
            f"{best['qemu-img'] / best['polyvisor --no-sync']:.2f}",
            f"{rss_pv:.0f}",
            f"{rss_q:.0f}",
        ]
        rows.append(row)
        print("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths, strict=True))),
              flush=True)
    if args.markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
