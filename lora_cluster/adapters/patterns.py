"""``rank_pattern`` / ``alpha_pattern`` resolved once per module *template*, not per module.

PEFT gives module ``key`` (e.g. ``model.layers.3.self_attn.q_proj``) the value of the first
pattern ``p``, in dict order, with ``re.match(rf"(.*\\.)?({p})$", key)``. Most patterns are
plain names (``q_proj``, ``self_attn.q_proj``, ``experts\\.gate_up_proj``): fixed-length runs
of letters, ``_`` and dots. Such a pattern looks only at the last ``len(p)`` characters of the
key and the one before; when those lie inside the template's fixed tail (after its last
``*``), the answer is the same for every module of the template, so one match on the template
decides all of them. Any other pattern (digits, classes, quantifiers) is matched per module of
that template — exact, just slower, and only for templates such a pattern is tried on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from lora_cluster.adapters.names import INDEX
from lora_cluster.errors import AdapterFormatError

V = TypeVar("V")
# Letters, "_", "\." and "." (a one-character wildcard): a fixed-length, digit-free pattern.
_FIXED = re.compile(r"(?:[A-Za-z_]|\\\.|\.)+")


def _fixed_length(pattern: str) -> int | None:
    """Characters a fixed-length digit-free pattern matches, or None for any other pattern."""
    if not _FIXED.fullmatch(pattern):
        return None
    return len(pattern) - pattern.count("\\.")


class PatternTable(Generic[V]):
    """One of rank_pattern / alpha_pattern with its default (r / lora_alpha)."""

    def __init__(self, patterns: Sequence[tuple[str, V]], default: V, *, field: str,
                 path: str) -> None:
        self.default = default
        self._entries: list[tuple[re.Pattern[str], V, int | None]] = []
        for pattern, value in patterns:
            try:
                compiled = re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                raise AdapterFormatError(f"{path}: {field} key {pattern!r} is not a valid regex "
                                         f"({exc})", file=path, key=f"{field}.{pattern}") from None
            self._entries.append((compiled, value, _fixed_length(pattern)))

    def __bool__(self) -> bool:
        return bool(self._entries)

    def value_for(self, key: str) -> V:
        """PEFT's lookup for one concrete module key."""
        for compiled, value, _ in self._entries:
            if compiled.match(key):
                return value
        return self.default

    def for_template(self, template: str, keys: Callable[[], list[str]]) -> V | list[V]:
        """The value of every module of ``template``: one value when it is the same for all,
        else a list aligned with ``keys()`` (the concrete module keys, built only then)."""
        tail = len(template) - template.rfind(INDEX) - 1 if INDEX in template else None
        probe = template.replace(INDEX, "0")
        for compiled, value, length in self._entries:
            if tail is not None and (length is None or length + 1 > tail):
                return [self.value_for(k) for k in keys()]
            if compiled.match(probe):
                return value
        return self.default
