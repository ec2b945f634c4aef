"""A tiny byte-level BPE tokenizer, trained locally with ``tokenizers`` on a built-in corpus.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``; loads in
``tokenizers.Tokenizer.from_file`` and in transformers ``AutoTokenizer``. Ids: ``<pad>`` 0,
``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<unk>`` 3, then the 256 byte symbols, then merges — exactly
``vocab_size`` tokens, so every id the model can emit decodes. Byte-level means any text
encodes (no unknown characters). No BOS/EOS is added on encode: ``encode(text)`` is the raw
text's tokens, identical through either library.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lora_cluster.testing.presets import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
assert [PAD_ID, BOS_ID, EOS_ID, UNK_ID] == [0, 1, 2, 3]

# Written for this package; varied enough to yield a few hundred merges.
CORPUS = (
    "The quick brown fox jumps over the lazy dog while the cluster serves many adapters.",
    "A mixture of experts routes every token to the two experts with the highest scores.",
    "Low rank adapters add a small product of two matrices to each frozen weight.",
    "Hello world! How are you today? I am fine, thank you, and you?",
    "SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY name;",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time there was a tiny model that learned to write short stories.",
    "The weather is sunny in the morning and rainy in the evening, as it often is.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2.71828",
    "Translate to French: the cat sits on the mat. Le chat est assis sur le tapis.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "Greedy decoding picks the token with the largest logit at every step of generation.",
    "Serving engines batch requests together and schedule them on shared accelerators.",
    "Every rank holds a shard of the model and a slice of each loaded adapter.",
    "JSON: {\"name\": \"tiny\", \"layers\": 2, \"experts\": 8, \"tokens\": [1, 2, 3]}",
    "Unicode works too: café, naïve, über, 東京, Ωμέγα, emoji 🙂 and symbols → ∑ ≤ ≥.",
)


@lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise ValueError(
            f"tiny tokenizer has {size} tokens, wanted exactly {vocab_size} "
            f"(the built-in corpus supports 260 to about 730)"
        )
    return tok.to_str()


def build_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """The tiny tokenizer with exactly ``vocab_size`` tokens (deterministic)."""
    return Tokenizer.from_str(_trained_json(vocab_size))


def write_tokenizer(model_dir: str | Path, *, vocab_size: int = 384,
                    model_max_length: int = 256) -> Path:
    """Save ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_trained_json(vocab_size))
    pad, bos, eos, unk = SPECIAL_TOKENS
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "added_tokens_decoder": added,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": model_max_length,
        "pad_token": pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out
