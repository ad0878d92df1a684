"""Conversation memory: every behaviour against both the real Redis (127.0.0.1:6379) and the JSON file."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from bot.memory import (
    ChannelKey,
    EmbeddedMemory,
    Memory,
    MemoryUnavailable,
    RedisMemory,
    Turn,
    open_memory,
)
from tests.platform_helpers import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    kind: str
    persona: str
    make: Callable[..., Memory]
    clock: Clock
    path: Path

    def key(self, channel: str = "c1", platform: str = "discord", persona: str | None = None) -> ChannelKey:
        return ChannelKey(persona or self.persona, platform, channel)


@pytest.fixture(params=["redis", "embedded"])
def env(request, tmp_path) -> Iterator[Env]:
    persona = f"test-{uuid.uuid4().hex}"
    clock = Clock()
    path = tmp_path / "memory.json"

    def make(**bounds) -> Memory:
        if request.param == "redis":
            return RedisMemory(REDIS_URL, **bounds)
        return EmbeddedMemory(path, clock=clock, **bounds)

    yield Env(request.param, persona, make, clock, path)
    if request.param == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"clone:{persona}*"))
        if keys:
            client.delete(*keys)
        client.close()


def turn(text: str, author_id: str = "u1", at: float = 1.0) -> Turn:
    persona = author_id == "persona"
    return Turn(author_id, "Clone" if persona else f"name-{author_id}", text, persona, at)


def texts(turns: list[Turn]) -> list[str]:
    return [t.text for t in turns]


def test_redis_key_escapes_colons():
    assert ChannelKey("p", "discord", "123").redis_key() == "clone:p:discord:123:turns"
    assert ChannelKey("a:b", "x", "c%3Ad").redis_key() == "clone:a%3Ab:x:c%253Ad:turns"
    assert ChannelKey("a:b", "x", "c").redis_key() != ChannelKey("a", "b:x", "c").redis_key()


def test_round_trip_and_order(env: Env):
    async def go():
        mem = env.make()
        key = env.key()
        assert await mem.recall(key) == ([], 0)
        t1 = Turn("42", "Ann", "héllo 👋", False, 10.5)
        t2 = Turn("persona", "Clone", "hi Ann", True, 11.25)
        assert await mem.append(key, [t1, t2]) is True
        assert await mem.append(key, [turn("third")]) is True
        turns, epoch = await mem.recall(key)
        assert turns == [t1, t2, turn("third")]
        assert epoch == 0
        # Another channel of the same persona is separate.
        assert await mem.recall(env.key("c2")) == ([], 0)
        await mem.close()

    asyncio.run(go())


def test_max_turns_trims_oldest(env: Env):
    async def go():
        mem = env.make(max_turns=3)
        key = env.key()
        assert await mem.append(key, [turn(f"m{i}") for i in range(5)])
        assert texts((await mem.recall(key))[0]) == ["m2", "m3", "m4"]
        assert await mem.append(key, [turn("m5"), turn("m6")])
        assert texts((await mem.recall(key))[0]) == ["m4", "m5", "m6"]
        await mem.close()

    asyncio.run(go())


def test_token_budget_trims_oldest(env: Env):
    async def go():
        mem = env.make(token_budget=10, count_tokens=len)
        key = env.key()
        assert await mem.append(key, [turn("aaaa"), turn("bbbb"), turn("cccc")])  # 12 tokens > 10
        assert texts((await mem.recall(key))[0]) == ["bbbb", "cccc"]
        assert await mem.append(key, [turn("ddd")])  # 4 + 4 + 3 = 11
        assert texts((await mem.recall(key))[0]) == ["cccc", "ddd"]
        assert await mem.append(key, [turn("ee")])  # 4 + 3 + 2 = 9 fits
        assert texts((await mem.recall(key))[0]) == ["cccc", "ddd", "ee"]
        # A single turn over the budget cannot be kept either: both bounds must hold.
        assert await mem.append(key, [turn("x" * 11)])
        assert (await mem.recall(key))[0] == []
        await mem.close()

    asyncio.run(go())


def test_default_token_count_is_len_over_4_plus_1(env: Env):
    async def go():
        mem = env.make(token_budget=6)  # default counter: 8 chars -> 3 tokens
        key = env.key()
        assert await mem.append(key, [turn("a" * 8), turn("b" * 8), turn("c" * 8)])  # 9 > 6
        assert texts((await mem.recall(key))[0]) == ["b" * 8, "c" * 8]
        await mem.close()

    asyncio.run(go())


def test_ttl_set_and_refreshed(env: Env):
    async def go():
        mem = env.make(ttl_days=14)
        key = env.key()
        assert await mem.append(key, [turn("one", "u1")])
        if env.kind == "redis":
            client = redis.Redis.from_url(REDIS_URL)
            author_set = f"clone:{env.persona}:author:u1:channels"
            full = 14 * DAY * 1000
            for k in (key.redis_key(), author_set):
                assert full - 5000 < client.pttl(k) <= full
            client.pexpire(key.redis_key(), 5000)
            client.pexpire(author_set, 5000)
            await mem.reset(key)  # the epoch key gets the TTL too
            assert full - 5000 < client.pttl(key.epoch_key()) <= full
            assert await mem.append(key, [turn("two", "u1")])
            for k in (key.redis_key(), author_set, key.epoch_key()):
                assert full - 5000 < client.pttl(k) <= full
            client.close()
        else:
            env.clock.now += 13 * DAY
            assert await mem.append(key, [turn("two")])  # slides the expiry
            env.clock.now += 13 * DAY
            assert texts((await mem.recall(key))[0]) == ["one", "two"]
            env.clock.now += 1.01 * DAY
            assert await mem.recall(key) == ([], 0)
            # Expired channels are also dropped from the file on load.
            await mem.append(env.key("c2"), [turn("fresh")])
            env.clock.now += 15 * DAY
            assert EmbeddedMemory(env.path, clock=env.clock)._channels == {}
            assert json.loads(env.path.read_text())["channels"] == {}
        await mem.close()

    asyncio.run(go())


def test_redis_channel_really_expires():
    async def go():
        persona = f"test-{uuid.uuid4().hex}"
        mem = RedisMemory(REDIS_URL, ttl_days=0.3 / DAY)  # 300 ms
        key = ChannelKey(persona, "discord", "c")
        assert await mem.append(key, [turn("soon gone")])
        assert texts((await mem.recall(key))[0]) == ["soon gone"]
        await asyncio.sleep(0.5)
        assert await mem.recall(key) == ([], 0)
        client = redis.Redis.from_url(REDIS_URL)
        assert list(client.scan_iter(f"clone:{persona}*")) == []
        client.close()
        await mem.close()

    asyncio.run(go())


def test_reset_clears_and_refuses_stale_epoch(env: Env):
    async def go():
        mem = env.make()
        key, other = env.key(), env.key("c2")
        assert await mem.append(key, [turn("before")])
        assert await mem.append(other, [turn("elsewhere")])
        _, epoch = await mem.recall(key)
        assert epoch == 0
        await mem.reset(key)
        assert await mem.recall(key) == ([], 1)
        # A reply generated before the reset must not come back.
        assert await mem.append(key, [turn("stale reply", "persona")], epoch=epoch) is False
        assert await mem.recall(key) == ([], 1)
        assert await mem.append(key, [turn("fresh")], epoch=1) is True
        assert await mem.append(key, [turn("no check")]) is True
        assert await mem.recall(key) == ([turn("fresh"), turn("no check")], 1)
        await mem.reset(key)
        assert await mem.recall(key) == ([], 2)
        assert texts((await mem.recall(other))[0]) == ["elsewhere"]
        await mem.close()

    asyncio.run(go())


def test_forget_user_everywhere_for_that_persona_only(env: Env):
    async def go():
        mem = env.make()
        c1, c2 = env.key("c1"), env.key("c2", platform="telegram")
        elsewhere = env.key("c1", persona=env.persona + "-other")
        assert await mem.append(c1, [turn("u1 a", "u1"), turn("reply a", "persona"), turn("u2 a", "u2")])
        assert await mem.append(c2, [turn("u2 b", "u2"), turn("u1 b", "u1"), turn("u1 c", "u1")])
        assert await mem.append(elsewhere, [turn("u1 other persona", "u1")])
        assert await mem.forget_user(env.persona, "u1") == 3
        assert texts((await mem.recall(c1))[0]) == ["reply a", "u2 a"]
        assert texts((await mem.recall(c2))[0]) == ["u2 b"]
        assert texts((await mem.recall(elsewhere))[0]) == ["u1 other persona"]
        assert await mem.forget_user(env.persona, "u1") == 0
        assert await mem.forget_user(env.persona, "nobody") == 0
        # New turns after forgetting are remembered (and forgettable) again.
        assert await mem.append(c1, [turn("u1 again", "u1")])
        assert await mem.forget_user(env.persona, "u1") == 1
        assert texts((await mem.recall(c1))[0]) == ["reply a", "u2 a"]
        await mem.close()

    asyncio.run(go())


def test_concurrent_appends_keep_call_order_and_contiguity(env: Env):
    async def go():
        mem = env.make(max_turns=1000, token_budget=100_000)
        key = env.key()
        calls = 60
        results = await asyncio.gather(
            *(mem.append(key, [turn(f"{i}-{j}") for j in range(3)]) for i in range(calls))
        )
        assert results == [True] * calls
        got = texts((await mem.recall(key))[0])
        assert got == [f"{i}-{j}" for i in range(calls) for j in range(3)]
        await mem.close()

    asyncio.run(go())


def test_redis_one_round_trip_per_recall_and_append():
    async def go():
        persona = f"test-{uuid.uuid4().hex}"
        mem = RedisMemory(REDIS_URL)
        key = ChannelKey(persona, "discord", "c")
        sent: list[str] = []
        client = mem.client
        real_execute = client.execute_command
        real_pipeline = client.pipeline

        async def execute_command(*args, **kwargs):
            sent.append(str(args[0]))
            return await real_execute(*args, **kwargs)

        def pipeline(*args, **kwargs):
            pipe = real_pipeline(*args, **kwargs)
            real_pipe_execute = pipe.execute

            async def execute(*a, **kw):
                sent.append("PIPELINE")
                return await real_pipe_execute(*a, **kw)

            pipe.execute = execute
            return pipe

        client.execute_command = execute_command
        client.pipeline = pipeline
        # The first append may also load the script into a server that has never seen it.
        assert await mem.append(key, [turn("warm-up")])
        sent.clear()
        assert await mem.append(key, [turn("a"), turn("b", "u2")]) is True
        assert sent == ["EVALSHA"]
        sent.clear()
        turns, epoch = await mem.recall(key)
        assert texts(turns) == ["warm-up", "a", "b"]
        assert sent == ["PIPELINE"]
        sent.clear()
        assert await mem.append(key, [turn("c")], epoch=epoch) is True
        assert sent == ["EVALSHA"]
        await mem.close()
        cleanup = redis.Redis.from_url(REDIS_URL)
        cleanup.delete(*cleanup.scan_iter(f"clone:{persona}*"))
        cleanup.close()

    asyncio.run(go())


def test_embedded_persists_across_instances(tmp_path):
    async def go():
        path = tmp_path / "sub" / "memory.json"
        key = ChannelKey("p", "terminal", "local")
        first = EmbeddedMemory(path)
        assert await first.append(key, [turn("remember me"), turn("ok", "persona")])
        await first.reset(ChannelKey("p", "terminal", "other"))
        await first.close()
        second = EmbeddedMemory(path)
        assert texts((await second.recall(key))[0]) == ["remember me", "ok"]
        assert await second.recall(ChannelKey("p", "terminal", "other")) == ([], 1)
        assert [p.name for p in path.parent.iterdir()] == ["memory.json"]  # no temp files left

    asyncio.run(go())


def test_embedded_in_memory_only_and_corrupt_file(tmp_path, caplog):
    async def go():
        mem = EmbeddedMemory(None)
        key = ChannelKey("p", "terminal", "local")
        assert await mem.append(key, [turn("x")])
        assert texts((await mem.recall(key))[0]) == ["x"]

        bad = tmp_path / "memory.json"
        bad.write_text('{"channels": {"trunc')
        with caplog.at_level(logging.WARNING, logger="bot.memory"):
            mem2 = EmbeddedMemory(bad)
        assert await mem2.recall(key) == ([], 0)
        assert (tmp_path / "memory.json.corrupt").read_text() == '{"channels": {"trunc'
        assert len(caplog.records) == 1

    asyncio.run(go())


@pytest.mark.parametrize("content", [
    "[]", "5", "null", '"memory"', "{}", '{"channels": []}', '{"channels": {"k": 5}}',
    '{"channels": {"k": {"persona": "p", "epoch": 0, "turns": [5]}}}',
    '{"channels": {"k": {"persona": "p", "epoch": 0, "turns": "abc"}}}',
    '{"channels": {"k": {"persona": "p", "epoch": "1", "turns": []}}}',
    '{"channels": {"k": {"persona": "p", "epoch": 0, "expires": "soon", "turns": []}}}',
    '{"channels": {"k": {"persona": "p", "epoch": 0, "expires": 2e9, "turns": [{"t": 1, "a": "u1"}]}}}',
    '{"channels": {"k": {"persona": "p", "epoch": 0, "expires": 2e9, "turns": '
    '[{"t": 1, "a": 7, "n": "Ana", "x": "hi", "p": false, "at": 1}]}}}',
])
def test_a_memory_file_of_the_wrong_shape_is_moved_aside_and_memory_starts_empty(tmp_path, caplog, content):
    path = tmp_path / "memory.json"
    path.write_text(content)
    key = ChannelKey("p", "terminal", "local")

    async def go():
        with caplog.at_level(logging.WARNING, logger="bot.memory"):
            mem = EmbeddedMemory(path, clock=Clock())
        assert await mem.recall(key) == ([], 0)
        assert await mem.append(key, [turn("fresh start")])
        await mem.forget_user("p", "nobody")
        await mem.reset(ChannelKey("p", "terminal", "other"))
        return texts((await EmbeddedMemory(path, clock=Clock()).recall(key))[0])

    assert asyncio.run(go()) == ["fresh start"]
    assert (tmp_path / "memory.json.corrupt").read_text() == content
    [warning] = caplog.records
    assert "moved to" in warning.getMessage() and warning.levelno == logging.WARNING


def test_open_memory_picks_redis_over_the_shared_client_else_the_file(tmp_path):
    from bot.memory import connect_redis

    client = connect_redis(REDIS_URL)
    mem = open_memory(client, tmp_path / "m.json", max_turns=5)
    assert isinstance(mem, RedisMemory) and mem.client is client and mem.max_turns == 5

    async def close_twice():
        await mem.close()  # the shared client belongs to its opener: still usable after
        assert await client.ping()
        await client.aclose()

    asyncio.run(close_twice())
    mem = open_memory(None, tmp_path / "m.json")
    assert isinstance(mem, EmbeddedMemory) and mem.path == tmp_path / "m.json"


def test_rediss_url_is_accepted():
    mem = RedisMemory("rediss://127.0.0.1:6380/0")
    kwargs = mem.client.connection_pool.connection_kwargs
    assert mem.client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert kwargs["socket_timeout"] == 0.5
    asyncio.run(mem.close())


# --- outage -------------------------------------------------------------------------------------------


def start_redis(port: int, data: Path | None = None) -> subprocess.Popen:
    """A redis-server of the test's own; with `data`, it keeps its data there across restarts."""
    keep = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)] if data else [
        "--appendonly", "no"]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *keep],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 5
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    client.close()
    return proc


def test_outage_degrades_quietly_and_recovers(caplog):
    port = free_port()
    proc = start_redis(port)
    secret = "SECRET-MESSAGE-TEXT"

    async def timed(coro):
        start = time.monotonic()
        result = await coro
        assert time.monotonic() - start < 2.0
        return result

    async def go():
        nonlocal proc
        mem = RedisMemory(f"redis://127.0.0.1:{port}/0")
        key = ChannelKey("p", "discord", "c")
        assert await mem.append(key, [turn(secret)])
        assert texts((await mem.recall(key))[0]) == [secret]

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        caplog.clear()
        for _ in range(3):
            assert await timed(mem.recall(key)) == ([], 0)
            assert await timed(mem.append(key, [turn(secret)])) is False
            with pytest.raises(MemoryUnavailable):  # a reset that did not happen is never "done"
                await timed(mem.reset(key))
            with pytest.raises(MemoryUnavailable):
                await timed(mem.forget_user("p", "u1"))
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert [r for r in caplog.records if r.levelno > logging.WARNING] == []

        proc = start_redis(port)
        assert await timed(mem.append(key, [turn("back")])) is True
        assert texts((await mem.recall(key))[0]) == ["back"]
        infos = [r for r in caplog.records if r.levelno == logging.INFO and "again" in r.getMessage()]
        assert len(infos) == 1
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        assert not any(secret in r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
        await mem.close()

    try:
        with caplog.at_level(logging.DEBUG, logger="bot.memory"):
            asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()


def test_stalled_server_costs_one_short_timeout(caplog):
    port = free_port()
    proc = start_redis(port)

    async def go():
        mem = RedisMemory(f"redis://127.0.0.1:{port}/0")
        key = ChannelKey("p", "discord", "c")
        assert await mem.append(key, [turn("hello")])
        proc.send_signal(signal.SIGSTOP)  # alive but answering nothing
        try:
            start = time.monotonic()
            assert await mem.recall(key) == ([], 0)
            assert await mem.append(key, [turn("x")]) is False
            assert time.monotonic() - start < 3.0  # two calls, each under ~1 s
        finally:
            proc.send_signal(signal.SIGCONT)
        assert texts((await mem.recall(key))[0]) == ["hello"]
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        await mem.close()

    try:
        with caplog.at_level(logging.INFO, logger="bot.memory"):
            asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()


def test_renaming_the_persona_keeps_its_memory(tmp_path):
    """Keys are built from the persona's stable id (persona.toml's `id`, else its folder), never
    from the display name: a new name finds the same conversation in Redis."""
    from bot.engine import Engine, Incoming
    from tests.platform_helpers import FixedBackend, drop_redis_keys
    from training.persona import Persona

    folder = tmp_path / f"p-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    (folder / "persona.toml").write_text('name = "Sam Rivera"\n')

    async def exchange(persona: Persona, text: str) -> list[Turn]:
        memory = RedisMemory(REDIS_URL)
        engine = Engine(persona, FixedBackend("ok"), memory, len)
        await engine.handle(Incoming("telegram", "9", "u1", "Ana", text))
        turns, _ = await memory.recall(engine.key("telegram", "9"))
        await memory.close()
        return turns

    first = Persona.load(folder)
    try:
        asyncio.run(exchange(first, "my dog is called Rex"))
        (folder / "persona.toml").write_text('name = "Samantha R."\n')
        renamed = Persona.load(folder)
        assert renamed.id == first.id == folder.name and renamed.name != first.name
        turns = asyncio.run(exchange(renamed, "remember my dog?"))
        assert [t.text for t in turns if not t.from_persona] == ["my dog is called Rex", "remember my dog?"]
        keys = redis.Redis.from_url(REDIS_URL).keys(f"clone:{folder.name}:*")
        assert keys and not any(b"Sam" in k for k in keys)
    finally:
        drop_redis_keys(folder.name)
