"""Helpers shared by the platform adapter tests."""

from __future__ import annotations

import asyncio
import time


class FixedBackend:
    """Stands in for the model: the thing under test is the adapter, not the generation."""

    def __init__(self, text: str = "hello\nthere") -> None:
        self.text, self.prompts = text, []

    async def generate(self, messages):
        self.prompts.append(messages)
        await asyncio.sleep(0.05)
        return self.text


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)
