"""Command handlers imported only when their command runs, so that ``polyvisor disk convert`` does not
pay for importing the hypervisor and VM layers (and the other way round); and the one command word that
decides which part of the grammar a command line needs."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Collection, Sequence

Handler = Callable[[argparse.Namespace], int]


def lazy(module: str, function: str) -> Handler:
    """A handler that imports ``module`` and calls its ``function`` when the command runs."""

    def run(args: argparse.Namespace) -> int:
        handler: Handler = getattr(importlib.import_module(module), function)
        return handler(args)

    run.__name__ = function
    return run


def command_word(args: Sequence[str], options_with_value: Collection[str] = ()) -> tuple[str, list[str]] | None:
    """The first positional word of *args* (the command a parser will dispatch on) and the words after it.

    None when there is none, or when help is asked for before it (help lists every command).
    """
    takes_value = False
    for position, arg in enumerate(args):
        if takes_value:
            takes_value = False
        elif arg in ("-h", "--help", "--"):
            return None
        elif arg.startswith("-") and arg != "-":
            takes_value = arg in options_with_value
        else:
            return arg, list(args[position + 1:])
    return None
