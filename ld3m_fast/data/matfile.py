"""A reader for the part of MATLAB's MAT-file format 5 that ImageNet's devkit uses.

`ILSVRC2012_devkit_t12/data/meta.mat` holds one variable, `synsets`: a struct array whose
fields include `ILSVRC2012_ID` (double) and `WNID` (char). It is what maps the class ids
of `ILSVRC2012_validation_ground_truth.txt` to wnids. This module reads MAT 5 files
(MATLAB's default up to v7, optionally zlib-compressed) with numeric, char, logical,
struct and cell arrays, in either byte order, without scipy; sparse arrays, objects and
v7.3 (HDF5) files are refused. Layout: MathWorks, "MAT-File Format", chapter 1.
Malformed input raises `ValueError`.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

HEADER_BYTES = 128
MAX_INFLATED_BYTES = 1 << 28  # meta.mat inflates to ~1 MB; refuse zip bombs

MI_INT8, MI_UINT8, MI_INT16, MI_UINT16, MI_INT32, MI_UINT32 = 1, 2, 3, 4, 5, 6
MI_MATRIX, MI_COMPRESSED, MI_UTF8, MI_UTF16, MI_UTF32 = 14, 15, 16, 17, 18
_NUMERIC = {MI_INT8: "i1", MI_UINT8: "u1", MI_INT16: "i2", MI_UINT16: "u2", MI_INT32: "i4", MI_UINT32: "u4",
            7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MX_CELL, MX_STRUCT, MX_CHAR = 1, 2, 4
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_LOGICAL_FLAG = 0x200


class _Reader:
    """Walks the data elements of one byte buffer."""

    def __init__(self, data: bytes, order: str):
        self.data, self.order, self.pos = data, order, 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def element(self) -> tuple[int, bytes]:
        """(type, payload) of the next data element; moves past its padding."""
        if self.pos + 8 > len(self.data):
            raise ValueError("data element header cut short")
        first, second = struct.unpack_from(self.order + "II", self.data, self.pos)
        if first >> 16:  # small data element: 2-byte size, 2-byte type, payload in the next 4 bytes
            size, kind = first >> 16, first & 0xFFFF
            if size > 4:
                raise ValueError(f"small data element of {size} bytes")
            payload = self.data[self.pos + 4:self.pos + 4 + size]
            self.pos += 8
            return kind, payload
        kind, size = first, second
        start = self.pos + 8
        if start + size > len(self.data):
            raise ValueError(f"data element of {size} bytes runs past the end of the file")
        self.pos = start + size + (0 if kind == MI_COMPRESSED else (-size) % 8)
        return kind, self.data[start:start + size]


def _numbers(kind: int, payload: bytes, order: str) -> np.ndarray:
    if kind not in _NUMERIC:
        raise ValueError(f"data element type {kind} is not numeric")
    dtype = np.dtype(_NUMERIC[kind]).newbyteorder(order)
    if len(payload) % dtype.itemsize:
        raise ValueError("numeric data element of a partial number")
    return np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="))


def _text(kind: int, payload: bytes, order: str, shape: tuple[int, ...]) -> str | list[str]:
    if kind in (MI_UTF8, MI_UINT8, MI_INT8):
        chars = payload.decode("utf-8", errors="replace")
    elif kind in (MI_UINT16, MI_UTF16):
        chars = payload.decode("utf-16-" + ("le" if order == "<" else "be"), errors="replace")
    elif kind == MI_UTF32:
        chars = payload.decode("utf-32-" + ("le" if order == "<" else "be"), errors="replace")
    else:
        raise ValueError(f"char array stored as type {kind}")
    if len(shape) != 2 or shape[0] * shape[1] != len(chars):
        raise ValueError(f"char array of shape {shape} holds {len(chars)} characters")
    rows, cols = shape
    # Column-major: row r is chars[r], chars[r + rows], ...
    lines = ["".join(chars[r + rows * c] for c in range(cols)) for r in range(rows)]
    return lines[0] if rows == 1 else ("" if rows == 0 else lines)


def _matrix(payload: bytes, order: str):
    """The value of one miMATRIX payload (name element included)."""
    if not payload:
        return np.zeros((0, 0))
    reader = _Reader(payload, order)
    flags_kind, flags = reader.element()
    if flags_kind != MI_UINT32 or len(flags) != 8:
        raise ValueError("array flags missing")
    flag_word = struct.unpack_from(order + "I", flags)[0]
    mx_class = flag_word & 0xFF
    shape = tuple(int(d) for d in _numbers(*reader.element(), order))
    reader.element()  # the array's name (empty inside structs and cells)
    count = int(np.prod(shape)) if shape else 0
    if mx_class == MX_CHAR:
        return _text(*reader.element(), order, shape) if count else ""
    if mx_class in _MX_NUMERIC:
        values = _numbers(*reader.element(), order)
        if values.size != count:
            raise ValueError(f"numeric array of shape {shape} holds {values.size} values")
        values = values.reshape(shape, order="F")
        return values.astype(bool) if flag_word & _LOGICAL_FLAG else values.astype(_MX_NUMERIC[mx_class])
    if mx_class == MX_CELL:
        return [_element_matrix(reader, order) for _ in range(count)]
    if mx_class == MX_STRUCT:
        _, length = reader.element()
        lengths = _numbers(MI_INT32, length, order)
        if lengths.size != 1:
            raise ValueError("struct field name length missing")
        name_length = int(lengths[0])
        _, names_raw = reader.element()
        if name_length <= 0 or len(names_raw) % name_length:
            raise ValueError("struct field names malformed")
        names = [names_raw[i:i + name_length].split(b"\0")[0].decode("ascii", errors="replace")
                 for i in range(0, len(names_raw), name_length)]
        return [{name: _element_matrix(reader, order) for name in names} for _ in range(count)]
    raise ValueError(f"MATLAB array class {mx_class} (sparse, object, function) is not supported")


def _element_matrix(reader: _Reader, order: str):
    kind, payload = reader.element()
    if kind != MI_MATRIX:
        raise ValueError(f"expected an array element, found type {kind}")
    return _matrix(payload, order)


def _array_name(payload: bytes, order: str) -> str:
    reader = _Reader(payload, order)
    reader.element()
    reader.element()
    return reader.element()[1].decode("ascii", errors="replace")


def _inflate(payload: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload, MAX_INFLATED_BYTES)
    except zlib.error as error:
        raise ValueError(f"compressed element: {error}") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"compressed element inflates past {MAX_INFLATED_BYTES} bytes")
    return data


def read_mat(path: str | Path) -> dict:
    """Every variable of a MAT 5 file: name -> value.

    Values: numeric and logical arrays as numpy arrays in MATLAB's shape; a char row as a
    str (several rows: a list of str); a struct array as a list of {field: value} dicts in
    MATLAB's (column-major) element order; a cell array as a list.
    """
    raw = Path(path).read_bytes()
    if len(raw) < HEADER_BYTES:
        raise ValueError("shorter than a MAT-file header")
    if raw[:19] == b"MATLAB 7.3 MAT-file" or raw[HEADER_BYTES - 4:HEADER_BYTES - 2] == b"\x00\x02":
        raise ValueError("a MATLAB v7.3 (HDF5) file; save it with -v7 or -v6")
    marker = raw[HEADER_BYTES - 2:HEADER_BYTES]
    order = {b"IM": "<", b"MI": ">"}.get(marker)
    if order is None:
        raise ValueError("not a MAT-file (no MAT 5 endian indicator)")
    reader = _Reader(raw[HEADER_BYTES:], order)
    variables = {}
    while not reader.at_end():
        kind, payload = reader.element()
        if kind == MI_COMPRESSED:
            kind, payload = _Reader(_inflate(payload), order).element()
        if kind != MI_MATRIX:
            continue
        variables[_array_name(payload, order)] = _matrix(payload, order)
    return variables


__all__ = ["read_mat"]
