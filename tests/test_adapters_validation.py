"""Set-based validation: the template scan is exact for any name list, patterns resolve per
template exactly as PEFT resolves them per module, and the ignored-modules warning appears
once per load with the right counts."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from pathlib import Path

import pytest
import torch

from lora_cluster.adapters import check_names, load_adapter
from lora_cluster.adapters.names import fill_template, scan_names
from lora_cluster.adapters.patterns import PatternTable
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing import build_adapter, save_adapter

P = "base_model.model.model.layers"


def _naive(names: list[str]) -> list[tuple[str, list[int]]]:
    """Per-name reference: numeric components (no leading zeros) → '*'."""
    out = []
    for name in names:
        parts = name.split(".")
        num = [p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts]
        out.append((".".join("*" if n else p for p, n in zip(parts, num)),
                    [int(p) for p, n in zip(parts, num) if n]))
    return out


def _moe_names(layers: int, experts: int, *, vision: int = 0) -> list[str]:
    names = []
    for layer in range(layers):
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names += [f"{P}.{layer}.self_attn.{k}.lora_{f}.weight" for f in "AB"]
        for e in range(experts):
            for k in ("gate_proj", "up_proj"):
                names += [f"{P}.{layer}.mlp.experts.{e}.{k}.lora_{f}.weight" for f in "AB"]
    for b in range(vision):
        for k in ("attn.qkv", "mlp.fc1"):
            names += [f"base_model.model.visual.blocks.{b}.{k}.lora_{f}.weight" for f in "AB"]
    return sorted(names)


def _check_scan(names: list[str]) -> None:
    got = scan_names(names)
    want = _naive(names)
    assert [got.templates[g] for g in got.group_of.tolist()] == [t for t, _ in want]
    for row, (_, values) in zip(got.indices.tolist(), want):
        assert row[: len(values)] == values and all(v == -1 for v in row[len(values):])


@pytest.mark.parametrize("case", ["regular", "shuffled", "holes", "odd", "mixed_layers"])
def test_scan_is_exact_for_any_input(case: str) -> None:
    names = _moe_names(12, 20, vision=3)
    rng = random.Random(0)
    if case == "shuffled":
        rng.shuffle(names)
    elif case == "holes":  # an expert missing in one layer, a layer missing entirely
        names = [n for n in names if ".3.mlp.experts.7." not in n and f"{P}.5." not in n]
    elif case == "odd":
        names = sorted([*names, "x", "5.leading", f"{P}.01.self_attn.q_proj.lora_A.weight",
                                "a..b", f"{P}.3", f"{P}.3.mlp.experts.2.9.deep.lora_A.weight",
                                "base_model.model.model.embed_tokens.lora_embedding_A"])
    elif case == "mixed_layers":  # dense layers between MoE layers: two block structures
        names = sorted([n for n in names if not (".experts." in n and f"{P}.4." in n)]
                       + [f"{P}.4.mlp.{k}.lora_A.weight" for k in ("gate_proj", "up_proj")])
    _check_scan(names)


def test_scan_template_counts_and_fill() -> None:
    names = _moe_names(3, 5)
    groups = scan_names(names)
    counts = dict(zip(groups.templates, groups.counts().tolist()))
    assert counts[f"{P}.*.mlp.experts.*.gate_proj.lora_A.weight"] == 15
    assert counts[f"{P}.*.self_attn.q_proj.lora_B.weight"] == 3
    t = f"{P}.*.mlp.experts.*.up_proj.lora_A.weight"
    assert fill_template(t, [2, 4]) in names
    g = groups.templates.index(t)
    assert groups.index_values(g, 1).tolist() == [0, 1, 2, 3, 4]


def test_large_adapter_verdict_is_set_based(fixture_cache) -> None:
    """40 layers × 512 experts: the verdict and its warning come from a few dozen templates
    (a loose time bound guards against per-module work creeping in)."""
    spec = dataclasses.replace(load_model_spec(fixture_cache.model("qwen3_moe")),
                               num_layers=40, num_experts=512,
                               sparse_layers=(True,) * 40)
    names = _moe_names(40, 512, vision=38)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        verdict = check_names(names, spec, where="big")
        best = min(best, time.perf_counter() - t0)
    assert best < 0.25, f"validation of {len(names)} names took {best * 1e3:.1f} ms"
    assert len(verdict.groups.templates) == 4 * 2 + 2 * 2 + 2 * 2  # attention, experts, vision
    assert verdict.ignored == {"visual.blocks.*.attn.qkv": 76, "visual.blocks.*.mlp.fc1": 76}
    assert verdict.warning is not None and "ignoring 152 tensors" in verdict.warning
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    again = check_names(shuffled, spec, where="big")
    assert again.ignored == verdict.ignored and sorted(again.groups.templates) == sorted(
        verdict.groups.templates)


@pytest.mark.parametrize("patterns", [
    {"q_proj": 2},
    {"self_attn.q_proj": 2, "proj": 5},
    {r"layers\.1\.self_attn\.q_proj": 7, "q_proj": 2},
    {r"experts\.[0-2]\.gate_proj": 6, "gate_proj": 3},
    {"..gate_proj": 9},                 # wildcard dots that may reach into the expert index
    {r".*\.gate_up_proj": 4, "experts": 8},
    {"e_proj": 3},                      # needs a "." before the match: never matches "gate_proj"
])
def test_patterns_resolve_per_template_like_peft_per_module(patterns: dict[str, int]) -> None:
    table = PatternTable(list(patterns.items()), 1, field="rank_pattern", path="cfg")
    templates = ["model.layers.*.self_attn.q_proj", "model.layers.*.mlp.experts.*.gate_proj",
                 "model.layers.*.mlp.experts.gate_up_proj", "lm_head"]
    for template in templates:
        keys = [fill_template(template, [layer, e][: template.count("*")])
                for layer in (0, 1, 11) for e in (0, 2, 3, 10)]
        got = table.for_template(template, lambda k=keys: k)
        want = []
        for key in keys:  # PEFT's get_pattern_key, verbatim semantics
            hit = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), None)
            want.append(patterns[hit] if hit is not None else 1)
        assert (got if isinstance(got, list) else [got] * len(keys)) == want, (template, patterns)


def _adapter_with_extras(tmp_path: Path, model_dir: Path) -> Path:
    fixture = build_adapter(model_dir, targets=["attention", "embed_tokens"], r=4)
    extra = {}
    for b in range(3):
        for k in ("attn.qkv", "mlp.fc2"):
            extra.update({f"base_model.model.visual.blocks.{b}.{k}.lora_A.weight": torch.ones(4, 8),
                          f"base_model.model.visual.blocks.{b}.{k}.lora_B.weight": torch.ones(8, 4)})
    extra["base_model.model.model.multi_modal_projector.linear.lora_A.weight"] = torch.ones(4, 8)
    extra["base_model.model.mtp.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 8)
    fixture = dataclasses.replace(fixture, tensors=dict(sorted({**fixture.tensors,
                                                                **extra}.items())))
    return save_adapter(tmp_path / "vl", fixture)


def test_ignored_modules_warn_once_per_load_with_counts(fixture_cache, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    adapter_dir = _adapter_with_extras(tmp_path, model_dir)
    caplog.set_level(logging.INFO, logger="lora_cluster.adapters")
    loaded = load_adapter(adapter_dir, spec, ParallelInfo(), name="vl", max_lora_rank=8)
    records = [r for r in caplog.records if r.name == "lora_cluster.adapters"
               and r.levelno == logging.WARNING]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "ignoring 14 tensors" in text
    for part in ("visual.blocks.*.attn.qkv (6)", "visual.blocks.*.mlp.fc2 (6)",
                 "model.multi_modal_projector.linear (1)", "mtp.layers.*.self_attn.q_proj (1)"):
        assert part in text, part
    examples = text.split("e.g. ", 1)[1].split(", ")
    assert 1 <= len(examples) <= 3 and all(e.startswith("base_model.model.") for e in examples)
    assert set(loaded.weights.kinds()) == {"q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"}
    load_adapter(adapter_dir, spec, ParallelInfo(), name="vl", max_lora_rank=8)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_clean_adapter_logs_no_warning(fixture_cache, caplog: pytest.LogCaptureFixture) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    adapter_dir = fixture_cache.adapter(model_dir, name="clean", targets=["all"])
    caplog.set_level(logging.WARNING, logger="lora_cluster.adapters")
    load_adapter(adapter_dir, load_model_spec(model_dir), ParallelInfo(), name="c",
                 max_lora_rank=16)
    assert not [r for r in caplog.records if r.name == "lora_cluster.adapters"]
