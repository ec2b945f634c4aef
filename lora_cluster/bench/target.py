"""The system under test: a Ray ``Cluster`` (the real path) or an in-process ``ControllerCore``.

``ray`` reuses this process's Ray connection when one exists (tests, a staged GPU machine),
else starts an embedded local one, as ``Cluster.start`` does. ``local`` runs one rank in this
process without Ray (``LocalRankGroup``): no transport cost, useful to separate the engine
from Ray on small machines. Both expose ``generate``, ``stats``, ``register_adapters``,
``load_adapter`` and ``shutdown``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from lora_cluster.config import ClusterConfig
from lora_cluster.errors import ConfigError

Backend = Literal["ray", "local"]
BACKENDS = ("ray", "local")


def start_local(config: ClusterConfig, rank_group_wrapper: Any = None) -> Any:
    """An in-process ``ControllerCore`` over one ``LocalRankGroup`` (optionally wrapped)."""
    import torch

    from lora_cluster.engine.controller_core import ControllerCore
    from lora_cluster.engine.rank_group import LocalRankGroup
    from lora_cluster.engine.tokenizer import Tokenizer
    from lora_cluster.model.spec import load_model_spec

    config = config.resolved(cuda_available=torch.cuda.is_available())
    group: Any = LocalRankGroup(config)
    if rank_group_wrapper is not None:
        group = rank_group_wrapper(group)
    return ControllerCore(config, load_model_spec(config.model), group,
                          Tokenizer.from_model_dir(config.model))


@contextmanager
def open_target(config: ClusterConfig, backend: Backend = "ray") -> Iterator[Any]:
    """Start the system under test and shut it down afterwards."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {BACKENDS}, got {backend!r}", field="backend")
    if backend == "ray":
        import os

        from lora_cluster.cluster.handle import Cluster

        # Ray runs its workers at nice 15 by default; the HF baselines run in this process at
        # nice 0. Only matters for CPU ranks on a busy host, and only for a Ray this process
        # starts itself: level the field there.
        os.environ.setdefault("RAY_worker_niceness", "0")
        target: Any = Cluster.start(config)
    else:
        target = start_local(config)
    try:
        yield target
    finally:
        target.shutdown()
