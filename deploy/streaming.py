"""Streaming a request's tokens from the engine's thread world into an async generator.

``RequestHandle.stream()`` blocks; a worker thread drains it into an ``asyncio.Queue`` and the
generator yields whatever has accumulated as one chunk (so a slow client gets bigger chunks,
never a backlog of tiny ones). ``IncrementalText`` turns token ids into text deltas whose
concatenation equals the final decoded text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from lora_cluster.api_types import GenerationResult
from lora_cluster.engine.request_handle import RequestHandle


@dataclass(frozen=True)
class StreamChunk:
    """New tokens of one request; the last chunk carries the finish reason and totals."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    index: int = 0  # which prompt of the request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica_id: str = ""
    arrival: str = ""


class IncrementalText:
    """Text deltas from a growing list of token ids.

    Decodes only a short window (from ``_prefix`` on) per step and holds back text that ends
    in an incomplete UTF-8 sequence (U+FFFD) until the next token completes it.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoding from here gives stable text
        self._read = 0  # tokens whose text is already emitted
        self.emitted = ""

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.emitted += delta
        return delta

    def finish(self, full_text: str) -> str:
        """The rest of ``full_text`` (the engine's decode of every token) not yet emitted."""
        if full_text.startswith(self.emitted):
            rest = full_text[len(self.emitted):]
            self.emitted = full_text
            return rest
        return ""


_END = object()


async def stream_handle(handle: RequestHandle, pool: Executor,
                        decode: Callable[[Sequence[int]], str] | None,
                        **meta: Any) -> AsyncIterator[StreamChunk]:
    """Chunks of ``handle``'s tokens as they come; cancels the request if the consumer leaves."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (consumer left): nothing to deliver to
            handle.cancel()

    def pump() -> None:
        try:
            for token in handle.stream():
                put(token)
            put((_END, handle.result()))
        except BaseException as exc:  # re-raised on the consumer side
            put((_END, exc))

    loop.run_in_executor(pool, pump)
    text = IncrementalText(decode) if decode is not None else None
    produced = 0
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            end = items[-1] if isinstance(items[-1], tuple) else None
            tokens = tuple(t for t in items if not isinstance(t, tuple))
            produced += len(tokens)
            delta = text.push(tokens) if (text is not None and tokens) else ""
            if end is None:
                if tokens:
                    yield StreamChunk(tokens, delta, **meta)
                continue
            outcome = end[1]
            if isinstance(outcome, BaseException):
                raise outcome
            assert isinstance(outcome, GenerationResult)
            if text is not None and outcome.text is not None:
                delta += text.finish(outcome.text)
            yield StreamChunk(tokens, delta, finish_reason=outcome.finish_reason,
                              prompt_tokens=len(outcome.prompt_token_ids),
                              completion_tokens=len(outcome.token_ids), **meta)
            return
    finally:
        # The consumer left early (client gone, or an error): stop generating for it, from a
        # worker thread (cancelling takes the engine's lock, which an adapter load may hold).
        if not handle.done:
            pool.submit(handle.cancel)


async def merge_streams(streams: list[AsyncIterator[StreamChunk]]) -> AsyncIterator[StreamChunk]:
    """Chunks of several streams as they come (each chunk keeps its ``index``)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield chunk
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def drain(stream: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put(chunk)
            await queue.put(None)
        except BaseException as exc:  # re-raised on the consumer side
            await queue.put(exc)

    tasks = [asyncio.ensure_future(drain(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
