"""Selective reads of 2-D tensors from an adapter file; every materialized byte is counted.

The safetensors file is memory-mapped and read with the offsets of the header we already
parsed (``header.TensorTable``): a read copies exactly the requested rows/columns — this
rank's TP slice, its local experts — into a new tensor, and the OS pages in only what is
touched. A small file (tensor data ending within ``SMALL_FILE_BYTES``) is instead read whole
with one ``readinto``: mapping it, faulting its few pages in one by one and unmapping cost
more than copying all of it from the page cache (cpu-tiny's 50 kB adapters: ~0.7 → ~0.1 ms a
read), and a whole tensor is then a view of that private buffer, not another copy. Many same-shape tensors (per-expert "2D" LoRA: thousands of tiny tensors) are read
as one stack by a single numpy gather of byte ranges, instead of one tensor object per
expert. (``safe_open``/``get_slice`` would re-parse the header — ~170 ms for 82k entries on
the CI box — and build one torch tensor per name, ~20 µs each; see benchmarks/adapter_load.py.)
``.bin`` files come mmap'd from ``torch.load`` and are sliced with torch indexing.

Ranges are [start, stop); ``None`` means the whole dimension. ``bytes_read`` counts the
bytes the returned tensors hold (a rank's share), whichever way the file was read.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence

import numpy as np
import torch

from lora_cluster.adapters.header import DTYPES, TensorTable
from lora_cluster.errors import AdapterFormatError, AdapterNotFoundError

Range = tuple[int, int]

SMALL_FILE_BYTES = 256 << 10  # read whole below this (a memcpy of it is a few µs)


def _runs(index: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Split a 1-D index array into runs of equal length m of consecutive values.

    Returns (run starts [k], m), or None when the runs are not all of one length.
    """
    if not index.size:
        return None
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    m = int(breaks[0]) if breaks.size else int(index.size)
    if index.size % m:
        return None
    runs = index.reshape(-1, m)
    if m > 1 and not np.all(runs[:, 1:] - runs[:, :-1] == 1):
        return None
    return runs[:, 0], m


class TensorReader:
    """Reads slices of one adapter file's tensors (see module docstring); a context manager."""

    def __init__(self, table: TensorTable) -> None:
        self.table = table
        self.bytes_read = 0
        self.tensors_read = 0
        self._buf: np.ndarray | None = None
        self._mm: mmap.mmap | None = None
        self._owned = False  # ``_buf`` is this reader's own copy (views of it may be kept)
        if table.tensors is None:
            end = table.data_start + (int(table.end.max()) if table.end.size else 0)
            if end <= SMALL_FILE_BYTES:
                self._buf = _read_head(table.path, end)
                self._owned = True
                return
            mapped = np.memmap(table.path, dtype=np.uint8, mode="r")
            self._mm = getattr(mapped, "_mmap", None)
            if self._mm is not None and hasattr(mmap, "MADV_RANDOM"):
                # No readahead: a fault maps only its own page, so the neighbouring (remote)
                # experts' bytes are not paged into this rank.
                self._mm.madvise(mmap.MADV_RANDOM)
            # A plain array over the same map: slicing a memmap builds a memmap per slice
            # (~80 µs of Python per tensor of a small adapter); this stays a view.
            self._buf = mapped.view(np.ndarray)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._buf = None
        mm, self._mm = self._mm, None
        if mm is not None:
            # A caller may still hold a view; then the GC closes the map later.
            with contextlib.suppress(BufferError):
                mm.close()

    def _geometry(self, pos: int) -> tuple[int, int, torch.dtype, int, int]:
        shape = self.table.shapes[pos]
        if len(shape) != 2:
            raise ValueError(f"{self.table.names[pos]!r}: expected a 2-D tensor, got {shape}")
        dtype, size = DTYPES[self.table.dtypes[pos]]
        return int(shape[0]), int(shape[1]), dtype, size, self.table.data_start + int(
            self.table.begin[pos])

    def _gather(self, starts: np.ndarray, nbytes: int, align: int = 1) -> np.ndarray:
        """[len(starts), nbytes] uint8: the byte run at each start (one numpy gather). One run
        of an owned buffer starting on an ``align`` multiple comes back as a view of it."""
        assert self._buf is not None
        self.bytes_read += int(starts.size) * nbytes
        if starts.size == 1:
            s = int(starts.reshape(-1)[0])
            run = self._buf[s: s + nbytes]
            # A view only where ``view(dtype)`` accepts its offset; a map's bytes are copied
            # (the map closes with the reader).
            keep = self._owned and s % align == 0
            return (run if keep else np.array(run)).reshape(1, nbytes)
        windows = np.lib.stride_tricks.as_strided(
            self._buf, shape=(self._buf.shape[0] - nbytes + 1, nbytes), strides=(1, 1))
        return windows[starts.reshape(-1)]

    def read_stack(self, positions: Sequence[int] | np.ndarray, rows: Range | np.ndarray | None = None,
                   cols: Range | np.ndarray | None = None) -> torch.Tensor:
        """[n, rows, cols] from n tensors of one shape and dtype (rows/cols: range or index)."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        if self.table.tensors is not None:
            return self._bin_stack(pos, rows, cols)
        n_rows, n_cols, dtype, size, _ = self._geometry(int(pos[0]))
        if pos.size == 1 and _whole(rows, n_rows) and _whole(cols, n_cols):
            # One whole tensor (a TP-unsharded linear): one byte run, no index arrays.
            first = self.table.data_start + int(self.table.begin[int(pos[0])])
            self.tensors_read += 1
            whole = self._gather(np.asarray([first]), n_rows * n_cols * size, size)
            return torch.from_numpy(whole).view(dtype).reshape(1, n_rows, n_cols)
        # Callers stack tensors of one plan-verified shape; sizes and dtypes are re-checked here
        # in bulk because a stack must never mix them.
        sizes = self.table.end[pos] - self.table.begin[pos]
        if np.any(sizes != sizes[0]) or (self.table.uniform_dtype is None and len(
                {self.table.dtypes[p] for p in pos.tolist()}) != 1):
            raise ValueError(f"{self.table.path}: stacked tensors differ in shape or dtype")
        row_idx = _index(rows, n_rows)
        col_idx = _index(cols, n_cols)
        begins = self.table.data_start + self.table.begin[pos]
        run = _runs(col_idx)
        full_rows = run is not None and run[1] == n_cols and bool(np.all(np.diff(row_idx) == 1))
        self.tensors_read += int(pos.size)
        if full_rows:  # whole rows, consecutive: one byte run per tensor
            start = begins + int(row_idx[0]) * n_cols * size
            raw = self._gather(start, row_idx.size * n_cols * size, size)
        elif run is not None:  # column runs: one byte run per (tensor, row, run)
            start = begins[:, None, None] + (row_idx[None, :, None] * n_cols
                                             + run[0][None, None, :]) * size
            raw = self._gather(start, run[1] * size)
        else:  # arbitrary columns: one run per element
            start = begins[:, None, None] + (row_idx[None, :, None] * n_cols
                                             + col_idx[None, None, :]) * size
            raw = self._gather(start, size)
        out = torch.from_numpy(np.ascontiguousarray(raw)).view(dtype)
        return out.reshape(pos.size, row_idx.size, col_idx.size)

    def read(self, pos: int, rows: Range | np.ndarray | None = None,
             cols: Range | np.ndarray | None = None) -> torch.Tensor:
        """One 2-D tensor's [rows, cols] slice."""
        if self._owned:  # the common case of a small file: a whole tensor, a view
            n_rows, n_cols, dtype, size, first = self._geometry(pos)
            if first % size == 0 and _whole(rows, n_rows) and _whole(cols, n_cols):
                nbytes = n_rows * n_cols * size
                self.tensors_read += 1
                self.bytes_read += nbytes
                assert self._buf is not None
                run = torch.from_numpy(self._buf[first: first + nbytes])
                return run.view(dtype).view(n_rows, n_cols)
        return self.read_stack([pos], rows, cols)[0]

    def _bin_stack(self, pos: np.ndarray, rows: Range | np.ndarray | None,
                   cols: Range | np.ndarray | None) -> torch.Tensor:
        assert self.table.tensors is not None
        parts = []
        for p in pos.tolist():
            t = self.table.tensors[self.table.names[p]]
            r_idx = torch.from_numpy(_index(rows, t.shape[0]))
            c_idx = torch.from_numpy(_index(cols, t.shape[1]))
            part = t.index_select(0, r_idx).index_select(1, c_idx)
            self.bytes_read += part.numel() * part.element_size()
            parts.append(part)
        self.tensors_read += len(parts)
        return torch.stack(parts)


def read_file_head(path: str, nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of ``path`` in a new uint8 array (one read; typed error naming the
    file if it is missing, unreadable or shorter)."""
    return _read_head(path, nbytes)


def _read_head(path: str, nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of ``path`` in a new uint8 array (one read; typed error if short)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    try:
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(buf.data)
            while got is not None and 0 < got < nbytes:  # a short read of a regular file is rare
                more = f.readinto(buf.data[got:])
                if not more:
                    break
                got += more
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path}: adapter weights not found", file=path) from None
    except OSError as exc:
        raise AdapterFormatError(f"{path}: unreadable ({exc})", file=path) from exc
    if got != nbytes:
        raise AdapterFormatError(f"{path}: truncated: the header's tensors end at byte {nbytes}, "
                                 f"the file has {got or 0}", file=path)
    return buf


def _whole(sel: Range | np.ndarray | None, full: int) -> bool:
    """Whether a selection is the whole dimension (None or the range [0, full))."""
    return sel is None or (isinstance(sel, tuple) and sel[0] == 0 and sel[1] == full)


def _index(sel: Range | np.ndarray | None, full: int) -> np.ndarray:
    if sel is None:
        return np.arange(full, dtype=np.int64)
    if isinstance(sel, np.ndarray):
        return sel.astype(np.int64, copy=False)
    lo, hi = sel
    return np.arange(lo, hi, dtype=np.int64)
