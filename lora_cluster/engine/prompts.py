"""Caller input as the controller needs it: prompts as token ids, one value per prompt, EOS ids.

Pure functions (no torch, no state); every refusal is a ``RequestError`` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_cluster.config import SamplingParams
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import RequestError
from lora_cluster.model.spec import ModelSpec

Prompt = str | Sequence[int]


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """Token ids of a text prompt (through the tokenizer) or a checked list of ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("prompt: text prompts need a tokenizer (the model directory "
                               "has no tokenizer.json); pass token ids", field="prompt")
        return tokenizer.encode(prompt)
    ids = list(prompt)
    bad = [t for t in ids
           if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt: token ids must be ints in [0, {vocab_size}), got {bad[:3]}",
                           field="prompt")
    return ids


def per_prompt(value: Any, count: int, what: str) -> list[Any]:
    """One value per prompt from a single value or a per-prompt list."""
    if value is None or isinstance(value, str | SamplingParams):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise RequestError(f"{what}: expected one per prompt ({count}), got {len(values)}",
                           field=what)
    return values


def eos_ids(spec: ModelSpec, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The model config's EOS ids; the tokenizer's when the config names none."""
    if spec.eos_token_ids or tokenizer is None:
        return spec.eos_token_ids
    return tokenizer.eos_token_ids
