"""Which files an ONNX model makes onnxruntime read besides itself (its external data).

A tensor may keep its bytes in a side file named by its ``external_data``
``location``; onnxruntime opens that file relative to the model. A bundle's
manifest hashes the .onnx file, which holds only the name, so an unhashed side
file could be swapped unnoticed: ``bundle`` refuses any location the manifest
does not list.

This reads the protobuf wire format directly, stdlib only (the ``onnx`` package
is imported only to build bundles, never by search or index). The file is memory-mapped and
only the messages that can hold tensors are walked; weights (``raw_data``) are
skipped by length, never read.
"""
from __future__ import annotations

import mmap
from pathlib import Path

# Field numbers from onnx.proto: for each message, the fields that lead to tensors.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
_LOCATION = b"location"


class OnnxFormatError(ValueError):
    """The file is not a well-formed protobuf message."""


def external_data_locations(path: Path) -> set[str]:
    """Every ``location`` an initializer or constant tensor of the model at ``path`` points to.

    Raises OnnxFormatError on a malformed file.

    >>> external_data_locations(Path("image.onnx"))  # doctest: +SKIP
    {'image.onnx.data'}
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk(data)


def _walk(data: mmap.mmap) -> set[str]:
    found: set[str] = set()
    # An explicit stack of (message kind, end offset, [key, value] of an entry): no recursion to exhaust.
    stack: list[tuple[str, int, list[bytes | None]]] = [("model", len(data), [None, None])]
    pos = 0
    while stack:
        kind, end, entry = stack[-1]
        if pos >= end:
            stack.pop()
            if kind == "entry" and entry[0] == _LOCATION and entry[1] is not None:
                found.add(entry[1].decode("utf-8", "replace"))
            continue
        tag, pos = _varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            child_end = pos + length
            if child_end > end:
                raise OnnxFormatError("a field runs past the end of its message")
            child = _CHILDREN[kind].get(field)
            if kind == "entry" and field in (1, 2):
                entry[field - 1] = bytes(data[pos:child_end])
            elif child is not None:
                stack.append((child, child_end, [None, None]))
                continue
            pos = child_end
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise OnnxFormatError("a field runs past the end of its message")
    return found


def _varint(data: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
