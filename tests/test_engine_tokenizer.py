"""The engine's tokenizer wrapper encodes and decodes like transformers' fast tokenizer."""

from __future__ import annotations

import json

import pytest

from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import ModelLoadError, RequestError

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "café 東京 🙂", "", "  x  "]


def test_matches_transformers(qwen3_moe_dir):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_model_dir(qwen3_moe_dir)
    theirs = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    assert ours is not None and ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    with_specials = [1, *ours.encode("hi there"), 2]
    assert ours.decode(with_specials) == theirs.decode(with_specials, skip_special_tokens=True)


def test_add_bos_from_config(tmp_path, qwen3_moe_dir):
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_text((qwen3_moe_dir / name).read_text())
    cfg = json.loads((qwen3_moe_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    tok = Tokenizer.from_model_dir(tmp_path)
    assert tok is not None and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("hello")[0] == 1 and tok.encode("hello")[1:] == Tokenizer.from_model_dir(
        qwen3_moe_dir).encode("hello")
    with pytest.raises(RequestError):
        tok.encode([1, 2])  # type: ignore[arg-type]


def test_missing_and_broken(tmp_path):
    assert Tokenizer.from_model_dir(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_model_dir(tmp_path)
