"""Selective reading of an HF safetensors checkpoint: a rank materializes only what it asks for.

``CheckpointReader`` resolves a tensor name to its file (single ``model.safetensors`` or the
shards of ``model.safetensors.index.json``), checks the full on-disk shape, and reads just the
requested slice through ``safe_open(...).get_slice`` — other ranks' shards and remote experts'
tensors are never read. Every byte it materializes is counted in ``bytes_read``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lora_cluster.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Index = tuple[slice | int, ...]


class CheckpointReader:
    """Reads tensor slices of one model directory; use as a context manager."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.bytes_read = 0
        self.tensors_read = 0
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: unreadable safetensors index ({exc})",
                                     file=str(index)) from exc
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{index}: weight_map must be an object", file=str(index),
                                     key="weight_map")
            return {str(k): str(v) for k, v in weight_map.items()}
        if single.is_file():
            names = self._open(SINGLE_FILE).keys()
            return dict.fromkeys(names, SINGLE_FILE)
        raise ModelLoadError(
            f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (is it an HF model directory?)",
            file=str(self.model_dir),
        )

    def _open(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            path = self.model_dir / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: missing checkpoint shard", file=str(path))
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own SafetensorError types
                raise ModelLoadError(f"{path}: corrupt safetensors file ({exc})",
                                     file=str(path)) from exc
            self._handles[name] = handle
        return handle

    def file_of(self, key: str) -> str:
        """Path of the file that holds ``key`` (or would, for a missing key)."""
        name = self._where.get(key)
        return str(self.model_dir / (name or (INDEX_FILE if self._is_sharded() else SINGLE_FILE)))

    def _is_sharded(self) -> bool:
        return (self.model_dir / INDEX_FILE).is_file()

    def tensor_names(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return list(self._where)

    def has(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        """Full on-disk shape of ``key`` (reads only the header)."""
        return tuple(self._slice(key).get_shape())

    def _slice(self, key: str) -> Any:
        name = self._where.get(key)
        if name is None:
            raise ModelLoadError(f"{self.file_of(key)}: missing tensor {key!r}",
                                 file=self.file_of(key), key=key)
        try:
            return self._open(name).get_slice(key)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{self.file_of(key)}: cannot read tensor {key!r} ({exc})",
                                 file=self.file_of(key), key=key) from exc

    def read(self, key: str, full_shape: Sequence[int], index: Index = ()) -> torch.Tensor:
        """``tensor[index]`` of ``key`` after checking its full shape is ``full_shape``."""
        sl = self._slice(key)
        actual = tuple(sl.get_shape())
        if actual != tuple(full_shape):
            raise ModelLoadError(
                f"{self.file_of(key)}: tensor {key!r} has shape {list(actual)}, "
                f"expected {list(full_shape)}", file=self.file_of(key), key=key,
            )
        try:
            tensor = sl[index] if index else sl[:]
        except Exception as exc:
            raise ModelLoadError(f"{self.file_of(key)}: cannot read tensor {key!r} ({exc})",
                                 file=self.file_of(key), key=key) from exc
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.tensors_read += 1
        return tensor

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
