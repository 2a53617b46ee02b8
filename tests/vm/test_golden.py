"""Golden files per codec: an input, the model JSON polyvisor reads from it, and the re-written output.

Regenerate the expected files with ``POLYVISOR_REGENERATE_GOLDEN=1 pytest tests/vm/test_golden.py``
and review the diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polyvisor.disk.paths import ReferencePolicy
from polyvisor.vm.codecs import ReadOptions, drop_fields, get_codec, read_package, write_package
from tests.vm.helpers import placeholder_disks, validate_libvirt, validate_ovf

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("POLYVISOR_REGENERATE_GOLDEN") == "1"
INPUTS = sorted(p for p in GOLDEN.glob("*/*") if ".expected" not in p.name)
OUTDIR = "@OUTDIR@"


def _check(path: Path, actual: str) -> None:
    if REGENERATE or not path.exists():
        assert REGENERATE, f"{path} is missing; run with POLYVISOR_REGENERATE_GOLDEN=1 to create it"
        path.write_text(actual, encoding="utf-8")
        return
    assert actual == path.read_text(encoding="utf-8"), f"{path} differs (regenerate with POLYVISOR_REGENERATE_GOLDEN=1)"


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden(source: Path, tmp_path: Path) -> None:
    codec = source.parent.name
    options = ReadOptions(policy=ReferencePolicy(allow_anywhere=True), require_disks=False)
    package = read_package(source, codec, options)
    _check(source.with_name(source.name + ".expected.json"), package.model.to_json())
    out = tmp_path / "out"
    written = write_package(package.model, codec, out, placeholder_disks(package.model, tmp_path / "src"))
    descriptor = next(p for p in written if p.suffix in get_codec(codec).suffixes)
    if codec == "libvirt":
        validate_libvirt(descriptor)
    if codec == "ovf":
        validate_ovf(descriptor)
    text = descriptor.read_text(encoding="utf-8").replace(str(out.resolve()), OUTDIR)
    # an output that is JSON itself (an EC2 request) must not overwrite the model's .expected.json
    suffix = ".expected-output" if descriptor.suffix == ".json" else ".expected"
    _check(source.with_name(source.name + suffix + descriptor.suffix), text)
    # what polyvisor wrote reads back as the same model, but for the codec's declared lossy fields
    lossy = get_codec(codec).lossy | {"vendor"}
    again = read_package(descriptor, codec)
    assert drop_fields(again.model, lossy) == drop_fields(package.model, lossy)
