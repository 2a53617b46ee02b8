"""What one fuzz input exercises: open, map, read what is mapped (bounded), check.

Anything other than a :class:`~polyvisor.errors.PolyvisorError` escaping
:func:`exercise` is a finding.
"""

from __future__ import annotations

import random
from pathlib import Path

from polyvisor.disk import ExtentKind, check_image, open_image
from polyvisor.errors import PolyvisorError

#: Guest bytes read per input at most (mutations can make virtual sizes huge).
READ_BUDGET = 8 << 20


def exercise(path: Path, fmt: str) -> str:
    """Parse *path* as *fmt* every way a user can; returns "ok" or the PolyvisorError class name."""
    try:
        with open_image(path, fmt) as image:
            budget = READ_BUDGET
            for ext in image.map():
                if ext.kind is not ExtentKind.DATA:
                    continue
                length = min(ext.length, budget)
                if length <= 0:
                    break
                image.read(ext.offset, length)
                budget -= length
            image.info()
        check_image(path, fmt)
    except PolyvisorError as exc:
        return type(exc).__name__
    return "ok"


def mutate(seed: bytes, rng: random.Random, *, max_ops: int = 8) -> bytes:
    """A structure-blind but metadata-biased mutation: byte/field overwrites near the start and end, truncations."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.random()
        if not data:
            break
        if op < 0.08:
            del data[rng.randrange(len(data)) :]
            continue
        region = rng.random()
        if region < 0.6:
            offset = rng.randrange(min(len(data), 65536))
        elif region < 0.8:
            offset = max(0, len(data) - 1 - rng.randrange(min(len(data), 4096)))
        else:
            offset = rng.randrange(len(data))
        width = rng.choice([1, 2, 4, 8])
        value = rng.choice([0, 1, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        if rng.random() < 0.5:
            chunk = bytes([value]) * width
        else:
            chunk = rng.choice([b"\xff" * width, b"\x00" * width, rng.randbytes(width),
                                (1 << (8 * width - 1)).to_bytes(width, rng.choice(["big", "little"]))])
        data[offset : offset + width] = chunk[: max(0, len(data) - offset)]
    return bytes(data)
