"""The header table and the selective reader: slices equal torch slicing of the full tensors,
exactly the returned bytes are counted, and malformed headers name the tensor at fault."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_cluster import errors
from lora_cluster.adapters import reader as reader_module
from lora_cluster.adapters.header import read_bin_table, read_safetensors_table
from lora_cluster.adapters.reader import TensorReader

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in DTYPES:
        for e in range(5):
            out[f"{dt}.e{e}"] = torch.randn(6, 10, generator=g).to(dt)
    out["vec"] = torch.randn(7, generator=g)
    return out


SELECTIONS = [
    (None, None),
    ((2, 5), None),                                   # row range: one run per tensor
    (None, (3, 8)),                                   # column range: one run per row
    ((1, 4), (0, 10)),
    (None, np.array([0, 1, 5, 6])),                   # two runs of equal length
    (np.array([5, 0, 3]), np.array([9, 2, 4, 4])),    # arbitrary rows and columns
]


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-mapped", "bin"])
def test_slices_match_torch_indexing(fmt: str, tensors, tmp_path: Path, monkeypatch) -> None:
    if fmt == "safetensors-mapped":  # a file above the whole-read size: memory-mapped
        monkeypatch.setattr(reader_module, "SMALL_FILE_BYTES", 0)
    if fmt == "bin":
        torch.save(tensors, tmp_path / "a.bin")
        table = read_bin_table(tmp_path / "a.bin")
    else:
        save_file(tensors, str(tmp_path / "a.safetensors"))
        table = read_safetensors_table(tmp_path / "a.safetensors")
    pos = {name: i for i, name in enumerate(table.names)}
    assert table.shape_of(pos["vec"]) == (7,) and table.shape_of(pos[f"{DTYPES[0]}.e0"]) == (6, 10)
    with TensorReader(table) as reader:
        for dt in DTYPES:
            names = [f"{dt}.e{e}" for e in (3, 0, 4)]
            full = torch.stack([tensors[n] for n in names])
            for rows, cols in SELECTIONS:
                before = reader.bytes_read
                got = reader.read_stack([pos[n] for n in names], rows, cols)
                r = slice(*rows) if isinstance(rows, tuple) else (
                    torch.from_numpy(rows) if rows is not None else slice(None))
                c = slice(*cols) if isinstance(cols, tuple) else (
                    torch.from_numpy(cols) if cols is not None else slice(None))
                want = full[:, r][:, :, c]
                assert got.dtype == dt and torch.equal(got, want), (dt, rows, cols)
                assert reader.bytes_read - before == want.numel() * want.element_size()
            one = reader.read(pos[names[1]], rows=(1, 3), cols=(2, 4))
            assert torch.equal(one, tensors[names[1]][1:3, 2:4])
            # One tensor whole, or whole rows of it: a view of the read buffer (small file)
            assert torch.equal(reader.read(pos[names[2]]), tensors[names[2]])
            assert torch.equal(reader.read(pos[names[2]], rows=(2, 5)), tensors[names[2]][2:5])
    # Tensors read from the whole-file buffer outlive the reader, and are independent.
    with TensorReader(table) as reader:
        kept = [reader.read(pos[f"{dt}.e1"]) for dt in DTYPES]
    for dt, t in zip(DTYPES, kept):
        assert torch.equal(t, tensors[f"{dt}.e1"])
    kept[0].zero_()
    assert torch.equal(kept[1], tensors[f"{DTYPES[1]}.e1"])


def test_whole_read_of_a_file_truncated_after_its_header_was_parsed(tensors, tmp_path) -> None:
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    table = read_safetensors_table(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(errors.AdapterFormatError, match="truncated"):
        TensorReader(table)
    path.unlink()
    with pytest.raises(errors.AdapterNotFoundError, match="not found"):
        TensorReader(table)


def _header_file(tmp_path: Path, header: dict, data: int = 64) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


@pytest.mark.parametrize("header,words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": "xy", "data_offsets": [8, 16]}}, ["'b'", "bad shape"]),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 3]}}, ["'a'", "data_offsets"]),
    ({"a": {"dtype": "F32", "shape": [2]}}, ["'a'", "no 'data_offsets'"]),
    ({"a": {"dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]}}, ["'a'", "bad shape"]),
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 8]}}, ["'a'", "[2, 3]"]),
    ({"a": {"dtype": "F32", "shape": [40], "data_offsets": [0, 160]}}, ["'a'", "truncated"]),
    ({"a": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, ["'a'", "I8"]),
    ({"a": [1, 2]}, ["'a'", "not an object"]),
])
def test_malformed_header_entries_are_named(header: dict, words: list[str],
                                            tmp_path: Path) -> None:
    with pytest.raises(errors.AdapterFormatError) as info:
        read_safetensors_table(_header_file(tmp_path, header))
    assert all(w in str(info.value) for w in words), str(info.value)
    assert "h.safetensors" in str(info.value)
