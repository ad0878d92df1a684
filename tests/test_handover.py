"""A deploy's hand-over, with two real `clone serve` processes on one bot and one Redis.

Messages wait in several Telegram chats; the first process is sent SIGTERM while it generates, and
the second starts at once, as a platform does. Every message is answered exactly once, by one of
the two, and the first is gone within its grace: what it did not answer by then it handed over
(claims released in Redis, updates left unconfirmed in the Bot API).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from bot.gate import SETTLED

from .fake_telegram import FakeTelegram
from .platform_helpers import drop_redis_keys, until

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
CHATS = (-601, -602, -603, -604, -605)
PER_CHAT = 3
EXIT_MARGIN_S = 4.0  # after the grace: closing Redis and the platforms, the interpreter's exit
ANA = {"id": 11, "is_bot": False, "first_name": "Ana"}


def write_persona(folder: Path, persona_id: str) -> Path:
    """Groups in which every message is for the clone (so each reply quotes the one it answers)."""
    folder.mkdir()
    chats = ", ".join(f'"telegram:{c}"' for c in CHATS)
    (folder / "persona.toml").write_text(
        f'name = "Sam Rivera"\nid = "{persona_id}"\n[serve]\nreply_in = [{chats}]\n'
        "messages_per_minute = 0\nintroduce = false\n")
    return folder


def group_message(chat_id: int, message_id: int) -> dict:
    return {"message_id": message_id, "date": int(time.time()), "from": ANA,
            "chat": {"id": chat_id, "type": "group", "title": f"group {chat_id}"},
            "text": f"question {message_id} in {chat_id}"}


def answers(fake: FakeTelegram) -> collections.Counter:
    """(chat, message id) -> how many replies quoted it (a reply's first piece quotes its message)."""
    return collections.Counter(
        (int(m["chat_id"]), json.loads(m["reply_parameters"])["message_id"])
        for m in fake.sent() if "reply_parameters" in m)


def claims(persona_id: str) -> dict[tuple[int, int], str]:
    """(chat, message id) -> the value of the message's claim in Redis."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        found = {}
        for key in client.scan_iter(f"clone:{persona_id}:seen:telegram:*"):
            chat, message = key.decode().rsplit(":", 2)[1:]
            found[int(chat), int(message)] = client.get(key).decode()
        return found
    finally:
        client.close()


# Each serving process's output lines (time read, text), and the task that reads them.
READERS: dict[asyncio.subprocess.Process, tuple[list[tuple[float, str]], asyncio.Task]] = {}


async def start_serve(tiny_base: Path, persona: Path, fake: FakeTelegram, grace_s: float,
                      step_s: float, tokens: int, hold: Path | None = None) -> asyncio.subprocess.Process:
    env = {**os.environ, "TELEGRAM_TOKEN": fake.token, "TELEGRAM_BASE_URL": fake.base_url,
           "REDIS_URL": REDIS_URL, "CLONE_STOP_GRACE_S": str(grace_s), "CLONE_TEST_STEP_S": str(step_s),
           "CLONE_TEST_TOKENS": str(tokens), "CLONE_TEST_HOLD": str(hold or ""), "OMP_NUM_THREADS": "1"}
    for name in ("LLM_BASE_URL", "DISCORD_TOKEN", "TELEGRAM_WEBHOOK_URL"):
        env.pop(name, None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.slow_serve", "serve", "--base", str(tiny_base),
        "--persona", str(persona), cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    # Read from the start: a pipe left unread fills and stalls the process writing to it.
    READERS[proc] = (lines := []), asyncio.create_task(read_lines(proc, lines))
    return proc


async def read_lines(proc: asyncio.subprocess.Process, lines: list[tuple[float, str]]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        lines.append((time.monotonic(), line.decode().rstrip()))


def output(proc: asyncio.subprocess.Process, since: float) -> str:
    """What it has written so far, each line with the seconds since `since`."""
    return "\n".join(f"{at - since:6.2f} {text}" for at, text in READERS[proc][0])


async def until_exit(proc: asyncio.subprocess.Process, since: float) -> str:
    """Its output, each line with the seconds since `since`, once it has exited."""
    await READERS[proc][1]
    await proc.wait()
    return output(proc, since)


def handed_over(log: str) -> set[tuple[int, int]]:
    """The messages a process's log says it left to the next one (ids only, as logs carry)."""
    found = re.findall(r"chat=(-?\d+) msg=(\d+) (?:left to the next process|handed over)", log)
    return {(int(chat), int(message)) for chat, message in found}


async def hand_over(tiny_base: Path, persona: Path, fake: FakeTelegram, grace_s: float,
                    step_s: float, tokens: int, preboot: bool):
    """Queue the messages; once every chat's first message is being generated, SIGTERM the first
    process and start the second: already polling beforehand (`preboot`, as Heroku's preboot and
    Railway overlap them; the first's model is held still until the SIGTERM, so that the second
    finds those messages in progress), else at once. Until every message is answered."""
    hold = persona.parent / "hold"
    if preboot:
        hold.touch()
    first = await start_serve(tiny_base, persona, fake, grace_s, step_s, tokens, hold)
    second = None
    try:
        await until(lambda: any(c.method == "getUpdates" for c in fake.calls), timeout=120)
        for n in range(1, PER_CHAT + 1):
            for chat in CHATS:
                fake.queue(group_message(chat, n))
        await until(lambda: all(fake.sent("sendChatAction", c) for c in CHATS), timeout=60)
        if preboot:
            second = await start_serve(tiny_base, persona, fake, grace_s, step_s=0.0, tokens=8)
            await until(lambda: sum(c.method == "deleteWebhook" for c in fake.calls) == 2, timeout=120)
            await asyncio.sleep(1.0)  # its first getUpdates, which hands it every update in hand
        first.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        hold.unlink(missing_ok=True)
        second = second or await start_serve(tiny_base, persona, fake, grace_s, step_s=0.0, tokens=8)
        log1 = await asyncio.wait_for(until_exit(first, stopped), 60)
        at_exit = (time.monotonic() - stopped, fake.unconfirmed(), claims(persona.name))
        try:
            await until(lambda: len(answers(fake)) == len(CHATS) * PER_CHAT, timeout=120)
        except AssertionError as e:  # say what the second process was doing
            raise AssertionError(f"{e}: {answers(fake)}\n{output(second, stopped)}") from None
        await asyncio.sleep(1.5)  # and nothing more follows
        second.send_signal(signal.SIGTERM)
        log2 = await asyncio.wait_for(until_exit(second, stopped), 60)
        return first.returncode, at_exit, log1, log2
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.parametrize("grace_s, step_s, tokens, preboot", [
    # The replies in progress fit the grace: sent. The second process, polling already, waits for
    # them (the first's claims), then answers the rest.
    (20.0, 0.05, 16, True),
    # They do not: interrupted, their claims released, every update left unconfirmed; the second,
    # started at once, answers all.
    (1.0, 0.3, 64, False),
], ids=["in-progress-finish-preboot", "grace-runs-out"])
def test_sigterm_hands_what_is_unanswered_to_the_next_process(tiny_base, tmp_path, grace_s, step_s,
                                                              tokens, preboot):
    persona_id = f"handover-{uuid.uuid4().hex[:12]}"
    persona = write_persona(tmp_path / persona_id, persona_id)

    async def scenario():
        fake = FakeTelegram()
        await fake.start()
        try:
            return fake, await hand_over(tiny_base, persona, fake, grace_s, step_s, tokens, preboot)
        finally:
            await fake.stop()

    try:
        fake, (code, (took, left, held), log1, log2) = asyncio.run(scenario())
        held_at_end = claims(persona_id)
    finally:
        drop_redis_keys(persona_id)
    everything = {(c, n) for c in CHATS for n in range(1, PER_CHAT + 1)}
    by_first = everything - handed_over(log1)
    assert code == 0, log1
    assert took <= grace_s + EXIT_MARGIN_S, (took, log1)
    # The first answered each chat's message in progress, or none; never a later one.
    assert by_first == ({(c, 1) for c in CHATS} if preboot else set()), log1
    # Every message answered once, across the hand-over, and confirmed to Telegram at last.
    assert answers(fake) == collections.Counter(everything), (answers(fake), log1, log2)
    assert sorted(fake.confirmed) == sorted(fake.queued)
    assert set(held_at_end) == everything and set(held_at_end.values()) == {SETTLED}
    if preboot:  # the second found the first's messages in progress, and waited for them
        waited = re.findall(r"chat=(-?\d+) msg=(\d+) is another process's: waiting", log2)
        assert {(int(c), int(m)) for c, m in waited} == by_first, log2
    else:  # what the first left: unconfirmed, unclaimed
        assert sorted(left) == sorted(fake.queued) and held == {}
    for log in (log1, log2):
        assert fake.token not in log and "question" not in log  # no token, no message text
        assert "Traceback" not in log
