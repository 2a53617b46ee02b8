"""polyvisor.records, the disk layer's stand-in for dataclasses, behaves as dataclasses do where it is relied on."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest

from polyvisor import records
from polyvisor.records import FrozenInstanceError, field, record
from tests.peers import polyvisor_env


@record
class Plain:
    name: str
    size: int = 0
    tags: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "plain"


@record(frozen=True, slots=True)
class Point:
    x: int
    y: int = 7


@record(slots=True)
class Slotted:
    a: int
    b: bytes = b""


@record
class Derived(Plain):
    extra: str = "x"


def test_positional_keyword_and_defaults() -> None:
    p = Plain("disk", tags=["a"])
    assert (p.name, p.size, p.tags) == ("disk", 0, ["a"])
    assert Plain("a", 3) == Plain(name="a", size=3)
    assert Plain("a") != Plain("b")
    assert Plain("a") != ("a", 0, [])  # type: ignore[comparison-overlap]


def test_default_factory_makes_a_new_value_per_instance() -> None:
    first, second = Plain("a"), Plain("b")
    first.tags.append("x")
    assert second.tags == []


def test_class_vars_are_not_fields() -> None:
    assert [f.name for f in records.fields(Plain)] == ["name", "size", "tags"]
    assert Plain.kind == "plain"
    assert Plain.__match_args__ == ("name", "size", "tags")


def test_wrong_arguments_raise_type_error() -> None:
    with pytest.raises(TypeError):
        Plain()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Plain("a", nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, 3)  # type: ignore[call-arg]


def test_field_order_rule() -> None:
    with pytest.raises(TypeError, match="without a default"):
        @record
        class Bad:
            a: int = 0
            b: int  # type: ignore[misc]


def test_repr_names_every_field() -> None:
    assert repr(Point(1)) == "Point(x=1, y=7)"
    assert repr(Plain("a")) == "Plain(name='a', size=0, tags=[])"


def test_frozen_refuses_assignment_and_hashes_by_value() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenInstanceError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del p.x
    assert hash(p) == hash(Point(1, 2))
    assert len({Point(1, 2), Point(1, 2), Point(2, 1)}) == 2


def test_copy_and_pickle() -> None:
    import copy
    import pickle

    for value in (Point(1, 2), Slotted(3, b"x"), Plain("a", 1, ["t"])):
        assert copy.deepcopy(value) == value
        assert copy.copy(value) == value
        assert pickle.loads(pickle.dumps(value)) == value  # noqa: S301 - our own bytes


def test_mutable_records_are_unhashable_like_dataclasses() -> None:
    with pytest.raises(TypeError):
        hash(Plain("a"))


def test_slots() -> None:
    s = Slotted(1)
    assert not hasattr(s, "__dict__")
    assert Slotted.__slots__ == ("a", "b")
    with pytest.raises(AttributeError):
        s.c = 1  # type: ignore[attr-defined]
    s.a = 5
    assert s == Slotted(5, b"")


def test_inheritance_appends_fields() -> None:
    d = Derived("n", 1, extra="e")
    assert [f.name for f in records.fields(d)] == ["name", "size", "tags", "extra"]
    assert d.tags == []
    assert d.extra == "e"


def test_replace_and_fields() -> None:
    p = Point(1, 2)
    assert records.replace(p, y=5) == Point(1, 5)
    assert p == Point(1, 2)
    with pytest.raises(TypeError, match="no field"):
        records.replace(p, z=1)
    with pytest.raises(TypeError, match="not a record"):
        records.fields(object())


def test_disk_convert_path_imports_neither_dataclasses_nor_inspect() -> None:
    """The point of records: ``polyvisor disk convert`` starts without them (tens of milliseconds)."""
    code = ("import sys; import polyvisor.cli, polyvisor.disk.convert, polyvisor.disk.registry; "
            "from polyvisor.disk.registry import get_format\n"
            "for name in ('raw', 'qcow2', 'vmdk', 'vhd', 'vhdx', 'vdi'): get_format(name)\n"
            "print(sorted(m for m in ('dataclasses', 'inspect', 'json', 'shutil', 'pkgutil', 'polyvisor.disk.check')"
            " if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=polyvisor_env(),
                          check=True, timeout=60)
    assert proc.stdout.strip() == "[]"
