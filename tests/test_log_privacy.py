"""Logs never carry message text, at any level: every surface runs at DEBUG with a planted string in
the user's messages, and the string must be in no log record (its message, its arguments, its
traceback) and nowhere on stderr. Libraries' own loggers count too: they log to the root logger's
handlers like ours do.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bot.engine import Engine, Incoming
from bot.gate import Gate
from bot.generation import GenerationSettings, LocalBackend
from bot.memory import EmbeddedMemory
from bot.openai_backend import OpenAIBackend
from tests.platform_helpers import FixedBackend, quiet, until
from tests.test_engine import chat_env, sample_copy, served_model
from training.base_model import load_model, resolve_base, token_counter
from training.persona import Persona

REPO = Path(__file__).resolve().parent.parent
PERSONA = Persona(name="Sam", description="Texts in short bursts.")
PLANTED = "PLANTED-9d2e-private-words"
SAID = [f"hello {PLANTED}", f"{PLANTED}<|im_end|>", f"and again {PLANTED}"]


def assert_not_logged(records: list[logging.LogRecord], *streams: str) -> None:
    for r in records:
        trace = logging.Formatter().formatException(r.exc_info) if r.exc_info else ""
        for part in (r.getMessage(), repr(r.msg), repr(r.args), trace):
            assert PLANTED not in part, f"{r.name}:{r.lineno} logged message text"
    for stream in streams:
        assert PLANTED not in stream


@pytest.fixture
def everything(caplog) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG, the libraries' included."""
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if logger.level:  # set by an earlier test or a library: back to DEBUG for this one
            caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def tiny_backend(tiny_base, tokenizer) -> LocalBackend:
    return LocalBackend(load_model(resolve_base(str(tiny_base))), tokenizer,
                        GenerationSettings(max_new_tokens=6))


def test_the_engine_with_a_local_model(tiny_base, tokenizer, tmp_path, everything, capfd):
    backend = tiny_backend(tiny_base, tokenizer)
    engine = Engine(PERSONA, backend, EmbeddedMemory(tmp_path / "m.json"), token_counter(tokenizer))

    async def scenario():
        for text in SAID:
            await engine.handle(Incoming("terminal", "c1", "u1", "Ana", text))
        await engine.forget("u1")
        await backend.close()

    asyncio.run(scenario())
    assert any(r.levelno == logging.DEBUG for r in everything.records)
    assert_not_logged(everything.records, everything.text, *capfd.readouterr())


def test_the_terminal_chat_at_debug(tiny_base, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cli", "-v", "chat", "--persona", str(sample_copy(tmp_path)), "--base",
         str(tiny_base)], input="\n".join([*SAID, "/forget", "/reset"]) + "\n", capture_output=True,
        text=True, env=chat_env(tmp_path), cwd=REPO, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "DEBUG" in done.stderr  # it really ran at DEBUG
    assert_not_logged([], done.stderr)


def test_the_openai_backend_against_serve_model(tiny_base, tmp_path, count_tokens, everything, capfd):
    with served_model(tiny_base, sample_copy(tmp_path), tmp_path, "-v") as url:
        backend = OpenAIBackend(url, "clone")
        engine = Engine(PERSONA, backend, EmbeddedMemory(tmp_path / "m.json"), count_tokens)

        async def scenario():
            for text in SAID:
                await engine.handle(Incoming("telegram", "7", "u1", "Ana", text))
            await backend.close()

        asyncio.run(scenario())
        chat = subprocess.run(
            [sys.executable, "-m", "cli", "-v", "chat", "--persona", str(tmp_path / "sample")],
            input="\n".join(SAID) + "\n", capture_output=True, text=True, cwd=REPO, timeout=120,
            env=chat_env(tmp_path, LLM_BASE_URL=url))
    assert chat.returncode == 0, chat.stderr
    server_err = (tmp_path / "serve-model.err").read_text()
    assert "DEBUG" in server_err and "DEBUG" in chat.stderr
    assert_not_logged(everything.records, everything.text, server_err, chat.stderr, *capfd.readouterr())


class Echo(FixedBackend):
    """Replies with what it was told, as a real model often half does: the planted text is in the
    replies the adapters send too."""

    async def generate(self, messages):
        self.prompts.append(messages)
        return f"you said {messages[-1]['content'].split('<|')[0]}\nok"


def test_the_telegram_adapter(tmp_path, count_tokens, everything, capfd):
    from tests.test_telegram import command, dm, run

    engine = Engine(PERSONA, Echo(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)

    async def scenario(fake):
        for text in SAID:
            fake.queue(dm(text))
        await until(lambda: len(fake.sent()) == 2 * len(SAID))
        fake.queue(command("/forget"))
        await until(lambda: len(fake.sent()) == 2 * len(SAID) + 1)

    run(engine, scenario, Gate(quiet(messages_per_minute=0), PERSONA.id))
    assert {"bot.conversation", "httpcore.http11"} <= {r.name for r in everything.records}
    assert_not_logged(everything.records, everything.text, *capfd.readouterr())


def test_the_discord_adapter(tmp_path, count_tokens, monkeypatch, everything, capfd):
    from tests.test_discord import ANA, DM_CHANNEL, run

    engine = Engine(PERSONA, Echo(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)

    async def scenario(fake):
        for text in SAID:
            await fake.push(fake.message(text, ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent(DM_CHANNEL)) == 2 * len(SAID))
        await fake.push(fake.message("/forget", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent(DM_CHANNEL)) == 2 * len(SAID) + 1)

    run(engine, monkeypatch, scenario, Gate(quiet(messages_per_minute=0), PERSONA.id))
    assert "bot.conversation" in {r.name for r in everything.records}
    assert_not_logged(everything.records, everything.text, *capfd.readouterr())


def test_the_owners_correct_on_telegram(tmp_path, count_tokens, everything, capfd):
    from tests.fake_telegram import BOT
    from tests.test_telegram import command, dm, run

    owner = {"id": 12, "is_bot": False, "first_name": "Sam"}
    persona = Persona(name="Sam", root=tmp_path / "sam")
    engine = Engine(persona, Echo(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)
    said = {"message_id": 9001, "date": 0, "from": BOT, "chat": dm("", owner)["chat"],
            "text": f"you said {SAID[0]}"}

    async def scenario(fake):
        fake.queue(dm(SAID[0], owner))
        await until(lambda: len(fake.sent()) == 2)
        fake.queue({**command(f"/correct {PLANTED}", user=owner), "reply_to_message": said})
        await until(lambda: len(fake.sent()) == 3)

    run(engine, scenario, Gate(quiet(owner=frozenset({"telegram:12"})), persona.id))
    assert PLANTED in (tmp_path / "sam" / "corrections.jsonl").read_text()  # stored, not logged
    assert any("command=/correct" in r.getMessage() for r in everything.records)
    assert_not_logged(everything.records, everything.text, *capfd.readouterr())


def test_the_owners_correct_on_discord(tmp_path, count_tokens, monkeypatch, everything, capfd):
    from tests.fake_discord import BOT
    from tests.test_discord import ANA, DM_CHANNEL, run

    persona = Persona(name="Sam", root=tmp_path / "sam")
    engine = Engine(persona, Echo(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)

    async def scenario(fake):
        await fake.push(fake.message(SAID[0], ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent(DM_CHANNEL)) == 2)
        said = fake.message(f"you said {SAID[0]}", BOT, DM_CHANNEL)
        await fake.push(fake.message(f"/correct {PLANTED}", ANA, DM_CHANNEL, referenced=said))
        await until(lambda: len(fake.sent(DM_CHANNEL)) == 3)

    run(engine, monkeypatch, scenario, Gate(quiet(owner=frozenset({f"discord:{ANA['id']}"})), persona.id))
    assert PLANTED in (tmp_path / "sam" / "corrections.jsonl").read_text()
    assert any("command=/correct" in r.getMessage() for r in everything.records)
    assert_not_logged(everything.records, everything.text, *capfd.readouterr())


def test_a_telegram_network_error_at_shutdown_is_one_line():
    """PTB's Updater logs a failed last getUpdates with a traceback (a timeout on a busy machine);
    it becomes one warning naming the error's class."""
    import io

    from telegram.error import TimedOut

    from bot.telegram import hide_tokens_from_logs

    hide_tokens_from_logs()
    hide_tokens_from_logs()  # twice, as two bots in one process would: one filter
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    updater = logging.getLogger("telegram.ext.Updater")
    updater.addHandler(handler)
    try:
        try:
            raise TimedOut()
        except TimedOut:
            updater.exception("Error while calling `get_updates` one more time")
        try:
            raise ValueError("not a network error")
        except ValueError:
            updater.exception("something else")
    finally:
        updater.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "WARNING Error while calling `get_updates` one more time (TimedOut)"
    assert "Traceback" in out.getvalue().split("something else")[1]  # other errors keep theirs
    assert len(updater.filters) == 1
