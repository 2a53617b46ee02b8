"""Run one hostile case in a fresh process with a hard memory limit; print what happened as JSON.

``python -m tests.hostile.probe FORMAT IMAGE [read|write]`` exits 0 and prints
``{"error": class name or null, "message": ..., "seconds": ..., "peak_bytes": ...,
"check": {...}}``.  An exception that is not a PolyvisorError is not caught:
it ends the process with a traceback, which the test reports.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path

from polyvisor.disk import ExtentKind, check_image, open_image, registered_formats
from polyvisor.errors import PolyvisorError

#: Address space the probe may use: a hostile image asking for a huge allocation fails here.
ADDRESS_SPACE = 1 << 30
READ_BUDGET = 64 << 20


def exercise(path: Path, fmt: str, mode: str) -> None:
    """Open, map, read what is mapped (bounded), describe; in "write" mode then open writable."""
    with open_image(path, fmt) as image:
        budget = READ_BUDGET
        for ext in image.map():
            if ext.kind is ExtentKind.DATA and budget > 0:
                length = min(ext.length, budget)
                image.read(ext.offset, length)
                budget -= length
        image.info()
    if mode == "write":
        open_image(path, fmt, writable=True).abort()


def main() -> int:
    fmt, path = sys.argv[1], Path(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "read"
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    registered_formats()  # import every format module first: the case is timed, not the imports
    tracemalloc.start()
    started = time.monotonic()
    error: PolyvisorError | None = None
    try:
        exercise(path, fmt, mode)
    except PolyvisorError as exc:
        error = exc
    seconds = time.monotonic() - started
    check: dict[str, object]
    try:
        result = check_image(path, fmt)
        check = {"corruptions": result.corruptions, "leaks": result.leaks,
                 "problems": [str(p) for p in result.problems[:5]]}
    except PolyvisorError as exc:
        check = {"error": type(exc).__name__, "message": str(exc)}
    _, peak = tracemalloc.get_traced_memory()
    print(json.dumps({
        "error": type(error).__name__ if error else None,
        "message": str(error) if error else None,
        "seconds": seconds,
        "check_seconds": time.monotonic() - started - seconds,
        "peak_bytes": peak,
        "check": check,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
