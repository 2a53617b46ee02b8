"""Fuzz polyvisor's disk parsers.

Seeds are small valid images made by qemu-img (fuzz/seeds.py); each input is a
mutated seed written to a private directory and put through
:func:`fuzz.target.exercise` (open, map, read, info, check).  A finding is
any exception that is not a PolyvisorError, an input taking longer than
``--input-timeout`` seconds, or an allocation beyond the address-space limit;
findings are saved under ``fuzz/findings/``.

Two engines:

* ``random`` (default; what CI runs): a fixed-seed mutation loop, reproducible;
* ``atheris``: coverage-guided (libFuzzer) for long runs, e.g.
  ``.venv/bin/python -m fuzz.run --engine atheris --format qcow2 -- -max_total_time=3600``.
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from fuzz.seeds import build_seeds
from fuzz.target import exercise, mutate

FINDINGS = Path(__file__).resolve().parent / "findings"
ADDRESS_SPACE_LIMIT = 4 << 30


class InputTimeout(Exception):
    """An input ran longer than allowed."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise InputTimeout


def _save_finding(name: str, data: bytes, fmt: str, detail: str) -> Path:
    FINDINGS.mkdir(exist_ok=True)
    path = FINDINGS / f"{name}-{int(time.time() * 1000)}.{fmt}"
    path.write_bytes(data)
    path.with_suffix(path.suffix + ".txt").write_text(detail)
    return path


def _one(workdir: Path, name: str, fmt: str, data: bytes, timeout: float) -> tuple[str, float]:
    """Run one input; returns (outcome, seconds) or raises on a finding."""
    target = workdir / f"input.{fmt}"
    target.write_bytes(data)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome = exercise(target, fmt)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return outcome, time.monotonic() - started


def run_random(seeds: dict[str, tuple[Path, str]], runs: int, seed: int, timeout: float) -> int:
    """The reproducible engine: *runs* mutations of each seed."""
    failures = 0
    with tempfile.TemporaryDirectory(prefix="polyvisor-fuzz-") as tmp:
        workdir = Path(tmp)
        for name, (path, fmt) in seeds.items():
            original = path.read_bytes()
            rng = random.Random(f"{seed}:{name}")
            outcomes: dict[str, int] = {}
            slowest = 0.0
            for _ in range(runs):
                data = mutate(original, rng)
                try:
                    outcome, seconds = _one(workdir, name, fmt, data, timeout)
                except InputTimeout:
                    failures += 1
                    saved = _save_finding(name, data, fmt, f"took longer than {timeout} s")
                    print(f"FINDING {name}: timeout, saved {saved}", file=sys.stderr)
                    continue
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    failures += 1
                    saved = _save_finding(name, data, fmt, traceback.format_exc())
                    print(f"FINDING {name}: {type(exc).__name__}: {exc}, saved {saved}", file=sys.stderr)
                    continue
                slowest = max(slowest, seconds)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))
            print(f"{name}: {runs} executions, slowest {slowest * 1000:.0f} ms: {summary}")
    return 1 if failures else 0


def run_atheris(seeds: dict[str, tuple[Path, str]], timeout: float, libfuzzer_args: list[str]) -> int:
    """Coverage-guided engine: the input chooses a seed and the patches applied to it."""
    import atheris

    originals = [(name, path.read_bytes(), fmt) for name, (path, fmt) in seeds.items()]
    workdir = Path(tempfile.mkdtemp(prefix="polyvisor-atheris-"))

    def one_input(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        name, original, fmt = originals[provider.ConsumeIntInRange(0, len(originals) - 1)]
        rng = random.Random(provider.ConsumeBytes(16))
        mutated = mutate(original, rng)
        try:
            _one(workdir, name, fmt, mutated, timeout)
        except InputTimeout:
            _save_finding(name, mutated, fmt, f"took longer than {timeout} s")
            raise

    from polyvisor.disk import registered_formats

    registered_formats()  # every parser imported, then instrumented (they were imported before atheris)
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["random", "atheris"], default="random")
    parser.add_argument("--format", action="append", help="only seeds of this format (repeatable)")
    parser.add_argument("--runs", type=int, default=2000, help="random engine: mutations per seed")
    parser.add_argument("--seed", type=int, default=1, help="random engine: RNG seed")
    parser.add_argument("--input-timeout", type=float, default=1.0, help="seconds one input may take")
    parser.add_argument("--seeds-dir", type=Path, default=Path(tempfile.gettempdir()) / "polyvisor-fuzz-seeds")
    parser.add_argument("libfuzzer", nargs="*", help="atheris engine: arguments for libFuzzer (after --)")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    signal.signal(signal.SIGALRM, _on_alarm)
    from polyvisor.disk import registered_formats

    wanted: Callable[[str], bool] = (lambda f: f in args.format) if args.format else (lambda f: True)
    seeds = {n: (p, f) for n, (p, f) in build_seeds(args.seeds_dir).items()
             if f in registered_formats() and wanted(f)}
    if not seeds:
        print("no seeds for the registered formats selected", file=sys.stderr)
        return 2
    if args.engine == "atheris":
        return run_atheris(seeds, args.input_timeout, args.libfuzzer)
    return run_random(seeds, args.runs, args.seed, args.input_timeout)


if __name__ == "__main__":
    raise SystemExit(main())
