"""The command stream delivers every command to every rank, in order, with replies."""

from __future__ import annotations

import threading

import pytest

from lora_cluster.cluster.stream import CommandPublisher, CommandReader
from lora_cluster.errors import ClusterError


def _rank_loop(pub: CommandPublisher, rank: int, seen: list[int],
               clocks: dict[int, dict[str, float]]) -> None:
    reader = CommandReader(pub.command_address, pub.reply_address, rank)
    clocks[rank] = reader.clock()
    try:
        while True:
            env = reader.next(timeout_s=5.0)
            assert env is not None
            if env.command == "stop":
                reader.reply(env.seq, True, None)
                clocks[rank] = reader.clock()
                return
            seen.append(env.command)
            reader.reply(env.seq, True, env.command * 10 + rank)
    finally:
        reader.close()


def test_every_rank_reads_every_command_in_order() -> None:
    pub = CommandPublisher()
    seen: list[list[int]] = [[], [], []]
    clocks: dict[int, dict[str, float]] = {}
    threads = [threading.Thread(target=_rank_loop, args=(pub, r, seen[r], clocks))
               for r in range(3)]
    for t in threads:
        t.start()
    try:
        pub.handshake(3, timeout_s=10)
        for cmd in range(50):
            seq = pub.publish(cmd)
            replies = {}
            while len(replies) < 3:
                reply = pub.recv_reply(5.0)
                assert reply is not None and reply.seq == seq
                replies[reply.rank] = reply.value
            assert replies == {r: cmd * 10 + r for r in range(3)}
        pub.publish("stop")
    finally:
        for t in threads:
            t.join(timeout=10)
        pub.close()
    assert seen == [list(range(50))] * 3
    # Each reader's clock: time waiting for commands, decoding them and replying, all spent.
    for clock in clocks.values():
        assert set(clock) == {"wait_ms", "decode_ms", "reply_ms"}
        assert all(v > 0 for v in clock.values()), clock


def test_handshake_names_missing_ranks() -> None:
    pub = CommandPublisher()
    try:
        with pytest.raises(ClusterError, match=r"ranks \[0, 1\]"):
            pub.handshake(2, timeout_s=0.3)
    finally:
        pub.close()
