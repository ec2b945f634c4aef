"""Tiny model architectures for tests and the demo: one frozen spec per family, plus presets.

A ``TinyModelSpec`` says everything the checkpoint, tokenizer and adapter writers need: dims,
MoE layout and rope settings, and the Hugging Face module paths of every LoRA-targetable
linear layer with its ``(in, out)`` shape (experts listed one by one, as on disk).

Dims are chosen so that no two roles share a size by accident (H=96, q=128, kv=64,
moe I=32, dense I=160, shared-expert I=80, V=384): a transposed or swapped tensor fails on
shape instead of passing silently, and every size is a multiple of 16 for the GPU kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "llama", "qwen3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True, kw_only=True)
class TinyModelSpec:
    """Architecture of one tiny checkpoint (family names as in HF ``model_type``)."""

    family: str
    vocab_size: int = 384
    hidden_size: int = 96
    intermediate_size: int = 160  # dense MLP (Mixtral: the expert size, as HF names it)
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 16
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    norm_topk_prob: bool = True
    rope_theta: float = 1_000_000.0
    # None or HF rope-scaling fields without theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Init scales chosen for decisive float32 greedy decoding (see checkpoint.py).
    logit_std: float = 4.0
    router_logit_std: float = 2.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if (self.family in MOE_FAMILIES) != (self.num_experts > 0):
            raise ValueError(f"{self.family}: num_experts must be > 0 exactly for MoE families")
        if self.family == "qwen2_moe" and not self.shared_expert_intermediate_size:
            raise ValueError("qwen2_moe needs shared_expert_intermediate_size > 0")

    # ---- derived layout -------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return _ARCHITECTURES[self.family]

    @property
    def qkv_bias(self) -> bool:
        """Qwen2-MoE has q/k/v biases."""
        return self.family == "qwen2_moe"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 families RMS-normalise q and k per head."""
        return self.family in ("qwen3_moe", "qwen3")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def expert_intermediate_size(self) -> int:
        """I of one expert: Mixtral keeps it in ``intermediate_size``, Qwen in ``moe_intermediate_size``."""
        return self.intermediate_size if self.family == "mixtral" else self.moe_intermediate_size

    @property
    def moe_prefix(self) -> str:
        """Submodule holding the router and experts on disk (``block_sparse_moe`` for Mixtral)."""
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    @property
    def expert_proj_names(self) -> tuple[str, str, str]:
        """On-disk (gate, up, down) names of one expert's projections."""
        return ("w1", "w3", "w2") if self.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` has an MoE block (same rule as transformers' Qwen MoE models)."""
        if not self.is_moe:
            return False
        if self.family == "mixtral":
            return True
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def layer_module_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """HF module path → (in, out) of every LoRA-targetable linear in one decoder layer."""
        h, p = self.hidden_size, f"model.layers.{layer}"
        shapes = {
            f"{p}.self_attn.q_proj": (h, self.q_size),
            f"{p}.self_attn.k_proj": (h, self.kv_size),
            f"{p}.self_attn.v_proj": (h, self.kv_size),
            f"{p}.self_attn.o_proj": (self.q_size, h),
        }
        if self.is_sparse(layer):
            i = self.expert_intermediate_size
            gate, up, down = self.expert_proj_names
            for e in range(self.num_experts):
                q = f"{p}.{self.moe_prefix}.experts.{e}"
                shapes.update({f"{q}.{gate}": (h, i), f"{q}.{up}": (h, i), f"{q}.{down}": (i, h)})
            if self.shared_expert_intermediate_size:
                s, q = self.shared_expert_intermediate_size, f"{p}.mlp.shared_expert"
                shapes.update({f"{q}.gate_proj": (h, s), f"{q}.up_proj": (h, s), f"{q}.down_proj": (s, h)})
        else:
            i, q = self.intermediate_size, f"{p}.mlp"
            shapes.update({f"{q}.gate_proj": (h, i), f"{q}.up_proj": (h, i), f"{q}.down_proj": (i, h)})
        return shapes

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Every LoRA-targetable module: embeddings (in = V), all layers' linears, lm_head."""
        shapes = {"model.embed_tokens": (self.vocab_size, self.hidden_size)}
        for layer in range(self.num_layers):
            shapes.update(self.layer_module_shapes(layer))
        shapes["lm_head"] = (self.hidden_size, self.vocab_size)
        return shapes

    def replace(self, **changes: Any) -> TinyModelSpec:
        """A copy with some fields changed (validated again)."""
        if "mlp_only_layers" in changes:
            changes["mlp_only_layers"] = tuple(changes["mlp_only_layers"])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> TinyModelSpec:
        """Rebuild a spec from a ``config.json`` written by this package (either style)."""
        family = cfg["model_type"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10_000.0)))
        rope.pop("type", None)
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            num_experts=num_experts if family in MOE_FAMILIES else 0,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg["max_position_embeddings"],
            rms_norm_eps=cfg["rms_norm_eps"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


_MOE: dict[str, Any] = {"num_experts": 8, "num_experts_per_tok": 2}

PRESETS: dict[str, TinyModelSpec] = {
    "qwen3_moe": TinyModelSpec(family="qwen3_moe", **_MOE, moe_intermediate_size=32),
    # Qwen3-MoE with a dense (mlp_only) middle layer: dense gate/up/down sit between MoE layers.
    "qwen3_moe_dense_layers": TinyModelSpec(family="qwen3_moe", **_MOE, moe_intermediate_size=32,
                                            num_layers=3, mlp_only_layers=(1,)),
    "mixtral": TinyModelSpec(family="mixtral", **_MOE, intermediate_size=32, rms_norm_eps=1e-5),
    "qwen2_moe": TinyModelSpec(family="qwen2_moe", **_MOE, moe_intermediate_size=32,
                               shared_expert_intermediate_size=80,
                               norm_topk_prob=False, rope_theta=10_000.0),
    "llama": TinyModelSpec(family="llama", rope_theta=10_000.0, rms_norm_eps=1e-5),
    # Llama-3 style rope scaling; original context 32 so the smoothing band covers real dims.
    "llama3": TinyModelSpec(family="llama", rope_theta=500_000.0, rms_norm_eps=1e-5,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32}),
    "qwen3": TinyModelSpec(family="qwen3"),
}


def get_spec(family_or_preset: str | TinyModelSpec, **overrides: Any) -> TinyModelSpec:
    """A preset by name (or a spec), with field overrides applied."""
    if isinstance(family_or_preset, TinyModelSpec):
        spec = family_or_preset
    else:
        try:
            spec = PRESETS[family_or_preset]
        except KeyError:
            raise ValueError(
                f"unknown preset {family_or_preset!r} (known: {sorted(PRESETS)})"
            ) from None
    return spec.replace(**overrides) if overrides else spec
