"""RedisMemory against a real Redis: latency, throughput and round trips per operation.

`--ops` operations (half appends of one user turn plus one reply, half recalls) over `--channels`
channels, one after another, on:

  ours   bot.memory.RedisMemory: one pipeline per recall, one Lua script call per append
  naive  the same through separate commands: LRANGE + GET for a recall; GET (epoch check), RPUSH,
         LTRIM, then PEXPIRE of each key and SADD of each author's channel set for an append,
         no pipeline (and no token-budget trimming, which would cost it more)

Round trips are counted by wrapping the client's `execute_command` and every pipeline's
`execute` (as tests/test_memory.py does). Each run uses a unique persona name; its keys are
deleted at the end.

    python benchmarks/memory_redis.py                  # 10,000 operations each
    python benchmarks/memory_redis.py --ops 2000 --json
    REDIS_URL=redis://host:6379/0 python benchmarks/memory_redis.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.memory import (  # noqa: E402
    ChannelKey,
    RedisMemory,
    Turn,
    _author_key,
    _decode,
    _encode,
    default_count_tokens,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class RoundTrips:
    """Counts what a redis.asyncio client sends: one per command, one per pipeline execute."""

    def __init__(self, client) -> None:
        self.count = 0
        real_execute, real_pipeline = client.execute_command, client.pipeline

        async def execute_command(*args, **kwargs):
            self.count += 1
            return await real_execute(*args, **kwargs)

        def pipeline(*args, **kwargs):
            pipe = real_pipeline(*args, **kwargs)
            real_pipe_execute = pipe.execute

            async def execute(*a, **kw):
                self.count += 1
                return await real_pipe_execute(*a, **kw)

            pipe.execute = execute
            return pipe

        client.execute_command = execute_command
        client.pipeline = pipeline


class NaiveRedisMemory:
    """Recall and append as one command per round trip: what RedisMemory avoids."""

    def __init__(self, url: str, max_turns: int = 40, ttl_days: float = 14.0) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(url, decode_responses=True)
        self.max_turns = max_turns
        self.ttl_ms = int(ttl_days * 86400 * 1000)

    async def recall(self, key: ChannelKey) -> tuple[list[Turn], int]:
        items = await self.client.lrange(key.redis_key(), 0, -1)
        epoch = await self.client.get(key.epoch_key())
        return [_decode(json.loads(raw)) for raw in items], int(epoch or 0)

    async def append(self, key: ChannelKey, turns: Sequence[Turn], epoch: int | None = None) -> bool:
        c = self.client
        if epoch is not None and int(await c.get(key.epoch_key()) or 0) != epoch:
            return False
        items = [json.dumps(_encode(t, default_count_tokens(t.text)), ensure_ascii=False) for t in turns]
        await c.rpush(key.redis_key(), *items)
        await c.ltrim(key.redis_key(), -self.max_turns, -1)
        await c.pexpire(key.redis_key(), self.ttl_ms)
        await c.pexpire(key.epoch_key(), self.ttl_ms)
        for author in sorted({t.author_id for t in turns}):
            await c.sadd(_author_key(key.persona, author), key.base())
            await c.pexpire(_author_key(key.persona, author), self.ttl_ms)
        return True

    async def close(self) -> None:
        await self.client.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(memory, persona: str, ops: int, channels: int) -> dict:
    counter = RoundTrips(memory.client)
    keys = [ChannelKey(persona, "bench", f"c{i}") for i in range(channels)]
    # Warm-up, not counted: connection set-up, and the script loaded into the server.
    await memory.append(ChannelKey(persona, "bench", "warm"), [Turn("w", "W", "hi", False, 0.0)])
    await memory.recall(ChannelKey(persona, "bench", "warm"))
    latencies: dict[str, list[float]] = {"append": [], "recall": []}
    trips: dict[str, int] = {"append": 0, "recall": 0}
    started = time.perf_counter()
    for i in range(ops):
        key = keys[(i // 2) % channels]
        before, t0 = counter.count, time.perf_counter()
        if i % 2 == 0:
            kind = "append"
            now = time.time()
            user = f"u{i % 7}"
            turns = [
                Turn(user, f"Friend {user}", f"message number {i}, how is it going?", False, now),
                Turn("persona", persona, f"all good, reply {i}", True, now),
            ]
            assert await memory.append(key, turns, 0)  # the epoch a recall gave, as the engine does
        else:
            kind = "recall"
            history, _ = await memory.recall(key)
            assert history
        latencies[kind].append(time.perf_counter() - t0)
        trips[kind] += counter.count - before
    elapsed = time.perf_counter() - started
    result: dict = {"seconds": round(elapsed, 3), "ops_per_s": round(ops / elapsed, 1)}
    for kind, values in latencies.items():
        result[kind] = {
            "count": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 3),
            "p99_ms": round(percentile(values, 99) * 1000, 3),
            "mean_ms": round(statistics.fmean(values) * 1000, 3),
            "round_trips_per_op": round(trips[kind] / len(values), 3),
        }
    return result


async def cleanup(persona: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"clone:{persona}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return len(keys)


async def run(args: argparse.Namespace) -> dict:
    tag = uuid.uuid4().hex[:12]
    personas = {"ours": f"bench-ours-{tag}", "naive": f"bench-naive-{tag}"}
    result: dict = {"ops": args.ops, "channels": args.channels}
    try:
        for name in ("naive", "ours"):
            memory = RedisMemory(REDIS_URL) if name == "ours" else NaiveRedisMemory(REDIS_URL)
            try:
                result[name] = await measure(memory, personas[name], args.ops, args.channels)
            finally:
                await memory.close()
    finally:
        result["keys_deleted"] = sum([await cleanup(p) for p in personas.values()])
    ours, naive = result["ours"], result["naive"]
    result["throughput_ratio"] = round(ours["ops_per_s"] / naive["ops_per_s"], 2)
    for kind in ("append", "recall"):
        result[f"{kind}_p50_ratio"] = round(naive[kind]["p50_ms"] / ours[kind]["p50_ms"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.ops} operations over {args.channels} channels ({REDIS_URL.split('@')[-1]})")
    print(f"{'':7}{'op':7}{'p50 ms':>8}{'p99 ms':>8}{'trips/op':>9}{'ops/s (all)':>13}")
    for name in ("naive", "ours"):
        m = result[name]
        for kind in ("append", "recall"):
            k = m[kind]
            print(
                f"{name:7}{kind:7}{k['p50_ms']:8.3f}{k['p99_ms']:8.3f}{k['round_trips_per_op']:9.2f}"
                f"{m['ops_per_s']:13.0f}"
            )
    print(
        f"ours / naive: {result['throughput_ratio']:.2f}x throughput; p50 {result['append_p50_ratio']:.2f}x "
        f"faster appends, {result['recall_p50_ratio']:.2f}x faster recalls; "
        f"{result['keys_deleted']} keys deleted"
    )


if __name__ == "__main__":
    main()
