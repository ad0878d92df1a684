"""`clone serve-model` as an OpenAI-compatible server, driven by the official `openai` client: one
real server (aiohttp on a free port of 127.0.0.1, in a thread of its own) for the whole module,
the tiny real model behind it, an API key required."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from aiohttp import web

from bot.generation import GenerationSettings
from bot.serve_model import ServingBackend, cut, make_app, unsettled
from training.base_model import load_model, resolve_base

KEY = "sk-clone-test-5be1c0de"
MODEL = "sam"
HELLO = [{"role": "system", "content": "You are Sam."}, {"role": "user", "content": "hello there"}]


@dataclass
class Served:
    url: str
    backend: ServingBackend


@pytest.fixture(scope="module")
def served(tiny_base, tokenizer) -> Iterator[Served]:
    backend = ServingBackend(load_model(resolve_base(str(tiny_base))), tokenizer,
                             GenerationSettings(max_new_tokens=6, max_batch=4))
    runner = web.AppRunner(make_app(backend, MODEL, KEY), access_log=None)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    async def stop() -> None:
        await runner.cleanup()
        await backend.close()

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield Served(f"http://127.0.0.1:{port}/v1", backend)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def client(served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def ask(client: openai.OpenAI, **params):
    return client.chat.completions.create(model=MODEL, messages=HELLO, **params)


def streamed(client: openai.OpenAI, **params) -> tuple[list[str], list, list]:
    """The content pieces, the choices' chunks and the usage chunks of one streamed answer."""
    pieces, chunks, usage = [], [], []
    for chunk in ask(client, stream=True, **params):
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
        if not chunk.choices:
            usage.append(chunk.usage)
            continue
        chunks.append(chunk)
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, chunks, usage


def test_a_completion_in_openais_shape(client):
    answer = ask(client, max_tokens=5, temperature=0)
    assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
    assert abs(answer.created - time.time()) < 60
    [choice] = answer.choices
    assert choice.index == 0 and choice.message.role == "assistant" and "<|" not in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 5 and 1 <= answer.usage.completion_tokens <= 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streaming_sends_the_same_text_in_pieces_then_the_finish_and_usage(client):
    whole = ask(client, max_tokens=8, temperature=0)
    pieces, chunks, usage = streamed(client, max_tokens=8, temperature=0,
                                     stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1  # sent as the batch produced it, not in one piece at the end
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    assert [u.model_dump() for u in usage] == [whole.usage.model_dump()]


def test_max_tokens_cuts_the_answer_and_says_length(client):
    one = ask(client, max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    two = ask(client, max_completion_tokens=2, temperature=0)
    assert two.choices[0].finish_reason == "length" and two.usage.completion_tokens == 2
    assert two.choices[0].message.content.startswith(one.choices[0].message.content)


def test_n_choices_greedy_alike_and_sampled_apart(client):
    greedy = ask(client, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 8
    hot = ask(client, n=3, max_tokens=6, temperature=1.5, top_p=1)
    assert len({c.message.content for c in hot.choices}) > 1
    _, chunks, _ = streamed(client, n=2, max_tokens=3, temperature=0)
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
             for i in (0, 1)]
    assert texts == [ask(client, max_tokens=3, temperature=0).choices[0].message.content] * 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"] * 2


def test_a_stop_string_ends_the_answer_streamed_or_not(client):
    text = ask(client, max_tokens=8, temperature=0).choices[0].message.content
    stop = text[3:5]
    answer = ask(client, max_tokens=8, temperature=0, stop=[stop, "never said"])
    assert answer.choices[0].message.content == text[: text.find(stop)]
    assert answer.choices[0].finish_reason == "stop"
    pieces, chunks, _ = streamed(client, max_tokens=8, temperature=0, stop=stop)
    assert "".join(pieces) == text[: text.find(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_requests_that_sample_differently_share_one_batch(served, client):
    sizes: list[int] = []
    real = served.backend.generate_batch

    def spy(conversations):
        sizes.append(len(conversations))
        time.sleep(0.2)  # the other requests queue up behind the first batch
        return real(conversations)

    served.backend.generate_batch = spy
    caps = [1, 2, 3, 5]
    try:
        with ThreadPoolExecutor(len(caps)) as pool:
            answers = list(pool.map(lambda cap: ask(client, max_tokens=cap, temperature=cap % 2), caps))
    finally:
        del served.backend.generate_batch
    assert max(sizes) > 1 and sum(sizes) == len(caps)
    assert [a.usage.completion_tokens for a in answers] == caps
    assert all(a.choices[0].finish_reason == "length" for a in answers)


def test_an_unknown_model_is_a_404_model_not_found(served, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.code == "model_not_found"
    raw = httpx.post(f"{served.url}/chat/completions", json={"model": "gpt-4o", "messages": HELLO},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 404
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("params", [
    {"temperature": 2.5}, {"top_p": 1.5}, {"n": 5}, {"n": 0}, {"max_tokens": 0}, {"max_tokens": 10**6},
    {"stop": ["a", "b", "c", "d", "e"]}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"logprobs": True}, {"presence_penalty": 1.0},
])
def test_what_cannot_be_honoured_is_a_400_not_ignored(client, params):
    with pytest.raises(openai.BadRequestError):
        ask(client, **params)


def test_the_api_key_is_required_on_v1_and_never_logged(served, caplog):
    caplog.set_level(logging.DEBUG)
    for key in ("wrong", KEY[:-1], KEY + "x"):
        with openai.OpenAI(base_url=served.url, api_key=key, max_retries=0) as wrong, \
                pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.code == "invalid_api_key"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        missing = httpx.post(f"{served.url}/chat/completions", json={"model": MODEL, "messages": HELLO},
                             headers=headers)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served.url}/nowhere").status_code == 401  # no route listing without the key
    health = httpx.get(served.url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    with openai.OpenAI(base_url=served.url, api_key=KEY, max_retries=0) as right:
        assert ask(right, max_tokens=1).choices[0].finish_reason == "length"
    assert KEY[:12] not in caplog.text


def test_the_command_takes_its_key_from_clone_api_key(tiny_base, tmp_path, monkeypatch):
    from tests.test_engine import sample_copy, served_model

    monkeypatch.setenv("CLONE_API_KEY", KEY)
    with served_model(tiny_base, sample_copy(tmp_path), tmp_path, "-v") as url:
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0) as right:
            answer = right.chat.completions.create(model="clone", messages=HELLO, max_tokens=2, temperature=0)
            assert answer.usage.completion_tokens <= 2
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as wrong, \
                pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    log = (tmp_path / "serve-model.err").read_text()
    assert "an API key is required" in log and KEY[:12] not in log


def test_holding_back_what_could_still_change():
    assert cut("hi there<|im_end|>more", ()) == ("hi there", True)
    assert cut("one, two. three", [".", "two"]) == ("one, ", True)
    assert cut("plain", ["x"]) == ("plain", False)
    assert unsettled("hello <|im_e", ()) == len("<|im_e")
    assert unsettled("a < b > c", ()) == 0 and unsettled("caf\ufffd", ()) == 1
    assert unsettled("say STO", ["STOP"]) == 3 and unsettled("say ST", ["STOP"]) == 2
    assert unsettled("say", ["STOP"]) == 0
