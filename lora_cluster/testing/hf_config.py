"""``config.json`` and ``generation_config.json`` contents, field for field as HF writes them.

Two styles, both real on disk:

* ``"v5"`` — what transformers 5.24 ``save_pretrained`` writes: ``rope_parameters`` (theta and
  scaling in one object), ``dtype``, and for Qwen3-MoE ``num_local_experts`` (its config maps
  ``num_experts`` onto that name).
* ``"v4"`` — what checkpoints on the Hub written by transformers 4.x carry: top-level
  ``rope_theta`` plus ``rope_scaling`` (or null), ``torch_dtype``, Qwen3-MoE ``num_experts``.

transformers 5.24 loads both.
"""

from __future__ import annotations

from typing import Any, Literal

from lora_cluster.testing.presets import BOS_ID, EOS_ID, PAD_ID, TinyModelSpec

ConfigStyle = Literal["v5", "v4"]
TRANSFORMERS_V5 = "5.24.0"
TRANSFORMERS_V4 = "4.51.0"


def _rope_fields(spec: TinyModelSpec, style: ConfigStyle) -> dict[str, Any]:
    scaling = dict(spec.rope_scaling) if spec.rope_scaling else None
    if style == "v4":
        return {"rope_theta": spec.rope_theta, "rope_scaling": scaling}
    params: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if scaling:
        params.update(scaling)
    return {"rope_parameters": dict(sorted(params.items()))}


def _family_fields(spec: TinyModelSpec, style: ConfigStyle) -> dict[str, Any]:
    n = spec.num_layers
    fam = spec.family
    if fam == "llama":
        return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if fam == "qwen3":
        out: dict[str, Any] = {"attention_bias": False, "max_window_layers": n,
                               "sliding_window": None, "use_sliding_window": False}
        if style == "v5":
            out["layer_types"] = ["full_attention"] * n
        return out
    moe: dict[str, Any] = {"num_experts_per_tok": spec.num_experts_per_tok,
                           "output_router_logits": False, "router_aux_loss_coef": 0.001}
    if fam == "mixtral":
        return {**moe, "num_local_experts": spec.num_experts, "router_jitter_noise": 0.0,
                "sliding_window": None}
    qwen_moe = {
        **moe,
        "decoder_sparse_step": spec.decoder_sparse_step,
        "mlp_only_layers": list(spec.mlp_only_layers),
        "moe_intermediate_size": spec.moe_intermediate_size,
        "norm_topk_prob": spec.norm_topk_prob,
        "use_sliding_window": False,
    }
    if fam == "qwen3_moe":
        experts_key = "num_local_experts" if style == "v5" else "num_experts"
        return {**qwen_moe, experts_key: spec.num_experts, "attention_bias": False,
                "sliding_window": None}
    # qwen2_moe
    out = {**qwen_moe, "num_experts": spec.num_experts, "max_window_layers": n,
           "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
           "sliding_window": None}
    if style == "v5":
        out.update(qkv_bias=True, layer_types=["full_attention"] * n)
    return out


def hf_config(spec: TinyModelSpec, *, dtype: str = "float32",
              style: ConfigStyle = "v5") -> dict[str, Any]:
    """The ``config.json`` object for ``spec``, keys sorted as ``save_pretrained`` sorts them."""
    if style not in ("v5", "v4"):
        raise ValueError(f"config style must be 'v5' or 'v4', got {style!r}")
    cfg: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": spec.rms_norm_eps,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        ("dtype" if style == "v5" else "torch_dtype"): dtype,
        "transformers_version": TRANSFORMERS_V5 if style == "v5" else TRANSFORMERS_V4,
    }
    cfg.update(_rope_fields(spec, style))
    cfg.update(_family_fields(spec, style))
    return dict(sorted(cfg.items()))


def generation_config(*, style: ConfigStyle = "v5") -> dict[str, Any]:
    """``generation_config.json`` as ``save_pretrained`` derives it from the model config."""
    return {
        "_from_model_config": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "output_attentions": False,
        "output_hidden_states": False,
        "pad_token_id": PAD_ID,
        "transformers_version": TRANSFORMERS_V5 if style == "v5" else TRANSFORMERS_V4,
        "use_cache": True,
    }
