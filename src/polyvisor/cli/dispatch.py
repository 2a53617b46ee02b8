"""Command handlers imported only when their command runs, so that ``polyvisor disk convert`` does not
pay for importing the hypervisor and VM layers (and the other way round)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def lazy(module: str, function: str) -> Handler:
    """A handler that imports ``module`` and calls its ``function`` when the command runs."""

    def run(args: argparse.Namespace) -> int:
        handler: Handler = getattr(importlib.import_module(module), function)
        return handler(args)

    run.__name__ = function
    return run
