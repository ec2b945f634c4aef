"""Write PEFT LoRA adapters for tiny models, byte-compatible with what PEFT 0.21.2 saves.

``build_adapter`` makes the tensors, the ``adapter_config.json`` object and the *intent*: every
targeted module (experts one by one, even when saved fused) with its ``a [R, in]``,
``b [out, R]`` (embeddings: ``a [R, V]``, ``b [H, R]``) and scaling, so tests can check what
a loader or PEFT ends up with. ``write_adapter`` saves it, optionally broken on purpose
(see ``faults.py``).

Targets (``targets=``): ``attention`` (q/k/v/o) or single ``q_proj``/``k_proj``/``v_proj``/
``o_proj``; ``mlp`` (dense layers' gate/up/down); ``experts`` (= ``experts.gate_up`` +
``experts.down``); ``shared_expert``; ``embed_tokens``; ``lm_head``; ``all``.
Expert format: ``"2d"`` per-expert keys (how transformers-4 era PEFT saved them) or ``"3d"``
fused ``target_parameters`` keys (how PEFT saves them on transformers 5).

B is random (not PEFT's zero init), scaled so each module's update is about ``strength``
times its base output (``std(B) = strength / (scaling·sqrt(R))`` with ``A ~ N(0, 1/in)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_cluster.testing.checkpoint import DTYPES, load_spec, model_state_dict, tensor_generator
from lora_cluster.testing.peft_format import (
    FUSED_TARGET_PARAMETERS,
    adapter_config,
    fused_expert_keys,
    fused_param_key,
    lora_keys,
    lora_scaling,
    pack_fused,
    pattern_value,
)
from lora_cluster.testing.presets import TinyModelSpec, get_spec

ExpertFormat = Literal["2d", "3d"]
TARGET_GROUPS = ("attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "experts",
                 "experts.gate_up", "experts.down", "shared_expert", "embed_tokens", "lm_head",
                 "all")
_ALL = ("attention", "mlp", "experts", "shared_expert", "embed_tokens", "lm_head")


@dataclass(frozen=True)
class ModuleLoRA:
    """The intended LoRA of one module: ``delta = scaling · b @ a`` (embeddings: transposed)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        """``[out, in]`` for linears; ``[V, H]`` (the embedding matrix's layout) for embeddings."""
        return self.scaling * (self.b @ self.a)


@dataclass(frozen=True)
class AdapterFixture:
    """An adapter in memory: what goes to disk and what it means."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    modules: dict[str, ModuleLoRA] = field(default_factory=dict)  # HF module path → intent
    spec: TinyModelSpec | None = None


def _classify(spec: TinyModelSpec, path: str) -> str:
    """Which target group a module path belongs to."""
    leaf = path.rsplit(".", 1)[-1]
    if path == "model.embed_tokens" or path == "lm_head":
        return path.rsplit(".", 1)[-1]
    if ".self_attn." in path:
        return leaf
    if ".shared_expert." in path:
        return "shared_expert"
    if ".experts." in path:
        gate, up, _ = spec.expert_proj_names
        return "experts.gate_up" if leaf in (gate, up) else "experts.down"
    return "mlp"


def _wanted(targets: Sequence[str]) -> set[str]:
    groups: set[str] = set()
    for t in targets:
        if t not in TARGET_GROUPS:
            raise ValueError(f"unknown target {t!r} (known: {TARGET_GROUPS})")
        expand = {"all": _ALL, "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "experts": ("experts.gate_up", "experts.down")}
        for g in expand.get(t, (t,)):
            groups.update(expand.get(g, (g,)))
    return groups


def select_modules(spec: TinyModelSpec, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Module path → (in, out) of every module the targets select (in spec order)."""
    groups = _wanted(targets)
    chosen = {p: s for p, s in spec.module_shapes().items() if _classify(spec, p) in groups}
    if not chosen:
        raise ValueError(f"targets {list(targets)} select no module of a {spec.family} model")
    return chosen


def _target_modules(spec: TinyModelSpec, chosen: Mapping[str, Any], fused: bool) -> list[str]:
    """PEFT ``target_modules``: leaf names when they select exactly ``chosen``, else full paths."""
    listed = [p for p in chosen if not (fused and ".experts." in p)]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in listed})
    closure = [p for p in spec.module_shapes()
               if p.rsplit(".", 1)[-1] in leaves and not (fused and ".experts." in p)]
    return leaves if sorted(closure) == sorted(listed) else sorted(listed)


def _as_spec(model: str | Path | TinyModelSpec) -> TinyModelSpec:
    """A model directory's spec, or a preset by name, or the spec itself."""
    if isinstance(model, TinyModelSpec):
        return model
    if Path(model).is_dir():
        return load_spec(model)
    return get_spec(str(model))


def _base_tensor(model: str | Path | TinyModelSpec, name: str, model_seed: int) -> torch.Tensor:
    if name == "lm_head.weight" and _as_spec(model).tie_word_embeddings:
        name = "model.embed_tokens.weight"  # tied: the checkpoint has no lm_head tensor
    if isinstance(model, TinyModelSpec) or not Path(model).is_dir():
        return model_state_dict(_as_spec(model), seed=model_seed)[name]
    root = Path(model)
    index = root / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(root / fname), "pt") as f:
        return f.get_tensor(name)


def build_adapter(
    model: str | Path | TinyModelSpec,
    *,
    targets: Sequence[str] = ("attention",),
    r: int = 8,
    alpha: float = 16,
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    expert_format: ExpertFormat = "2d",
    dtype: str = "float32",
    strength: float = 0.5,
    model_seed: int = 0,
) -> AdapterFixture:
    """Make an adapter for ``model`` (a model directory, a preset name or a spec) in memory."""
    if expert_format not in ("2d", "3d"):
        raise ValueError(f"expert_format must be '2d' or '3d', got {expert_format!r}")
    spec = _as_spec(model)
    chosen = select_modules(spec, targets)
    fused = expert_format == "3d" and spec.is_moe
    cast = DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleLoRA] = {}

    def draw(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=tensor_generator(seed, name)) * std

    def make(path: str, in_f: int, out_f: int, key: str) -> ModuleLoRA:
        rank = int(pattern_value(rank_pattern, key, r))
        s = lora_scaling(float(pattern_value(alpha_pattern, key, alpha)), rank, use_rslora=use_rslora)
        emb = path == "model.embed_tokens"
        a = draw(f"{path}.A", (rank, in_f), 1.0 if emb else in_f ** -0.5)
        b = draw(f"{path}.B", (out_f, rank), strength / (s * rank ** 0.5))
        return ModuleLoRA(a.to(cast).float(), b.to(cast).float(), s)

    for path, (in_f, out_f) in chosen.items():
        if fused and ".experts." in path:
            continue
        m = modules[path] = make(path, in_f, out_f, path)
        ka, kb = lora_keys(path, embedding=path == "model.embed_tokens")
        tensors[ka], tensors[kb] = m.a, m.b
        if path in ("model.embed_tokens", "lm_head"):
            tensors[f"base_model.model.{path}.base_layer.weight"] = _base_tensor(
                model, f"{path}.weight", model_seed).float()

    target_parameters: list[str] = []
    if fused:
        groups = _wanted(targets)
        kinds = [w for w in ("gate_up", "down") if f"experts.{w}" in groups]
        target_parameters = [p for p in FUSED_TARGET_PARAMETERS
                             if any(p.endswith(f"{k}_proj") for k in kinds)]
        h, i = spec.hidden_size, spec.expert_intermediate_size
        gate, up, down = spec.expert_proj_names
        for layer in range(spec.num_layers):
            if not spec.is_sparse(layer):
                continue
            q = f"model.layers.{layer}.{spec.moe_prefix}.experts"
            for which in kinds:
                in_f, out_f = (h, 2 * i) if which == "gate_up" else (i, h)
                per = [make(f"{q}.{e}.{which}", in_f, out_f, fused_param_key(layer, which))
                       for e in range(spec.num_experts)]
                a3, b3 = pack_fused(torch.stack([m.a for m in per]), torch.stack([m.b for m in per]))
                ka, kb = fused_expert_keys(layer, which, nested=len(kinds) == 2)
                tensors[ka], tensors[kb] = a3, b3
                for e, m in enumerate(per):
                    if which == "down":
                        modules[f"{q}.{e}.{down}"] = m
                    else:
                        modules[f"{q}.{e}.{gate}"] = ModuleLoRA(m.a, m.b[:i], m.scaling)
                        modules[f"{q}.{e}.{up}"] = ModuleLoRA(m.a, m.b[i:], m.scaling)

    config = adapter_config(
        base_model=str(model) if not isinstance(model, TinyModelSpec) else spec.family,
        r=r, alpha=alpha, use_rslora=use_rslora, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, target_modules=_target_modules(spec, chosen, fused),
        target_parameters=sorted(target_parameters) or None,
    )
    tensors = {k: v.to(cast).contiguous() for k, v in sorted(tensors.items())}
    return AdapterFixture(config=config, tensors=tensors, modules=modules, spec=spec)


def save_adapter(adapter_dir: str | Path, fixture: AdapterFixture, *,
                 weights_format: Literal["safetensors", "bin"] = "safetensors") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)."""
    out = Path(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in ("adapter_model.safetensors", "adapter_model.bin"):
        (out / old).unlink(missing_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(fixture.config, indent=2) + "\n")
    if weights_format == "bin":
        torch.save(dict(fixture.tensors), out / "adapter_model.bin")
    else:
        save_file(dict(fixture.tensors), str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    return out


def write_adapter(
    adapter_dir: str | Path,
    model: str | Path | TinyModelSpec,
    *,
    corrupt: str | None = None,
    weights_format: Literal["safetensors", "bin"] = "safetensors",
    **options: Any,
) -> Path:
    """Build an adapter (``build_adapter`` options) and save it, optionally broken on purpose.

    ``corrupt``: None or one of ``faults.FAULTS`` (DoRA, bias, a wrong shape, a truncated
    safetensors header, an unknown module, missing files, ...). Returns the directory.
    """
    from lora_cluster.testing.faults import apply_fault, apply_file_fault

    fixture = build_adapter(model, **options)
    if corrupt is not None:
        fixture = apply_fault(fixture, corrupt)
    out = save_adapter(adapter_dir, fixture, weights_format=weights_format)
    if corrupt is not None:
        apply_file_fault(out, corrupt)
    return out
