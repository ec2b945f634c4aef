"""Per-step dispatch latency: the ordered command stream vs a Ray actor-call fan-out.

Run: .venv/bin/python benchmarks/dispatch.py [--steps 2000]
For 2 and 4 rank actors on an embedded local Ray, one small step message per iteration:
  stream/output  publish → the output rank's reply (what a decode step waits for)
  stream/all     publish → every rank's ack
  ray fan-out    ray.get([rank.step.remote(msg) for every rank])
Prints a table (median / p90 µs) and writes benchmarks/results/dispatch_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

from lora_cluster.cli_format import format_table
from lora_cluster.cluster.stream import CommandPublisher, CommandReader
from lora_cluster.engine.messages import SampleSpec, SeqStep, Step, StepPlan


@ray.remote(num_cpus=0.01, max_concurrency=2)
class EchoRank:
    """Reads the stream; replies per the mode in each message (output only, or all)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def serve(self, command_address: str, reply_address: str) -> int:
        reader = CommandReader(command_address, reply_address, self.rank)
        handled = 0
        while True:
            env = reader.next()
            assert env is not None
            mode, _ = env.command
            if mode == "stop":
                reader.close()
                return handled
            handled += 1
            if mode == "all" or self.rank == 0:
                reader.reply(env.seq, True, None)

    def step(self, message: object) -> int:
        return self.rank


def _message(i: int) -> Step:
    seqs = tuple(SeqStep(seq_id=s, token_ids=(i % 100,), start_pos=10 + i, slot=s % 4,
                         sample=SampleSpec(index=i)) for s in range(8))
    return Step(seq=i, plan=StepPlan(seqs=seqs))


def bench(ranks: int, steps: int) -> dict[str, float]:
    actors = [EchoRank.remote(r) for r in range(ranks)]
    ray.get([a.step.remote(None) for a in actors])
    pub = CommandPublisher()
    loops = [a.serve.remote(pub.command_address, pub.reply_address) for a in actors]
    pub.handshake(ranks, timeout_s=30)
    out: dict[str, float] = {}
    for mode in ("output", "all"):
        samples = []
        for i in range(steps):
            t0 = time.perf_counter()
            seq = pub.publish((mode, _message(i)))
            need = 1 if mode == "output" else ranks
            while need:
                reply = pub.recv_reply(10.0)
                assert reply is not None and reply.seq == seq
                need -= 1
            samples.append(time.perf_counter() - t0)
        out[f"stream_{mode}_median_us"] = statistics.median(samples) * 1e6
        out[f"stream_{mode}_p90_us"] = statistics.quantiles(samples, n=10)[-1] * 1e6
    pub.publish(("stop", None))
    ray.get(loops)
    pub.close()
    samples = []
    for i in range(steps):
        msg = _message(i)
        t0 = time.perf_counter()
        ray.get([a.step.remote(msg) for a in actors])
        samples.append(time.perf_counter() - t0)
    out["ray_fanout_median_us"] = statistics.median(samples) * 1e6
    out["ray_fanout_p90_us"] = statistics.quantiles(samples, n=10)[-1] * 1e6
    for a in actors:
        ray.kill(a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows, results = [], {}
    for ranks in (2, 4):
        r = bench(ranks, args.steps)
        results[str(ranks)] = r
        rows.append((ranks, r["stream_output_median_us"], r["stream_all_median_us"],
                     r["ray_fanout_median_us"], r["stream_output_p90_us"], r["ray_fanout_p90_us"]))
    print(format_table(["ranks", "stream→output µs", "stream→all µs", "ray fan-out µs",
                        "stream p90", "ray p90"], rows))
    path = write_json("dispatch_cpu.json", {"steps": args.steps, "results": results,
                                            "goal_us_at_4_ranks": 250})
    print(f"\nwrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
