"""Long-term memory: every behaviour against both the real Redis (127.0.0.1:6379) and the JSON file."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis

import bot.longterm
from bot.longterm import (
    EmbeddedLongTerm,
    LongTerm,
    RedisLongTerm,
    Remembered,
    list_key,
    open_longterm,
    user_key,
)
from bot.memory import MemoryUnavailable
from tests.platform_helpers import drop_redis_keys, free_port
from tests.test_memory import start_redis

REDIS_URL = "redis://127.0.0.1:6379/0"
DAY = 86400.0
DIM = 384
NOW = time.time()


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def vectors(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [unit(rng.standard_normal(DIM)) for _ in range(n)]


def near(v: np.ndarray, noise: float = 0.03, seed: int = 1) -> np.ndarray:
    """A near duplicate of `v` (cosine about 0.86 at noise 0.03 in 384 dimensions)."""
    return unit(v + noise * np.random.default_rng(seed).standard_normal(DIM))


def item(text: str, vector: np.ndarray, at: float = NOW, speaker: str = "Ana") -> Remembered:
    return Remembered(text, speaker, at, vector)


def texts(found: list[tuple[float, Remembered]]) -> list[str]:
    return [r.text for _, r in found]


@dataclass
class Env:
    kind: str
    persona: str
    make: Callable[..., LongTerm]
    path: Path


@pytest.fixture(params=["redis", "embedded"])
def env(request, tmp_path) -> Iterator[Env]:
    persona = f"test-{uuid.uuid4().hex}"
    path = tmp_path / "longterm.json"

    def make(**bounds) -> LongTerm:
        if request.param == "redis":
            return RedisLongTerm(REDIS_URL, **bounds)
        return EmbeddedLongTerm(path, **bounds)

    yield Env(request.param, persona, make, path)
    if request.param == "redis":
        drop_redis_keys(persona)


def run(coro):
    return asyncio.run(coro)


def test_search_is_best_first_by_cosine_and_round_trips_items(env: Env):
    a, b, c, d = vectors(4)

    async def go():
        lt = env.make()
        items = [item("about a", a, NOW - 30, "Ana 👋"), item("about b", b, NOW - 20),
                 item("about c, héllo", c, NOW - 10), item("about d", d, NOW - 5)]
        await lt.add(env.persona, "discord", "u1", items[:2])
        await lt.add(env.persona, "discord", "u1", items[2:])
        found = await lt.search(env.persona, "discord", "u1", near(c), k=2, min_score=-1.0)
        assert len(found) == 2 and found[0][1] == items[2]  # text, speaker and time come back as given
        assert 0.8 < found[0][0] < 0.92 and found[0][0] > found[1][0]
        assert found[0][1].vector.dtype == np.float32 and found[0][1].vector.shape == (DIM,)
        assert np.allclose(found[0][1].vector, c, atol=1e-3)  # float16 storage
        everything = await lt.search(env.persona, "discord", "u1", a, k=10, min_score=-1.0)
        assert len(everything) == 4 and everything[0][1] == items[0]
        assert everything[0][1].speaker == "Ana 👋" and everything[0][1].at == NOW - 30
        scores = [s for s, _ in everything]
        assert scores == sorted(scores, reverse=True) and abs(scores[0] - 1.0) < 1e-3
        assert await lt.search(env.persona, "discord", "u1", a, k=0) == []
        await lt.close()

    run(go())


def test_before_and_min_score_filter(env: Env):
    a, c = vectors(2)

    async def go():
        lt = env.make()
        await lt.add(env.persona, "telegram", "u1",
                     [item("old a", a, NOW - 100), item("new a", near(a), NOW)])
        await lt.add(env.persona, "telegram", "u1", [item("opposite", unit(-a), NOW - 50)])
        # Only what was said before the oldest turn the window still shows (min_score 0.0, the
        # default, leaves out the opposite).
        assert texts(await lt.search(env.persona, "telegram", "u1", a, k=5, before=NOW - 1)) == ["old a"]
        assert await lt.search(env.persona, "telegram", "u1", a, k=5, before=NOW - 100) == []
        everything = await lt.search(env.persona, "telegram", "u1", a, k=5, min_score=-1.0)
        assert texts(everything) == ["old a", "new a", "opposite"] and everything[2][0] < -0.99
        assert texts(await lt.search(env.persona, "telegram", "u1", a, k=5, min_score=0.95)) == ["old a"]
        assert texts(await lt.search(env.persona, "telegram", "u1", c, k=5, min_score=0.5)) == []
        await lt.close()

    run(go())


def test_users_platforms_and_personas_are_separate(env: Env):
    a, b = vectors(2)

    async def go():
        lt = env.make()
        await lt.add(env.persona, "discord", "u1", [item("u1 on discord", a)])
        await lt.add(env.persona, "telegram", "u1", [item("u1 on telegram", a)])
        await lt.add(env.persona, "discord", "u:2%3A", [item("u2 on discord", a)])
        await lt.add(env.persona + "-other", "discord", "u1", [item("other persona", a)])
        for platform, user, expected in (("discord", "u1", "u1 on discord"),
                                         ("telegram", "u1", "u1 on telegram"),
                                         ("discord", "u:2%3A", "u2 on discord")):
            assert texts(await lt.search(env.persona, platform, user, a, k=5)) == [expected]
        assert await lt.search(env.persona, "discord", "u:2", a, k=5) == []
        assert await lt.search(env.persona, "terminal", "u1", b, k=5, min_score=-1) == []
        assert await lt.forget_user(env.persona + "-other", "u1") == 1
        await lt.close()

    run(go())


def test_max_items_keeps_the_newest(env: Env):
    vs = vectors(7)

    async def go():
        lt = env.make(max_items=3)
        await lt.add(env.persona, "discord", "u1", [item(f"m{i}", vs[i], NOW + i) for i in range(5)])
        found = await lt.search(env.persona, "discord", "u1", vs[0], k=10, min_score=-1.0)
        assert sorted(texts(found)) == ["m2", "m3", "m4"]
        await lt.add(env.persona, "discord", "u1", [item("m5", vs[5], NOW + 5), item("m6", vs[6], NOW + 6)])
        found = await lt.search(env.persona, "discord", "u1", vs[6], k=10, min_score=-1.0)
        assert texts(found)[0] == "m6" and sorted(texts(found)) == ["m4", "m5", "m6"]
        await lt.close()

    run(go())


def test_expired_items_are_never_returned_nor_kept(env: Env):
    a, b = vectors(2)

    async def go():
        lt = env.make(ttl_days=1)
        await lt.add(env.persona, "discord", "u1", [item("two days ago", a, NOW - 2 * DAY),
                                                    item("an hour ago", near(a), NOW - 3600)])
        assert texts(await lt.search(env.persona, "discord", "u1", a, k=5)) == ["an hour ago"]
        # Only expired items: nothing is kept, nothing found.
        await lt.add(env.persona, "telegram", "u1", [item("last week", b, NOW - 7 * DAY)])
        assert await lt.search(env.persona, "telegram", "u1", b, k=5) == []
        assert await lt.forget_user(env.persona, "u1") == 1
        await lt.close()

    run(go())


def test_forget_user_deletes_on_every_platform_and_counts(env: Env):
    a, b = vectors(2)

    async def go():
        lt = env.make()
        await lt.add(env.persona, "discord", "u1", [item("forget-me-1", a), item("forget-me-2", b)])
        await lt.add(env.persona, "telegram", "u1", [item("t1", a)])
        await lt.add(env.persona, "terminal", "u1", [item("x1", a)])
        await lt.add(env.persona, "discord", "u2", [item("someone else", a)])
        assert await lt.forget_user(env.persona, "u1") == 4
        for platform in ("discord", "telegram", "terminal"):
            assert await lt.search(env.persona, platform, "u1", a, k=5, min_score=-1) == []
        assert texts(await lt.search(env.persona, "discord", "u2", a, k=5)) == ["someone else"]
        assert await lt.forget_user(env.persona, "u1") == 0
        assert await lt.forget_user(env.persona, "nobody") == 0
        # Remembering goes on after a deletion.
        await lt.add(env.persona, "telegram", "u1", [item("new", b)])
        assert texts(await lt.search(env.persona, "telegram", "u1", b, k=5)) == ["new"]
        await lt.close()

    run(go())
    if env.kind == "embedded":
        assert "forget-me" not in env.path.read_text()


def test_bounds_are_checked(tmp_path):
    for make in (lambda **b: RedisLongTerm(REDIS_URL, **b), lambda **b: EmbeddedLongTerm(None, **b)):
        with pytest.raises(ValueError, match="max_items"):
            make(max_items=0)
        for ttl in (0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="ttl_days"):
                make(ttl_days=ttl)
    with pytest.raises(ValueError, match="one-dimensional"):
        run(EmbeddedLongTerm(None).add("p", "d", "u", [item("x", np.zeros((2, DIM), np.float32))]))


# --- Redis ---------------------------------------------------------------------------------------------


def test_redis_layout_ttl_and_compact_entries():
    persona = f"test-{uuid.uuid4().hex}"
    (a,) = vectors(1)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    async def go():
        lt = RedisLongTerm(REDIS_URL, ttl_days=2)
        await lt.add(persona, "disc:ord", "u:1%", [item("hi", a)])
        await lt.close()

    try:
        run(go())
        key = f"clone:{persona}:lt:u%3A1%25:disc%3Aord"
        assert list_key(persona, "disc:ord", "u:1%") == key
        assert sorted(client.scan_iter(f"clone:{persona}:*")) == [user_key(persona, "u:1%"), key]
        assert client.smembers(user_key(persona, "u:1%")) == {"disc:ord"}
        for k in (key, user_key(persona, "u:1%")):
            assert 2 * DAY - 10 < client.ttl(k) <= 2 * DAY
        [raw] = client.lrange(key, 0, -1)
        entry = json.loads(raw)
        assert sorted(entry) == ["at", "n", "v", "x"] and len(entry["v"]) == 1024  # 384 float16, base64
        assert len(raw) < 1100
    finally:
        drop_redis_keys(persona)
        client.close()


def test_redis_one_round_trip_per_add_and_search():
    persona = f"test-{uuid.uuid4().hex}"
    a, b = vectors(2)

    async def go():
        lt = RedisLongTerm(REDIS_URL)
        sent: list[str] = []
        real = lt.client.execute_command

        async def execute_command(*args, **kwargs):
            sent.append(str(args[0]))
            return await real(*args, **kwargs)

        lt.client.execute_command = execute_command
        await lt.add(persona, "discord", "u1", [item("warm-up", a)])  # may load the script first
        sent.clear()
        await lt.add(persona, "discord", "u1", [item("x", a), item("y", b)])
        assert sent == ["EVALSHA"]
        sent.clear()
        assert texts(await lt.search(persona, "discord", "u1", b, k=1)) == ["y"]
        assert sent == ["LRANGE"]
        await lt.close()

    try:
        run(go())
    finally:
        drop_redis_keys(persona)


def test_a_shared_client_is_left_open_and_open_longterm_picks(tmp_path):
    from bot.memory import connect_redis

    client = connect_redis(REDIS_URL)
    lt = open_longterm(client, tmp_path / "lt.json", max_items=7, ttl_days=3)
    assert isinstance(lt, RedisLongTerm) and lt.client is client and lt.max_items == 7

    async def go():
        await lt.close()
        assert await client.ping()
        await client.aclose()

    run(go())
    lt = open_longterm(None, tmp_path / "lt.json", max_items=7)
    assert isinstance(lt, EmbeddedLongTerm) and lt.path == tmp_path / "lt.json" and lt.max_items == 7
    assert isinstance(open_longterm(None, None), EmbeddedLongTerm)


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "bot.longterm" and r.levelno >= logging.WARNING]


def test_redis_outage_costs_no_reply_but_forgetting_says_so(caplog):
    port = free_port()
    (a,) = vectors(1)

    async def timed(coro):
        start = time.monotonic()
        result = await coro
        assert time.monotonic() - start < 2.0
        return result

    async def go():
        lt = RedisLongTerm(f"redis://127.0.0.1:{port}/0")
        for _ in range(3):
            assert await timed(lt.search("p", "discord", "u1", a, k=3)) == []
            await timed(lt.add("p", "discord", "u1", [item("lost", a)]))
            with pytest.raises(MemoryUnavailable):
                await timed(lt.forget_user("p", "u1"))
        [warning] = warnings_of(caplog)
        assert "ConnectionError" in warning.getMessage() and str(port) not in caplog.text  # no URL
        proc = start_redis(port)  # the server comes back: the same store reconnects
        try:
            await lt.add("p", "discord", "u1", [item("back", a)])
            assert texts(await lt.search("p", "discord", "u1", a, k=3)) == ["back"]
            assert await lt.forget_user("p", "u1") == 1
            again = [r for r in caplog.records if r.levelno == logging.INFO and "again" in r.getMessage()]
            assert len(again) == 1 and len(warnings_of(caplog)) == 1
            await lt.close()
        finally:
            proc.kill()
            proc.wait()

    with caplog.at_level(logging.INFO, logger="bot.longterm"):
        run(go())


# --- the JSON file -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_embedded_survives_a_reload_and_drops_what_expired_meanwhile(tmp_path):
    path = tmp_path / "sub" / "longterm.json"
    a, b = vectors(2)
    clock = Clock()

    async def go():
        first = EmbeddedLongTerm(path, ttl_days=10, clock=clock)
        await first.add("p", "discord", "u1", [item("older-item", a, NOW - 8 * DAY), item("recent", b, NOW)])
        await first.add("p", "telegram", "u2", [item("other-item", a, NOW - 9 * DAY)])
        await first.close()
        second = EmbeddedLongTerm(path, ttl_days=10, clock=clock)
        found = await second.search("p", "discord", "u1", a, k=5, min_score=-1)
        assert texts(found) == ["older-item", "recent"]
        assert texts(await second.search("p", "telegram", "u2", a, k=5)) == ["other-item"]
        clock.now = NOW + 3 * DAY  # "older-item" and "other-item" are now past ten days
        assert texts(await second.search("p", "discord", "u1", a, k=5, min_score=-1)) == ["recent"]
        third = EmbeddedLongTerm(path, ttl_days=10, clock=clock)  # dropped on load, and saved
        assert "-item" not in path.read_text()
        assert texts(await third.search("p", "discord", "u1", b, k=5)) == ["recent"]
        assert await third.search("p", "telegram", "u2", a, k=5, min_score=-1) == []

    run(go())
    assert [p.name for p in path.parent.iterdir()] == ["longterm.json"]  # no temp files left


def test_embedded_in_process_only():
    (a,) = vectors(1)

    async def go():
        lt = EmbeddedLongTerm(None)
        await lt.add("p", "terminal", "local", [item("kept here", a)])
        assert texts(await lt.search("p", "terminal", "local", a, k=1)) == ["kept here"]
        assert await lt.forget_user("p", "local") == 1

    run(go())


@pytest.mark.parametrize("content", [
    '{"lists": {"trunc', "[]", "null", "{}", '{"lists": []}', '{"lists": {"k": 5}}',
    '{"lists": {"k": {"persona": "p", "platform": "d", "user": "u", "items": [5]}}}',
    '{"lists": {"k": {"persona": "p", "platform": "d", "user": 7, "items": []}}}',
    '{"lists": {"k": {"persona": "p", "platform": "d", "user": "u", "items": '
    '[{"x": "hi", "n": "Ana", "at": 1, "v": "not base64!"}]}}}',
    '{"lists": {"k": {"persona": "p", "platform": "d", "user": "u", "items": '
    '[{"x": "hi", "n": "Ana", "at": "yesterday", "v": ""}]}}}',
])
def test_a_bad_file_is_moved_aside_and_memory_starts_empty(tmp_path, caplog, content):
    path = tmp_path / "longterm.json"
    path.write_text(content)
    (a,) = vectors(1)

    async def go():
        with caplog.at_level(logging.WARNING, logger="bot.longterm"):
            lt = EmbeddedLongTerm(path)
        assert await lt.search("p", "d", "u", a, k=5, min_score=-1) == []
        await lt.add("p", "d", "u", [item("fresh start", a)])
        return texts(await EmbeddedLongTerm(path).search("p", "d", "u", a, k=5))

    assert run(go()) == ["fresh start"]
    [aside] = tmp_path.glob("longterm.json.bad-*")
    assert aside.read_text() == content
    [warning] = warnings_of(caplog)
    assert "moved to" in warning.getMessage()


@contextmanager
def full_disk(monkeypatch, on: list[bool]):
    real = bot.longterm.atomic_file

    @contextmanager
    def atomic_file(path, mode="w"):
        if on[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        with real(path, mode) as f:
            yield f

    monkeypatch.setattr(bot.longterm, "atomic_file", atomic_file)
    yield


def test_a_full_disk_keeps_memory_in_process(tmp_path, monkeypatch, caplog):
    path = tmp_path / "longterm.json"
    a, b = vectors(2)
    on = [True]

    async def go():
        lt = EmbeddedLongTerm(path)
        with full_disk(monkeypatch, on), caplog.at_level(logging.INFO, logger="bot.longterm"):
            await lt.add("p", "discord", "u1", [item("first", a)])  # no exception to the caller
            await lt.add("p", "discord", "u1", [item("second", b)])
            assert texts(await lt.search("p", "discord", "u1", a, k=1)) == ["first"]
            with pytest.raises(MemoryUnavailable):  # a deletion that is not on disk is not done
                await lt.forget_user("p", "u1")
            [warning] = warnings_of(caplog)
            assert "cannot be written" in warning.getMessage()
            on[0] = False
            await lt.add("p", "discord", "u2", [item("disk back", a)])
            assert any("written again" in r.getMessage() for r in caplog.records)
        reloaded = EmbeddedLongTerm(path)
        assert texts(await reloaded.search("p", "discord", "u2", a, k=5)) == ["disk back"]
        assert await reloaded.search("p", "discord", "u1", a, k=5, min_score=-1) == []

    run(go())


# --- privacy -------------------------------------------------------------------------------------------


def test_no_text_name_or_user_id_is_ever_logged(tmp_path, caplog):
    secret = "SECRET-7f3a-said-this"
    persona = f"test-{uuid.uuid4().hex}"
    a, b = vectors(2)
    caplog.set_level(logging.DEBUG)
    dead = free_port()

    async def go():
        stores = [RedisLongTerm(REDIS_URL), EmbeddedLongTerm(tmp_path / "lt.json"),
                  RedisLongTerm(f"redis://127.0.0.1:{dead}/0")]
        for lt in stores:
            await lt.add(persona, "discord", f"id-{secret}", [item(f"my pin {secret}", a, speaker=secret)])
            await lt.search(persona, "discord", f"id-{secret}", a, k=3)
            with pytest.raises(MemoryUnavailable) if lt is stores[2] else contextlib.nullcontext():
                await lt.forget_user(persona, f"id-{secret}")
            await lt.close()
        # An unreadable entry is skipped at DEBUG, without its content.
        client = redis.Redis.from_url(REDIS_URL)
        client.rpush(list_key(persona, "discord", "u"), f'{{"x": "{secret}", "n": "{secret}"}}')
        client.close()
        lt = RedisLongTerm(REDIS_URL)
        assert await lt.search(persona, "discord", "u", b, k=3) == []
        await lt.close()
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"lists": {secret: {"user": secret, "items": [{"x": secret}]}}}))
        EmbeddedLongTerm(bad)

    try:
        run(go())
    finally:
        drop_redis_keys(persona)
    assert any(r.levelno == logging.DEBUG and r.name == "bot.longterm" for r in caplog.records)
    for r in caplog.records:
        trace = logging.Formatter().formatException(r.exc_info) if r.exc_info else ""
        for part in (r.getMessage(), repr(r.msg), repr(r.args), trace):
            assert secret not in part, f"{r.name}:{r.lineno} logged private text"
