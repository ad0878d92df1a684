"""Who gets an answer: access lists, a per-user rate limit, and one reply per incoming message.

The rules come from the persona's `[serve]` table in persona.toml (validated at start, errors name
the key); the state (rate buckets, answered message ids) lives in Redis when REDIS_URL is set, so
that two processes overlapping during a deploy answer each message once and share one rate limit,
and in this process otherwise. The gate knows platforms only as names and ids, like the engine.

    [serve]
    owner = ["telegram:123456789", "discord:80351110224678912"]
    allow_users = []          # when any allow list is set, only what one of them names is answered
    block_users = ["telegram:42"]
    allow_chats = []          # Telegram chats, Discord channels
    block_chats = []
    allow_servers = []        # Discord servers (guilds)
    block_servers = []
    reply_in = ["discord:1234"]   # chats answered without a mention
    messages_per_minute = 6   # per user; 0 turns the limit off
    about = "..."             # the /about text
    introduce = true          # the first reply in a chat starts with the /about text

The owner is always answered and never rate limited; a block list beats an allow list.

A claim names the process answering the message until it is `settle`d. A process that stops
(`drain`) admits nothing more and hands over what it has not begun to answer: it releases those
claims. So while two processes overlap (a deploy), the one that finds a message claimed by the
other and not settled waits: for the reply (then it is a duplicate) or the release (then it is
its own to answer). The one answering it may be stopped before it replies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bot.memory import key_part, redis_client
from training.persona import Persona

log = logging.getLogger(__name__)

PLATFORMS = ("telegram", "discord")
DEFAULT_MESSAGES_PER_MINUTE = 6
SEEN_TTL_S = 24 * 3600  # a platform re-delivers a message within minutes, not days
INTRODUCED_TTL_S = 365 * 24 * 3600  # a chat hears "I'm an AI clone" again after a year of silence
CLAIM_WAIT_S = 120.0  # how long to wait for another process's reply (a busy CPU takes a while)
CLAIM_POLL_S = 0.25
SETTLED = "answered"  # a claim's value once its message is answered (else "<process>:<message>")
RATE_LIMIT_REPLY = (
    "You're sending messages faster than I can keep up with. Give me a minute, then try again."
)
_ID = re.compile(r"^(telegram|discord):(-?\d+)$")
_ID_LISTS = ("owner", "allow_users", "block_users", "allow_chats", "block_chats",
             "allow_servers", "block_servers", "reply_in")


class GateSettingsError(ValueError):
    """A [serve] setting that is wrong; the message names the file and the key."""


class Stopping(Exception):
    """This process is stopping: the message is left to the next one, unclaimed."""


class Verdict(Enum):
    ANSWER = "answer"
    IGNORE = "ignore"              # not allowed here: no reply at all
    DUPLICATE = "duplicate"        # another process (or a re-delivery) already took this message
    LIMITED = "limited"            # over the rate limit: say so politely, once
    LIMITED_QUIET = "limited_quiet"  # still over it, and already told


@dataclass(frozen=True)
class Sender:
    """An incoming message as the gate sees it: platform-qualified ids, nothing else."""

    platform: str
    user_id: str
    chat_id: str
    message_id: str
    server_id: str | None = None  # a Discord guild; None in DMs and on Telegram

    def qualified(self, value: str) -> str:
        return f"{self.platform}:{value}"


@dataclass(frozen=True)
class Rules:
    owner: frozenset[str] = frozenset()
    allow_users: frozenset[str] = frozenset()
    block_users: frozenset[str] = frozenset()
    allow_chats: frozenset[str] = frozenset()
    block_chats: frozenset[str] = frozenset()
    allow_servers: frozenset[str] = frozenset()
    block_servers: frozenset[str] = frozenset()
    reply_in: frozenset[str] = frozenset()
    messages_per_minute: float = DEFAULT_MESSAGES_PER_MINUTE
    about: str | None = None
    introduce: bool = True

    @classmethod
    def from_persona(cls, persona: Persona) -> Rules:
        where = f"{persona.root / 'persona.toml' if persona.root else 'persona'} [serve]"
        return cls.parse(persona.serve, where)

    @classmethod
    def parse(cls, table: dict[str, Any], where: str = "[serve]") -> Rules:
        known = (*_ID_LISTS, "messages_per_minute", "about", "introduce")
        for key in table:
            if key not in known:
                raise GateSettingsError(f"{where}: unknown setting `{key}` (known: {', '.join(known)})")
        lists: dict[str, frozenset[str]] = {}
        for key in _ID_LISTS:
            value = table.get(key, [])
            if not isinstance(value, list):
                raise GateSettingsError(f"{where}: `{key}` must be a list of \"platform:id\" strings")
            for i, item in enumerate(value):
                if not isinstance(item, str) or not _ID.match(item.strip()):
                    raise GateSettingsError(
                        f"{where}: `{key}[{i}]` is {item!r}; write ids as \"telegram:<number>\" "
                        f"or \"discord:<number>\""
                    )
            lists[key] = frozenset(item.strip() for item in value)
        rate = table.get("messages_per_minute", DEFAULT_MESSAGES_PER_MINUTE)
        # nan would compare as "over the limit" (or raise in Redis' Lua) for every message.
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < math.inf:
            raise GateSettingsError(
                f"{where}: `messages_per_minute` must be a finite number >= 0 (0: no limit)")
        about = table.get("about")
        if about is not None and (not isinstance(about, str) or not about.strip()):
            raise GateSettingsError(f"{where}: `about` must be a non-empty string")
        introduce = table.get("introduce", True)
        if not isinstance(introduce, bool):
            raise GateSettingsError(f"{where}: `introduce` must be true or false")
        return cls(**lists, messages_per_minute=float(rate), about=about.strip() if about else None,
                   introduce=introduce)

    def is_owner(self, sender: Sender) -> bool:
        return sender.qualified(sender.user_id) in self.owner

    def listens_in(self, platform: str, chat_id: str) -> bool:
        """Whether every message in this group chat or channel is for the clone, mention or not."""
        return f"{platform}:{chat_id}" in self.reply_in

    def allows(self, sender: Sender) -> bool:
        if self.is_owner(sender):
            return True
        user, chat = sender.qualified(sender.user_id), sender.qualified(sender.chat_id)
        server = sender.qualified(sender.server_id) if sender.server_id else None
        if user in self.block_users or chat in self.block_chats or server in self.block_servers:
            return False
        if not (self.allow_users or self.allow_chats or self.allow_servers):
            return True
        return user in self.allow_users or chat in self.allow_chats or server in self.allow_servers


# -- state: answered messages and rate buckets --------------------------------------------------


class LocalState:
    """The gate's state in this process: enough for one process (and embedded memory)."""

    def __init__(self, max_seen: int = 100_000) -> None:
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (expiry, holder)
        self._buckets: dict[str, tuple[float, float, bool]] = {}  # key -> (tokens, at, warned)
        self.max_seen = max_seen

    async def claim(self, key: str, ttl_s: float = SEEN_TTL_S, fallback: bool = True,
                    holder: str = "1") -> bool:
        now = time.monotonic()
        while self._seen and (len(self._seen) >= self.max_seen or next(iter(self._seen.values()))[0] < now):
            self._seen.popitem(last=False)  # oldest first: bounded, whatever the TTLs
        if self._seen.get(key, (0.0, ""))[0] >= now:
            return False
        self._seen.pop(key, None)  # an expired one goes back to the end
        self._seen[key] = (now + ttl_s, holder)
        return True

    async def release(self, key: str, holder: str) -> None:
        if self._seen.get(key, (0.0, ""))[1] == holder:
            del self._seen[key]

    async def settle(self, key: str, holder: str) -> None:
        expiry, held = self._seen.get(key, (0.0, ""))
        if held == holder:
            self._seen[key] = (expiry, SETTLED)

    async def holder(self, key: str) -> str | None:
        """Who holds `key`; in one process there is no one else to wait for."""
        return SETTLED if self._seen.get(key, (0.0, ""))[0] >= time.monotonic() else None

    async def take(self, key: str, capacity: float, per_second: float, now: float) -> int:
        tokens, at, warned = self._buckets.get(key, (capacity, now, False))
        tokens = min(capacity, tokens + max(0.0, now - at) * per_second)
        if tokens >= 1:
            result, tokens, warned = _TAKEN, tokens - 1, False
        else:
            result, warned = (_QUIET if warned else _WARN), True
        self._buckets[key] = (tokens, now, warned)
        if len(self._buckets) > 10_000:  # many one-off users: forget the buckets that refilled
            self._buckets = {k: (t, a, w) for k, (t, a, w) in self._buckets.items()
                             if t + (now - a) * per_second < capacity}
        return result

    async def close(self) -> None:
        return None


_TAKEN, _WARN, _QUIET = 1, 2, 0

# KEYS: 1 the bucket hash. ARGV: 1 capacity, 2 tokens per ms, 3 now ms, 4 ttl ms.
# Returns 1 taken, 2 refused (tell the user), 0 refused (already told).
_TAKE_LUA = """
local cap, rate, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'warned')
local tokens, at = tonumber(b[1]) or cap, tonumber(b[2]) or now
local warned = b[3] == '1'
tokens = math.min(cap, tokens + math.max(0, now - at) * rate)
local result
if tokens >= 1 then
  tokens, warned, result = tokens - 1, false, 1
elseif warned then
  result = 0
else
  warned, result = true, 2
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', ARGV[3], 'warned', warned and '1' or '0')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return result
"""


# KEYS: 1 a claim. ARGV: 1 its holder. Deletes the claim only if that holder still has it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: 1 a claim. ARGV: 1 its holder, 2 the settled value. Marks it answered, keeping its expiry.
_SETTLE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl) end
return 1
"""


class RedisState:
    """The gate's state in Redis, shared by every process serving this persona. One round trip per
    call. While Redis is unreachable the gate lets messages through: answering a message twice
    during an outage beats answering it never."""

    def __init__(self, redis: str | Any, timeout_s: float = 0.5) -> None:
        """`redis`: a URL (this state opens and closes its own client) or the process's shared client."""
        self.client, self._owns_client = redis_client(redis, timeout_s)
        self._take = self.client.register_script(_TAKE_LUA)
        self._release = self.client.register_script(_RELEASE_LUA)
        self._settle = self.client.register_script(_SETTLE_LUA)
        self._down = False

    async def _call(self, fallback: Any, coro) -> Any:
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            result = await coro
        except (ConnectionError, TimeoutError, OSError) as exc:
            if not self._down:
                self._down = True
                log.warning("gate: Redis unreachable (%s); answering without dedup or rate limit",
                            type(exc).__name__)
            return fallback
        if self._down:
            self._down = False
            log.info("gate: Redis is reachable again")
        return result

    async def claim(self, key: str, ttl_s: float = SEEN_TTL_S, fallback: bool = True,
                    holder: str = "1") -> bool:
        """Whether this call set `key` (it was not set); `fallback` while Redis is unreachable."""
        return bool(await self._call(fallback, self.client.set(key, holder, nx=True, ex=int(ttl_s))))

    async def release(self, key: str, holder: str) -> None:
        """Delete the claim `key` if `holder` still holds it (never another process's)."""
        await self._call(0, self._release(keys=[key], args=[holder]))

    async def settle(self, key: str, holder: str) -> None:
        await self._call(0, self._settle(keys=[key], args=[holder, SETTLED]))

    async def holder(self, key: str) -> str | None:
        """Who holds `key` (None: no one); SETTLED while Redis is unreachable: nothing to wait for."""
        held = await self._call(SETTLED.encode(), self.client.get(key))
        return held.decode() if isinstance(held, bytes) else held

    async def take(self, key: str, capacity: float, per_second: float, now: float) -> int:
        ttl_ms = int(capacity / per_second * 1000) + 1000  # a full refill, then the bucket is moot
        args = [capacity, per_second / 1000, int(now * 1000), ttl_ms]
        return int(await self._call(_TAKEN, self._take(keys=[key], args=args)))

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


@dataclass
class Gate:
    rules: Rules
    persona: str
    state: LocalState | RedisState = field(default_factory=LocalState)
    clock: Callable[[], float] = time.time
    # Names this process in its claims, so that it releases its own and never another's.
    process: str = field(default_factory=lambda: uuid.uuid4().hex)
    stopping: bool = False
    claim_wait_s: float = CLAIM_WAIT_S

    def _key(self, kind: str, *parts: str) -> str:
        return ":".join(["clone", key_part(self.persona), kind, *(key_part(p) for p in parts)])

    def _seen(self, sender: Sender) -> str:
        return self._key("seen", sender.platform, sender.chat_id, sender.message_id)

    def _holder(self, sender: Sender) -> str:
        return f"{self.process}:{sender.message_id}"

    def drain(self) -> None:
        """Admit nothing more: every later `admit` raises Stopping."""
        self.stopping = True

    async def admit(self, sender: Sender, *, deletion_request: bool = False) -> Verdict:
        """The verdict for one addressed message. Call it once per message: it claims the message
        id, so a second call (or another process) gets DUPLICATE. A deletion request (`/forget`)
        is never refused: not for a blocked user, not over the rate limit. Raises Stopping once
        `drain` was called."""
        if self.stopping:
            raise Stopping
        if not deletion_request and not self.rules.allows(sender):
            log.info("gate: ignored %s user=%s chat=%s (access lists)", sender.platform, sender.user_id,
                     sender.chat_id)
            return Verdict.IGNORE
        if not await self._claim(sender):
            log.info("gate: %s chat=%s msg=%s already answered", sender.platform, sender.chat_id,
                     sender.message_id)
            return Verdict.DUPLICATE
        per_minute = self.rules.messages_per_minute
        if deletion_request or per_minute <= 0 or self.rules.is_owner(sender):
            return Verdict.ANSWER
        taken = await self.state.take(
            self._key("rate", sender.platform, sender.user_id), per_minute, per_minute / 60, self.clock())
        if taken == _TAKEN:
            return Verdict.ANSWER
        log.info("gate: rate limited %s user=%s", sender.platform, sender.user_id)
        return Verdict.LIMITED if taken == _WARN else Verdict.LIMITED_QUIET

    async def _claim(self, sender: Sender) -> bool:
        """Claim a message; while another process holds it unanswered, wait until it answers it
        (False) or hands it over (then claim it), for `claim_wait_s` at most."""
        key = self._seen(sender)
        deadline, waited = time.monotonic() + self.claim_wait_s, False
        while not await self.state.claim(key, holder=self._holder(sender)):
            held = await self.state.holder(key)
            if held is not None and (":" not in held or held.startswith(f"{self.process}:")
                                     or time.monotonic() > deadline):
                return False  # answered; or this process has it; an old version's claim; given up
            if self.stopping:
                raise Stopping
            if held is not None:
                if not waited:
                    log.info("gate: %s chat=%s msg=%s is another process's: waiting for its reply",
                             sender.platform, sender.chat_id, sender.message_id)
                waited = True
                await asyncio.sleep(CLAIM_POLL_S)
        return True

    async def first_contact(self, sender: Sender) -> bool:
        """Whether the clone should introduce itself (once per chat) before its reply. Not while
        Redis is unreachable: better no introduction than one with every message."""
        if not self.rules.introduce:
            return False
        key = self._key("introduced", sender.platform, sender.chat_id)
        return await self.state.claim(key, INTRODUCED_TTL_S, fallback=False, holder=self._holder(sender))

    async def release(self, sender: Sender) -> None:
        """Give back what this process claimed for this message (the message, and the chat's
        introduction if it was to come with this reply), so that another process answers it."""
        await self.state.release(self._seen(sender), self._holder(sender))
        await self.state.release(self._key("introduced", sender.platform, sender.chat_id),
                                 self._holder(sender))

    async def settle(self, sender: Sender) -> None:
        """Mark this process's claim on the message answered: a process waiting on it moves on."""
        await self.state.settle(self._seen(sender), self._holder(sender))

    async def answer_or_hand_over(
        self, sender: Sender, flow: Awaitable[None], replying: Callable[[], bool],
        handed_over: Callable[[], None],
    ) -> None:
        """Run `flow`, the conversation's handling of this message. While this process stops, a
        message not yet admitted (Stopping), or cancelled at the end of the grace before any of its
        reply went out (`replying()` false), is handed over: its claims released, `handed_over()`
        told, for the platform to deliver it again to the next process. A reply begun is never
        handed over: half a reply, then a whole one, is worse than half."""
        handed = False
        try:
            await flow
        except Stopping:
            handed = True
            handed_over()
            log.info("gate: %s chat=%s msg=%s left to the next process", sender.platform,
                     sender.chat_id, sender.message_id)
        except asyncio.CancelledError:
            if not replying():
                handed = True
                handed_over()
                await self.release(sender)
                log.info("gate: %s chat=%s msg=%s handed over at the end of the grace",
                         sender.platform, sender.chat_id, sender.message_id)
            raise
        finally:
            if not handed:  # answered, or failed trying: either way no one else should wait on it
                await self.settle(sender)

    async def close(self) -> None:
        await self.state.close()


def open_gate(persona: Persona, rules: Rules | None = None, redis: Any | None = None) -> Gate:
    """The persona's gate, its state in Redis when given the process's client (shared by every
    process serving this persona), else in this process. Raises GateSettingsError for a bad
    [serve] table."""
    rules = rules or Rules.from_persona(persona)
    return Gate(rules, persona.id, RedisState(redis) if redis is not None else LocalState())
