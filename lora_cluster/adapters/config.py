"""``adapter_config.json`` → a frozen ``AdapterConfig``; everything that would change the maths
but is not served (DoRA, LoRA bias, full module copies, ...) is refused here with a typed error.

Field names and semantics are PEFT 0.21.2's ``LoraConfig``: scaling ``lora_alpha / r`` (rsLoRA
``lora_alpha / sqrt(r)``), ``rank_pattern`` / ``alpha_pattern`` keyed by regexes matched against
module names (see ``patterns.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cluster.errors import AdapterFormatError, UnsupportedAdapterError

CONFIG_FILE = "adapter_config.json"

# Fields that select a LoRA variant or extra trainable parts we do not serve: field → why.
# A field is refused when its value is "set" (truthy and not an empty container).
_REFUSED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
    "lora_bias": "LoRA bias (lora_bias=true adds a trained bias to lora_B) is not supported",
    "modules_to_save": "modules_to_save (full trained copies of whole modules) is not supported",
    "layer_replication": "layer_replication changes the model's layer stack; not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
}
# init_lora_weights values that select a LoRA variant at inference time (not just an init).
_VARIANT_INITS = ("mica",)


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """The parts of a PEFT LoRA config that decide what the adapter computes.

    Refused fields (``use_dora``, ``bias`` other than "none", ``modules_to_save``, ...) never
    reach an instance, so they have no field here.
    """

    path: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    target_parameters: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()  # PEFT dict order: first match wins
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False  # no effect on nn.Linear/Embedding targets (PEFT resets it)
    peft_type: str = "LORA"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    peft_version: str | None = None

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's scaling for one module of rank ``r`` and alpha ``alpha``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def default_scaling(self) -> float:
        return self.scaling(self.r, self.lora_alpha)

    def target_names(self) -> tuple[str, ...]:
        """target_modules (list, or the regex string as one entry) + target_parameters."""
        tm = self.target_modules
        listed = (tm,) if isinstance(tm, str) else tuple(tm or ())
        return listed + self.target_parameters


def _fail(path: str, key: str, why: str) -> AdapterFormatError:
    return AdapterFormatError(f"{path}: field {key!r} {why}", file=path, key=key)


def _str_list(raw: dict[str, Any], key: str, path: str) -> tuple[str, ...] | str | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(path, key, f"must be a string or a list of strings, got {value!r}")


def _pattern(raw: dict[str, Any], key: str, path: str, kind: type) -> tuple[tuple[str, Any], ...]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be an object mapping module patterns to values, got {value!r}")
    out = []
    for pattern, v in value.items():
        ok = isinstance(v, int) and v >= 1 if kind is int else isinstance(v, int | float)
        if isinstance(v, bool) or not ok:
            raise _fail(path, f"{key}.{pattern}", f"must be a positive {kind.__name__}, got {v!r}")
        out.append((str(pattern), kind(v)))
    return tuple(out)


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def parse_adapter_config(raw: Any, path: str) -> AdapterConfig:
    """Validate a decoded ``adapter_config.json``; refusals raise UnsupportedAdapterError."""
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}",
                                 file=path)
    peft_type = str(raw.get("peft_type") or "LORA")
    if peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{path}: peft_type {peft_type!r} is not supported (only LORA adapters are served)",
            file=path, key="peft_type")
    for key, why in _REFUSED_FIELDS.items():
        if _is_set(raw.get(key)):
            raise UnsupportedAdapterError(f"{path}: {why} ({key}={raw.get(key)!r})",
                                          file=path, key=key)
    bias = raw.get("bias", "none") or "none"
    if bias != "none":
        raise UnsupportedAdapterError(
            f"{path}: bias={bias!r} trains base-layer biases, which are not served "
            "(only bias='none' is supported)", file=path, key="bias")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_VARIANT_INITS):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={init!r} selects a LoRA variant that is not supported",
            file=path, key="init_lora_weights")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _fail(path, "r", f"must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise _fail(path, "lora_alpha", f"must be a number, got {alpha!r}")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list)
                                   and all(isinstance(v, int) for v in layers)):
        raise _fail(path, "layers_to_transform", f"must be an int or a list of ints, got {layers!r}")
    params = _str_list(raw, "target_parameters", path)
    if isinstance(params, str):
        params = (params,)
    if params and raw.get("fan_in_fan_out"):
        raise UnsupportedAdapterError(
            f"{path}: fan_in_fan_out=true with target_parameters (PEFT itself refuses this)",
            file=path, key="fan_in_fan_out")
    return AdapterConfig(
        path=path,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_str_list(raw, "target_modules", path),
        target_parameters=tuple(params or ()),
        rank_pattern=_pattern(raw, "rank_pattern", path, int),
        alpha_pattern=_pattern(raw, "alpha_pattern", path, float),
        layers_to_transform=None if layers is None else tuple(layers),
        layers_pattern=_str_list(raw, "layers_pattern", path),
        exclude_modules=_str_list(raw, "exclude_modules", path),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        peft_type="LORA",
        task_type=raw.get("task_type"),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        peft_version=raw.get("peft_version"),
    )


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Read and validate one ``adapter_config.json`` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        from lora_cluster.errors import AdapterNotFoundError

        raise AdapterNotFoundError(f"{p}: adapter config not found", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{p}: unreadable adapter config ({exc})", file=str(p)) from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(
            f"{p}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            file=str(p), line=exc.lineno) from None
    return parse_adapter_config(raw, str(p))
