"""Long-term memory: what each person told the clone, kept per (persona, platform, user) and found
again by meaning, so the clone can bring back something said weeks ago that the rolling window
(bot.memory) has long dropped.

The caller embeds (unit-length float32 vectors from a sentence-embedding model) and redacts; this
module only stores and ranks. A search is brute force over one user's items on one platform: with
`max_items` (default 500) that is a single matrix-vector product, cheaper than any index.

Layout in Redis (parts escaped with memory.key_part, so a user id with ':' or '%' stays one part):
  clone:{persona}:lt:{user}:{platform}  a list of compact JSON entries, oldest first; the vector is
                                        base64 of little-endian float16 (768 bytes for 384 dims,
                                        half of float32, far below what changes a ranking)
  clone:{persona}:lt:{user}             the set of platforms that user has lists on, so forget_user
                                        finds them without a SCAN over the whole keyspace (and
                                        without glob-escaping the user id)
These have one part fewer or an `lt` where bot.memory puts a platform, so they never meet its keys.

Bounds: a list keeps its newest `max_items` entries; an entry is kept `ttl_days` after it was said
(`at`) and never returned after that, and a user's keys expire `ttl_days` after their last add.
Without Redis the same is kept in a JSON file (EmbeddedLongTerm), with the same semantics.

Remembering is best effort: while Redis is down (or the disk is full) search gives [] and add drops
or keeps in process only, with one warning per outage. Forgetting is a user's request:
forget_user raises MemoryUnavailable when it could not be carried out.
Nothing a person said, no display name and no user id is ever logged, at any level.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bot.memory import _DAY, MemoryUnavailable, _check_fields, key_part, redis_client
from training.atomic import atomic_file

log = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 500
DEFAULT_TTL_DAYS = 90.0
MAX_TEXT_CHARS = 4000  # a longer message is kept cut to its start: a memory, not an archive


@dataclass(frozen=True)
class Remembered:
    text: str  # what the user said (already redacted by the caller)
    speaker: str  # the user's display name at the time
    at: float  # unix time it was said
    vector: np.ndarray = field(compare=False, repr=False)  # float32, unit length (384,)


class LongTerm(Protocol):
    async def add(self, persona: str, platform: str, user_id: str, items: Sequence[Remembered]) -> None:
        """Keep `items` (best effort: dropped while the store is unreachable)."""
        ...

    async def search(
        self, persona: str, platform: str, user_id: str, vector: np.ndarray, k: int,
        before: float | None = None, min_score: float = 0.0,
    ) -> list[tuple[float, Remembered]]:
        """Up to `k` (cosine, item), best first, with score >= min_score and, given `before`, said
        before it. [] while the store is unreachable."""
        ...

    async def forget_user(self, persona: str, user_id: str) -> int:
        """Delete everything `user_id` said to `persona` on every platform; how many items.
        Raises MemoryUnavailable when it could not."""
        ...

    async def close(self) -> None: ...


def list_key(persona: str, platform: str, user_id: str) -> str:
    """The Redis list (and the embedded store's name) for one user on one platform."""
    return f"{user_key(persona, user_id)}:{key_part(platform)}"


def user_key(persona: str, user_id: str) -> str:
    """The Redis set of platforms on which `user_id` has a list."""
    return f"clone:{key_part(persona)}:lt:{key_part(user_id)}"


def _check_bounds(max_items: int, ttl_days: float) -> None:
    if max_items < 1:
        raise ValueError(f"long-term memory: max_items must be >= 1, not {max_items}")
    if not ttl_days > 0:  # also refuses NaN
        raise ValueError(f"long-term memory: ttl_days must be > 0, not {ttl_days}")


def _encode(item: Remembered) -> dict[str, Any]:
    vector = np.asarray(item.vector, dtype=np.float32)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"long-term memory: a vector must be one-dimensional, not of shape {vector.shape}")
    packed = base64.b64encode(vector.astype("<f2").tobytes()).decode("ascii")
    return {"x": item.text[:MAX_TEXT_CHARS], "n": item.speaker, "at": float(item.at), "v": packed}


def _dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def _decode(entry: dict[str, Any]) -> Remembered:
    vector = np.frombuffer(base64.b64decode(entry["v"], validate=True), dtype="<f2").astype(np.float32)
    return Remembered(str(entry["x"]), str(entry["n"]), float(entry["at"]), vector)


def _rank(
    entries: Sequence[dict[str, Any] | str | bytes], vector: np.ndarray, k: int, before: float | None,
    min_score: float, cutoff: float,
) -> list[tuple[float, Remembered]]:
    """The best `k` of `entries` (JSON or decoded) said after `cutoff` (and before `before`)."""
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    found: list[Remembered] = []
    for entry in reversed(entries):  # newest first, so that a tie goes to the newer item
        try:
            item = _decode(json.loads(entry) if isinstance(entry, str | bytes) else entry)
        except (ValueError, KeyError, TypeError):
            log.debug("long-term memory: skipped an unreadable entry")
            continue
        if item.at > cutoff and (before is None or item.at < before) and item.vector.shape == query.shape:
            found.append(item)
    if k <= 0 or not found:
        return []
    matrix = np.stack([item.vector for item in found])
    norms = np.maximum(np.linalg.norm(matrix, axis=1) * np.linalg.norm(query), 1e-12)
    scores = matrix @ query / norms  # cosine: float16 storage leaves the norms a hair off 1
    order = np.argsort(-scores, kind="stable")  # NaN sorts last and fails the min_score test
    return [(float(scores[i]), found[i]) for i in order if scores[i] >= min_score][:k]


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError, TimeoutError

    return ConnectionError, TimeoutError, OSError


# KEYS: 1 the user's list on this platform, 2 the user's set of platforms.
# ARGV: 1 max_items, 2 ttl ms, 3 cutoff (unix s: entries said at or before it are expired),
#       4 platform, 5.. JSON entries.  Returns the list's length.
_ADD_LUA = """
for i = 5, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
local cutoff = tonumber(ARGV[3])
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local ok, entry = pcall(cjson.decode, head)
  local at = ok and type(entry) == 'table' and tonumber(entry['at'])
  if at and at > cutoff then break end
  redis.call('LPOP', KEYS[1])
end
local ttl = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('SADD', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return redis.call('LLEN', KEYS[1])
"""


class RedisLongTerm:
    """Long-term memory in Redis: one round trip per add (Lua script) and per search (LRANGE).

    Entries are in insertion order, so expired ones are dropped from the head when adding; one
    added out of order stays until trimmed or its key expires, but is never returned."""

    def __init__(
        self,
        redis: str | Any,
        max_items: int = DEFAULT_MAX_ITEMS,
        ttl_days: float = DEFAULT_TTL_DAYS,
        timeout_s: float = 0.5,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`redis`: a URL (this store opens and closes its own client) or the process's shared
        client from memory.connect_redis (its owner closes it)."""
        _check_bounds(max_items, ttl_days)
        self.max_items = max_items
        self.ttl_s = ttl_days * _DAY
        self.clock = clock
        self.client, self._owns_client = redis_client(redis, timeout_s)
        self._add_script = self.client.register_script(_ADD_LUA)
        self._down = False

    def _outage(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            # The error class only: its message could carry the URL (and a password).
            log.warning("long-term memory: Redis unreachable (%s); going on without it", type(exc).__name__)

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.info("long-term memory: Redis is reachable again")

    async def add(self, persona: str, platform: str, user_id: str, items: Sequence[Remembered]) -> None:
        if not items:
            return
        entries = [_dumps(_encode(item)) for item in items]  # a malformed vector raises here
        ttl_ms = max(1, int(self.ttl_s * 1000))
        cutoff = f"{self.clock() - self.ttl_s:.3f}"
        keys = [list_key(persona, platform, user_id), user_key(persona, user_id)]
        try:
            await self._add_script(keys=keys, args=[self.max_items, ttl_ms, cutoff, platform, *entries])
        except _redis_errors() as exc:
            self._outage(exc)
            return
        self._ok()

    async def search(
        self, persona: str, platform: str, user_id: str, vector: np.ndarray, k: int,
        before: float | None = None, min_score: float = 0.0,
    ) -> list[tuple[float, Remembered]]:
        if k <= 0:
            return []
        try:
            entries = await self.client.lrange(list_key(persona, platform, user_id), 0, -1)
        except _redis_errors() as exc:
            self._outage(exc)
            return []
        self._ok()
        return _rank(entries, vector, k, before, min_score, self.clock() - self.ttl_s)

    async def forget_user(self, persona: str, user_id: str) -> int:
        set_key = user_key(persona, user_id)
        try:
            found = await self.client.smembers(set_key)
            platforms = [p.decode() if isinstance(p, bytes) else p for p in found]
            if not platforms:
                self._ok()
                return 0
            async with self.client.pipeline(transaction=True) as pipe:
                for platform in platforms:
                    pipe.llen(list_key(persona, platform, user_id))
                    pipe.delete(list_key(persona, platform, user_id))
                # SREM, not DEL: a platform added meanwhile keeps its way to be forgotten later.
                pipe.srem(set_key, *platforms)
                done = await pipe.execute()
        except _redis_errors() as exc:
            self._outage(exc)
            raise MemoryUnavailable("Redis is unreachable") from None
        self._ok()
        return int(sum(done[0:-1:2]))

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


class EmbeddedLongTerm:
    """The same long-term memory in process, saved to a JSON file (when `path` is given) after
    every change, atomically.

    A file that cannot be read, or is not a long-term memory file, is moved aside
    (`<name>.bad-<time>`) with one warning, and memory starts empty. When the file cannot be
    written (a full disk), memory goes on in process with one warning until a save succeeds again;
    forget_user then raises MemoryUnavailable, as what it deleted is still on disk."""

    def __init__(
        self,
        path: Path | None,
        max_items: int = DEFAULT_MAX_ITEMS,
        ttl_days: float = DEFAULT_TTL_DAYS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_bounds(max_items, ttl_days)
        self.path = path
        self.max_items = max_items
        self.ttl_s = ttl_days * _DAY
        self.clock = clock
        self._unsaved = False  # the last save failed (and was warned about)
        # list_key -> {"persona", "platform", "user", "items": [encoded entries, oldest first]}
        self._lists: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            lists = _checked_lists(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._move_aside(path, exc)
            return
        self._lists = lists
        if self._drop_expired():
            self._save()

    def _move_aside(self, path: Path, exc: BaseException) -> None:
        """Keep an unreadable file for the user instead of overwriting it on the next save."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.name}.bad-{stamp}")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}.bad-{stamp}-{n}"), n + 1
        try:
            os.replace(path, aside)
        except OSError:
            self.path = None  # never overwrite what could not be kept
            log.warning("long-term memory: %s is unreadable (%s) and cannot be moved aside; remembering "
                        "in this process only", path, type(exc).__name__)
            return
        log.warning("long-term memory: %s is unreadable (%s); moved to %s", path, type(exc).__name__, aside)

    def _drop_expired(self) -> bool:
        cutoff = self.clock() - self.ttl_s
        changed = False
        for key, lst in list(self._lists.items()):
            kept = [entry for entry in lst["items"] if entry["at"] > cutoff]
            if len(kept) < len(lst["items"]):
                lst["items"], changed = kept, True
            if not kept:
                del self._lists[key]
                changed = True
        return changed

    def _save(self) -> bool:
        """Write the file; False (warned once, until a save succeeds) when it cannot be written."""
        if self.path is None:
            return True
        try:
            with atomic_file(self.path) as f:
                json.dump({"version": 1, "lists": self._lists}, f, ensure_ascii=False, separators=(",", ":"))
        except OSError as exc:
            if not self._unsaved:
                self._unsaved = True
                log.warning("long-term memory: %s cannot be written (%s); remembering in this process only",
                            self.path, exc.strerror or type(exc).__name__)
            return False
        if self._unsaved:
            self._unsaved = False
            log.info("long-term memory: %s is written again", self.path)
        return True

    async def add(self, persona: str, platform: str, user_id: str, items: Sequence[Remembered]) -> None:
        if not items:
            return
        entries = [_encode(item) for item in items]  # a malformed vector raises here
        new = {"persona": persona, "platform": platform, "user": user_id, "items": []}
        lst = self._lists.setdefault(list_key(persona, platform, user_id), new)
        lst["items"] = (lst["items"] + entries)[-self.max_items :]
        self._drop_expired()
        self._save()  # remembered in this process even when the disk is full

    async def search(
        self, persona: str, platform: str, user_id: str, vector: np.ndarray, k: int,
        before: float | None = None, min_score: float = 0.0,
    ) -> list[tuple[float, Remembered]]:
        lst = self._lists.get(list_key(persona, platform, user_id))
        if lst is None:
            return []
        return _rank(lst["items"], vector, k, before, min_score, self.clock() - self.ttl_s)

    async def forget_user(self, persona: str, user_id: str) -> int:
        self._drop_expired()
        removed = 0
        for key, lst in list(self._lists.items()):
            if lst["persona"] == persona and lst["user"] == user_id:
                removed += len(lst["items"])
                del self._lists[key]
        # Saved even when nothing was found here: an earlier deletion may not have reached the disk.
        if not self._save():
            raise MemoryUnavailable(f"{self.path} cannot be written")
        return removed

    async def close(self) -> None:
        return None


_LIST_FIELDS: dict[str, Any] = {"persona": str, "platform": str, "user": str, "items": list}
_ENTRY_FIELDS: dict[str, Any] = {"x": str, "n": str, "at": (int, float), "v": str}


def _checked_lists(data: Any) -> dict[str, dict[str, Any]]:
    """The lists of a long-term memory file's JSON, every field and vector checked: a file of
    another shape raises here (TypeError or ValueError), not later mid-chat."""
    lists = data.get("lists") if isinstance(data, dict) else None
    if not isinstance(lists, dict):
        raise TypeError("no lists object")
    for lst in lists.values():
        _check_fields(lst, _LIST_FIELDS)
        for entry in lst["items"]:
            _check_fields(entry, _ENTRY_FIELDS)
            _decode(entry)
    return lists


def open_longterm(redis: Any | None, path: Path | None, **bounds: Any) -> LongTerm:
    """RedisLongTerm over `redis` (the process's client, or a URL) when there is one, else
    EmbeddedLongTerm at `path` (None: in process only). `bounds` (max_items, ttl_days) go to the
    constructor."""
    if redis is not None:
        log.info("long-term memory: Redis")
        return RedisLongTerm(redis, **bounds)
    log.info("long-term memory: %s", path if path is not None else "in this process only")
    return EmbeddedLongTerm(path, **bounds)
