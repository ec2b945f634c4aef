"""Layer-by-layer staging on the adapter side: the out-of-order arrival tracker (weak refs,
one warning per update with the right layers and bytes) and the layer stream (one header
parse, only the named layers' tensors read, parts in file order, equal to a whole load)."""

from __future__ import annotations

import gc
import json
import logging
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_cluster.adapters import load_adapter
from lora_cluster.adapters.layer_stream import LayerStream, layer_bytes
from lora_cluster.adapters.staging import LayerArrivals
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec

LOGGER = "lora_cluster.adapters"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_in_order(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file whose data section holds the tensors in exactly this order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors:
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def kind_major(adapter_dir: Path, out_dir: Path) -> Path:
    """Copy of a PEFT adapter whose file lists q_proj of every layer, then k_proj, … (layers
    interleave: each layer's modules arrive spread over the whole file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))

    def order(name: str) -> tuple[str, int, str]:
        layer = int(name.split(".layers.")[1].split(".")[0])
        kind = name.split(".layers.")[1].split(".", 1)[1]
        return (kind.replace("lora_A", "").replace("lora_B", ""), layer, kind)

    write_in_order(out_dir / "adapter_model.safetensors",
                   [(n, tensors[n]) for n in sorted(tensors, key=order)])
    return out_dir


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32)  # 4n bytes


# ------------------------------------------------------------------ the tracker
def test_in_order_arrivals_never_warn(caplog):
    arrivals = LayerArrivals("a v2", {0: 2, 1: 2, None: 1})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        keep = [ones(10), ones(10)]
        assert not arrivals.arrive(0, keep[:1])
        assert arrivals.buffered() == {0: 40} and len(arrivals) == 1
        assert arrivals.arrive(0, keep[1:])
        assert not arrivals.arrive(1, [ones(5)]) and arrivals.arrive(1, [ones(5)])
        assert arrivals.arrive(None, [])
        arrivals.close()
    assert not caplog.records and arrivals.peak is None and arrivals.missing_layers() == []
    with pytest.raises(ValueError, match="already complete"):
        arrivals.arrive(0, [])
    with pytest.raises(KeyError, match="not part of this update"):
        arrivals.arrive(7, [])


def test_interleaved_arrivals_warn_once_with_peak_layers_and_bytes(caplog):
    arrivals = LayerArrivals("'sql' v3", {0: 3, 1: 3, 2: 3, 5: 3})
    held = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for layer in (0, 1, 2):        # first parts of three layers: 3 buffered
            held.append(ones(256))     # 1 KiB each
            arrivals.arrive(layer, held[-1:])
        for layer in (0, 1, 2):        # second parts: 6 KiB held by 3 layers (the peak)
            held.append(ones(256))
            arrivals.arrive(layer, held[-1:])
        assert arrivals.held_bytes == 6 * 1024 and not caplog.records  # episode still open
        assert arrivals.arrive(0, [ones(999)])  # layer 0 completes: 2 still buffered
        assert arrivals.arrive(1, [ones(999)])  # 1 buffered: the episode ends → warning
        assert len(caplog.records) == 1
        # A second, smaller episode later in the same update: no second warning.
        arrivals.arrive(5, [ones(8)])
        arrivals.arrive(5, [ones(8)])
        assert arrivals.arrive(2, [])
        assert arrivals.arrive(5, [])
        arrivals.close()
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "'sql' v3" in msg and "layers [0, 1, 2]" in msg and "(6144 bytes)" in msg
    assert "0.01 MB" in msg
    assert arrivals.peak is not None and arrivals.peak.layers == (0, 1, 2)
    assert arrivals.peak.nbytes == 6144 and arrivals.buffered() == {} and len(arrivals) == 0


def test_tracker_holds_only_weak_references(caplog):
    arrivals = LayerArrivals("w", {0: 2, 1: 2})
    staging = {0: [ones(1000)], 1: [ones(500)]}
    refs = [weakref.ref(t) for ts in staging.values() for t in ts]
    arrivals.arrive(0, staging[0])
    arrivals.arrive(1, staging[1])
    assert arrivals.buffered() == {0: 4000, 1: 2000} and arrivals.held_bytes == 6000
    del staging  # the staging area drops its tensors (a failed update): the tracker must not
    gc.collect()
    assert all(r() is None for r in refs)
    assert arrivals.buffered() == {0: 0, 1: 0} and arrivals.held_bytes == 0
    assert not any(isinstance(o, torch.Tensor) for o in gc.get_referents(*vars(arrivals).values()))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        arrivals.close()  # a failed update: the open episode is reported once, at its peak
    assert len(caplog.records) == 1 and "layers [0, 1]" in caplog.records[0].getMessage()
    assert "(6000 bytes)" in caplog.records[0].getMessage()
    assert arrivals.buffered() == {} and arrivals.held_bytes == 0


def test_model_wide_layer_is_named():
    arrivals = LayerArrivals("m", {0: 2, None: 2})
    t = [ones(1), ones(1)]
    arrivals.arrive(None, t[:1])
    arrivals.arrive(0, t[1:])
    arrivals.close()
    assert arrivals.peak is not None and arrivals.peak.describe().startswith(
        "layers [0, model-wide] holding")


# ------------------------------------------------------------------ the layer stream
@pytest.mark.parametrize("options", [
    {"targets": ["all"], "expert_format": "2d", "seed": 11},
    {"targets": ["all"], "expert_format": "3d", "r": 4, "seed": 12},
])
@pytest.mark.parametrize("info", [ParallelInfo(), ParallelInfo(ep_rank=1, ep_size=2),
                                  ParallelInfo(tp_rank=1, tp_size=2)], ids=["ep1", "ep2r1", "tp2r1"])
def test_stream_reads_only_named_layers_and_equals_a_whole_load(fixture_cache, qwen3_moe_dir,
                                                                options, info):
    spec = load_model_spec(qwen3_moe_dir)
    path = fixture_cache.adapter(qwen3_moe_dir, name="s", **options)
    whole = load_adapter(path, spec, info, name="s", max_lora_rank=16)
    with LayerStream(path, spec, info, name="s", version=1, max_lora_rank=16) as stream:
        assert stream.layers() == [0, 1, None]
        got: dict = {}
        parts = 0
        for layer, modules in stream.read([0]):
            assert layer == 0 and all(k[0] == 0 for k in modules)
            got.update(modules)
            parts += 1
        assert parts == stream.expected()[0]
        after_layer0 = stream.stats.bytes_read
        for _, modules in stream.read([1, None]):
            got.update(modules)
    assert set(got) == set(whole.weights.modules)
    for key, t in got.items():
        ref = whole.weights.modules[key]
        assert torch.equal(t.a, ref.a) and torch.equal(t.b, ref.b) and t.scaling == ref.scaling
    # Only layer 0's tensors were read by the first group (about a third of the bytes).
    assert 0 < after_layer0 < 0.6 * whole.stats.bytes_read
    assert stream.stats.bytes_read == whole.stats.bytes_read


def test_stream_parts_arrive_in_file_order(fixture_cache, qwen3_moe_dir, tmp_path):
    spec = load_model_spec(qwen3_moe_dir)
    plain = fixture_cache.adapter(qwen3_moe_dir, name="o", targets=["attention"], seed=5)
    mixed = kind_major(plain, tmp_path / "o")
    with LayerStream(plain, spec, ParallelInfo(), name="o", version=1, max_lora_rank=16) as s:
        in_order = [(layer, sorted(m)) for layer, m in s.read(s.layers())]
    with LayerStream(mixed, spec, ParallelInfo(), name="o", version=1, max_lora_rank=16) as s:
        interleaved = [(layer, sorted(m)) for layer, m in s.read(s.layers())]
        sizes = layer_bytes(s.plan)
    assert [layer for layer, _ in in_order] == [0] * 4 + [1] * 4
    assert [layer for layer, _ in interleaved] == [0, 1] * 4
    assert [m[0][1] for _, m in interleaved] == ["k_proj"] * 2 + ["o_proj"] * 2 + [
        "q_proj"] * 2 + ["v_proj"] * 2  # the kind-major file order
    assert sizes == {0: sizes[1], 1: sizes[1]} and sizes[0] > 0


def test_closed_stream_refuses_reads(fixture_cache, qwen3_moe_dir):
    spec = load_model_spec(qwen3_moe_dir)
    path = fixture_cache.adapter(qwen3_moe_dir, name="c", targets=["attention"])
    stream = LayerStream(path, spec, ParallelInfo(), name="c", version=1, max_lora_rank=16)
    stream.close()
    stream.close()
    with pytest.raises(ValueError, match="closed"):
        next(stream.read([0]))
