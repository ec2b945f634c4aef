"""The correctness oracle: transformers + PEFT on the same files the engine reads (test-only).

``oracle_logits`` / ``oracle_greedy`` run one prompt at a time (PEFT refuses mixed batches
with ``target_parameters`` adapters) in float32 with eager attention and eager experts.
Loaded models are cached per (model dir, adapter dir, file stamps).

How adapters are loaded (see lora_cluster/testing/FORMATS.md for why):
* PEFT's transformers-5 rewriting of MoE adapters is switched off while loading, because it
  silently drops Qwen2-MoE per-expert tensors and Qwen3-MoE dense-layer MLP tensors, and
  scales rsLoRA gate/up by √2. Instead, per-expert ("2D") expert tensors are converted here
  into PEFT's fused ("3D") layout with each expert's own scaling folded into its B, so every
  expert keeps exactly its ``scaling · B @ A`` (zero-padding ranks that differ).
* ``target_modules`` is replaced by the exact module paths present in the file.
* After loading, every LoRA tensor PEFT holds is compared with the (converted) file: a tensor
  PEFT ignored raises ``OracleError`` instead of silently giving base-model answers.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_EXPERT_2D = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.lora_([AB])\.weight$"
)
_MODULE = re.compile(r"^base_model\.model\.(.+?)\.(?:lora_[AB]\.weight|lora_embedding_[AB])$")
_UP = ("up_proj", "w3")
_CACHE_SIZE = 24


class OracleError(RuntimeError):
    """The oracle could not reproduce an adapter faithfully."""


def _pattern_value(pattern: dict[str, Any] | None, key: str, default: Any) -> Any:
    # PEFT's get_pattern_key: first pattern, in dict order, matching (.*\.)?(pattern)$
    for p, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def _scaling(cfg: dict[str, Any], key: str) -> float:
    r = _pattern_value(cfg.get("rank_pattern"), key, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), key, cfg["lora_alpha"])
    return alpha / r**0.5 if cfg.get("use_rslora") else alpha / r


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    st = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(st)) if st.exists() else torch.load(
        adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    return cfg, {k: v.float() for k, v in tensors.items()}


def _fuse_2d_experts(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], num_experts: int
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Per-expert LoRA → PEFT's fused layout, scaling folded into B (wrapper scaling = 1)."""
    # (layer, "gate_up"|"down") → expert → [(0 gate / 1 up / 0 down, a, scaled b)]
    per: dict[tuple[int, str], dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]]] = (
        defaultdict(lambda: defaultdict(list)))
    rest = {}
    for key, t in tensors.items():
        m = _EXPERT_2D.match(key)
        if not m:
            rest[key] = t
            continue
        if m.group(4) == "B":
            continue
        layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        path = key[len("base_model.model."): -len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")] * _scaling(cfg, path)
        which = "down" if proj in ("down_proj", "w2") else "gate_up"
        per[(layer, which)][e].append((1 if proj in _UP else 0, t, b))
    if not per:
        return cfg, tensors
    rank_pattern: dict[str, Any] = {}
    alpha_pattern: dict[str, Any] = {}
    kinds = {which for _, which in per}
    for (layer, which), experts in per.items():
        if sorted(experts) != list(range(num_experts)):
            raise OracleError(f"layer {layer} {which}: LoRA for experts {sorted(experts)} only; "
                              "the fused layout needs all experts")
        parts = [sorted(experts[e], key=lambda x: x[0]) for e in range(num_experts)]
        if which == "gate_up" and any(len(p) != 2 for p in parts):
            raise OracleError(f"layer {layer}: gate and up must both have LoRA to fuse them")
        r_max = max(a.shape[0] for p in parts for _, a, _ in p)
        a_e, b_e = [], []
        for p in parts:
            a_pad = [torch.nn.functional.pad(a, (0, 0, 0, r_max - a.shape[0])) for _, a, _ in p]
            b_pad = [torch.nn.functional.pad(b, (0, r_max - b.shape[1])) for _, _, b in p]
            a_e.append(torch.cat(a_pad, dim=0))            # [n·R, in]
            b_e.append(torch.block_diag(*b_pad))          # [n·out, n·R]
        a3, b3 = torch.stack(a_e), torch.stack(b_e)       # [E, R', in], [E, out', R']
        e_, r_, in_ = a3.shape
        inner = ".base_layer" if which == "gate_up" and len(kinds) == 2 else ""
        base = f"base_model.model.model.layers.{layer}.mlp.experts{inner}"
        rest[f"{base}.lora_A.weight"] = a3.reshape(e_ * r_, in_)
        rest[f"{base}.lora_B.weight"] = b3.permute(1, 2, 0).reshape(b3.shape[1], r_ * e_)
        key = re.escape(f"model.layers.{layer}.mlp.experts.{which}_proj")
        rank_pattern[key] = r_
        alpha_pattern[key] = r_**0.5 if cfg.get("use_rslora") else r_  # scaling 1
    cfg = dict(cfg)
    cfg["rank_pattern"] = {**rank_pattern, **(cfg.get("rank_pattern") or {})}
    cfg["alpha_pattern"] = {**alpha_pattern, **(cfg.get("alpha_pattern") or {})}
    cfg["target_parameters"] = sorted(f"mlp.experts.{w}_proj" for w in kinds)
    return cfg, rest


def _exact_targets(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    paths = sorted({m.group(1) for k in tensors if (m := _MODULE.match(k))
                    and ".mlp.experts" not in m.group(1)})
    return {**cfg, "target_modules": paths or None}


@contextlib.contextmanager
def _no_peft_v5_conversion() -> Iterator[None]:
    import peft.utils.transformers_weight_conversion as conv

    saved = conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers
    conv.convert_peft_config_for_transformers = lambda *a, **k: None
    conv.convert_peft_adapter_state_dict_for_transformers = (
        lambda model, peft_config, adapter_state_dict, adapter_name="default": adapter_state_dict)
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers = saved


def _check_loaded(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    state = model.state_dict()
    missing, wrong = [], []
    for key, t in tensors.items():
        loaded_key = re.sub(r"\.(lora_[AB])\.(weight|bias)$", r".\1.default.\2", key)
        loaded_key = re.sub(r"\.(lora_embedding_[AB])$", r".\1.default", loaded_key)
        loaded_key = re.sub(r"\.lora_magnitude_vector$", ".lora_magnitude_vector.default.weight",
                            loaded_key)
        got = state.get(loaded_key)
        if got is None:
            missing.append(key)
        elif got.shape != t.shape or not torch.equal(got.float(), t):
            wrong.append(key)
    if missing or wrong:
        raise OracleError(f"{where}: PEFT did not load {len(missing)} tensors "
                          f"(e.g. {missing[:3]}) and loaded {len(wrong)} differently "
                          f"(e.g. {wrong[:3]})")


def load_base_model(model_dir: str | Path) -> torch.nn.Module:
    """The base model alone: float32, eager attention and experts, eval mode (uncached)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        kwargs["experts_implementation"] = "eager"
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def _load(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    model = load_base_model(model_dir)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    cfg, tensors = _read_adapter(adapter_dir)
    num_experts = getattr(model.config, "num_local_experts", None) or getattr(
        model.config, "num_experts", 0)
    cfg, tensors = _fuse_2d_experts(cfg, tensors, int(num_experts or 0))
    cfg = _exact_targets(cfg, tensors)
    with tempfile.TemporaryDirectory(prefix="oracle-adapter-") as tmp, _no_peft_v5_conversion(), \
            warnings.catch_warnings():
        # PEFT checks fused-expert pattern keys against module names only, then applies them.
        warnings.filterwarnings("ignore", message=".*pattern keys did not match any targeted")
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(Path(tmp) / "adapter_model.safetensors"))
        peft_model = PeftModel.from_pretrained(model, tmp, is_trainable=False).eval()
    _check_loaded(peft_model, tensors, adapter_dir)
    return peft_model


def _stamp(path: Path | None) -> tuple[Any, ...]:
    if path is None:
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                        for p in path.iterdir() if p.is_file()))


_models: OrderedDict[tuple[Any, ...], torch.nn.Module] = OrderedDict()


def oracle_model(model_dir: str | Path, adapter_dir: str | Path | None = None) -> torch.nn.Module:
    """transformers (+ PEFT) model for the pair, cached; rewritten files are reloaded."""
    mdir = Path(model_dir).resolve()
    adir = Path(adapter_dir).resolve() if adapter_dir is not None else None
    key = (str(mdir), _stamp(mdir), str(adir), _stamp(adir))
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    model = _load(mdir, adir)
    _models[key] = model
    while len(_models) > _CACHE_SIZE:
        _models.popitem(last=False)
    return model


@torch.inference_mode()
def oracle_logits(model_dir: str | Path, adapter_dir: str | Path | None,
                  ids: Sequence[int]) -> torch.Tensor:
    """Float32 logits ``[len(ids), V]`` of one sequence (no cache, one forward)."""
    model = oracle_model(model_dir, adapter_dir)
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float()


@torch.inference_mode()
def oracle_greedy(model_dir: str | Path, adapter_dir: str | Path | None,
                  prompt_ids: Sequence[int], max_new_tokens: int, *,
                  stop_at_eos: bool = True) -> list[int]:
    """Greedy new tokens (argmax each step, KV cache), ending with EOS if one was produced."""
    model = oracle_model(model_dir, adapter_dir)
    config: Any = model.config
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out = model(input_ids=torch.tensor([list(prompt_ids)]), use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if stop_at_eos and token in eos_ids:
            break
        out = model(input_ids=torch.tensor([[token]]), cache=out.cache,
                    use_cache=True)
    return new
