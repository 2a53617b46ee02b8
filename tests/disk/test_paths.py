"""References out of an image's directory are refused unless allowed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polyvisor.disk.paths import ChainGuard, ReferencePolicy, resolve_reference, windows_path_to_relative
from polyvisor.errors import BackingChainError, MissingReference, UnsafeReference, UnsupportedFeature


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "sub").mkdir()
    (tmp_path / "vm" / "disk.img").write_bytes(b"")
    (tmp_path / "vm" / "base.img").write_bytes(b"")
    (tmp_path / "vm" / "sub" / "deep.img").write_bytes(b"")
    (tmp_path / "outside.img").write_bytes(b"secret")
    os.symlink(tmp_path / "outside.img", tmp_path / "vm" / "link.img")
    return tmp_path


def test_relative_inside_is_followed(tree: Path) -> None:
    image = tree / "vm" / "disk.img"
    assert resolve_reference(image, "base.img", ReferencePolicy(), what="backing file") == (tree / "vm" / "base.img")
    assert resolve_reference(image, "sub/deep.img", ReferencePolicy(), what="extent") == tree / "vm/sub/deep.img"


@pytest.mark.parametrize("reference", ["../outside.img", "/etc/passwd", "link.img", "sub/../../outside.img"])
def test_escapes_are_refused(tree: Path, reference: str) -> None:
    with pytest.raises(UnsafeReference) as info:
        resolve_reference(tree / "vm" / "disk.img", reference, ReferencePolicy(), what="extent")
    assert "disk.img" in str(info.value)
    assert "extent" in str(info.value)


def test_explicit_permission(tree: Path) -> None:
    image = tree / "vm" / "disk.img"
    anywhere = ReferencePolicy(allow_anywhere=True)
    assert resolve_reference(image, "../outside.img", anywhere, what="backing file") == tree / "outside.img"
    one_dir = ReferencePolicy(allowed_dirs=(tree,))
    assert resolve_reference(image, "../outside.img", one_dir, what="backing file") == tree / "outside.img"
    with pytest.raises(UnsafeReference):
        resolve_reference(image, "/etc/passwd", one_dir, what="backing file")


def test_missing_and_protocol_references(tree: Path) -> None:
    image = tree / "vm" / "disk.img"
    with pytest.raises(MissingReference):
        resolve_reference(image, "nope.img", ReferencePolicy(), what="backing file")
    with pytest.raises(UnsupportedFeature):
        resolve_reference(image, "nbd://example.com/x", ReferencePolicy(), what="backing file")
    with pytest.raises(UnsafeReference):
        resolve_reference(image, "base.img\x00", ReferencePolicy(), what="backing file")


def test_windows_paths() -> None:
    assert windows_path_to_relative(".\\parent.vhd") == "parent.vhd"
    assert windows_path_to_relative("C:\\VMs\\parent.vhd") == "/C:/VMs/parent.vhd"
    assert windows_path_to_relative("plain.vhd") == "plain.vhd"


def test_chain_guard_detects_loops_and_depth(tree: Path) -> None:
    guard = ChainGuard(ReferencePolicy(max_chain_depth=3))
    guard.enter(tree / "vm" / "disk.img")
    with pytest.raises(BackingChainError):
        guard.enter(tree / "vm" / "disk.img")
    guard.enter(tree / "vm" / "base.img")
    guard.enter(tree / "vm" / "sub" / "deep.img")
    with pytest.raises(BackingChainError):
        guard.enter(tree / "outside.img")
