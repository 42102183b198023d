"""Safetensors files a user hands omni, checked before they are trusted, and read with numpy alone.

Every safetensors file omni reads from a user (an `omni export`, an HF Llama folder or its shards named by
model.safetensors.index.json, a patch_projection.safetensors) goes through `read_header` first:

    bytes 0..8          the header length N, little-endian; at most MAX_HEADER_BYTES (100 MB, safetensors' own
                        limit), and the file must hold all N bytes
    bytes 8..8+N        a JSON object, UTF-8, no name twice: tensor name -> {"dtype": one of DTYPES, "shape": a
                        list of non-negative ints, "data_offsets": [begin, end]}, and an optional "__metadata__"
                        mapping strings to strings
    the rest            the data area: each tensor's bytes at [begin, end) of it, end - begin == prod(shape) x the
                        dtype's size; the tensors, in offset order, cover it exactly (no overlap, no gap, nothing
                        after the last, nothing missing: a truncated file is refused)

What does not hold is one error (the caller's OmniError subclass, ExportError by default) naming the file and the
tensor and saying what to do, never the library's own `header too large` or `invalid offset`. Tensors are then read
from the file by their checked offsets (`read_tensor`, `read_file`), so a header that passed cannot make numpy read
out of range. Locations may be URLs (omni.storage): a header is a ranged read, not a download of the file.

`read_index` does the same for model.safetensors.index.json: a JSON object whose "weight_map" maps tensor names
to file names inside the folder, every one of them present.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from omni import storage
from omni.errors import ExportError, OmniError

MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers (MAX_HEADER_SIZE): so does omni, first
METADATA = "__metadata__"
DTYPES = {  # the safetensors dtype names omni reads -> numpy (little-endian, as the format is)
    "BOOL": np.dtype(bool), "U8": np.dtype("u1"), "I8": np.dtype("i1"), "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "C64": np.dtype("<c8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FIX = "the file is damaged or was not written by a safetensors writer; download or export it again"


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # in the data area
    end: int


@dataclass
class Header:
    location: str                 # the file, as messages name it
    data_start: int               # 8 + the header length
    tensors: dict[str, Entry]     # by name, in file (offset) order
    metadata: dict[str, str]
    error: type = ExportError     # what reading its tensors raises


def _fail(error: type, location, reason: str, fix: bool = True) -> OmniError:
    return error(f"{location}: {reason}" + (f"; {FIX}" if fix else ""))


def _open(location, error: type):
    """The file open for reading (a URL: the store's file object, read in ranges)."""
    p = storage.path(location)
    try:
        return storage.retry(lambda: p.open("rb"), f"open {p}")
    except FileNotFoundError:
        raise _fail(error, p, "no such file", fix=False) from None
    except IsADirectoryError:
        raise _fail(error, p, "is a folder, not a safetensors file", fix=False) from None
    except OSError as e:
        raise _fail(error, p, f"cannot be read ({e.strerror or e})", fix=False) from None


def _read(f, location, offset: int, size: int, error: type) -> bytearray:
    buffer = bytearray(size)
    try:
        f.seek(offset)
        got = f.readinto(buffer) if size else 0
        while got < size:  # a short read from a store: ask for the rest
            more = f.readinto(memoryview(buffer)[got:])
            if not more:
                break
            got += more
    except OSError as e:
        raise _fail(error, location, f"cannot be read ({e.strerror or e})", fix=False) from None
    if got != size:
        raise _fail(error, location, f"ends at byte {offset + got}, before the {size} bytes at {offset} its header "
                                     f"promised (truncated, or changed while omni read it)")
    return buffer


def _size(f) -> int:
    f.seek(0, 2)
    return f.tell()


def read_header(location, error: type = ExportError) -> Header:
    """The checked header of the safetensors file `location` (see the module docstring for what is checked)."""
    shown = str(storage.path(location))
    with _open(location, error) as f:
        return _parse(f, shown, _size(f), error)


def _parse(f, shown: str, size: int, error: type) -> Header:
    if size < 8:
        raise _fail(error, shown, f"not a safetensors file: {size} bytes, less than the 8-byte header length "
                                  f"it starts with")
    n = int.from_bytes(bytes(_read(f, shown, 0, 8, error)), "little")
    if n > MAX_HEADER_BYTES:
        raise _fail(error, shown, f"its header length says {n:,} bytes, beyond the {MAX_HEADER_BYTES:,}-byte "
                                  f"(100 MB) limit of safetensors headers")
    if n > size - 8:
        raise _fail(error, shown, f"truncated: its header length says {n:,} bytes but the file has only "
                                  f"{size - 8:,} after it")
    raw = bytes(_read(f, shown, 8, n, error))
    twice = []

    def no_name_twice(pairs):
        keys = [k for k, _ in pairs]
        twice.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_name_twice)
    except UnicodeDecodeError:
        raise _fail(error, shown, "its header is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise _fail(error, shown, f"its header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise _fail(error, shown, f"its header is a JSON {type(header).__name__}, not an object of tensors")
    if twice:
        raise _fail(error, shown, f"its header names {quoted(twice[0])} twice")
    metadata = header.pop(METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(error, shown, f"its {METADATA} must map strings to strings, got {_short(metadata)}")
    data_size = size - 8 - n
    tensors = {name: _entry(name, value, shown, error) for name, value in header.items()}
    cursor, previous = 0, None
    for name, e in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.end > data_size:
            raise _fail(error, shown, f"tensor {quoted(name)} has data_offsets [{e.begin}, {e.end}] but the data area "
                                      f"holds only {data_size:,} bytes: the file is truncated or its header lies")
        if e.begin < cursor:
            raise _fail(error, shown, f"tensors {quoted(previous)} and {quoted(name)} overlap (data_offsets up to {cursor} and "
                                      f"from {e.begin})")
        if e.begin > cursor:
            raise _fail(error, shown, f"bytes {cursor}..{e.begin} of the data area, before tensor {quoted(name)}, belong "
                                      f"to no tensor")
        cursor, previous = e.end, name
    if cursor != data_size:
        after = f"after tensor {quoted(previous)}" if previous else "and it names no tensor"
        raise _fail(error, shown, f"{data_size - cursor:,} bytes of the data area {after} belong to no tensor")
    ordered = dict(sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)))
    return Header(shown, 8 + n, ordered, metadata, error)


def _entry(name: str, value, shown: str, error: type) -> Entry:
    where = f"tensor {quoted(name)}"
    if not isinstance(value, dict):
        raise _fail(error, shown, f"{where}: its header entry is {_short(value)}, not {{dtype, shape, data_offsets}}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in value:
            raise _fail(error, shown, f"{where} has no '{key}'")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(error, shown, f"{where} has dtype {_short(dtype)}, not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_count(x) for x in shape):
        raise _fail(error, shown, f"{where} has shape {_short(shape)}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        raise _fail(error, shown, f"{where} has data_offsets {_short(offsets)}; they are [begin, end], "
                                  f"0 <= begin <= end")
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != need:
        raise _fail(error, shown, f"{where} is {dtype} {shape}, {need:,} bytes, but its data_offsets "
                                  f"[{offsets[0]}, {offsets[1]}] span {offsets[1] - offsets[0]:,}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def quoted(name: str) -> str:
    """A tensor name as messages show it: 'name', escaped when it holds a newline or another unprintable."""
    return f"'{name}'" if name.isprintable() else repr(name)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _array(header: Header, name: str, buffer: bytearray) -> np.ndarray:
    e = header.tensors[name]
    return np.frombuffer(buffer, DTYPES[e.dtype]).reshape(e.shape)


def read_tensor(header: Header, name: str) -> np.ndarray:
    """One tensor of a checked file, as a writable numpy array (BF16 as ml_dtypes.bfloat16)."""
    e = header.tensors[name]
    with _open(header.location, header.error) as f:
        return _array(header, name, _read(f, header.location, header.data_start + e.begin, e.end - e.begin,
                                          header.error))


def read_file(location, error: type = ExportError) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file `location` (a local path or a URL), checked, in file order."""
    shown = str(storage.path(location))
    with _open(location, error) as f:
        header = _parse(f, shown, _size(f), error)
        return {name: _array(header, name, _read(f, shown, header.data_start + e.begin, e.end - e.begin, error))
                for name, e in header.tensors.items()}


def read_index(index, error: type = ExportError) -> dict[str, storage.Path]:
    """model.safetensors.index.json: {tensor name: the file in the index's folder holding it}. Checked: a JSON object
    whose "weight_map" maps names to plain file names of that folder, each present."""
    index = storage.path(index)
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{index}: not valid JSON ({str(e)[:120]}); download or export the folder again") from None
    if not isinstance(data, dict):
        raise error(f"{index}: holds a JSON {type(data).__name__}, not an object with a \"weight_map\"")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index}: \"weight_map\" must be a non-empty object of tensor name -> file name, got "
                    f"{_short(weight_map)}; download or export the folder again")
    files = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\\" in file:
            raise error(f"{index}: \"weight_map\" puts tensor {quoted(name)} in {_short(file)}, not the name of a file "
                        f"in {index.parent}")
        files[name] = index.parent / file
    for file in sorted(set(files.values()), key=str):
        if not file.is_file():
            raise error(f"{index} names {file.name}, which is missing from {index.parent}")
    return files
