"""What the user sees when a part is down: Redis stopped mid-chat (a real redis-server of the test's
own), the generation server unreachable, the memory file's disk full (a real tmpfs, full).

The terminal chat runs as a real `clone chat` process; where the model is not what is tested it
talks to a small OpenAI-compatible server that always answers "sure thing" (`fixed_llm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from bot.conversation import FORGET_FAILED, RESET_FAILED, Conversation
from bot.engine import UNAVAILABLE_REPLY, Engine, Incoming
from bot.gate import Gate
from bot.memory import ChannelKey, EmbeddedMemory, RedisMemory
from bot.openai_backend import OpenAIBackend
from bot.telegram import TELEGRAM
from tests.platform_helpers import FixedBackend, free_port, quiet
from tests.test_conversation import KeptChat, inbound
from tests.test_engine import chat_env, sample_copy
from tests.test_memory import start_redis
from training.persona import Persona

REPO = Path(__file__).resolve().parent.parent
PERSONA = Persona(name="Sam", description="Texts in short bursts.")
PLANTED = "PLANTED-4f1c-outage-text"


class _FixedCompletion(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "sure thing"},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def fixed_llm() -> Iterator[str]:
    """An OpenAI-compatible server on a free port that always answers "sure thing"; its /v1 url."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FixedCompletion)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def chat_command(persona: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "chat", "--persona", str(persona)]


class OwnRedis:
    """A redis-server on a free port that keeps its data in `folder`: stopped, it is down for
    everyone; started again, it has every key it had."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = start_redis(self.port, folder)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def start(self) -> None:
        self.proc = start_redis(self.port, self.folder)


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    yield server
    server.stop()


# --- /reset and /forget while Redis is down --------------------------------------------------------


def test_reset_and_forget_in_a_redis_outage_say_they_failed_and_work_once_it_is_back(own_redis,
                                                                                     count_tokens):
    chat = KeptChat()

    async def scenario() -> list[str]:
        memory = RedisMemory(own_redis.url)
        engine = Engine(PERSONA, FixedBackend("sure"), memory, count_tokens)
        flow = Conversation(engine, TELEGRAM, Gate(quiet(), PERSONA.id))
        key = ChannelKey(PERSONA.id, "telegram", "11")
        await flow.handle(inbound("remember this"), chat)
        own_redis.stop()
        await flow.handle(inbound("/reset"), chat)
        await flow.handle(inbound("/forget"), chat)
        own_redis.start()
        kept = [t.text for t in (await memory.recall(key))[0]]  # nothing was deleted, as told
        await flow.handle(inbound("/reset"), chat)
        await flow.handle(inbound("/forget"), chat)
        assert (await memory.recall(key))[0] == []
        await memory.close()
        return kept

    assert asyncio.run(scenario()) == ["remember this", "sure"]
    assert chat.texts() == [
        "sure", RESET_FAILED.format(chat="chat"), FORGET_FAILED,
        "Okay, fresh start: I've forgotten this chat.", "Done: removed 0 of your messages from my memory.",
    ]
    assert RESET_FAILED.format(chat="chat") == (
        "I couldn't forget this chat right now (memory unavailable); try again in a minute.")


def test_a_stalled_redis_makes_a_reset_fail_quickly(own_redis, count_tokens):
    """SIGSTOP: the server is alive but answers nothing; the reset fails after one short timeout."""
    chat = KeptChat()

    async def scenario() -> float:
        memory = RedisMemory(own_redis.url)
        flow = Conversation(Engine(PERSONA, FixedBackend(), memory, count_tokens), TELEGRAM,
                            Gate(quiet(), PERSONA.id))
        await memory.recall(ChannelKey(PERSONA.id, "telegram", "11"))  # a pooled connection
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            await flow.handle(inbound("/reset"), chat)
            return time.monotonic() - started
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
            await memory.close()

    assert asyncio.run(scenario()) < 3
    assert chat.texts() == [RESET_FAILED.format(chat="chat")]


def _read_until(proc: subprocess.Popen, prefix: str) -> str:
    """The next stdout line of the chat that starts with `prefix` (others are skipped)."""
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith(prefix):
            return line.rstrip("\n")
    raise AssertionError(f"the chat ended before a line starting {prefix!r}: {proc.stderr.read()}")


def test_the_terminal_chat_says_a_reset_failed_while_redis_is_down(own_redis, tmp_path):
    with fixed_llm() as llm:
        env = chat_env(tmp_path, REDIS_URL=own_redis.url, LLM_BASE_URL=llm)
        chat = subprocess.Popen(chat_command(sample_copy(tmp_path)), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=REPO)
        try:
            def say(line: str) -> None:
                chat.stdin.write(line + "\n")
                chat.stdin.flush()

            say("remember this")
            assert _read_until(chat, "Sam Rivera: ") == "Sam Rivera: sure thing"
            own_redis.stop()
            say("/reset")
            failed_reset = _read_until(chat, "(")
            say("/forget")
            failed_forget = _read_until(chat, "(")
            own_redis.start()
            stored = redis.Redis(port=own_redis.port).lrange("clone:sample:terminal:local:turns", 0, -1)
            say("/reset")
            reset = _read_until(chat, "(")
            say("/quit")
            _, err = chat.communicate(timeout=30)
        finally:
            chat.kill()
    assert failed_reset == ("(I couldn't forget this conversation right now: memory unavailable; "
                            "try again in a minute)")
    assert failed_forget == ("(I couldn't delete your messages right now: memory unavailable; "
                             "try again in a minute)")
    assert len(stored) == 2  # the failed reset deleted nothing, and said so
    assert reset == "(conversation forgotten)"
    assert chat.returncode == 0 and "Traceback" not in err


# --- the generation server unreachable ---------------------------------------------------------------


def test_an_unreachable_llm_server_gets_an_apology_and_one_warning_per_message(tmp_path, count_tokens,
                                                                                caplog):
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "clone", timeout_s=2)
    engine = Engine(PERSONA, backend, EmbeddedMemory(None), count_tokens)

    async def scenario():
        out = [await engine.handle(Incoming("telegram", "7", "u1", "Ana", f"{PLANTED} {i}"))
               for i in range(2)]
        await backend.close()
        return out

    caplog.set_level(logging.DEBUG)
    assert asyncio.run(scenario()) == [[UNAVAILABLE_REPLY], [UNAVAILABLE_REPLY]]
    failed = [r for r in caplog.records if r.name == "bot.engine" and r.levelno == logging.WARNING]
    assert len(failed) == 2 and "unreachable (ConnectError)" in failed[0].getMessage()
    assert PLANTED not in caplog.text


def test_the_terminal_chat_keeps_running_when_the_llm_server_is_unreachable(tmp_path):
    env = chat_env(tmp_path, LLM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    done = subprocess.run(chat_command(sample_copy(tmp_path)), input=f"{PLANTED}\nstill there?\n",
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == [f"Sam Rivera: {UNAVAILABLE_REPLY}"] * 2
    assert "Traceback" not in done.stderr and PLANTED not in done.stderr
    assert done.stderr.count("generation failed") == 2


# --- the memory file's disk full ---------------------------------------------------------------------


def test_a_full_disk_never_costs_a_reply(tmp_path):
    """The chat runs in a mount namespace of its own, its memory file on a 64 KiB tmpfs filled to
    the last byte: every write of the memory file fails with ENOSPC (No space left on device).
    It needs util-linux's `unshare` and user namespaces (both on every machine this runs on):
    without them the test fails, it is never skipped."""
    assert shutil.which("unshare"), "util-linux's unshare is needed to give the chat a full disk"
    full = tmp_path / "full"
    full.mkdir()
    persona = sample_copy(tmp_path)
    script = (f"mount -t tmpfs -o size=64k none {full} && "
              f"(dd if=/dev/zero of={full}/filler bs=1k 2>/dev/null; true) && exec \"$@\"")
    with fixed_llm() as llm:
        env = chat_env(tmp_path, LLM_BASE_URL=llm, CLONE_MEMORY_FILE=str(full / "memory.json"))
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
             *chat_command(persona)],
            input="hello\nand again\n/reset\n", capture_output=True, text=True, env=env, cwd=REPO,
            timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == [
        "Sam Rivera: sure thing", "Sam Rivera: sure thing",
        "(I couldn't forget this conversation right now: memory unavailable; try again in a minute)"]
    warnings = [line for line in done.stderr.splitlines() if "cannot be written" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr
