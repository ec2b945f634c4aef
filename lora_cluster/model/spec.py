"""The model's shape, parsed once from an HF ``config.json``: what every layer and loader reads.

Also the canonical LoRA target *kinds* of a layer and their full (unsharded) shapes, the
vocabulary shared by the adapter loader (producer) and the LoRA layers (consumers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora_cluster.errors import ModelLoadError

Family = Literal["qwen3_moe", "qwen2_moe", "mixtral", "llama", "qwen3", "qwen2", "mistral"]
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "qwen3_moe", "qwen2_moe", "mixtral", "llama", "qwen3", "qwen2", "mistral",
)
# "dynamic" (NTK) is refused: transformers recomputes its frequencies from the longest
# position of whatever batch runs, so a sequence's logits would depend on its batch-mates.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Canonical LoRA target kinds. Per-layer kinds are keyed (layer, kind); model-wide ones
# (embed_tokens, lm_head) are keyed (None, kind).
ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
EXPERT_KINDS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
SHARED_EXPERT_KINDS = (
    "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
)
MODEL_KINDS = ("embed_tokens", "lm_head")


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """Rotary embedding parameters (HF ``rope_parameters`` or legacy ``rope_scaling``)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    partial_rotary_factor: float = 1.0
    truncate: bool = True  # yarn: round the correction range to whole dimensions


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything about the base model's architecture that the engine needs."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama/Qwen3 ``attention_bias`` also puts a bias on o_proj
    mlp_bias: bool = False  # Llama ``mlp_bias``: gate/up/down biases of dense MLPs
    qk_norm: bool = False
    sliding_window: int | None = None  # keys older than this many positions are masked
    # MoE (num_experts == 0: dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    sparse_layers: tuple[bool, ...] = ()
    # checkpoint naming: "qwen" = mlp.experts.e.{gate,up,down}_proj,
    # "mixtral" = block_sparse_moe.experts.e.{w1,w3,w2}
    expert_naming: Literal["qwen", "mixtral"] = "qwen"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sparse(self, layer: int) -> bool:
        return bool(self.sparse_layers[layer]) if self.sparse_layers else False

    def layer_target_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """LoRA target kind → full (in_features, out_features) for one decoder layer."""
        h = self.hidden_size
        shapes = {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
        }
        if self.is_sparse(layer):
            i = self.moe_intermediate_size
            shapes.update({
                "experts.gate_proj": (h, i), "experts.up_proj": (h, i), "experts.down_proj": (i, h),
            })
            if self.shared_expert_intermediate_size:
                s = self.shared_expert_intermediate_size
                shapes.update({
                    "shared_expert.gate_proj": (h, s),
                    "shared_expert.up_proj": (h, s),
                    "shared_expert.down_proj": (s, h),
                })
        else:
            i = self.intermediate_size
            shapes.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
        return shapes

    def model_target_shapes(self) -> dict[str, tuple[int, int]]:
        """Model-wide targets: embed_tokens (in = vocab) and lm_head (out = vocab)."""
        return {"embed_tokens": (self.vocab_size, self.hidden_size),
                "lm_head": (self.hidden_size, self.vocab_size)}

    def all_target_kinds(self) -> frozenset[str]:
        kinds = set(MODEL_KINDS)
        for layer in range(self.num_layers):
            kinds.update(self.layer_target_shapes(layer))
        return frozenset(kinds)


def _get(cfg: dict[str, Any], key: str, path: str, default: Any = ...) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is ...:
        raise ModelLoadError(f"{path}: missing required field {key!r}", file=path, key=key)
    return default


def _flat_rope_params(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    # transformers lets a legacy ``rope_scaling`` win over ``rope_parameters``.
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"{path}: rope_parameters must be an object", file=path,
                             key="rope_parameters")
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested:  # per-layer-type parameters: serve them only when every layer agrees
        if any(v != nested[0] for v in nested[1:]):
            raise ModelLoadError(f"{path}: per-layer-type rope_parameters differ; not supported",
                                 file=path, key="rope_parameters")
        params = nested[0]
    return dict(params)


def _rope_spec(cfg: dict[str, Any], path: str, default_theta: float) -> RopeSpec:
    """RoPE parameters resolved the way transformers 5.x standardizes ``rope_parameters``."""
    params = _flat_rope_params(cfg, path)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"{path}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})",
            file=path, key="rope_parameters.rope_type",
        )
    theta = params.get("rope_theta") or cfg.get("rope_theta") or default_theta
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else float(partial)
    if rope_type == "default":
        # The default init of these families rotates the whole head whatever the factor says.
        return RopeSpec(theta=float(theta), rope_type="default")
    if partial != 1.0:
        raise ModelLoadError(
            f"{path}: partial_rotary_factor={partial} with rope type {rope_type!r} is not "
            "supported by this model family", file=path, key="rope_parameters.partial_rotary_factor",
        )
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ("factor",)}[rope_type]
    for key in required:
        if params.get(key) is None:
            raise ModelLoadError(f"{path}: rope type {rope_type!r} needs rope_parameters.{key}",
                                 file=path, key=f"rope_parameters.{key}")
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    # A top-level original_max_position_embeddings (Phi-3 style) overrides the nested one.
    original = cfg.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings") or max_pos
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _sparse_layers(cfg: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    if num_experts == 0:
        return tuple(False for _ in range(num_layers))
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def _num_experts(cfg: dict[str, Any], path: str) -> int:
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (an attribute alias).
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise ModelLoadError(f"{path}: missing required field 'num_experts'", file=path,
                         key="num_experts")


def _biases(cfg: dict[str, Any], family: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, dense-MLP bias) as each family's modeling code wires them."""
    if family == "qwen2":
        return True, False, False
    if family == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True)), False, False
    if family in ("llama", "qwen3", "qwen3_moe"):
        attn = bool(cfg.get("attention_bias", False))
        return attn, attn, family == "llama" and bool(cfg.get("mlp_bias", False))
    return False, False, False  # mistral, mixtral


def _sliding_window(cfg: dict[str, Any], family: str, path: str) -> int | None:
    if cfg.get("use_sliding_window"):
        raise ModelLoadError(f"{path}: sliding-window attention is not supported", file=path,
                             key="use_sliding_window")
    if family == "mistral":  # MistralConfig defaults to a 4096-token window when the key is absent
        window = cfg.get("sliding_window", 4096)
    elif family == "mixtral":
        window = cfg.get("sliding_window")
    else:  # the Qwen families only slide with use_sliding_window; Llama never does
        window = None
    return int(window) if window else None


def spec_from_hf_config(cfg: dict[str, Any], path: str = "config.json") -> ModelSpec:
    """Map an HF config dict onto a ModelSpec; unsupported families raise ModelLoadError."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"{path}: model_type {family!r} is not supported (supported: {SUPPORTED_FAMILIES})",
            file=path, key="model_type",
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"{path}: hidden_act {act!r} is not supported (only silu)",
                             file=path, key="hidden_act")
    window = _sliding_window(cfg, family, path)
    hidden = int(_get(cfg, "hidden_size", path))
    heads = int(_get(cfg, "num_attention_heads", path))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    # Qwen3Config defaults head_dim to 128; the others derive it from the hidden size.
    head_dim = int(cfg.get("head_dim") or (128 if family == "qwen3" else hidden // heads))
    layers = int(_get(cfg, "num_hidden_layers", path))
    if family == "mixtral":
        num_experts = _num_experts(cfg, path)
        moe_inter = int(_get(cfg, "intermediate_size", path))
    elif family in ("qwen3_moe", "qwen2_moe"):
        num_experts = _num_experts(cfg, path)
        moe_inter = int(_get(cfg, "moe_intermediate_size", path))
    else:
        num_experts, moe_inter = 0, 0
    if num_experts and not 0 < int(cfg.get("num_experts_per_tok") or 0) <= num_experts:
        raise ModelLoadError(f"{path}: num_experts_per_tok must be in [1, {num_experts}]",
                             file=path, key="num_experts_per_tok")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    # Only MixtralConfig overrides transformers' default rope_theta of 10000.
    default_theta = 1_000_000.0 if family == "mixtral" else 10_000.0
    qkv_bias, o_bias, mlp_bias = _biases(cfg, family)
    return ModelSpec(
        family=family,
        vocab_size=int(_get(cfg, "vocab_size", path)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_get(cfg, "intermediate_size", path)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope=_rope_spec(cfg, path, default_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=family in ("qwen3_moe", "qwen3"),
        sliding_window=window,
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
        moe_intermediate_size=moe_inter,
        norm_topk_prob=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0) or 0)
        if family == "qwen2_moe" else 0,
        sparse_layers=_sparse_layers(cfg, layers, num_experts),
        expert_naming="mixtral" if family == "mixtral" else "qwen",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``<model_dir>/config.json`` into a ModelSpec."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found (is {model_dir} an HF model directory?)",
                             file=str(path)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable config ({exc})", file=str(path)) from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object", file=str(path))
    return spec_from_hf_config(cfg, str(path))
