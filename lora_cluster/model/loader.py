"""``load_model``: an HF directory → this rank's ``DecoderModel``, reading only its shards."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lora_cluster.errors import ConfigError
from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.decoder import DecoderModel, LoadReport
from lora_cluster.model.parallel import Comm, ParallelInfo
from lora_cluster.model.spec import ModelSpec, load_model_spec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, spec: ModelSpec) -> torch.dtype:
    """A torch dtype from a name; None / "auto" take the checkpoint's dtype (float32 if unknown)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype: {dtype} is not supported (use one of {list(_DTYPES)})",
                              field="dtype")
        return dtype
    if dtype is None or dtype == "auto":
        return _DTYPES.get(str(spec.torch_dtype), torch.float32)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not supported (use one of {list(_DTYPES)})",
                          field="dtype")
    return _DTYPES[dtype]


def load_model(model_dir: str | Path, *, parallel: ParallelInfo | None = None,
               comm: Comm | None = None, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", max_loras: int = 0,
               max_lora_rank: int = 0) -> DecoderModel:
    """Build this rank's model from ``model_dir`` (``config.json`` + safetensors).

    Reads only this rank's TP slices and local experts (``model.load_report`` counts the
    bytes); missing or mis-shaped tensors raise ModelLoadError naming the file and key.
    """
    start = time.perf_counter()
    spec = load_model_spec(model_dir)
    model = DecoderModel(spec, parallel=parallel, comm=comm, dtype=resolve_dtype(dtype, spec),
                         device=device, max_loras=max_loras, max_lora_rank=max_lora_rank)
    with CheckpointReader(model_dir) as reader:
        model.load_weights(reader)
        model.load_report = LoadReport(str(model_dir), reader.bytes_read, reader.tensors_read,
                                       time.perf_counter() - start)
    return model.eval()
