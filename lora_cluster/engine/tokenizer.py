"""Text ↔ token ids for a model directory, through the ``tokenizers`` library only.

Encoding follows what transformers' fast tokenizer does for the same files: the special
tokens ``tokenizer.json``'s post-processor adds, plus a BOS when ``tokenizer_config.json``
says ``add_bos_token`` and the post-processor did not already add one. Decoding skips
special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from lora_cluster.errors import ModelLoadError, RequestError


class Tokenizer:
    """A loaded ``tokenizer.json`` with the model's BOS/EOS conventions."""

    def __init__(self, tokenizer: HFTokenizer, *, add_bos: bool = False,
                 bos_token_id: int | None = None, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tok = tokenizer
        self.add_bos = add_bos and bos_token_id is not None
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids

    @staticmethod
    def from_model_dir(model_dir: str | Path) -> Tokenizer | None:
        """The model's tokenizer, or None when the directory has no ``tokenizer.json``."""
        root = Path(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"{path}: unreadable tokenizer ({exc})", file=str(path)) from exc
        cfg = _read_json(root / "tokenizer_config.json")
        bos = _token_id(tok, cfg.get("bos_token"))
        eos = _token_id(tok, cfg.get("eos_token"))
        return Tokenizer(tok, add_bos=bool(cfg.get("add_bos_token", False)), bos_token_id=bos,
                         eos_token_ids=() if eos is None else (eos,))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model expects them (BOS per the tokenizer config)."""
        if not isinstance(text, str):
            raise RequestError(f"prompt: expected text, got {type(text).__name__}", field="prompt")
        ids = list(self._tok.encode(text, add_special_tokens=True).ids)
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, int(self.bos_token_id))  # type: ignore[arg-type]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc})", file=str(path)) from exc
    return data if isinstance(data, dict) else {}


def _token_id(tok: HFTokenizer, token: Any) -> int | None:
    """Id of a special token given as a string or as an AddedToken-style dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    found = tok.token_to_id(token)
    return None if found is None else int(found)
