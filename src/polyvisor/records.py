"""Typed record classes that are cheap to define: :func:`record` is :func:`dataclasses.dataclass` for the disk layer.

The disk layer declares about sixty small classes (on-disk structures, extents, options).  As dataclasses,
each took about 1 ms to define (``dataclass`` compiles five methods per class) and importing
:mod:`dataclasses` pulls in ``inspect``, ``ast``, ``dis`` and ``tokenize``: together some 30 ms of every
``polyvisor disk convert``, whose peer qemu-img starts in 10 ms.  A record compiles only its
``__init__``; ``repr``, ``==`` and ``hash`` are shared functions over the fields.  Type checkers treat
:func:`record` as ``dataclass`` (PEP 681 ``dataclass_transform``).

Supported: defaults and :func:`field` default factories, ``frozen`` (assignment raises
:class:`FrozenInstanceError`; instances hash by value), ``slots``, ``ClassVar`` annotations (not fields),
inheritance from another record, and :func:`fields` / :func:`replace`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform, overload

T = TypeVar("T")

#: Marks a parameter the caller did not pass (its field has a default factory).
_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()

#: Where a class keeps its fields.
_FIELDS = "__record_fields__"


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class Field:
    """One field of a record: its name and default (a value, or a factory called per instance)."""

    __slots__ = ("default", "default_factory", "name")

    def __init__(self, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None) -> None:
        if default is not _MISSING and default_factory is not None:
            raise ValueError("a field cannot have both a default and a default_factory")
        self.name = ""
        self.default = default
        self.default_factory = default_factory

    @property
    def has_default(self) -> bool:
        """Whether the field may be left out of the constructor call."""
        return self.default is not _MISSING or self.default_factory is not None

    def __repr__(self) -> str:
        return f"Field(name={self.name!r})"


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None) -> Any:
    """A field's default given as a factory (``field(default_factory=list)``), as in dataclasses."""
    return Field(default, default_factory)


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = False, slots: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[T] | None = None, /, *, frozen: bool = False,
           slots: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """Turn a class with annotated attributes into a record (``@record`` or ``@record(frozen=True, slots=True)``)."""

    def wrap(c: type[T]) -> type[T]:
        return _make_record(c, frozen=frozen, slots=slots)

    return wrap if cls is None else wrap(cls)


def fields(class_or_instance: Any) -> tuple[Field, ...]:
    """The fields of a record class or instance, in declaration order."""
    found: tuple[Field, ...] | None = getattr(class_or_instance, _FIELDS, None)
    if found is None:
        raise TypeError(f"{class_or_instance!r} is not a record")
    return found


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of record *obj* with some fields changed."""
    values = {}
    for f in fields(obj):
        values[f.name] = changes.pop(f.name) if f.name in changes else getattr(obj, f.name)
    if changes:
        raise TypeError(f"{type(obj).__name__} has no field {next(iter(changes))!r}")
    return type(obj)(**values)


# ------------------------------------------------------------------ building the class


def _is_class_var(annotation: object) -> bool:
    if isinstance(annotation, str):
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    return annotation is ClassVar or getattr(annotation, "__origin__", None) is ClassVar


def _make_record(cls: type[T], *, frozen: bool, slots: bool) -> type[T]:
    # the nearest record base's fields (it already holds its own bases' fields)
    by_name = {f.name: f for f in getattr(cls, _FIELDS, ())}
    own: list[str] = []
    # the class's own annotations (inspect.get_annotations would import inspect, which this module avoids)
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
        if _is_class_var(annotation):
            continue
        value = cls.__dict__.get(name, _MISSING)
        f = value if isinstance(value, Field) else Field(value)
        f.name = name
        if isinstance(value, Field):
            if f.default is _MISSING:
                delattr(cls, name)  # a factory or nothing: no class attribute
            else:
                setattr(cls, name, f.default)
        by_name[name] = f
        own.append(name)
    all_fields = tuple(by_name.values())
    seen_default = False
    for f in all_fields:
        if f.has_default:
            seen_default = True
        elif seen_default:
            raise TypeError(f"{cls.__name__}: field {f.name!r} without a default follows one with a default")

    added: dict[str, Any] = {
        _FIELDS: all_fields,
        "__match_args__": tuple(f.name for f in all_fields),
        "__init__": _make_init(cls.__qualname__, all_fields, frozen=frozen),
    }
    if "__repr__" not in cls.__dict__:
        added["__repr__"] = _record_repr
    if "__eq__" not in cls.__dict__:
        added["__eq__"] = _record_eq
        added["__hash__"] = _record_hash if frozen else None
    if frozen:
        added["__setattr__"] = _frozen_setattr
        added["__delattr__"] = _frozen_delattr
        if slots:  # copy and pickle would restore the slots with setattr, which a frozen record refuses
            added["__getstate__"] = _values
            added["__setstate__"] = _frozen_setstate
    if not slots:
        for name, value in added.items():
            setattr(cls, name, value)
        return cls
    # __slots__ only takes effect when the class is created: make it anew, as dataclasses does.
    namespace = {**cls.__dict__, **added}
    base_slots = {s for base in cls.__mro__[1:] for s in getattr(base, "__slots__", ())}
    namespace["__slots__"] = tuple(name for name in own if name not in base_slots)
    for name in own:
        namespace.pop(name, None)  # defaults live in __init__; a class attribute would clash with the slot
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    metaclass: Any = type(cls)
    new_cls: type[T] = metaclass(cls.__name__, cls.__bases__, namespace)
    new_cls.__qualname__ = cls.__qualname__
    return new_cls


def _make_init(qualname: str, all_fields: tuple[Field, ...], *, frozen: bool) -> Callable[..., None]:
    """Compile ``__init__(self, a, b=default, ...)`` for the fields (the one method worth compiling)."""
    scope: dict[str, Any] = {"_MISSING": _MISSING, "_set": object.__setattr__}
    params = []
    body = []
    for i, f in enumerate(all_fields):
        value = f.name
        if f.default_factory is not None:
            scope[f"_factory_{i}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            value = f"_factory_{i}() if {f.name} is _MISSING else {f.name}"
        elif f.default is not _MISSING:
            scope[f"_default_{i}"] = f.default
            params.append(f"{f.name}=_default_{i}")
        else:
            params.append(f.name)
        body.append(f"    _set(self, {f.name!r}, {value})" if frozen else f"    self.{f.name} = {value}")
    source = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(source, scope)  # noqa: S102 - source built from the class's own field names
    init: Callable[..., None] = scope["__init__"]
    init.__qualname__ = f"{qualname}.__init__"
    return init


def _values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, f.name) for f in getattr(obj, _FIELDS))


def _record_repr(self: Any) -> str:
    inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in getattr(self, _FIELDS))
    return f"{type(self).__qualname__}({inner})"


def _record_eq(self: Any, other: object) -> bool:
    if other.__class__ is not self.__class__:
        result: bool = NotImplemented
        return result
    return bool(_values(self) == _values(other))


def _record_hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _frozen_setstate(self: Any, state: tuple[Any, ...]) -> None:
    for f, value in zip(getattr(self, _FIELDS), state, strict=True):
        object.__setattr__(self, f.name, value)


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")
