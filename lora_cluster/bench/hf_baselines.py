"""Baselines on the same model and requests: HF PEFT mixed batches, and merged weights.

transformers and peft are test-only dependencies: they are imported lazily, and
``hf_missing()`` says what is absent so the report can say "skipped: not installed".

* ``PeftMixed``: one ``PeftModel`` holding every adapter; a batch of requests runs as one
  ``generate(..., adapter_names=[...])`` (PEFT's mixed-adapter batch inference; it refuses
  expert adapters there, so the benchmark's adapters are attention-only).
* ``MergedWeights``: one merged copy ``W + scaling · B @ A`` of every module an adapter
  changes, per adapter (modules it leaves alone are shared); a batch is split by adapter and
  each group runs with its adapter's merged weights switched in by reference — the serving
  cost of "one merged model per adapter" on one device, without the copies of unchanged
  weights. Adapters beyond the memory budget do not fit and are reported as skipped.

Both use HF defaults (SDPA attention, grouped-mm experts where available), greedy decoding,
left padding, and exactly ``max_tokens`` new tokens per request (``min_new_tokens`` = the
batch's longest; only each request's own ``max_tokens`` count as output).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_cluster.bench.workload import BenchRequest
from lora_cluster.testing.presets import PAD_ID

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_missing() -> str | None:
    """Why the HF baselines cannot run here (None when transformers and peft import)."""
    missing = []
    for module in ("transformers", "peft"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return f"skipped: not installed ({', '.join(missing)})" if missing else None


class HFModel:
    """The base model in transformers, and batched greedy generation over it."""

    def __init__(self, model_dir: str | Path, *, device: str, dtype: str) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.device = torch.device(device)
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[dtype])
        self.model: Any = model.to(self.device).eval()
        self.generator: Any = self.model  # replaced by the PeftModel once adapters are added

    @torch.inference_mode()
    def generate(self, requests: Sequence[BenchRequest],
                 adapter_names: Sequence[str] | None = None) -> list[list[int]]:
        """Each request's ``max_tokens`` greedy new tokens (one left-padded batch)."""
        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        new = max(r.max_tokens for r in requests)
        kwargs: dict[str, Any] = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = list(adapter_names)
        out = self.generator.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=PAD_ID,
            **kwargs)
        rows = out[:, width:].tolist()  # synchronises the device
        return [row[:r.max_tokens] for row, r in zip(rows, requests)]


class PeftMixed:
    """Every adapter in one ``PeftModel``; a batch is one mixed-adapter ``generate``."""

    def __init__(self, hf: HFModel) -> None:
        self.hf = hf
        self.names: list[str] = []

    def add(self, name: str, adapter_dir: str | Path) -> None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if not self.names:
                self.hf.generator = PeftModel.from_pretrained(
                    self.hf.model, str(adapter_dir), adapter_name=name).eval()
            else:
                self.hf.generator.load_adapter(str(adapter_dir), adapter_name=name)
        self.names.append(name)

    def run_batch(self, requests: Sequence[BenchRequest]) -> list[list[int]]:
        return self.hf.generate(requests, [self.names[r.adapter] for r in requests])


def _scaling(cfg: dict[str, Any]) -> float:
    r, alpha = float(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


class MergedWeights:
    """Per adapter, merged copies of the modules it changes; switched in by reference.

    Works on the plain base model: build and run it before ``PeftMixed`` wraps the model.
    """

    def __init__(self, hf: HFModel) -> None:
        self.hf = hf
        self.sets: list[dict[str, torch.nn.Parameter]] = []
        self.original: dict[str, torch.nn.Parameter] = {}
        self.bytes_per_adapter = 0

    @torch.inference_mode()
    def add(self, adapter_dir: str | Path) -> None:
        """Merge one adapter (plain linear LoRA only; anything else raises ValueError)."""
        from safetensors.torch import load_file

        root = Path(adapter_dir)
        cfg = json.loads((root / "adapter_config.json").read_text())
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
            raise ValueError(f"{root}: the merged baseline handles uniform-rank plain LoRA only")
        tensors = load_file(str(root / "adapter_model.safetensors"))
        scaling = _scaling(cfg)
        merged: dict[str, torch.nn.Parameter] = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                if ".lora_B." not in key:
                    raise ValueError(f"{root}: {key}: the merged baseline handles linear LoRA only")
                continue
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = self.hf.model.get_submodule(path)
            self.original.setdefault(path, module.weight)
            base = self.original[path]
            delta = scaling * (b.to(base.device, torch.float32) @ a.to(base.device, torch.float32))
            weight = (base.float() + delta).to(base.dtype)
            merged[path] = torch.nn.Parameter(weight, requires_grad=False)
        self.bytes_per_adapter = sum(p.numel() * p.element_size() for p in merged.values())
        self.sets.append(merged)

    def _switch(self, weights: dict[str, torch.nn.Parameter]) -> None:
        for path, param in weights.items():
            self.hf.model.get_submodule(path).weight = param

    def restore(self) -> None:
        """Put the base weights back."""
        self._switch(self.original)

    def run_batch(self, requests: Sequence[BenchRequest]) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        out: list[list[int]] = [[] for _ in requests]
        try:
            for adapter, rows in groups.items():
                self._switch(self.sets[adapter])
                tokens = self.hf.generate([requests[i] for i in rows])
                for i, t in zip(rows, tokens):
                    out[i] = t
        finally:
            self.restore()
        return out


def memory_budget_bytes(device: str, fraction: float = 0.5) -> int:
    """Room for merged copies: ``fraction`` of free device memory (CUDA) or of available RAM."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free * fraction)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return 4 << 30
