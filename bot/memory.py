"""Per-channel conversation memory for the chat engine: Redis when REDIS_URL is set, else a JSON file
in the persona's folder.

Both keep, per (persona, platform, channel), the latest turns within `max_turns` and `token_budget`
(oldest dropped first), expire a channel `ttl_days` after its last append, and carry an "epoch" that
`reset` bumps so a reply generated before a reset is refused by `append`.

Remembering is best effort (while Redis is down or the disk is full the chat goes on without it),
but forgetting is a request a user made: `reset` and `forget_user` raise `MemoryUnavailable` when
it could not be carried out, so the user is told instead of finding the old turns back later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from training.atomic import atomic_file

log = logging.getLogger(__name__)

DEFAULT_MAX_TURNS = 40
DEFAULT_TOKEN_BUDGET = 1500
DEFAULT_TTL_DAYS = 14.0
_DAY = 86400.0


class MemoryUnavailable(Exception):
    """A reset or a deletion could not be carried out: the store is unreachable or cannot be written."""


def default_count_tokens(text: str) -> int:
    """A rough token estimate (about 4 characters a token), used when no tokenizer is given."""
    return len(text) // 4 + 1


@dataclass(frozen=True)
class Turn:
    author_id: str  # platform user id, or "persona" for the clone's own replies
    author: str  # display name
    text: str
    from_persona: bool
    at: float  # unix time


def key_part(part: str) -> str:
    """One part of a Redis key, escaped so that parts never run into each other."""
    # '%' first, so an escaped ':' can never be confused with a literal "%3A" in a part.
    return part.replace("%", "%25").replace(":", "%3A")


@dataclass(frozen=True)
class ChannelKey:
    persona: str
    platform: str
    channel: str

    def base(self) -> str:
        return f"clone:{key_part(self.persona)}:{key_part(self.platform)}:{key_part(self.channel)}"

    def redis_key(self) -> str:
        return self.base() + ":turns"

    def epoch_key(self) -> str:
        return self.base() + ":epoch"


def _author_key(persona: str, author_id: str) -> str:
    """The set of channel bases (ChannelKey.base) in which `author_id` has turns."""
    return f"clone:{key_part(persona)}:author:{key_part(author_id)}:channels"


class Memory(Protocol):
    async def recall(self, key: ChannelKey) -> tuple[list[Turn], int]: ...

    async def append(self, key: ChannelKey, turns: Sequence[Turn], epoch: int | None = None) -> bool: ...

    async def reset(self, key: ChannelKey) -> None:
        """Forget the channel; raises MemoryUnavailable when that could not be done."""
        ...

    async def forget_user(self, persona: str, author_id: str) -> int:
        """Delete every turn by `author_id`; how many. Raises MemoryUnavailable when it could not."""
        ...

    async def close(self) -> None: ...


def _encode(turn: Turn, tokens: int) -> dict[str, Any]:
    return {
        "t": tokens,
        "a": turn.author_id,
        "n": turn.author,
        "x": turn.text,
        "p": turn.from_persona,
        "at": turn.at,
    }


def _decode(item: dict[str, Any]) -> Turn:
    return Turn(
        author_id=str(item["a"]),
        author=str(item["n"]),
        text=str(item["x"]),
        from_persona=bool(item["p"]),
        at=float(item["at"]),
    )


def _check_bounds(max_turns: int, token_budget: int, ttl_days: float) -> None:
    if max_turns < 1 or token_budget < 1 or ttl_days <= 0:
        raise ValueError("max_turns and token_budget must be >= 1 and ttl_days > 0")


class KeyedLocks:
    """One asyncio.Lock per name (a channel), dropped when unused. Callers get the lock in call
    order (asyncio.Lock is FIFO), which a connection pool or concurrent tasks alone do not promise."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def acquire_slot(self, name: str) -> asyncio.Lock:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        return lock

    def release_slot(self, name: str) -> None:
        lock, users = self._locks[name]
        if users <= 1:
            del self._locks[name]
        else:
            self._locks[name] = (lock, users - 1)

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock = self.acquire_slot(name)  # before the first await: the queue keeps call order
        try:
            async with lock:
                yield
        finally:
            self.release_slot(name)

    def __len__(self) -> int:
        return len(self._locks)


# KEYS: 1 turns list, 2 epoch, 3.. author sets.
# ARGV: 1 expected epoch or "", 2 max_turns, 3 token budget, 4 ttl ms, 5 channel base, 6.. JSON turns.
_APPEND_LUA = """
if ARGV[1] ~= '' then
  local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
  if cur ~= tonumber(ARGV[1]) then return 0 end
end
local max_turns = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
for i = 6, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -max_turns, -1)
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local toks = {}
local total = 0
for i, item in ipairs(items) do
  local t = tonumber(cjson.decode(item)['t']) or 0
  toks[i] = t
  total = total + t
end
local drop = 0
while drop < #items and total > budget do
  drop = drop + 1
  total = total - toks[drop]
end
if drop > 0 then redis.call('LTRIM', KEYS[1], drop, -1) end
redis.call('PEXPIRE', KEYS[1], ttl)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[5])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 1
"""

# KEYS: 1 author set, 2.. turns lists.  ARGV: 1 author id.  Returns the number of turns removed.
_FORGET_LUA = """
local removed = 0
for k = 2, #KEYS do
  local items = redis.call('LRANGE', KEYS[k], 0, -1)
  local kept = {}
  for _, item in ipairs(items) do
    if cjson.decode(item)['a'] == ARGV[1] then removed = removed + 1 else kept[#kept + 1] = item end
  end
  if #kept < #items then
    local ttl = redis.call('PTTL', KEYS[k])
    redis.call('DEL', KEYS[k])
    for _, item in ipairs(kept) do redis.call('RPUSH', KEYS[k], item) end
    if ttl > 0 and #kept > 0 then redis.call('PEXPIRE', KEYS[k], ttl) end
  end
end
redis.call('DEL', KEYS[1])
return removed
"""


def connect_redis(url: str, timeout_s: float = 0.5, max_connections: int = 64):
    """An asyncio Redis client for serving: short timeouts and no retries (a dead server costs one
    short timeout, not a backoff loop), and a pool that makes a burst of messages wait for a free
    connection (redis-py's default pool raises once 100 are in use)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=True, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), max_connections=max_connections, timeout=10,
    )
    return aioredis.Redis(connection_pool=pool)


def redis_client(redis: str | Any, timeout_s: float = 0.5) -> tuple[Any, bool]:
    """(client, owned): a client of its own for a URL (its user closes it), or the process's shared
    client as it is (whoever opened it closes it)."""
    if isinstance(redis, str):
        return connect_redis(redis, timeout_s), True
    return redis, False


class RedisMemory:
    """Memory in Redis: one round trip per recall (pipeline) and per append (Lua script).

    While Redis is unreachable, recall gives ([], 0), append gives False, and reset and forget_user
    raise MemoryUnavailable; one warning is logged when it goes down and one info line when it is
    back. Nothing is retried: the next call simply tries again.
    """

    def __init__(
        self,
        redis: str | Any,
        *,
        max_turns: int = DEFAULT_MAX_TURNS,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        ttl_days: float = DEFAULT_TTL_DAYS,
        count_tokens: Callable[[str], int] = default_count_tokens,
        timeout_s: float = 0.5,
    ) -> None:
        """`redis`: a URL (this memory opens and closes its own client) or the process's shared
        client from `connect_redis` (its owner closes it)."""
        _check_bounds(max_turns, token_budget, ttl_days)
        self.max_turns = max_turns
        self.token_budget = token_budget
        self.ttl_ms = int(ttl_days * _DAY * 1000)
        self.count_tokens = count_tokens
        self.client, self._owns_client = redis_client(redis, timeout_s)
        self._append_script = self.client.register_script(_APPEND_LUA)
        self._forget_script = self.client.register_script(_FORGET_LUA)
        self._locks = KeyedLocks()
        self._down = False

    def _outage(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            # The error class only: its message could carry the URL (and a password).
            log.warning(
                "conversation memory: Redis unreachable (%s); running without memory", type(exc).__name__
            )

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.info("conversation memory: Redis is reachable again")

    async def recall(self, key: ChannelKey) -> tuple[list[Turn], int]:
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lrange(key.redis_key(), 0, -1)
                pipe.get(key.epoch_key())
                items, epoch = await pipe.execute()
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._outage(exc)
            return [], 0
        self._ok()
        turns = []
        for raw in items:
            try:
                turns.append(_decode(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                log.debug("conversation memory: skipped an unreadable turn in %s", key.redis_key())
        return turns, int(epoch or 0)

    async def append(self, key: ChannelKey, turns: Sequence[Turn], epoch: int | None = None) -> bool:
        from redis.exceptions import ConnectionError, TimeoutError

        if not turns:
            return True
        items = [json.dumps(_encode(t, self.count_tokens(t.text)), ensure_ascii=False) for t in turns]
        authors = sorted({t.author_id for t in turns})
        keys = [key.redis_key(), key.epoch_key(), *(_author_key(key.persona, a) for a in authors)]
        args = [
            "" if epoch is None else str(epoch),
            self.max_turns,
            self.token_budget,
            self.ttl_ms,
            key.base(),
            *items,
        ]
        name = key.redis_key()
        lock = self._locks.acquire_slot(name)  # taken before any await, so call order is kept
        try:
            async with lock:
                done = await self._append_script(keys=keys, args=args)
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._outage(exc)
            return False
        finally:
            self._locks.release_slot(name)
        self._ok()
        return bool(done)

    async def reset(self, key: ChannelKey) -> None:
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(key.redis_key())
                pipe.incr(key.epoch_key())
                pipe.pexpire(key.epoch_key(), self.ttl_ms)
                await pipe.execute()
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._outage(exc)
            raise MemoryUnavailable("Redis is unreachable") from None
        self._ok()

    async def forget_user(self, persona: str, author_id: str) -> int:
        """Delete every turn by `author_id` in every channel of `persona`."""
        from redis.exceptions import ConnectionError, TimeoutError

        set_key = _author_key(persona, author_id)
        try:
            bases = sorted(await self.client.smembers(set_key))
            removed = await self._forget_script(keys=[set_key, *(b + ":turns" for b in bases)],
                                                args=[author_id])
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._outage(exc)
            raise MemoryUnavailable("Redis is unreachable") from None
        self._ok()
        return int(removed)

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


class EmbeddedMemory:
    """The same memory in-process, saved to a JSON file (when `path` is given) after every change.

    A file that cannot be read, or is not a memory file, is moved aside (`.corrupt`) with a
    warning, and memory starts empty. When the file cannot be written (a full disk), memory goes
    on in-process: one warning until a save succeeds again, and reset and forget_user raise
    MemoryUnavailable, as what they deleted is still on disk."""

    def __init__(
        self,
        path: Path | None,
        *,
        max_turns: int = DEFAULT_MAX_TURNS,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        ttl_days: float = DEFAULT_TTL_DAYS,
        count_tokens: Callable[[str], int] = default_count_tokens,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_bounds(max_turns, token_budget, ttl_days)
        self.path = path
        self.max_turns = max_turns
        self.token_budget = token_budget
        self.ttl_s = ttl_days * _DAY
        self.count_tokens = count_tokens
        self.clock = clock
        self._unsaved = False  # the last save failed (and was warned about)
        # redis_key -> {"persona", "epoch", "expires", "turns": [encoded turn dicts]}
        self._channels: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            channels = _checked_channels(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the unreadable file for the user instead of overwriting it on the next save.
            aside = path.with_name(path.name + ".corrupt")
            log.warning(
                "conversation memory: %s is unreadable (%s); moved to %s", path, type(exc).__name__, aside
            )
            os.replace(path, aside)
            return
        self._channels = channels
        if self._drop_expired():
            self._save()

    def _drop_expired(self) -> bool:
        now = self.clock()
        dead = [k for k, ch in self._channels.items() if ch.get("expires", 0) <= now]
        for k in dead:
            del self._channels[k]
        return bool(dead)

    def _save(self) -> bool:
        """Write the file; False (warned once, until a save succeeds) when it cannot be written."""
        if self.path is None:
            return True
        try:
            with atomic_file(self.path) as f:
                json.dump({"version": 1, "channels": self._channels}, f, ensure_ascii=False)
        except OSError as exc:
            if not self._unsaved:
                self._unsaved = True
                log.warning("conversation memory: %s cannot be written (%s); remembering in this "
                            "process only", self.path, exc.strerror or type(exc).__name__)
            return False
        if self._unsaved:
            self._unsaved = False
            log.info("conversation memory: %s is written again", self.path)
        return True

    def _save_deletion(self) -> None:
        """A deletion that is not on disk is not done: it would come back with the next start."""
        if not self._save():
            raise MemoryUnavailable(f"{self.path} cannot be written")

    async def recall(self, key: ChannelKey) -> tuple[list[Turn], int]:
        if self._drop_expired():
            self._save()
        ch = self._channels.get(key.redis_key())
        if ch is None:
            return [], 0
        return [_decode(item) for item in ch["turns"]], int(ch["epoch"])

    async def append(self, key: ChannelKey, turns: Sequence[Turn], epoch: int | None = None) -> bool:
        self._drop_expired()
        ch = self._channels.get(key.redis_key())
        current = 0 if ch is None else int(ch["epoch"])
        if epoch is not None and epoch != current:
            return False
        if not turns:
            return True
        if ch is None:
            ch = self._channels[key.redis_key()] = {"persona": key.persona, "epoch": 0, "turns": []}
        items = ch["turns"] + [_encode(t, self.count_tokens(t.text)) for t in turns]
        items = items[-self.max_turns :]
        total = sum(item["t"] for item in items)
        drop = 0
        while drop < len(items) and total > self.token_budget:
            total -= items[drop]["t"]
            drop += 1
        ch["turns"] = items[drop:]
        ch["expires"] = self.clock() + self.ttl_s
        self._save()  # remembered in this process even when the disk is full
        return True

    async def reset(self, key: ChannelKey) -> None:
        self._drop_expired()
        ch = self._channels.get(key.redis_key())
        epoch = 0 if ch is None else int(ch["epoch"])
        self._channels[key.redis_key()] = {
            "persona": key.persona,
            "epoch": epoch + 1,
            "turns": [],
            "expires": self.clock() + self.ttl_s,
        }
        self._save_deletion()

    async def forget_user(self, persona: str, author_id: str) -> int:
        self._drop_expired()
        removed = 0
        for ch in self._channels.values():
            if ch["persona"] != persona:
                continue
            kept = [item for item in ch["turns"] if item["a"] != author_id]
            removed += len(ch["turns"]) - len(kept)
            ch["turns"] = kept
        self._save_deletion()
        return removed

    async def close(self) -> None:
        return None


_CHANNEL_FIELDS: dict[str, Any] = {"persona": str, "epoch": int, "turns": list}
_TURN_FIELDS: dict[str, Any] = {
    "t": (int, float), "a": str, "n": str, "x": str, "p": bool, "at": (int, float)}


def _checked_channels(data: Any) -> dict[str, dict[str, Any]]:
    """The channels of a memory file's JSON, every field checked: valid JSON of another shape
    (a list, a number where a turn should be) raises TypeError here, not later mid-chat."""
    channels = data.get("channels") if isinstance(data, dict) else None
    if not isinstance(channels, dict):
        raise TypeError("no channels object")
    for ch in channels.values():
        _check_fields(ch, _CHANNEL_FIELDS)
        if not isinstance(ch.get("expires", 0), int | float):
            raise TypeError("expires is not a number")
        for item in ch["turns"]:
            _check_fields(item, _TURN_FIELDS)
    return channels


def _check_fields(item: Any, fields: dict[str, Any]) -> None:
    if not isinstance(item, dict) or not all(isinstance(item.get(k), t) for k, t in fields.items()):
        raise TypeError("an entry of the wrong shape")


def open_memory(redis: Any | None, path: Path | None, **bounds: Any) -> Memory:
    """RedisMemory over `redis` (the process's client) when there is one, else EmbeddedMemory at
    `path` (the persona's memory.json). `bounds` (max_turns, token_budget, ttl_days,
    count_tokens) go to the constructor."""
    if redis is not None:
        log.info("conversation memory: Redis")
        return RedisMemory(redis, **bounds)
    log.info("conversation memory: %s", path)
    return EmbeddedMemory(path, **bounds)
