"""Validated adapter plans by content, so a rank does not re-validate what it has seen.

Validation (``loader.inspect_adapter``: config parse, header parse and checks, the name scan,
the plan) is a pure function of three inputs besides the model: the bytes of
``adapter_config.json``, the bytes of the safetensors JSON header, and ``max_lora_rank`` —
plus one check that depends on the file itself: every tensor's bytes lie inside it. A fleet
of adapters trained with one recipe has byte-identical configs and headers (only the tensor
data differ), and the controller has already validated each one at registration; so a rank
keeps the plans it built, keyed by a digest of those bytes, and a later load of any adapter
with the same bytes reuses the plan with only what is file-specific redone:

* the config and header bytes are read again (they are the key: a file rewritten since is a
  miss and is validated in full, with the usual typed refusal);
* the data section's size is checked against the header's offsets (``check_data_size``): a
  file truncated after registration fails here with the same ``AdapterFormatError`` as a full
  validation would raise, naming the file and the first tensor past its end;
* the tensor reads themselves keep their own checks (``TensorReader``).

Only clean plans are kept (no summary warning: a warning names its adapter's directory and is
logged per load) and only safetensors files (``.bin`` has no header to key on). Thread-safe:
a rank's reader thread and command thread share one cache. Bounded: ``capacity`` plans, least
recently used first out; a plan holds its header's table, so large adapters count by tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path

from lora_cluster.adapters.config import parse_adapter_config
from lora_cluster.adapters.header import (
    check_data_size,
    parse_safetensors_header,
    read_safetensors_header,
)
from lora_cluster.adapters.layout import locate_adapter_files
from lora_cluster.adapters.loader import LoadStats, inspect_adapter, logger
from lora_cluster.adapters.plan import AdapterPlan, plan_adapter
from lora_cluster.adapters.validation import check_names
from lora_cluster.model.spec import ModelSpec

DEFAULT_CAPACITY = 64  # distinct adapter structures kept
DEFAULT_MAX_TENSORS = 1 << 20  # header entries kept over all plans (a 41k-module MoE: 82k)


class PlanCache:
    """Plans of validated adapters keyed by their config + header bytes (see module doc)."""

    def __init__(self, spec: ModelSpec, *, max_lora_rank: int,
                 capacity: int = DEFAULT_CAPACITY,
                 max_tensors: int = DEFAULT_MAX_TENSORS) -> None:
        self.spec = spec
        self.max_lora_rank = max_lora_rank
        self.capacity = capacity
        self.max_tensors = max_tensors
        self._plans: OrderedDict[bytes, AdapterPlan] = OrderedDict()
        self._tensors = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def content_key(self, config_bytes: bytes, header: bytes) -> bytes:
        """The key of a plan: a digest of the config bytes, the raw safetensors header bytes
        and this cache's rank limit (equal keys, equal validation outcome)."""
        return hashlib.blake2b(b"%d\0%d\0" % (len(config_bytes), self.max_lora_rank)
                               + config_bytes + header, digest_size=20).digest()

    def inspect(self, adapter_dir: str | Path, *, subfolder: str | None = None,
                stats: LoadStats | None = None) -> AdapterPlan:
        """``loader.inspect_adapter`` for this cache's model and rank limit, reusing the plan
        of byte-identical config + header (same typed errors; see the module docstring)."""
        return self.inspect_keyed(adapter_dir, subfolder=subfolder, stats=stats)[0]

    def inspect_keyed(self, adapter_dir: str | Path, *, subfolder: str | None = None,
                      stats: LoadStats | None = None) -> tuple[AdapterPlan, bytes | None]:
        """``inspect`` and the plan's content key: equal keys, equal config and header bytes
        (None: a plan that is not kept — ``.bin``, or one with a warning)."""
        stats = stats if stats is not None else LoadStats()
        with stats.timing("validate"):
            files = locate_adapter_files(adapter_dir, subfolder)
        if not files.is_safetensors:
            return self._full(adapter_dir, subfolder, stats), None
        with stats.timing("read"):
            try:
                config_bytes = files.config.read_bytes()
            except OSError:
                return self._full(adapter_dir, subfolder, stats), None  # its typed error
            path, raw, size = read_safetensors_header(files.weights)
        key = self.content_key(config_bytes, raw)
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if cached is not None:
            with stats.timing("validate"):
                table = dataclasses.replace(cached.table, path=path)
                check_data_size(table, size)
                config = dataclasses.replace(cached.config, path=str(files.config))
                plan = dataclasses.replace(cached, config=config, table=table)
            stats.file_bytes = table.nbytes
            return plan, key
        try:
            parsed = json.loads(config_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._full(adapter_dir, subfolder, stats), None  # its typed error
        plan = self._validate(files.directory, files.config, parsed, path, raw, size, stats)
        if plan.warning is None:
            self._keep(key, plan)
            return plan, key
        logger.warning(plan.warning)
        return plan, None

    def _validate(self, directory: Path, config_path: Path, parsed: object, path: str,
                  raw: bytes, size: int, stats: LoadStats) -> AdapterPlan:
        """Full validation of exactly the bytes the key was made of."""
        with stats.timing("validate"):
            config = parse_adapter_config(parsed, str(config_path))
        with stats.timing("read"):
            table = parse_safetensors_header(path, raw, size)
        stats.file_bytes = table.nbytes
        with stats.timing("validate"):
            verdict = check_names(table.names, self.spec, where=str(directory))
            return plan_adapter(config, table, verdict, self.spec,
                                max_lora_rank=self.max_lora_rank)

    def _full(self, adapter_dir: str | Path, subfolder: str | None,
              stats: LoadStats) -> AdapterPlan:
        return inspect_adapter(adapter_dir, self.spec, max_lora_rank=self.max_lora_rank,
                               subfolder=subfolder, stats=stats)

    def _keep(self, key: bytes, plan: AdapterPlan) -> None:
        n = len(plan.table)
        if n > self.max_tensors:
            return
        with self._lock:
            if key in self._plans:
                return
            self._plans[key] = plan
            self._tensors += n
            while len(self._plans) > self.capacity or self._tensors > self.max_tensors:
                _, old = self._plans.popitem(last=False)
                self._tensors -= len(old.table)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"plans": len(self._plans), "tensors": self._tensors, "hits": self.hits,
                    "misses": self.misses}
