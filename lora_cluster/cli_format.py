"""Terminal output for the CLI: aligned tables, JSON, progress lines on stderr."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples and tensors → plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def print_json(value: Any) -> None:
    print(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 48) -> str:
    """A plain aligned table; long cells are cut with an ellipsis."""

    def cell(v: Any) -> str:
        text = f"{v:.1f}" if isinstance(v, float) else str(v)
        text = text.replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


@contextmanager
def progress(message: str, enabled: bool = True) -> Iterator[None]:
    """``message … done (1.2 s)`` on stderr around a long step."""
    start = time.perf_counter()
    if enabled:
        print(f"{message} …", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if enabled:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if enabled:
        print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
