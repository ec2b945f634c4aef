"""PEFT 0.21.2 on-disk LoRA format: tensor key names, ``adapter_config.json``, pattern lookup,
and the fused 3D expert layout (pack/unpack), as verified against peft's own code.

Keys (``P`` = ``base_model.model.``, module paths as in the HF checkpoint):
    linear        P{path}.lora_A.weight [R, in]      P{path}.lora_B.weight [out, R]
    embed_tokens  P{path}.lora_embedding_A [R, V]    P{path}.lora_embedding_B [H, R]
    embed/lm_head, when targeted: P{path}.base_layer.weight = the base weight itself
                  (PEFT's save_embedding_layers="auto" turns on whenever one is targeted)
    fused experts (``target_parameters``), for layer L, nesting = registration order
                  (gate_up_proj inside, down_proj outside):
                  both:      P model.layers.L.mlp.experts.base_layer.lora_{A,B}.weight (gate_up)
                             P model.layers.L.mlp.experts.lora_{A,B}.weight            (down)
                  only one:  P model.layers.L.mlp.experts.lora_{A,B}.weight
                  Mixtral uses these ``mlp.experts`` names too (its in-memory names), not
                  ``block_sparse_moe``. Tell gate_up from down by shapes: A's in-dim is H for
                  gate_up and I for down (B's out-dim is 2I and H).

Fused 3D math (peft ``ParamWrapper.get_delta_weight``; E experts, R the wrapper's rank,
``scaling`` = alpha/R or alpha/sqrt(R) for that wrapper — rank_pattern/alpha_pattern keys
are matched against ``model.layers.L.mlp.experts.gate_up_proj`` / ``...down_proj``)::

    A: lora_A.weight [E·R, in]    expert-major:  A3 = A.reshape(E, R, in);  A_e = A3[e]
    B: lora_B.weight [out, E·R]   rank-major:    B3 = B.reshape(out, R, E); B_e = B3[:, :, e]
                                                  (B_e = columns e, e+E, e+2E, ...)
    delta_e = scaling · B_e @ A_e        [out, in], added to the expert's weight
    gate_up_proj (in = H, out = 2I): rows [0, I) are gate (w1), rows [I, 2I) are up (w3);
        per-expert gate: a = A_e, b = B_e[:I];  up: a = A_e, b = B_e[I:]  (A is shared)
    down_proj (in = I, out = H): per-expert down (w2): a = A_e, b = B_e
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
FUSED_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def lora_keys(path: str, *, embedding: bool = False) -> tuple[str, str]:
    """The (A, B) tensor keys of one 2D target module."""
    if embedding:
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def fused_expert_keys(layer: int, which: str, *, nested: bool) -> tuple[str, str]:
    """The (A, B) keys of a fused expert wrapper; ``which`` is "gate_up" or "down".

    ``nested``: both gate_up_proj and down_proj are targeted, so gate_up's wrapper is the
    inner one and carries an extra ``base_layer`` in its name.
    """
    inner = ".base_layer" if (nested and which == "gate_up") else ""
    base = f"{PREFIX}model.layers.{layer}.mlp.experts{inner}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def fused_param_key(layer: int, which: str) -> str:
    """The name PEFT matches rank_pattern/alpha_pattern against for a fused expert wrapper."""
    return f"model.layers.{layer}.mlp.experts.{'gate_up_proj' if which == 'gate_up' else 'down_proj'}"


def pattern_value(pattern: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's lookup: the first pattern (dict order) with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def lora_scaling(alpha: float, r: int, *, use_rslora: bool) -> float:
    """alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / (r ** 0.5) if use_rslora else alpha / r


def pack_fused(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``a [E, R, in]``, ``b [E, out, R]`` → PEFT's ``A [E·R, in]``, ``B [out, E·R]``."""
    e, r, in_f = a.shape
    out_f = b.shape[1]
    return a.reshape(e * r, in_f), b.permute(1, 2, 0).reshape(out_f, r * e)


def unpack_fused(a: torch.Tensor, b: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``A [E·R, in]``, ``B [out, E·R]`` → per-expert ``a [E, R, in]``, ``b [E, out, R]``."""
    e = num_experts
    if a.shape[0] % e or b.shape[1] % e or a.shape[0] != b.shape[1]:
        raise ValueError(f"fused LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not split "
                         f"into {e} experts")
    r = a.shape[0] // e
    return a.reshape(e, r, a.shape[1]), b.reshape(b.shape[0], r, e).permute(2, 0, 1)


def adapter_config(
    *,
    base_model: str,
    r: int,
    alpha: float,
    target_modules: list[str] | str | None,
    target_parameters: list[str] | None = None,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """``adapter_config.json`` with every field PEFT 0.21.2 writes, keys sorted as it sorts them."""
    cfg: dict[str, Any] = {
        "alora_invocation_tokens": None, "alpha_pattern": dict(alpha_pattern or {}),
        "arrow_config": None, "auto_mapping": None, "base_model_name_or_path": base_model,
        "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION,
        "qalora_group_size": 16, "r": r, "rank_pattern": dict(rank_pattern or {}),
        "revision": None, "target_modules": target_modules,
        "target_parameters": list(target_parameters) if target_parameters else None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": use_rslora, "velora_config": None,
    }
    unknown = set(fields) - set(cfg)
    if unknown:
        raise ValueError(f"not PEFT LoraConfig fields: {sorted(unknown)}")
    cfg.update(fields)
    return dict(sorted(cfg.items()))
