"""What an adapter weights file holds — names, dtypes, shapes, byte ranges — without its data.

``adapter_model.safetensors``: the 8-byte little-endian header length, then the JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data section. Only the header is read here. Integrity is checked in bulk (numpy over all
entries): every entry well-formed, a floating dtype, ``end - begin == numel · itemsize`` and
inside the file — so a later read can never run past the data.

``adapter_model.bin`` is opened only through ``torch.load(weights_only=True, mmap=True)``:
tensors stay memory-mapped until sliced, like the safetensors path.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cluster.errors import AdapterFormatError

# safetensors dtype code → (torch dtype, bytes per element); LoRA tensors are floating point.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_CODE_OF = {dt: code for code, (dt, _) in DTYPES.items()}
_ITEMSIZE = {code: size for code, (_, size) in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True, eq=False)
class TensorTable:
    """Every tensor of one adapter file, in file (header) order, as parallel sequences.

    begin/end: [N] int64 byte offsets of each tensor inside the data section, which starts
    at file offset ``data_start`` (safetensors); ``tensors`` holds the mmap'd tensors of a
    ``.bin`` file instead.
    """

    path: str
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    ndim: np.ndarray   # [N] dimensions of each tensor
    dims: np.ndarray   # [N, D] each shape, padded with 1 (D = largest ndim, at least 1)
    begin: np.ndarray
    end: np.ndarray
    data_start: int = 0
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def shape_of(self, pos: int) -> tuple[int, ...]:
        return tuple(int(d) for d in self.dims[pos, : int(self.ndim[pos])])

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def uniform_dtype(self) -> str | None:
        """The one dtype of every tensor, or None when the file mixes dtypes."""
        if not self.dtypes:
            return None
        first = self.dtypes[0]
        return first if self.dtypes.count(first) == len(self.dtypes) else None

    @property
    def nbytes(self) -> int:
        return int((self.end - self.begin).sum())


def _bad_entry(path: str, header: dict[str, Any], names: list[str]) -> AdapterFormatError:
    """Locate the first malformed entry (only runs once something is known to be wrong)."""
    for name in names:
        entry = header[name]
        if not isinstance(entry, dict):
            return AdapterFormatError(f"{path}: header entry {name!r} is not an object",
                                      file=path, key=name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                return AdapterFormatError(f"{path}: header entry {name!r} has no {key!r}",
                                          file=path, key=name)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return AdapterFormatError(f"{path}: tensor {name!r} has a bad shape {shape!r}",
                                      file=path, key=name)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            return AdapterFormatError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}",
                                      file=path, key=name)
    return AdapterFormatError(f"{path}: malformed safetensors header", file=path)


def shape_arrays(shapes: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ndim [N], dims [N, D] padded with 1) of a list of shapes, with C-level iteration."""
    n = len(shapes)
    ndim = np.fromiter(map(len, shapes), np.int64, count=n)
    flat = np.fromiter(chain.from_iterable(shapes), np.int64, count=int(ndim.sum()))
    if flat.size and int(flat.min()) < 0:
        raise ValueError("negative dimension")
    dims = np.ones((n, max(int(ndim.max(initial=0)), 1)), np.int64)
    starts = np.cumsum(ndim) - ndim
    dims[np.repeat(np.arange(n), ndim), np.arange(flat.size) - np.repeat(starts, ndim)] = flat
    return ndim, dims


def _check_extents(path: str, names: list[str], dtypes: list[str], shapes: list[list[int]],
                   numel: np.ndarray, begin: np.ndarray, end: np.ndarray, data_len: int) -> None:
    unknown = set(dtypes) - DTYPES.keys()
    if unknown:
        code = sorted(unknown)[0]
        name = names[dtypes.index(code)]
        raise AdapterFormatError(
            f"{path}: tensor {name!r} has dtype {code}; LoRA weights must be one of "
            f"{sorted(DTYPES)}", file=path, key=name)
    itemsize = np.fromiter(map(_ITEMSIZE.__getitem__, dtypes), np.int64, count=len(dtypes))
    bad = np.flatnonzero((end - begin != numel * itemsize) | (begin < 0) | (end > data_len))
    if bad.size:
        i = int(bad[0])
        past = int(end[i]) > data_len
        why = (f"data ends at byte {int(end[i])} but the file's data section has only "
               f"{data_len} bytes (truncated file?)" if past else
               f"data_offsets {[int(begin[i]), int(end[i])]} do not hold shape {shapes[i]} "
               f"of {dtypes[i]}")
        raise AdapterFormatError(f"{path}: tensor {names[i]!r}: {why}", file=path, key=names[i])


@contextmanager
def _paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while decoding a large header: the decoded JSON is acyclic, and
    the ~5 container objects per tensor would otherwise trigger repeated full collections
    (a 41k-module header decodes ~1.8x faster)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_safetensors_table(path: str | Path) -> TensorTable:
    """Parse and check a safetensors header (reads 8 + header-length bytes, no tensor data)."""
    return parse_safetensors_header(*read_safetensors_header(path))


def read_safetensors_header(path: str | Path) -> tuple[str, bytes, int]:
    """(path, the raw JSON header bytes, the file's size): the first 8 + length bytes only."""
    p = str(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFormatError(f"{p}: not a safetensors file ({size} bytes, no header)",
                                         file=p)
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise AdapterFormatError(
                    f"{p}: corrupt safetensors header: declares {length} header bytes but the file "
                    f"has {size - 8} after the length field (truncated or not safetensors)",
                    file=p)
            raw = f.read(length)
    except FileNotFoundError:
        from lora_cluster.errors import AdapterNotFoundError

        raise AdapterNotFoundError(f"{p}: adapter weights not found", file=p) from None
    except OSError as exc:
        raise AdapterFormatError(f"{p}: unreadable ({exc})", file=p) from exc
    return p, raw, size


def parse_safetensors_header(p: str, raw: bytes, size: int) -> TensorTable:
    """The checked table of a header read by ``read_safetensors_header``."""
    length = len(raw)
    try:
        with _paused_gc():
            header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{p}: corrupt safetensors header (invalid JSON: {exc})",
                                 file=p) from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{p}: corrupt safetensors header (not a JSON object)", file=p)
    header.pop("__metadata__", None)
    names = list(header)
    n = len(names)
    try:
        entries = list(header.values())
        dtypes = list(map(itemgetter("dtype"), entries))
        shapes = list(map(itemgetter("shape"), entries))
        offsets = list(map(itemgetter("data_offsets"), entries))
        if not all(map((2).__eq__, map(len, offsets))):  # (strings/dicts fail in fromiter)
            raise ValueError("data_offsets")
        pairs = np.fromiter(chain.from_iterable(offsets), np.int64, count=2 * n).reshape(n, 2)
        ndim, dims = shape_arrays(shapes)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise _bad_entry(p, header, names) from None
    begin, end = pairs[:, 0].copy(), pairs[:, 1].copy()
    data_start = 8 + length
    _check_extents(p, names, dtypes, shapes, dims.prod(axis=1), begin, end, size - data_start)
    return TensorTable(p, names, dtypes, shapes, ndim, dims, begin, end, data_start)


def read_bin_table(path: str | Path) -> TensorTable:
    """A PEFT ``adapter_model.bin`` through a weights-only, memory-mapped ``torch.load``."""
    p = str(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        from lora_cluster.errors import AdapterNotFoundError

        raise AdapterNotFoundError(f"{p}: adapter weights not found", file=p) from None
    except Exception as exc:  # the unpickler raises many kinds; all mean "unreadable"
        raise AdapterFormatError(f"{p}: not a loadable weights-only torch file ({exc})",
                                 file=p) from exc
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterFormatError(f"{p}: expected a dict of name → tensor", file=p)
    tensors = {k: state[k] for k in sorted(state)}
    names = list(tensors)
    dtypes = []
    for name, t in tensors.items():
        code = _CODE_OF.get(t.dtype)
        if code is None:
            raise AdapterFormatError(f"{p}: tensor {name!r} has dtype {t.dtype}; LoRA weights must "
                                     f"be floating point", file=p, key=name)
        dtypes.append(code)
    shapes = [list(t.shape) for t in tensors.values()]
    sizes = np.fromiter((t.numel() * t.element_size() for t in tensors.values()), np.int64,
                        count=len(names))
    end = np.cumsum(sizes)
    ndim, dims = shape_arrays(shapes)
    return TensorTable(p, names, dtypes, shapes, ndim, dims, end - sizes, end, 0, tensors)


def check_data_size(table: TensorTable, size: int) -> None:
    """Check ``table``'s byte ranges against a file of ``size`` bytes — for a table parsed
    from byte-identical header bytes of another file: every other header check is a function
    of those bytes alone; this one depends on the file (a truncated copy fails here)."""
    data_len = size - table.data_start
    if table.end.size and int(table.end.max()) > data_len:
        _check_extents(table.path, table.names, table.dtypes, table.shapes,
                       table.dims.prod(axis=1), table.begin, table.end, data_len)
