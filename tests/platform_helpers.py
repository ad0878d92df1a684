"""Helpers shared by the tests that run the platform adapters, local servers and Redis."""

from __future__ import annotations

import asyncio
import socket
import time

from bot.gate import Rules


class FixedBackend:
    """Stands in for the model: the thing under test is the adapter, not the generation."""

    def __init__(self, text: str = "hello\nthere") -> None:
        self.text, self.prompts = text, []

    async def generate(self, messages):
        self.prompts.append(messages)
        await asyncio.sleep(0.05)
        return self.text


class SlowFirstBackend(FixedBackend):
    """Answers the last message's text back, the first call slowest: replies would overtake each
    other unless the adapter keeps a chat's order."""

    def __init__(self, delays=(0.6, 0.3, 0.0)) -> None:
        super().__init__()
        self.delays = list(delays)

    async def generate(self, messages):
        self.prompts.append(messages)
        await asyncio.sleep(self.delays.pop(0) if self.delays else 0.0)
        return "re: " + messages[-1]["content"].rsplit(":", 1)[-1].strip()


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def drop_redis_keys(persona: str, url: str = "redis://127.0.0.1:6379/0") -> None:
    """Delete what a test wrote to the shared Redis under its (unique) persona name."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"clone:{persona}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def quiet(**rules) -> Rules:
    """Serving rules without the first-contact introduction, for tests that count replies."""
    return Rules(introduce=False, **rules)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for a server to take, or to stay dead)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
