"""The grammar built for one command line parses it exactly as the whole grammar does."""

from __future__ import annotations

import argparse

import pytest

from polyvisor.cli import build_parser
from polyvisor.cli.dispatch import command_word

COMMAND_LINES = [
    ["disk", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", "-c", "--no-sync", "a.raw", "b.qcow2"],
    ["disk", "info", "--json", "--allow-dir", "/srv", "x.vmdk"],
    ["disk", "create", "-O", "vhdx", "d.vhdx", "10G"],
    ["disk", "check", "-f", "qcow2", "x"],
    ["disk", "compare", "-f", "raw", "-F", "vdi", "a", "b"],
    ["disk", "map", "x"],
    ["-c", "qemu:///session?root=/r", "vm", "list", "--json"],
    ["--connect=qemu:///session", "vm", "start", "web"],
    ["-c", "disk", "vm", "snapshot", "create", "web", "s1", "--description", "d"],
    ["vm", "inspect", "--no-disks", "a.ova"],
    ["vm", "codecs"],
    ["v2v", "a.ova", "--to", "libvirt", "-o", "out"],
    ["drivers", "--json"],
    ["migrate", "web", "--to", "qemu:///session", "--live"],
    ["demo", "--no-boot"],
]


def _comparable(ns: argparse.Namespace) -> dict[str, object]:
    """The parsed values, with handlers compared by name (lazy handlers are new closures each time)."""
    values = vars(ns).copy()
    handler = values.pop("handler")
    values["handler"] = getattr(handler, "__name__", handler)
    return values


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda argv: " ".join(argv[:3]))
def test_the_partial_grammar_parses_like_the_whole(argv: list[str]) -> None:
    partial = build_parser(argv)
    whole = build_parser()
    assert _comparable(partial.parse_args(argv)) == _comparable(whole.parse_args(argv))
    # and it really is partial: fewer commands than the whole grammar
    assert len(partial._subparsers._group_actions[0].choices) == 1  # type: ignore[union-attr, arg-type]


def test_unknown_or_missing_commands_get_the_whole_grammar(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["nonsense"], ["disk", "nonsense"], ["vm", "nonsense"], []):
        with pytest.raises(SystemExit) as exit_info:
            build_parser(argv).parse_args(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense' (choose from 'disk', 'vm', 'v2v', 'drivers', 'migrate', 'demo')" in err
    assert "'info', 'create', 'convert', 'check', 'compare', 'map'" in err
    assert "'inspect', 'codecs', 'list'" in err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help", "disk"], ["disk", "--help"]):
        with pytest.raises(SystemExit):
            build_parser(argv).parse_args(argv)
    out = capsys.readouterr().out
    for word in ("disk", "vm", "v2v", "drivers", "migrate", "demo", "convert", "compare", "map"):
        assert word in out


def test_command_word() -> None:
    assert command_word(["-c", "disk", "vm", "list"], ("-c",)) == ("vm", ["list"])
    assert command_word(["--connect=x", "disk"], ("-c", "--connect")) == ("disk", [])
    assert command_word(["-h", "disk"]) is None
    assert command_word(["--version"]) is None
