"""Group an adapter's tensor names by *template* (numeric components → ``*``) without a Python
loop over the names.

A 40-layer, 512-expert adapter has ~82k tensor names, but only a few dozen templates, e.g.
``base_model.model.model.layers.*.mlp.experts.*.gate_proj.lora_A.weight``. Names come sorted
(safetensors headers are), so every decoder layer is one contiguous *block* whose text is the
same for all layers except the layer number; inside a block every expert is one small block
again. The scan therefore parses one reference block per distinct structure and confirms every
other block by comparing its joined text with the expected text (``str.join`` + ``==``, C
speed), recursing into experts. Blocks that do not match — other structures, unsorted input,
odd names — are parsed on their own, so the result is exact for any input; only the speed
depends on the input being regular.

The result, ``NameGroups``, gives each input name its template id and its numeric components
as numpy arrays aligned with the input order (callers select with masks, never loops).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property, lru_cache
from operator import itemgetter

import numpy as np

INDEX = "*"
# A numeric component: all digits, no leading zero (so str(int(c)) == c round-trips).
_COMPONENT = re.compile(r"(?:^|(?<=\.))(0|[1-9][0-9]*)(?=\.|$)")
_BLOCK_NUMBER = re.compile(r"(0|[1-9][0-9]*)\.")
# Runs of at most this many names are first tried as one uniform run (one text compare);
# bigger runs are confirmed block by block, whose texts stay cache-sized.
_WHOLE_RUN_LIMIT = 16384
# Block structures remembered per run (most recent first); a regular adapter needs one or two
# (e.g. MoE and dense layers). Bounded so that irregular input stays linear.
_MAX_REFS = 4


@dataclass(frozen=True)
class NameGroups:
    """Every input name's template and numeric components (arrays aligned with the input).

    templates: distinct templates, numeric components replaced by ``*``
    group_of:  [N] int32, index into ``templates``
    indices:   [N, D] int32, the numeric components of each name in order (-1 padded);
               D is the largest number of ``*`` in any template (column-major: each index
               axis is contiguous)
    """

    templates: tuple[str, ...]
    group_of: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.group_of.shape[0])

    def counts(self) -> np.ndarray:
        """[G] number of names per template."""
        return np.bincount(self.group_of, minlength=len(self.templates))

    @cached_property
    def _by_group(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.group_of, kind="stable")
        bounds = np.searchsorted(self.group_of[order], np.arange(len(self.templates) + 1))
        return order, bounds

    def first_position(self, group: int) -> int:
        """Input position of the first name of template ``group`` (one vectorized scan)."""
        return int(np.argmax(self.group_of == group))

    def positions(self, group: int) -> np.ndarray:
        """Input positions of the names of template ``group`` (ascending)."""
        order, bounds = self._by_group
        return order[bounds[group]: bounds[group + 1]]

    def index_values(self, group: int, depth: int) -> np.ndarray:
        """Sorted distinct values of the ``depth``-th ``*`` of template ``group``."""
        return np.unique(self.indices[self.group_of == group, depth])


def fill_template(template: str, values: tuple[int, ...] | list[int]) -> str:
    """The name a template has for these index values (``*`` filled in order)."""
    parts = template.split(INDEX)
    if len(parts) != len(values) + 1:
        raise ValueError(f"template {template!r} has {len(parts) - 1} indices, got {values}")
    return "".join(p + str(v) for p, v in zip(parts, values)) + parts[-1]


@dataclass
class _Local:
    """A scan result relative to some head: local templates, ids and indices [n, d]."""

    templates: list[str]
    group_of: np.ndarray
    indices: np.ndarray


def _empty(d: int = 0) -> _Local:
    return _Local([], np.zeros(0, np.int32), np.zeros((0, d), np.int32))


def _parse_one(name: str) -> tuple[str, list[int]]:
    values = [int(m.group(1)) for m in _COMPONENT.finditer(name)]
    return (_COMPONENT.sub(INDEX, name) if values else name), values


def _parse_each(names: list[str]) -> _Local:
    """The plain path: parse names one by one (used for odd names and reference leaves)."""
    if not names:
        return _empty()
    table: dict[str, int] = {}
    gids: list[int] = []
    rows: list[list[int]] = []
    for name in names:
        template, values = _parse_one(name)
        gids.append(table.setdefault(template, len(table)))
        rows.append(values)
    depth = max(map(len, rows))
    idx = np.full((len(names), depth), -1, np.int32)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = row
    return _Local(list(table), np.asarray(gids, np.int32), idx)


@lru_cache(maxsize=64)
def _lex_values(n: int) -> tuple[tuple[str, ...], np.ndarray]:
    """0..n-1 as strings in the order a sorted name list holds them ("0", "1", "10", ...)."""
    strs = tuple(sorted(map(str, range(n))))
    return strs, np.fromiter(map(int, strs), np.int32, count=n)


class _Merger:
    """Concatenates the results of consecutive pieces into one, unifying template tables.

    Pieces are recorded and assembled once in ``result``; a reference block added for many
    layers is remapped once (cached by identity) and its leading index column is one repeat.
    """

    def __init__(self) -> None:
        self.table: dict[str, int] = {}
        self._pieces: list[tuple[np.ndarray, np.ndarray, int]] = []  # gids, indices, value
        # (id(local), prefix) → (local, remapped ids); holding ``local`` keeps its id unique.
        self._remap: dict[tuple[int, str], tuple[_Local, np.ndarray]] = {}

    def add(self, local: _Local, prefix: str = "", value: int = -1) -> None:
        """Append ``local``'s names; templates get ``prefix``; ``value`` >= 0 is a leading index."""
        if not len(local.group_of):
            return
        key = (id(local), prefix)
        cached = self._remap.get(key)
        if cached is None:
            remap = np.fromiter((self.table.setdefault(prefix + t, len(self.table))
                                 for t in local.templates), np.int32, count=len(local.templates))
            cached = self._remap[key] = (local, remap[local.group_of])
        gids = cached[1]
        self._pieces.append((gids, local.indices, value))

    def result(self) -> _Local:
        if not self._pieces:
            return _empty()
        lead = any(v >= 0 for _, _, v in self._pieces)
        depth = max(a.shape[1] + (v >= 0) for _, a, v in self._pieces)
        sizes = [len(g) for g, _, _ in self._pieces]
        idx = np.full((depth, sum(sizes)), -1, np.int32)  # transposed: axes contiguous
        if lead:
            idx[0] = np.repeat(np.fromiter((v for _, _, v in self._pieces), np.int32,
                                           count=len(sizes)), sizes)
        row = 0
        for (_, a, v), size in zip(self._pieces, sizes):
            col = 1 if v >= 0 else 0
            idx[col: col + a.shape[1], row: row + size] = a.T
            row += size
        return _Local(list(self.table), np.concatenate([g for g, _, _ in self._pieces]), idx.T)


@dataclass
class _Ref:
    """A verified block structure: the names after the block head, and their scan."""

    rel: list[str]
    rel_text: list[str]  # ["", *rel]: joined with "\n" + head it gives "\n" + block text
    local: _Local

    def matches(self, block: list[str], head: str) -> bool:
        if len(block) != len(self.rel):
            return False
        expected = ("\n" + head).join(self.rel_text)  # "\n" + head + rel0 + "\n" + head + ...
        actual = "\n".join(block)
        return len(expected) == len(actual) + 1 and expected.endswith(actual)


def _new_ref(block: list[str], head: str) -> _Ref | None:
    """The block as a reference, or None when some name does not start with ``head``."""
    rel = list(map(itemgetter(slice(len(head), None)), block))
    ref = _Ref(rel, ["", *rel], _empty())
    if not ref.matches(block, head):
        return None
    ref.local = _scan(rel)
    return ref


def _try_whole_run(names: list[str], lo: int, hi: int, stem: str, first: _Ref,
                   ) -> _Local | None:
    """Accept [lo, hi) in one compare if it is blocks 0..n-1, all shaped like ``first``."""
    m = len(first.rel)
    if m == 0 or (hi - lo) % m:
        return None
    n = (hi - lo) // m
    strs, values = _lex_values(n)
    expected = "".join([("\n" + stem + v + ".").join(first.rel_text) for v in strs])
    actual = "\n".join(names[lo:hi])
    if len(expected) != len(actual) + 1 or not expected.endswith(actual):
        return None
    loc = first.local
    idx = np.empty((1 + loc.indices.shape[1], n * m), np.int32)
    idx[0] = np.repeat(values, m)
    idx[1:] = np.tile(loc.indices.T, (1, n))
    return _Local(loc.templates, np.tile(loc.group_of, n), idx.T)


def _scan_run(names: list[str], lo: int, hi: int, stem: str, merger: _Merger) -> None:
    """Names [lo, hi) all start with ``stem`` (ends in "."); blocks by the number after it."""
    prefix = stem + INDEX + "."
    refs: list[_Ref] = []
    j = lo
    while j < hi:
        name = names[j]
        mm = _BLOCK_NUMBER.match(name, len(stem)) if name.startswith(stem) else None
        if mm is None:
            merger.add(_parse_each([name]))
            j += 1
            continue
        value = mm.group(1)
        head = stem + value + "."
        k = max(bisect_left(names, stem + value + "/", j, hi), j + 1)
        block = names[j:k]
        ref = next((r for r in refs if r.matches(block, head)), None)
        if ref is None:
            ref = _new_ref(block, head)
            if ref is None:  # unsorted input: not one block after all
                merger.add(_parse_each(block))
                j = k
                continue
            if j == lo and not refs and hi - lo <= _WHOLE_RUN_LIMIT and value == "0":
                whole = _try_whole_run(names, lo, hi, stem, ref)
                if whole is not None:
                    merger.add(whole, prefix)
                    return
            refs = [ref, *refs[: _MAX_REFS - 1]]
        merger.add(ref.local, prefix, int(value))
        j = k


def _scan(names: list[str]) -> _Local:
    merger = _Merger()
    i, n = 0, len(names)
    while i < n:
        name = names[i]
        m = _COMPONENT.search(name)
        if m is None or m.start(1) == 0:
            # No numeric component (or a leading one): a leaf of this level.
            j = i + 1
            while j < n and _COMPONENT.search(names[j]) is None:
                j += 1
            merger.add(_parse_each(names[i:j]))
            i = j
            continue
        stem = name[: m.start(1)]
        end = max(bisect_left(names, stem[:-1] + "/", i), i + 1)
        _scan_run(names, i, end, stem, merger)
        i = end
    return merger.result()


def _looks_unsorted(names: list[str], samples: int = 256) -> bool:
    """A cheap probe of ``samples`` evenly spaced neighbour pairs (not a proof of order)."""
    step = max(1, (len(names) - 1) // samples)
    return any(names[i] > names[i + 1] for i in range(0, len(names) - 1, step))


def scan_names(names: list[str]) -> NameGroups:
    """Templates, template ids and numeric components of every name (exact for any order).

    Unsorted input (e.g. a ``.bin`` state dict in module order) is scanned in sorted order
    and mapped back, so it still takes the fast path."""
    names = names if isinstance(names, list) else list(names)
    if not _looks_unsorted(names):
        local = _scan(names)
        return NameGroups(tuple(local.templates), local.group_of, local.indices)
    order = np.array(sorted(range(len(names)), key=names.__getitem__), np.int64)
    local = _scan([names[i] for i in order.tolist()])
    group_of = np.empty_like(local.group_of)
    group_of[order] = local.group_of
    indices = np.empty_like(local.indices)
    indices[order] = local.indices
    return NameGroups(tuple(local.templates), group_of, indices)
