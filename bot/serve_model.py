"""`clone serve-model`: the clone (a LocalBackend) behind OpenAI's chat-completions API.

Bots on other machines reach it with OpenAIBackend (or any OpenAI client). Concurrent requests
are batched by LocalBackend's queue; a full queue answers 429, which OpenAIBackend turns back
into `Busy`. Sampling settings are the server's own (GenerationSettings): a request's
max_tokens/temperature are accepted and ignored, so all requests can share one batch.

A request's conversation is cut to PROMPT_TOKENS before it is encoded (each text by characters
first, its end kept; then the oldest turns after the system prompt go), so that the 1 MB a body
may hold costs what a full prompt costs, not minutes of attention.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from bot.engine import Busy
from bot.generation import LocalBackend
from training.base_model import token_counter
from training.encode import encode
from training.prompt import (
    CHARS_PER_TOKEN,
    TURN_OVERHEAD,
    keep_end,
    keep_end_within,
    prompt_tokens,
    turn_text,
    turn_tokens,
)

log = logging.getLogger(__name__)
ROLES = {"system", "user", "assistant"}
PROMPT_TOKENS = 2048  # four times a bot's own prompt budget: room for clients that keep more
_BACKEND = web.AppKey("backend", LocalBackend)
_MODEL = web.AppKey("model_name", str)


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                             status=status)


def _bad_request(message: str) -> web.Response:
    return _error(400, message, "invalid_request_error")


def _validate(body: Any) -> list[dict[str, str]] | str:
    """The messages, or why the body is refused (never quoting message text)."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if body.get("stream"):
        return "streaming is not supported"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role must be one of {sorted(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def fit(messages: list[dict[str, str]], count_tokens: Callable[[str], int],
        budget: int = PROMPT_TOKENS) -> list[dict[str, str]]:
    """The system prompt (when first) and the latest messages that fit `budget` tokens, counted
    from the newest back so a long conversation is never tokenized whole; the newest alone over
    the budget keeps its end. Each text is cut by characters first (see keep_end)."""
    messages = [{**m, "content": keep_end(m["content"], budget * CHARS_PER_TOKEN)} for m in messages]
    head = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
    used = prompt_tokens(head, count_tokens)
    kept: list[dict[str, str]] = []
    for m in reversed(messages[len(head):]):
        size = turn_tokens(m["content"], count_tokens)
        if used + size > budget:
            if not kept:
                room = budget - used - TURN_OVERHEAD
                kept.append({**m, "content": keep_end_within(m["content"], count_tokens, room)})
            break
        kept.append(m)
        used += size
    return head + kept[::-1]


async def chat_completions(request: web.Request) -> web.Response:
    backend, model_name = request.app[_BACKEND], request.app[_MODEL]
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("the body is not valid JSON")
    messages = _validate(body)
    if isinstance(messages, str):
        return _bad_request(messages)
    messages = fit(messages, token_counter(backend.tokenizer))
    try:
        raw = await backend.generate(messages)
    except Busy:
        return _error(429, "the model is busy; try again shortly", "rate_limit_error")
    except Exception as e:  # LocalBackend logged the batch; the class only: its text could quote a prompt
        log.warning("A chat completion failed (%s)", type(e).__name__)
        return _error(500, "generation failed", "server_error")
    content = turn_text(raw.text)
    finish = "length" if raw.truncated else "stop"
    tokenizer = backend.tokenizer
    prompt_tokens = len(encode(messages, tokenizer, add_generation_prompt=True).input_ids)
    completion_tokens = len(tokenizer(content, add_special_tokens=False)["input_ids"])
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


async def models(request: web.Request) -> web.Response:
    name = request.app[_MODEL]
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "clone"}]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app(backend: LocalBackend, model_name: str) -> web.Application:
    app = web.Application()
    app[_BACKEND] = backend
    app[_MODEL] = model_name
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


async def serve(backend: LocalBackend, host: str, port: int, model_name: str) -> None:
    """Serve until cancelled; then stop listening and stop the generation worker."""
    runner = web.AppRunner(make_app(backend, model_name), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("Serving model %r on http://%s:%d/v1", model_name, host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await backend.close()
