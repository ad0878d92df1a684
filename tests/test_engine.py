"""The engine end to end with a real (tiny) model, the real generation queue and real memory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from bot.engine import BUSY_REPLY, Engine, Incoming
from bot.generation import GenerationSettings, LocalBackend
from bot.memory import ChannelKey, EmbeddedMemory
from tests.platform_helpers import free_port
from training.base_model import load_model, resolve_base, token_counter
from training.persona import Persona

REPO = Path(__file__).resolve().parent.parent
PERSONA = Persona(name="Sam", description="Texts in short bursts.")


def make_engine(tiny_base, tokenizer, tmp_path, **settings) -> tuple[Engine, LocalBackend, EmbeddedMemory]:
    backend = LocalBackend(load_model(resolve_base(str(tiny_base))), tokenizer,
                           GenerationSettings(**{"max_new_tokens": 6, **settings}))
    memory = EmbeddedMemory(tmp_path / "memory.json")
    return Engine(PERSONA, backend, memory, token_counter(tokenizer)), backend, memory


def test_answers_and_remembers_the_exchange(tiny_base, tokenizer, tmp_path):
    engine, backend, memory = make_engine(tiny_base, tokenizer, tmp_path)

    async def scenario():
        replies = await engine.handle(Incoming("terminal", "c1", "u1", "Ana", "hello there"))
        turns, _ = await memory.recall(ChannelKey("sam", "terminal", "c1"))
        await backend.close()
        return replies, turns

    replies, turns = asyncio.run(scenario())
    assert all(isinstance(r, str) and r and "<|" not in r for r in replies)
    assert turns[0].text == "hello there" and not turns[0].from_persona
    assert len(turns) == 1 + bool(replies)
    if replies:
        assert turns[1].from_persona and turns[1].text == "\n".join(replies)


def test_concurrent_channels_are_batched_and_a_full_queue_says_busy(tiny_base, tokenizer, tmp_path):
    engine, backend, _ = make_engine(tiny_base, tokenizer, tmp_path, max_batch=8, max_queue=6)
    sizes: list[int] = []
    real = backend.generate_batch

    def spy(conversations):
        sizes.append(len(conversations))
        return real(conversations)

    backend.generate_batch = spy

    async def scenario():
        msgs = [Incoming("discord", f"ch{i}", f"u{i}", f"user{i}", f"hi number {i}") for i in range(10)]
        out = await asyncio.gather(*(engine.handle(m) for m in msgs))
        await backend.close()
        return out

    results = asyncio.run(scenario())
    assert results.count([BUSY_REPLY]) == 4  # ten at once, room for six in the queue
    assert max(sizes) > 1 and sum(sizes) == 6


def test_a_reply_generated_across_a_reset_is_not_remembered(tiny_base, tokenizer, tmp_path):
    engine, backend, memory = make_engine(tiny_base, tokenizer, tmp_path)
    gate = asyncio.Event()
    real = backend.generate

    async def held(messages):  # the real model, held back until the test has reset the channel
        await gate.wait()
        return await real(messages)

    backend.generate = held

    async def scenario():
        key = ChannelKey("sam", "telegram", "42")
        task = asyncio.create_task(engine.handle(Incoming("telegram", "42", "u1", "Ana", "secret plan")))
        await asyncio.sleep(0.05)
        await engine.reset("telegram", "42")
        gate.set()
        await task
        turns, _ = await memory.recall(key)
        await backend.close()
        return turns

    assert asyncio.run(scenario()) == []


def sample_copy(tmp_path) -> Path:
    """The sample persona's settings in a folder of the test's own (no adapter, no memory)."""
    folder = tmp_path / "sample"
    folder.mkdir()
    (folder / "persona.toml").write_bytes((REPO / "persona_data" / "sample" / "persona.toml").read_bytes())
    return folder


def test_terminal_chat_with_piped_input_remembers_across_restarts(tiny_base, tmp_path):
    env = {**os.environ, "CLONE_MEMORY_FILE": str(tmp_path / "memory.json")}
    env.pop("REDIS_URL", None)
    cmd = [sys.executable, "-m", "cli", "chat", "--persona", str(sample_copy(tmp_path)),
           "--base", str(tiny_base)]
    first = subprocess.run(cmd, input="hello clone\n/quit\n", capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "Chatting with Sam Rivera (base model" in first.stdout
    assert "answering with the base model" in first.stderr  # the warning when there is no adapter
    # Only the chat's own lines: no INFO log lines between them (they go to stderr, and only WARNING up).
    assert "INFO" not in first.stderr and "bot.engine" not in first.stderr + first.stdout
    lines = first.stdout.splitlines()
    assert lines[0].startswith("Persona Sam Rivera [sample]") and lines[1].startswith("Chatting with")
    assert all(line.startswith("Sam Rivera: ") for line in lines[2:])
    stored = json.loads((tmp_path / "memory.json").read_text())
    assert "hello clone" in json.dumps(stored)
    second = subprocess.run(cmd, input="/forget\n/reset\n", capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert second.returncode == 0
    assert "(deleted 1 of your messages from memory)" in second.stdout
    assert "(conversation forgotten)" in second.stdout
    assert "hello clone" not in (tmp_path / "memory.json").read_text()


def test_chat_through_a_served_model_over_http_never_loads_torch(tiny_base, tmp_path):
    import time
    import urllib.request

    port = free_port()
    persona = sample_copy(tmp_path)
    env = {**os.environ, "CLONE_MEMORY_FILE": str(tmp_path / "memory.json")}
    env.pop("REDIS_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve-model", "--port", str(port), "--base", str(tiny_base),
         "--persona", str(persona)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "serve-model exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "serve-model never answered"
                time.sleep(0.2)
        # -X importtime lists every module the chat process imports, on stderr.
        chat = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "cli", "chat", "--persona", str(persona)],
            input="hi over http\n", capture_output=True, text=True, cwd=REPO, timeout=120,
            env={**env, "LLM_BASE_URL": f"http://127.0.0.1:{port}/v1"},
        )
        assert chat.returncode == 0, chat.stderr
        assert f"(server http://127.0.0.1:{port}/v1)" in chat.stdout
        assert "hi over http" in (tmp_path / "memory.json").read_text()
        imported = {line.rsplit("|", 1)[-1].strip() for line in chat.stderr.splitlines() if "|" in line}
        assert "bot.openai_backend" in imported
        assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_engine_still_answers_while_redis_is_unreachable(tiny_base, tokenizer, tmp_path, caplog):
    import time

    from bot.memory import RedisMemory

    port = free_port()  # nothing listens on it
    backend = LocalBackend(load_model(resolve_base(str(tiny_base))), tokenizer,
                           GenerationSettings(max_new_tokens=4))
    memory = RedisMemory(f"redis://127.0.0.1:{port}/0")
    engine = Engine(PERSONA, backend, memory, token_counter(tokenizer))

    async def scenario():
        took = []
        for i in range(3):
            start = time.monotonic()
            replies = await engine.handle(Incoming("telegram", "7", "u1", "Ana", f"message {i}"))
            took.append(time.monotonic() - start)
            assert isinstance(replies, list)
        await backend.close()
        await memory.close()
        return took

    with caplog.at_level("WARNING"):
        took = asyncio.run(scenario())
    assert max(took) < 5
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "Redis" in r.getMessage()]
    assert len(warnings) == 1


def test_a_reply_cut_by_the_token_cap_is_trimmed_before_it_is_sent(tiny_base, tokenizer, tmp_path):
    """The random tiny model never ends its turn within 5 tokens: every reply is cut by the cap,
    the backend says so, and the engine sends it without the unfinished end."""
    from bot.postprocess import to_messages

    engine, backend, _ = make_engine(tiny_base, tokenizer, tmp_path, max_new_tokens=5, temperature=0)
    raw = []
    real = backend.generate_batch
    backend.generate_batch = lambda conversations: raw.extend(out := real(conversations)) or out

    async def scenario():
        replies = await engine.handle(Incoming("terminal", "c1", "u1", "Ana", "tell me a story"))
        await backend.close()
        return replies

    replies = asyncio.run(scenario())
    [generated] = raw
    assert generated.truncated
    assert replies == to_messages(generated.text, truncated=True)
    assert replies != to_messages(generated.text)  # what would have been sent before: cut off
