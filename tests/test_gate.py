"""The gate: [serve] settings, access lists, the per-user rate limit and once-per-message claims,
in this process and in a real Redis shared by two gates (two processes during a deploy)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bot.gate import (
    Gate,
    GateSettingsError,
    LocalState,
    RedisState,
    Rules,
    Sender,
    Stopping,
    Verdict,
    open_gate,
)
from tests.platform_helpers import drop_redis_keys, free_port
from training.persona import Persona, PersonaError

REDIS_URL = "redis://127.0.0.1:6379/0"


def sender(user: str = "1", chat: str = "1", message: str | None = None, server: str | None = None,
           platform: str = "telegram") -> Sender:
    return Sender(platform, user, chat, message or uuid.uuid4().hex, server)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Gates:
    """Gates for one fresh persona; with "redis", every gate made shares the real server."""

    def __init__(self, kind: str) -> None:
        self.kind, self.persona, self.made = kind, f"gate-test-{uuid.uuid4().hex}", []

    def __call__(self, rules: Rules | None = None, clock=None) -> Gate:
        state = RedisState(REDIS_URL) if self.kind == "redis" else LocalState()
        self.made.append(Gate(rules or Rules(), self.persona, state, clock or Clock()))
        return self.made[-1]

    def run(self, scenario) -> None:
        """asyncio.run(scenario()), closing the gates' connections inside the same loop."""

        async def main():
            try:
                await scenario()
            finally:
                for gate in self.made:
                    await gate.close()

        asyncio.run(main())


@pytest.fixture(params=["local", "redis"])
def make_gate(request):
    gates = Gates(request.param)
    yield gates
    if request.param == "redis":
        drop_redis_keys(gates.persona)


# -- settings --------------------------------------------------------------------------------


def test_a_full_serve_table_parses():
    rules = Rules.parse({
        "owner": ["telegram:10", "discord:20"], "allow_users": ["telegram:11"],
        "block_chats": ["telegram:-100200"], "reply_in": ["discord:30"],
        "messages_per_minute": 2.5, "about": "  An AI version of Sam.  ",
    })
    assert rules.owner == {"telegram:10", "discord:20"}
    assert rules.block_chats == {"telegram:-100200"}
    assert rules.messages_per_minute == 2.5 and rules.about == "An AI version of Sam."
    assert rules.listens_in("discord", "30") and not rules.listens_in("telegram", "30")


@pytest.mark.parametrize("table, named", [
    ({"allow_user": ["telegram:1"]}, "unknown setting `allow_user`"),
    ({"owner": "telegram:1"}, "`owner` must be a list"),
    ({"block_users": ["telegram:1", 42]}, "`block_users[1]` is 42"),
    ({"allow_servers": ["slack:1"]}, "`allow_servers[0]` is 'slack:1'"),
    ({"allow_chats": ["telegram:abc"]}, "`allow_chats[0]`"),
    ({"messages_per_minute": -1}, "`messages_per_minute` must be a finite number >= 0"),
    ({"messages_per_minute": float("nan")}, "`messages_per_minute` must be a finite number >= 0"),
    ({"messages_per_minute": float("inf")}, "`messages_per_minute` must be a finite number >= 0"),
    ({"messages_per_minute": float("-inf")}, "`messages_per_minute`"),
    ({"messages_per_minute": "6"}, "`messages_per_minute`"),
    ({"about": ""}, "`about` must be a non-empty string"),
    ({"introduce": "yes"}, "`introduce` must be true or false"),
])
def test_a_bad_serve_setting_is_named(table, named):
    with pytest.raises(GateSettingsError) as e:
        Rules.parse(table, "persona.toml [serve]")
    assert str(e.value).startswith("persona.toml [serve]: ") and named in str(e.value)


def test_serve_settings_come_from_persona_toml(tmp_path):
    (tmp_path / "persona.toml").write_text(
        'name = "Sam"\n[serve]\nowner = ["discord:5"]\nmessages_per_minute = 0\n')
    rules = Rules.from_persona(Persona.load(tmp_path))
    assert rules.owner == {"discord:5"} and rules.messages_per_minute == 0
    (tmp_path / "persona.toml").write_text('name = "Sam"\n[serve]\nowner = ["discord:x"]\n')
    with pytest.raises(GateSettingsError, match=r"persona.toml \[serve\]: `owner\[0\]`"):
        open_gate(Persona.load(tmp_path))
    (tmp_path / "persona.toml").write_text('name = "Sam"\nserve = 3\n')
    with pytest.raises(PersonaError, match="`serve` must be a table"):
        Persona.load(tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
def test_a_rate_that_is_not_a_finite_number_is_refused_from_persona_toml(tmp_path, value):
    """TOML writes nan and inf as bare words: without Redis every message was "too fast", with
    Redis every message raised."""
    (tmp_path / "persona.toml").write_text(f'name = "Sam"\n[serve]\nmessages_per_minute = {value}\n')
    with pytest.raises(GateSettingsError, match=r"persona.toml \[serve\]: `messages_per_minute` must be"):
        Rules.from_persona(Persona.load(tmp_path))


def test_the_sample_persona_serves_everyone():
    from pathlib import Path

    rules = Rules.from_persona(Persona.load(Path(__file__).parent.parent / "persona_data" / "sample"))
    assert rules.allows(sender())


# -- access ----------------------------------------------------------------------------------


def test_no_lists_means_everyone_and_block_lists_win():
    assert Rules().allows(sender())
    rules = Rules(block_users=frozenset({"telegram:2"}), block_chats=frozenset({"telegram:-9"}),
                  block_servers=frozenset({"discord:7"}), allow_users=frozenset({"telegram:2"}))
    assert not rules.allows(sender(user="2"))                   # blocked, though also allowed
    assert not rules.allows(sender(user="3"))                   # an allow list exists: not on it
    rules = Rules(block_users=frozenset({"telegram:2"}), block_chats=frozenset({"telegram:-9"}),
                  block_servers=frozenset({"discord:7"}))
    assert not rules.allows(sender(chat="-9"))
    assert not rules.allows(sender(platform="discord", server="7", chat="70"))
    assert rules.allows(sender(platform="discord", server="8", chat="70"))
    assert not rules.allows(sender(user="2", chat="2"))
    assert rules.allows(sender(platform="discord", user="2", chat="2"))  # ids are per platform


def test_allow_lists_are_a_union_and_the_owner_always_passes():
    rules = Rules(owner=frozenset({"discord:1"}), allow_users=frozenset({"telegram:5"}),
                  allow_chats=frozenset({"telegram:-50"}), allow_servers=frozenset({"discord:9"}),
                  block_users=frozenset({"discord:1"}))
    assert rules.allows(sender(user="5", chat="5"))                       # a friend, in a DM
    assert rules.allows(sender(user="6", chat="-50"))                     # anyone in the family group
    assert rules.allows(sender(platform="discord", user="6", chat="90", server="9"))
    assert not rules.allows(sender(user="6", chat="6"))                   # a stranger's DM
    assert not rules.allows(sender(platform="discord", user="6", chat="90", server="8"))
    assert rules.allows(sender(platform="discord", user="1", chat="1"))   # the owner, listed or not


# -- state: claims and the rate limit ----------------------------------------------------------


def test_each_message_is_claimed_once(make_gate):
    async def scenario():
        gate = make_gate()
        first = sender(chat="-1", message="77")
        assert await gate.admit(first) is Verdict.ANSWER
        assert await gate.admit(first) is Verdict.DUPLICATE
        assert await gate.admit(sender(chat="-2", message="77")) is Verdict.ANSWER  # ids are per chat

    make_gate.run(scenario)


def test_the_rate_limit_tells_once_then_refills(make_gate):
    async def scenario():
        clock = Clock()
        gate = make_gate(Rules(messages_per_minute=3), clock)
        verdicts = [await gate.admit(sender(user="8")) for _ in range(5)]
        assert verdicts == [Verdict.ANSWER] * 3 + [Verdict.LIMITED, Verdict.LIMITED_QUIET]
        assert await gate.admit(sender(user="9")) is Verdict.ANSWER  # per user
        clock.now += 19  # 0.95 of a message back: not yet
        assert await gate.admit(sender(user="8")) is Verdict.LIMITED_QUIET
        clock.now += 2
        assert await gate.admit(sender(user="8")) is Verdict.ANSWER
        assert await gate.admit(sender(user="8")) is Verdict.LIMITED  # a new streak: told again
        clock.now += 3600
        assert [await gate.admit(sender(user="8")) for _ in range(4)] == [Verdict.ANSWER] * 3 + [
            Verdict.LIMITED]  # full again, but never more than the burst

    make_gate.run(scenario)


def test_owner_forget_and_zero_are_never_limited(make_gate):
    async def scenario():
        gate = make_gate(Rules(owner=frozenset({"telegram:1"}), messages_per_minute=1))
        assert {await gate.admit(sender(user="1")) for _ in range(5)} == {Verdict.ANSWER}
        assert await gate.admit(sender(user="2")) is Verdict.ANSWER
        assert await gate.admit(sender(user="2")) is Verdict.LIMITED
        assert await gate.admit(sender(user="2"), deletion_request=True) is Verdict.ANSWER
        blocked = make_gate(Rules(block_users=frozenset({"telegram:3"})))
        assert await blocked.admit(sender(user="3")) is Verdict.IGNORE
        assert await blocked.admit(sender(user="3"), deletion_request=True) is Verdict.ANSWER
        unlimited = make_gate(Rules(messages_per_minute=0))
        assert {await unlimited.admit(sender(user="4")) for _ in range(50)} == {Verdict.ANSWER}

    make_gate.run(scenario)


def test_two_processes_answer_a_message_once_and_share_the_limit():
    """Two gates on one Redis, as two processes overlap during a deploy: each message is taken by
    exactly one of them, even when both ask at the same moment."""
    persona = f"gate-test-{uuid.uuid4().hex}"

    async def scenario():
        old = Gate(Rules(messages_per_minute=0), persona, RedisState(REDIS_URL))
        new = Gate(Rules(messages_per_minute=0), persona, RedisState(REDIS_URL))

        async def answer(gate: Gate, message: Sender) -> Verdict:
            verdict = await gate.admit(message)  # the loser waits until the winner has answered
            await gate.settle(message)
            return verdict

        try:
            messages = [sender(chat=str(c), message=str(m)) for c in range(5) for m in range(40)]
            both = await asyncio.gather(*(answer(gate, s) for s in messages for gate in (old, new)))
            pairs = list(zip(both[::2], both[1::2], strict=True))
            assert all(sorted(p, key=str) == [Verdict.ANSWER, Verdict.DUPLICATE] for p in pairs)
            limited = [Gate(Rules(messages_per_minute=2), persona, g.state) for g in (old, new)]
            verdicts = [await limited[i % 2].admit(sender(user="u")) for i in range(3)]
            assert verdicts == [Verdict.ANSWER, Verdict.ANSWER, Verdict.LIMITED]
        finally:
            await old.close()
            await new.close()
            drop_redis_keys(persona)

    asyncio.run(scenario())


# -- stopping: hand over what is not answered ---------------------------------------------------


def test_a_draining_gate_admits_nothing_and_releases_only_its_own_claims(make_gate):
    async def scenario():
        ours = make_gate()
        theirs = Gate(Rules(), ours.persona, ours.state)  # another process, the same state
        mine, other = sender(chat="5", message="1"), sender(chat="5", message="2")
        assert await ours.admit(mine) is Verdict.ANSWER and await ours.first_contact(mine)
        assert await theirs.admit(other) is Verdict.ANSWER
        await theirs.settle(other)  # answered
        await ours.release(other)  # not ours: untouched
        await ours.release(mine)   # the message and the chat's introduction are free again
        ours.drain()
        with pytest.raises(Stopping):
            await ours.admit(sender(chat="5", message="3"))
        with pytest.raises(Stopping):
            await ours.admit(mine, deletion_request=True)  # even /forget: the next process does it
        fresh = Gate(Rules(), ours.persona, ours.state)
        assert await fresh.admit(mine) is Verdict.ANSWER and await fresh.first_contact(mine)
        assert await fresh.admit(other) is Verdict.DUPLICATE

    make_gate.run(scenario)


def test_a_message_held_by_another_process_is_waited_for():
    """Two processes overlapping in a deploy both receive a message: the one that did not claim it
    waits until the other has answered it (a duplicate) or handed it over (its own to answer)."""
    gates = Gates("redis")

    async def scenario():
        old, new = gates(), gates()
        answered, handed, abandoned = (sender(chat="7", message=m) for m in ("1", "2", "3"))
        for message in (answered, handed, abandoned):
            assert await old.admit(message) is Verdict.ANSWER
        waits = [asyncio.create_task(new.admit(m)) for m in (answered, handed)]
        await asyncio.sleep(0.6)
        assert not any(w.done() for w in waits)  # neither answered nor handed over yet
        await old.settle(answered)
        await old.release(handed)
        assert [await w for w in waits] == [Verdict.DUPLICATE, Verdict.ANSWER]
        waiting = asyncio.create_task(new.admit(abandoned))
        await asyncio.sleep(0.3)
        new.drain()  # the waiting process is stopping too: it leaves the message alone
        with pytest.raises(Stopping):
            await waiting
        patient = gates()
        patient.claim_wait_s = 0.5  # an owner that never answers is given up on, at last
        assert await patient.admit(abandoned) is Verdict.DUPLICATE
        assert await old.admit(answered) is Verdict.DUPLICATE  # its own claim: no wait

    try:
        gates.run(scenario)
    finally:
        drop_redis_keys(gates.persona)


def test_a_reply_cancelled_before_it_went_out_is_handed_over(make_gate):
    async def scenario():
        gate = make_gate()
        other = Gate(Rules(), gate.persona, gate.state)
        handed: list[str] = []

        async def flow(message: Sender, replying: list[bool]) -> None:
            assert await gate.admit(message) is Verdict.ANSWER
            replying.append(True) if message.message_id == "begun" else None
            await asyncio.sleep(10)  # generating

        async def run(message_id: str) -> None:
            message, replying = sender(chat="9", message=message_id), []
            task = asyncio.create_task(gate.answer_or_hand_over(
                message, flow(message, replying), lambda: bool(replying),
                lambda: handed.append(message_id)))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        await run("unsent")
        await run("begun")
        assert handed == ["unsent"]
        assert await other.admit(sender(chat="9", message="unsent")) is Verdict.ANSWER  # released
        assert await other.admit(sender(chat="9", message="begun")) is Verdict.DUPLICATE  # settled
        gate.drain()
        await gate.answer_or_hand_over(sender(message="late"), gate.admit(sender(message="late")),
                                       lambda: False, lambda: handed.append("late"))
        assert handed == ["unsent", "late"]

    make_gate.run(scenario)


def test_without_redis_the_gate_lets_messages_through(caplog):
    port = free_port()

    async def scenario():
        gate = Gate(Rules(messages_per_minute=1), "p", RedisState(f"redis://127.0.0.1:{port}/0"))
        try:
            same = sender(message="1")
            return [await gate.admit(same) for _ in range(3)]
        finally:
            await gate.close()

    assert asyncio.run(scenario()) == [Verdict.ANSWER] * 3
    assert sum("Redis unreachable" in r.getMessage() for r in caplog.records) == 1


def test_local_claims_stay_bounded():
    async def scenario():
        state = LocalState(max_seen=100)
        for i in range(1000):
            assert await state.claim(f"k{i}")
        assert len(state._seen) <= 100
        assert not await state.claim("k999")

    asyncio.run(scenario())


def test_a_chat_is_introduced_to_once(make_gate):
    async def scenario():
        gate = make_gate()
        assert await gate.first_contact(sender(chat="5"))
        assert not await gate.first_contact(sender(chat="5", user="other"))
        assert await gate.first_contact(sender(chat="6"))
        assert not await make_gate(Rules(introduce=False)).first_contact(sender(chat="7"))

    make_gate.run(scenario)


def test_no_introduction_while_redis_is_unreachable():
    port = free_port()

    async def scenario():
        gate = Gate(Rules(), "p", RedisState(f"redis://127.0.0.1:{port}/0"))
        try:
            return await gate.first_contact(sender())
        finally:
            await gate.close()

    assert asyncio.run(scenario()) is False
