"""What each tensor-name *template* of a PEFT adapter is: a LoRA factor of a served target
kind, something the text model does not run (ignored), or something we refuse.

Templates come from ``names.scan_names`` (numeric components are ``*``), so this runs once
per template — a few dozen per adapter — never per tensor.

Module paths (after the ``base_model.model.`` prefix PEFT adds) and their canonical kinds
(``lora_cluster.model.spec``)::

    model.layers.*.self_attn.{q,k,v,o}_proj                     q_proj … o_proj
    model.layers.*.mlp.{gate,up,down}_proj                      gate_proj … (dense layers)
    model.layers.*.mlp.experts.*.{gate,up,down}_proj            experts.gate_proj … (2D)
    model.layers.*.block_sparse_moe.experts.*.{w1,w3,w2}        experts.gate/up/down_proj
    model.layers.*.mlp.experts[.base_layer]                     fused 3D experts (target_parameters)
    model.layers.*.mlp.shared_expert.{gate,up,down}_proj        shared_expert.*
    model.embed_tokens  (lora_embedding_A/B)                    embed_tokens
    lm_head                                                     lm_head
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PEFT_PREFIX = "base_model.model."
FUSED = "experts.fused"  # pseudo kind: a fused 3D wrapper, split into expert kinds by shape

# Namespaces of multimodal / auxiliary parts the served text model does not run.
IGNORED_MARKERS = ("visual.", "vision_tower", "vision_model", "multi_modal_projector", "mtp.")

Status = Literal["target", "ignored", "embedding_copy", "unsupported"]

_ROLE = re.compile(
    r"(?P<module>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector|lora_[AB]\.bias|base_layer\.weight|base_layer\.bias|weight|bias)")
_ROLE_FACTOR = {"lora_A.weight": ("A", "linear"), "lora_B.weight": ("B", "linear"),
                "lora_embedding_A": ("A", "embedding"), "lora_embedding_B": ("B", "embedding")}
_ROLE_REFUSED = {
    "lora_magnitude_vector": "DoRA magnitude vectors (use_dora) are not supported",
    "lora_A.bias": "LoRA bias tensors (lora_bias) are not supported",
    "lora_B.bias": "LoRA bias tensors (lora_bias) are not supported",
    "base_layer.bias": "trained base-layer biases (bias='all'/'lora_only') are not supported",
    "bias": "trained biases (bias='all') are not supported",
    "weight": "full module weights (modules_to_save) are not supported",
    "base_layer.weight": "full base-layer weights are not supported",
}
_EXPERT_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_L = r"model\.layers\.\*\."
_MODULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(_L + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"), "{0}"),
    (re.compile(_L + r"mlp\.(gate_proj|up_proj|down_proj)"), "{0}"),
    (re.compile(_L + r"(?:mlp|block_sparse_moe)\.experts\.\*\.(gate_proj|up_proj|down_proj|w1|w3|w2)"),
     "experts.{0}"),
    (re.compile(_L + r"mlp\.shared_expert\.(gate_proj|up_proj|down_proj)"), "shared_expert.{0}"),
    (re.compile(_L + r"(?:mlp|block_sparse_moe)\.experts(?:\.base_layer)?"), FUSED),
    (re.compile(r"model\.embed_tokens"), "embed_tokens"),
    (re.compile(r"lm_head"), "lm_head"),
)
_ROUTER = re.compile(_L + r"(?:mlp|block_sparse_moe)\.(?:gate|shared_expert_gate)")


@dataclass(frozen=True)
class TemplateInfo:
    """The verdict on one tensor-name template."""

    template: str
    status: Status
    module: str = ""        # module-path template without the PEFT prefix
    kind: str = ""          # canonical kind (or FUSED) for status "target"
    factor: str = ""        # "A" or "B" for status "target"
    reason: str = ""        # why, for "ignored" / "unsupported"

    @property
    def indexed_by_expert(self) -> bool:
        return self.kind.startswith("experts.") and self.kind != FUSED


def _canonical(module: str) -> str | None:
    for pattern, kind in _MODULES:
        m = pattern.fullmatch(module)
        if m:
            leaf = m.group(1) if m.groups() else ""
            return kind.format(_EXPERT_ALIASES.get(leaf, leaf))
    return None


def classify_template(template: str) -> TemplateInfo:
    """Decide what one tensor-name template is (see the module docstring)."""
    path = template[len(PEFT_PREFIX):] if template.startswith(PEFT_PREFIX) else template
    m = _ROLE.fullmatch(path)
    module, role = (m.group("module"), m.group("role")) if m else (path, "")
    if any(marker in module for marker in IGNORED_MARKERS):
        return TemplateInfo(template, "ignored", module,
                            reason="a module of a part the served text model does not run")
    kind = _canonical(module)
    if role == "base_layer.weight" and kind in ("embed_tokens", "lm_head"):
        return TemplateInfo(template, "embedding_copy", module, kind=kind)
    if role in _ROLE_REFUSED:
        return TemplateInfo(template, "unsupported", module, reason=_ROLE_REFUSED[role])
    if role not in _ROLE_FACTOR:
        return TemplateInfo(template, "unsupported", module, reason="not a LoRA tensor")
    factor, form = _ROLE_FACTOR[role]
    if _ROUTER.fullmatch(module):
        return TemplateInfo(template, "unsupported", module,
                            reason="LoRA on the MoE router (mlp.gate / shared_expert_gate) is not "
                                   "supported")
    if kind is None:
        return TemplateInfo(template, "unsupported", module,
                            reason="a module the served model does not have")
    if (form == "embedding") != (kind == "embed_tokens"):
        want = "lora_embedding_A/B" if kind == "embed_tokens" else "lora_A/B.weight"
        return TemplateInfo(template, "unsupported", module,
                            reason=f"{kind} LoRA must be saved as {want}")
    return TemplateInfo(template, "target", module, kind=kind, factor=factor)
