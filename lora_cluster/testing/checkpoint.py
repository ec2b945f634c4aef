"""Write tiny HF checkpoints: ``config.json``, ``generation_config.json``, ``model.safetensors``
(or ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``) and a tokenizer.

Tensor names are the on-disk names transformers reads and ``save_pretrained`` writes:
experts one by one (``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral
``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``), never the fused 3D tensors transformers
builds in memory.

Init (float32, then cast): each tensor is drawn from its own generator seeded by
``(seed, name)``, so a tensor does not change when other parts of the spec do. Scales keep the
residual stream O(1) (linear weights ~ N(0, 1/in)) and make greedy decoding decisive: logits
have std ≈ ``logit_std`` and router logits ≈ ``router_logit_std``, so top-1 tokens and top-k
experts are separated by far more than float32 rounding; norm weights are 1 ± 0.1 so a
forgotten norm weight shows.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lora_cluster.testing.hf_config import ConfigStyle, generation_config, hf_config
from lora_cluster.testing.presets import BOS_ID, PAD_ID, UNK_ID, TinyModelSpec, get_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIXTURE_MARKER = ".lora_cluster_fixture.json"


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator private to one tensor name (stable under spec changes elsewhere)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=tensor_generator(seed, name)) * std


def _linear(seed: int, name: str, in_f: int, out_f: int) -> torch.Tensor:
    return _normal(seed, name, (out_f, in_f), 1.0 / math.sqrt(in_f))


def _norm(seed: int, name: str, n: int) -> torch.Tensor:
    return 1.0 + _normal(seed, name, (n,), 0.1)


def model_state_dict(spec: TinyModelSpec, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, float32, keyed by its on-disk name."""
    h = spec.hidden_size
    sd: dict[str, torch.Tensor] = {}
    # The family salts every tensor's seed, so different families never share weights.
    salt = seed * 131 + zlib.crc32(spec.family.encode()) % 1_000_000

    def normal(key: str, shape: tuple[int, ...], std: float) -> None:
        sd[key] = _normal(salt, key, shape, std)

    normal("model.embed_tokens.weight", (spec.vocab_size, h), 1.0)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{name}.weight"] = _norm(salt, f"{p}.{name}.weight", h)
        if spec.qk_norm:
            for name in ("q_norm", "k_norm"):
                key = f"{p}.self_attn.{name}.weight"
                sd[key] = _norm(salt, key, spec.head_dim)
        if spec.qkv_bias:
            for name, n in (("q_proj", spec.q_size), ("k_proj", spec.kv_size),
                            ("v_proj", spec.kv_size)):
                normal(f"{p}.self_attn.{name}.bias", (n,), 0.2)
        if spec.is_sparse(layer):
            normal(f"{p}.{spec.moe_prefix}.gate.weight", (spec.num_experts, h),
                   spec.router_logit_std / math.sqrt(h))
            if spec.shared_expert_intermediate_size:
                normal(f"{p}.mlp.shared_expert_gate.weight", (1, h), 1.0 / math.sqrt(h))
        for module, (in_f, out_f) in spec.layer_module_shapes(layer).items():
            sd[f"{module}.weight"] = _linear(salt, f"{module}.weight", in_f, out_f)
    sd["model.norm.weight"] = _norm(salt, "model.norm.weight", h)
    if not spec.tie_word_embeddings:
        normal("lm_head.weight", (spec.vocab_size, h), spec.logit_std / math.sqrt(h))
        # pad/bos/unk are never worth generating (EOS stays a normal candidate).
        sd["lm_head.weight"][[PAD_ID, BOS_ID, UNK_ID]] *= 0.25
    return dict(sorted(sd.items()))


def _shard(names: list[str], sizes: dict[str, int], num_shards: int) -> list[list[str]]:
    """Split names (in order) into ``num_shards`` runs of roughly equal bytes."""
    total = sum(sizes.values())
    shards: list[list[str]] = [[]]
    acc = 0
    for name in names:
        if shards[-1] and acc >= total * len(shards) / num_shards and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(name)
        acc += sizes[name]
    if len(shards) != num_shards:
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} shards")
    return shards


def write_safetensors(model_dir: Path, tensors: dict[str, torch.Tensor], *,
                      num_shards: int = 1) -> list[Path]:
    """Write ``model.safetensors``, or N shards plus ``model.safetensors.index.json``."""
    meta = {"format": "pt"}
    if num_shards <= 1:
        path = model_dir / "model.safetensors"
        save_file(tensors, str(path), metadata=meta)
        return [path]
    names = list(tensors)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    weight_map: dict[str, str] = {}
    paths = []
    for k, shard in enumerate(_shard(names, sizes, num_shards), start=1):
        fname = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(model_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
        paths.append(model_dir / fname)
    index = {
        "metadata": {"total_parameters": sum(t.numel() for t in tensors.values()),
                     "total_size": sum(sizes.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tiny_model(
    model_dir: str | Path,
    family: str | TinyModelSpec = "qwen3_moe",
    *,
    seed: int = 0,
    sharded: bool | int = False,
    dtype: str = "float32",
    config_style: ConfigStyle = "v5",
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a tiny HF checkpoint of ``family`` (a preset name or a spec) into ``model_dir``.

    ``sharded``: False → one ``model.safetensors``; True → 3 shards; an int N → N shards (with
    ``model.safetensors.index.json``). ``overrides`` change spec fields (e.g. ``num_layers=3``).
    Returns the directory. Any previous checkpoint files in it are replaced.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    spec = get_spec(family, **overrides)
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model_state_dict(spec, seed=seed).items()}
    num_shards = 3 if sharded is True else int(sharded or 1)
    write_safetensors(out, tensors, num_shards=num_shards)
    _write_json(out / "config.json", hf_config(spec, dtype=dtype, style=config_style))
    _write_json(out / "generation_config.json", generation_config(style=config_style))
    if tokenizer:
        from lora_cluster.testing.tokenizer import write_tokenizer

        write_tokenizer(out, vocab_size=spec.vocab_size,
                        model_max_length=spec.max_position_embeddings)
    _write_json(out / FIXTURE_MARKER, {"spec": _spec_record(spec), "seed": seed,
                                       "num_shards": num_shards, "dtype": dtype,
                                       "config_style": config_style, "tokenizer": tokenizer})
    return out


def _spec_record(spec: TinyModelSpec) -> dict[str, Any]:
    import dataclasses

    rec = dataclasses.asdict(spec)
    rec["mlp_only_layers"] = list(spec.mlp_only_layers)
    rec["rope_scaling"] = dict(spec.rope_scaling) if spec.rope_scaling else None
    return rec


def read_fixture_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The parameters a directory was written with (None if not written by this package)."""
    try:
        return json.loads((Path(model_dir) / FIXTURE_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_spec(model_dir: str | Path) -> TinyModelSpec:
    """The spec of a model directory, from its ``config.json``."""
    return TinyModelSpec.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
