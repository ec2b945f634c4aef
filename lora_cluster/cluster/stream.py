"""One ordered, sequence-numbered command stream from the controller to every rank.

The controller publishes each command once (ZMQ PUB); every rank reads the same sequence
(SUB) and replies on a shared PUSH → PULL channel. A rank that sees a gap in sequence numbers
stops with an error rather than run a step out of order, so an adapter can never change in
the middle of a step. Payloads are pickled; bulky results travel by Ray object reference,
not through this stream.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any

import zmq

from lora_cluster.errors import ClusterError

_HELLO = -1


@dataclass(frozen=True)
class Envelope:
    """A command with its position in the stream (seq -1: handshake ping, not a command)."""

    seq: int
    command: Any


@dataclass(frozen=True)
class Reply:
    """A rank's answer to the command at ``seq``: a value, or the exception it raised."""

    seq: int
    rank: int
    ok: bool
    value: Any


class CommandPublisher:
    """Controller end: publishes commands, collects replies."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 0)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        pub_port = self._pub.bind_to_random_port("tcp://*")
        pull_port = self._pull.bind_to_random_port("tcp://*")
        self.command_address = f"tcp://{host}:{pub_port}"
        self.reply_address = f"tcp://{host}:{pull_port}"
        self._next_seq = 0

    def publish(self, command: Any) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self._pub.send(pickle.dumps(Envelope(seq, command), protocol=pickle.HIGHEST_PROTOCOL))
        return seq

    def recv_reply(self, timeout_s: float) -> Reply | None:
        """Next reply, or None when none arrives within ``timeout_s``."""
        if self._pull.poll(int(max(timeout_s, 0.0) * 1000)) == 0:
            return None
        reply = pickle.loads(self._pull.recv())
        assert isinstance(reply, Reply)
        return reply

    def handshake(self, num_ranks: int, timeout_s: float) -> None:
        """Ping until every rank has answered (PUB drops messages before a SUB connects)."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < num_ranks:
            if time.monotonic() > deadline:
                missing = sorted(set(range(num_ranks)) - seen)
                raise ClusterError(f"command stream: ranks {missing} never connected "
                                   f"within {timeout_s:.0f}s", ranks=missing)
            self._pub.send(pickle.dumps(Envelope(_HELLO, None)))
            reply = self.recv_reply(0.05)
            while reply is not None:
                if reply.seq == _HELLO:
                    seen.add(reply.rank)
                reply = self.recv_reply(0.0)

    def close(self) -> None:
        self._pub.close(0)
        self._pull.close(0)


class CommandReader:
    """Rank end: reads the stream in order, replies to the controller."""

    def __init__(self, command_address: str, reply_address: str, rank: int) -> None:
        self.rank = rank
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(command_address)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 1000)
        self._push.connect(reply_address)
        self._expected = 0
        self._greeted = False
        # Seconds this reader spent waiting for a command, decoding them, and replying.
        self.wait_s = self.decode_s = self.reply_s = 0.0

    def next(self, timeout_s: float | None = None) -> Envelope | None:
        """The next command in order (answering handshake pings on the way), or None on timeout."""
        timeout_ms = -1 if timeout_s is None else int(timeout_s * 1000)
        while True:
            t0 = time.perf_counter()
            if self._sub.poll(timeout_ms) == 0:
                self.wait_s += time.perf_counter() - t0
                return None
            t1 = time.perf_counter()
            env = pickle.loads(self._sub.recv())
            self.wait_s += t1 - t0
            self.decode_s += time.perf_counter() - t1
            assert isinstance(env, Envelope)
            if env.seq == _HELLO:
                if not self._greeted:
                    self._greeted = True
                    self.reply(_HELLO, True, None)
                continue
            if env.seq != self._expected:
                raise ClusterError(
                    f"command stream: rank {self.rank} expected seq {self._expected}, got {env.seq}",
                    rank=self.rank,
                )
            self._expected += 1
            return env

    def reply(self, seq: int, ok: bool, value: Any) -> None:
        t0 = time.perf_counter()
        self._push.send(pickle.dumps(Reply(seq, self.rank, ok, value),
                                     protocol=pickle.HIGHEST_PROTOCOL))
        self.reply_s += time.perf_counter() - t0

    def clock(self) -> dict[str, float]:
        """Milliseconds so far waiting for commands, decoding them and sending replies."""
        return {"wait_ms": self.wait_s * 1e3, "decode_ms": self.decode_s * 1e3,
                "reply_ms": self.reply_s * 1e3}

    def close(self) -> None:
        self._sub.close(0)
        self._push.close()
