"""Keeping XML a codec does not map: elements stored as text in the model's vendor keys, and parsed back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from polyvisor.errors import InvalidModel
from polyvisor.vm.safety import parse_xml


def element_text(element: ET.Element) -> str:
    """An element (and its subtree) as compact XML text, without the tail."""
    copy = ET.fromstring(ET.tostring(element))  # noqa: S314 - re-parsing our own serialisation
    copy.tail = None
    _strip_whitespace(copy)
    return ET.tostring(copy, encoding="unicode")


def element_from_text(text: str, *, key: str) -> ET.Element:
    """Parse a vendor value back into an element (vendor values are untrusted: defused parser)."""
    try:
        return parse_xml(text.encode("utf-8"), source=f"vendor key {key}")
    except Exception as exc:  # noqa: BLE001 - every parse problem becomes one clear model error
        raise InvalidModel(f"vendor key {key!r} does not hold a valid XML element: {exc}") from None


def _strip_whitespace(element: ET.Element) -> None:
    if element.text is not None and not element.text.strip() and len(element):
        element.text = None
    for child in element:
        child.tail = None
        _strip_whitespace(child)


def local(tag: str) -> str:
    """The local part of a ``{namespace}name`` tag."""
    return tag.rsplit("}", 1)[-1]
