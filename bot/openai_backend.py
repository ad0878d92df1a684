"""A generation backend that asks an OpenAI-compatible server (vLLM, llama.cpp's server,
`clone serve-model`) for the clone's next turn, so the model can live on another machine.

It drops in wherever `LocalBackend` does: `await backend.generate(messages) -> Generated`. A
saturated server (HTTP 429 or 503) raises `Busy`, and an unreachable or failing one `Unavailable`
(naming the url and what failed, never message text); the engine answers both politely.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import httpx

from bot.engine import Busy, Generated, Unavailable

log = logging.getLogger(__name__)
_BUSY_STATUSES = {429, 503}


class OpenAIBackend:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60,
        max_tokens: int = 64,
        temperature: float = 0.8,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        # Created on first use: an httpx client belongs to the event loop that first drives it.
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(headers=headers, timeout=self.timeout_s)
        return self._client

    async def generate(self, messages: list[dict[str, str]]) -> Generated:
        """The model's next turn after `messages` (raw text: post-processing is the engine's)."""
        url = f"{self.base_url}/chat/completions"
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        try:
            response = await self._http().post(url, json=body)
        except httpx.TimeoutException:
            raise Unavailable(f"LLM server {url} timed out after {self.timeout_s}s") from None
        except httpx.HTTPError as e:  # the error's text may name the url, never a message
            raise Unavailable(f"LLM server {url} unreachable ({type(e).__name__})") from None
        if response.status_code in _BUSY_STATUSES:
            raise Busy
        if response.status_code != 200:
            # The body may echo the prompt back: name only the status.
            raise Unavailable(f"LLM server {url} answered HTTP {response.status_code}")
        try:
            content, finish = _content(response.json())
        except (ValueError, KeyError, IndexError, TypeError):
            raise Unavailable(f"LLM server {url} sent a reply that is not a chat completion") from None
        log.debug("LLM reply from %s: %d chars, finish_reason=%s", url, len(content), finish)  # no text
        return Generated(content, truncated=finish == "length")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _content(payload: Any) -> tuple[str, str | None]:
    """The reply's text and its finish_reason ("length" when the server's token cap cut it)."""
    choice = payload["choices"][0]
    content = choice["message"]["content"]
    if content is None:  # some servers send null for an empty turn
        content = ""
    if not isinstance(content, str):
        raise TypeError("content is not a string")
    return content, choice.get("finish_reason")


def backend_from_env(environ: Mapping[str, str] | None = None, **settings: Any) -> OpenAIBackend | None:
    """An OpenAIBackend when LLM_BASE_URL is set (LLM_MODEL, LLM_API_KEY optional), else None.

    `settings` go to OpenAIBackend (timeout_s, max_tokens, temperature).
    """
    env = os.environ if environ is None else environ
    base_url = env.get("LLM_BASE_URL")
    if not base_url:
        return None
    return OpenAIBackend(base_url, env.get("LLM_MODEL") or "clone", env.get("LLM_API_KEY") or None,
                         **settings)
