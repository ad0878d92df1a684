"""The engine end to end with a real (tiny) model, the real generation queue and real memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bot.engine import BUSY_REPLY, Engine, Incoming
from bot.generation import GenerationSettings, LocalBackend
from bot.memory import ChannelKey, EmbeddedMemory, Turn
from tests.platform_helpers import FixedBackend, free_port
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
    env = chat_env(tmp_path)
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


def chat_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a `clone` process: memory in the test's folder, no Redis unless `extra`
    names one."""
    env = {**os.environ, "CLONE_MEMORY_FILE": str(tmp_path / "memory.json")}
    env.pop("REDIS_URL", None)
    return {**env, **extra}


@contextlib.contextmanager
def served_model(tiny_base, persona: Path, tmp_path: Path, *flags: str) -> Iterator[str]:
    """`clone [flags] serve-model` on a free port, its stderr in tmp_path/serve-model.err; yields
    its /v1 url once it answers."""
    import urllib.request

    port = free_port()
    with (tmp_path / "serve-model.err").open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", *flags, "serve-model", "--port", str(port), "--base",
             str(tiny_base), "--persona", str(persona)],
            cwd=REPO, env=chat_env(tmp_path), stdout=subprocess.DEVNULL, stderr=err,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                assert server.poll() is None, "serve-model exited"
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "serve-model never answered"
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            server.wait(timeout=20)


def test_chat_through_a_served_model_over_http_never_loads_torch(tiny_base, tmp_path):
    persona = sample_copy(tmp_path)
    with served_model(tiny_base, persona, tmp_path) as url:
        # -X importtime lists every module the chat process imports, on stderr.
        chat = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "cli", "chat", "--persona", str(persona)],
            input="hi over http\n", capture_output=True, text=True, cwd=REPO, timeout=120,
            env=chat_env(tmp_path, LLM_BASE_URL=url, CLONE_RECALL="0"),
        )
    assert chat.returncode == 0, chat.stderr
    assert f"(server {url})" in chat.stdout
    assert "hi over http" in (tmp_path / "memory.json").read_text()
    imported = {line.rsplit("|", 1)[-1].strip() for line in chat.stderr.splitlines() if "|" in line}
    assert "bot.openai_backend" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}


def test_the_engine_still_answers_while_redis_is_unreachable(tiny_base, tokenizer, tmp_path, caplog):
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


# A `clone chat` that reports its own peak memory (kB) on its last stderr line. VmHWM, not
# ru_maxrss: Linux carries the parent's (pytest's) peak into a child's ru_maxrss across exec.
MEASURED_CHAT = ("import sys; from cli.main import main; rc = main(sys.argv[1:]); "
                 "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
                 "print(f'maxrss_kb={hwm}', file=sys.stderr); sys.exit(rc)")


def huge_message(chars: int = 1_000_000) -> str:
    """Ordinary words (about 4 characters a token) between two markers: the start and the end."""
    words = " ".join(("the plan is simple we meet at noon and talk about everything else " * 20000).split())
    return "FIRST-WORDS " + words[: chars - 23] + " LAST-WORDS"


def test_a_million_character_message_gets_a_reply_in_bounded_time_and_memory(tiny_base, tmp_path):
    env = chat_env(tmp_path)
    text = huge_message()
    assert len(text) == 1_000_000
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED_CHAT, "chat", "--persona", str(sample_copy(tmp_path)), "--base",
         str(tiny_base)], input=f"{text}\nand a short one\n", capture_output=True, text=True, env=env,
        cwd=REPO, timeout=180)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stderr.rsplit("maxrss_kb=", 1)[1]) / 1024
    # A short chat takes 10-20 s and 450 MB here; before the cut this ran for minutes, in gigabytes.
    assert took < 90 and peak_mb < 800, (took, peak_mb)
    turns = json.loads((tmp_path / "memory.json").read_text())["channels"]
    [channel] = turns.values()
    said = [t["x"] for t in channel["turns"] if not t["p"]]
    assert said[-1] == "and a short one"  # the chat went on
    # What was kept of the long one is its end, cut to what a prompt could hold.
    assert said[0].startswith("…") and said[0].endswith("LAST-WORDS") and "FIRST-WORDS" not in said[0]
    assert len(said[0]) <= 512 * 8


def test_a_message_over_the_prompt_budget_alone_keeps_its_end_within_the_budget(tokenizer, count_tokens):
    engine = Engine(PERSONA, FixedBackend(), EmbeddedMemory(None), count_tokens, prompt_tokens=200)
    history = [Turn("u1", "Ana", "an earlier message", False, 1.0)]
    messages = engine.prompt(history, Incoming("terminal", "c1", "u1", "Ana", huge_message(20_000)))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[-1]["content"].startswith("…") and messages[-1]["content"].endswith("LAST-WORDS")
    size = sum(count_tokens(m["content"]) + 6 for m in messages)
    assert 150 < size <= 200  # cut to the budget, not far below it


def test_a_persona_toml_that_is_a_folder_is_one_line_and_exit_2(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "persona.toml").mkdir()
    assert main(["chat", "--persona", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    where = tmp_path / "persona.toml"
    assert err.splitlines() == [f"clone chat: error: {where}: is a folder, not a settings file"]
    assert out == ""
