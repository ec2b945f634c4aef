"""What ``ControllerCore.submit`` returns: wait for the result, or stream tokens as they come."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lora_cluster.api_types import GenerationResult
from lora_cluster.errors import ClusterError, LoRAClusterError


class RequestHandle:
    """One submitted request (thread-safe; any number of threads may wait on it)."""

    def __init__(self, request_id: int, cancel: Callable[[int], None]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        # Two conditions on one lock: a new token wakes only streaming readers, so a thread
        # waiting for the final result is not woken once per token (with ~100 requests in a
        # step that is ~100 needless wake-ups competing with the step loop for the GIL).
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # done: result / logits waiters
        self._cv_tokens = threading.Condition(lock)  # tokens or done: stream readers
        self._tokens: list[int] = []
        self._result: GenerationResult | None = None
        self._logits: Any = None
        self._error: LoRAClusterError | None = None
        self._done = False

    # ---------------------------------------------------------------- producer side
    def _push(self, token: int) -> None:
        with self._cv_tokens:
            self._tokens.append(token)
            self._cv_tokens.notify_all()

    def _finish(self, result: GenerationResult | None, *, logits: Any = None,
                error: LoRAClusterError | None = None) -> None:
        with self._cv:
            self._result, self._logits, self._error = result, logits, error
            self._done = True
            self._cv.notify_all()
            self._cv_tokens.notify_all()

    # ---------------------------------------------------------------- consumer side
    @property
    def done(self) -> bool:
        with self._cv:
            return self._done

    def _wait(self, timeout: float | None) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._done, timeout):
                raise ClusterError(f"request {self.request_id}: no result within {timeout} s",
                                   request_id=self.request_id)
            if self._error is not None:
                raise self._error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The final result; raises the request's typed error if it failed."""
        self._wait(timeout)
        assert self._result is not None
        return self._result

    def logits(self, timeout: float | None = None) -> Any:
        """A scoring request's payload: float32 [len, V] logits of every prompt position."""
        self._wait(timeout)
        return self._logits

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Token ids as they are generated; ends when the request does (raising its error)."""
        seen = 0

        def progressed() -> bool:
            return len(self._tokens) > seen or self._done

        while True:
            with self._cv_tokens:
                ready = self._cv_tokens.wait_for(progressed, timeout)
                if not ready:
                    raise ClusterError(f"request {self.request_id}: no token within {timeout} s",
                                       request_id=self.request_id)
                fresh = self._tokens[seen:]
                finished, error = self._done, self._error
            yield from fresh
            seen += len(fresh)
            if finished and seen >= len(self._tokens):
                if error is not None:
                    raise error
                return

    def __iter__(self) -> Iterator[int]:
        return self.stream()

    def cancel(self) -> None:
        """Stop the request; it finishes with reason "abort" and the tokens so far."""
        self._cancel(self.request_id)


def wait_all(handles: Sequence[RequestHandle], get: Callable[[RequestHandle], Any]) -> list[Any]:
    """Every handle's outcome in order; on the first error the rest are cancelled."""
    try:
        return [get(h) for h in handles]
    except BaseException:
        for h in handles:
            h.cancel()
        raise
