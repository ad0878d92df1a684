"""The real model server (aiohttp, a real port) driven by OpenAIBackend over real HTTP."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from bot.engine import Busy, Engine, Generated, Incoming
from bot.generation import GenerationSettings, LocalBackend
from bot.memory import ChannelKey, EmbeddedMemory
from bot.openai_backend import OpenAIBackend, backend_from_env
from bot.serve_model import PROMPT_TOKENS, ServingBackend, fit, make_app
from training.base_model import load_model, resolve_base, token_counter
from training.persona import Persona
from training.prompt import turn_text

HELLO = [{"role": "system", "content": "You are Sam."}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    return load_model(resolve_base(str(tiny_base)))


def local(model, tokenizer, **settings) -> ServingBackend:
    return ServingBackend(model, tokenizer, GenerationSettings(max_new_tokens=6, **settings))


@asynccontextmanager
async def server(backend: LocalBackend, name: str = "clone"):
    """The app on a free port of 127.0.0.1; yields its base url (ending in /v1)."""
    runner = web.AppRunner(make_app(backend, name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
        await backend.close()


def test_a_reply_comes_back_as_text_without_template_markers(tiny_model, tokenizer):
    raw: list[str] = []
    backend = local(tiny_model, tokenizer)
    real = backend.generate_batch

    def spy(conversations):
        raw.extend(texts := real(conversations))
        return texts

    backend.generate_batch = spy

    async def scenario():
        async with server(backend) as url:
            client = OpenAIBackend(url, "clone", max_tokens=6)
            reply = await client.generate(HELLO)
            async with httpx.AsyncClient() as http:
                full = (await http.post(f"{url}/chat/completions", json={"messages": HELLO})).json()
            await client.close()
            return reply, full

    reply, full = asyncio.run(scenario())
    assert isinstance(reply, Generated) and "<|" not in reply.text
    assert reply.text == turn_text(raw[0].text)
    assert full["object"] == "chat.completion" and full["model"] == "clone"
    assert full["id"].startswith("chatcmpl-") and abs(full["created"] - time.time()) < 60
    choice = full["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == ("length" if raw[1].truncated else "stop")
    assert choice["message"] == {"role": "assistant", "content": turn_text(raw[1].text)}
    usage = full["usage"]
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_requests_all_get_answers_in_batches(tiny_model, tokenizer):
    backend = local(tiny_model, tokenizer, max_batch=8, max_queue=16)
    sizes: list[int] = []
    real = backend.generate_batch

    def spy(conversations):
        sizes.append(len(conversations))
        time.sleep(0.05)  # long enough for the other requests to queue up behind the first
        return real(conversations)

    backend.generate_batch = spy

    async def scenario():
        async with server(backend) as url:
            client = OpenAIBackend(url, "clone", max_tokens=6)
            convs = [[{"role": "user", "content": f"hi number {i}"}] for i in range(6)]
            out = await asyncio.gather(*(client.generate(c) for c in convs))
            await client.close()
            return out

    replies = asyncio.run(scenario())
    assert len(replies) == 6 and all(isinstance(r, Generated) and "<|" not in r.text for r in replies)
    assert sum(sizes) == 6 and max(sizes) > 1


@pytest.mark.parametrize("body, why", [
    ({"model": "clone"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": ["hello"]}, "messages[0] must be an object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": 5}]},
     "messages[1].content must be a string"),
    ({"messages": [{"role": "user"}]}, "messages[0].content must be a string"),
    ([1, 2], "the body must be a JSON object"),
    (None, "the body is not valid JSON"),
])
def test_a_bad_body_gets_400_with_a_json_error(tiny_model, tokenizer, body, why):
    backend = local(tiny_model, tokenizer)
    calls: list[int] = []
    backend.generate_batch = lambda conversations: calls.append(1) or [Generated("")] * len(conversations)

    async def scenario():
        async with server(backend) as url, httpx.AsyncClient() as http:
            if body is None:
                return await http.post(f"{url}/chat/completions", content=b"{not json")
            return await http.post(f"{url}/chat/completions", json=body)

    response = asyncio.run(scenario())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith(why) and error["type"] == "invalid_request_error"
    assert calls == []  # nothing reached the model


def test_the_client_names_the_status_but_never_the_message_text(tiny_model, tokenizer):
    backend = local(tiny_model, tokenizer)

    async def scenario():
        async with server(backend) as url:
            client = OpenAIBackend(url, "clone", max_tokens=6)
            try:
                await client.generate([{"role": "tool", "content": "my secret plans"}])
            finally:
                await client.close()

    with pytest.raises(RuntimeError) as caught:
        asyncio.run(scenario())
    assert "HTTP 400" in str(caught.value) and "secret" not in str(caught.value)


def test_a_failed_generation_is_a_500_and_a_runtime_error(tiny_model, tokenizer):
    backend = local(tiny_model, tokenizer)

    def broken(conversations):
        raise ValueError("boom")

    backend.generate_batch = broken

    async def scenario():
        async with server(backend) as url:
            client = OpenAIBackend(url, "clone", max_tokens=6)
            try:
                await client.generate(HELLO)
            finally:
                await client.close()

    with pytest.raises(RuntimeError, match="HTTP 500"):
        asyncio.run(scenario())


def test_a_full_queue_is_429_and_the_client_raises_busy(tiny_model, tokenizer):
    backend = local(tiny_model, tokenizer, max_queue=1, max_batch=1)
    real = backend.generate_batch

    def slow(conversations):
        time.sleep(0.3)  # holds the only slot while the others arrive
        return real(conversations)

    backend.generate_batch = slow

    async def scenario():
        async with server(backend) as url:
            client = OpenAIBackend(url, "clone", max_tokens=6)
            results = await asyncio.gather(*(client.generate(HELLO) for _ in range(6)),
                                           return_exceptions=True)
            async with httpx.AsyncClient() as http:  # the status itself, once the queue is full
                slot = asyncio.create_task(client.generate(HELLO))
                await asyncio.sleep(0.1)
                queued = asyncio.create_task(client.generate(HELLO))
                await asyncio.sleep(0.1)
                raw = await http.post(f"{url}/chat/completions", json={"messages": HELLO})
                await asyncio.gather(slot, queued, return_exceptions=True)
            await client.close()
            return results, raw

    results, raw = asyncio.run(scenario())
    answers = [r for r in results if isinstance(r, Generated)]
    busy = [r for r in results if isinstance(r, Busy)]
    assert len(answers) + len(busy) == 6  # nothing else went wrong
    assert 1 <= len(answers) <= 2 and len(busy) >= 4  # one generating, at most one waiting
    assert raw.status_code == 429 and raw.json()["error"]["type"] == "rate_limit_error"


def test_models_and_health(tiny_model, tokenizer):
    backend = local(tiny_model, tokenizer)

    async def scenario():
        async with server(backend, name="sam-v3") as url, httpx.AsyncClient() as http:
            listed = (await http.get(f"{url}/models")).json()
            health = await http.get(url.removesuffix("/v1") + "/health")
            return listed, health

    listed, health = asyncio.run(scenario())
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["sam-v3"]
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_the_engine_works_end_to_end_over_http(tiny_model, tokenizer, tmp_path):
    backend = local(tiny_model, tokenizer)
    memory = EmbeddedMemory(tmp_path / "m.json")

    async def scenario():
        async with server(backend) as url:
            client = OpenAIBackend(url, "clone", max_tokens=6)
            engine = Engine(Persona(name="Sam"), client, memory, token_counter(tokenizer))
            replies = await engine.handle(Incoming("terminal", "c1", "u1", "Ana", "hello there"))
            turns, _ = await memory.recall(ChannelKey("sam", "terminal", "c1"))
            await client.close()
            return replies, turns

    replies, turns = asyncio.run(scenario())
    assert all(isinstance(r, str) and r and "<|" not in r for r in replies)
    assert turns[0].text == "hello there" and not turns[0].from_persona
    assert len(turns) == 1 + bool(replies)
    assert (tmp_path / "m.json").exists()


def test_an_unreachable_server_is_a_clear_runtime_error():
    async def scenario():
        client = OpenAIBackend("http://127.0.0.1:9/v1", "clone", timeout_s=2)
        try:
            await client.generate(HELLO)
        finally:
            await client.close()

    with pytest.raises(RuntimeError, match="unreachable"):
        asyncio.run(scenario())


def test_backend_from_env():
    assert backend_from_env({}) is None
    backend = backend_from_env({"LLM_BASE_URL": "http://gpu:8000/v1/", "LLM_API_KEY": "k"},
                               max_tokens=32)
    assert isinstance(backend, OpenAIBackend)
    assert (backend.base_url, backend.model, backend.api_key, backend.max_tokens) == (
        "http://gpu:8000/v1", "clone", "k", 32)
    named = backend_from_env({"LLM_BASE_URL": "http://x/v1", "LLM_MODEL": "sam"})
    assert named is not None and named.model == "sam" and named.api_key is None


def test_a_megabyte_body_is_cut_to_the_prompt_budget_before_it_is_encoded(tiny_model, tokenizer):
    """The 1 MB a body may hold, as one message or as hundreds of long ones: answered in seconds,
    from a prompt of at most PROMPT_TOKENS (plus the generation prompt), the system prompt kept."""
    backend = local(tiny_model, tokenizer)
    prompts: list[list[dict[str, str]]] = []
    real = backend.generate_batch
    backend.generate_batch = lambda conversations: prompts.extend(conversations) or real(conversations)
    words = " ".join(("we meet at noon and talk about everything " * 25000).split())
    one = [HELLO[0], {"role": "user", "content": "FIRST " + words[:999_000] + " LAST"}]
    many = [HELLO[0]] + [{"role": ("user", "assistant")[i % 2], "content": f"{i} {words[:900]}"}
                         for i in range(1000)]

    async def scenario():
        async with server(backend) as url, httpx.AsyncClient(timeout=120) as http:
            out = []
            for messages in (one, many):
                started = time.monotonic()
                response = await http.post(f"{url}/chat/completions", json={"messages": messages})
                out.append((response, time.monotonic() - started))
            return out

    for response, took in asyncio.run(scenario()):
        assert response.status_code == 200 and took < 30
        assert 1500 < response.json()["usage"]["prompt_tokens"] <= PROMPT_TOKENS + 10
    cut_one, cut_many = prompts
    assert cut_one[0] == HELLO[0] and cut_many[0] == HELLO[0]
    assert cut_one[1]["content"].startswith("…") and cut_one[1]["content"].endswith(" LAST")
    assert cut_many[-1]["content"].startswith("999 ")  # the latest messages are the ones kept
    assert 5 < len(cut_many) < 20


def test_fit_keeps_a_conversation_that_fits_as_it_is(count_tokens):
    conversation = [HELLO[0], *({"role": r, "content": f"message {i}"}
                                for i, r in enumerate(["user", "assistant", "user"]))]
    assert fit(conversation, count_tokens, 100) == conversation
    assert fit(conversation, count_tokens, 20) == [HELLO[0], conversation[-1]]
    alone = [{"role": "user", "content": "hello"}]
    assert fit(alone, count_tokens, 100) == alone
