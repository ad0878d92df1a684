"""The dataset pipeline on hand-made message streams, with the real packaged tokenizer."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest

from training import dataset
from training.dataset import PrepareConfig, build, write
from training.message import Message
from training.persona import Persona

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
PERSONA = Persona(name="Sam", description="Likes cats.", me=("u1",))


def msg(i: int, author: str, text: str, minutes: float, chat: str = "c1", **kw) -> Message:
    return Message(
        platform=kw.pop("platform", "telegram"), chat_id=chat, chat_name="chat", id=str(i),
        author_id=author, author=kw.pop("name", author.upper()),
        timestamp=T0 + timedelta(minutes=minutes), text=text,
        kind=kw.pop("kind", "text"), reply_to=kw.pop("reply_to", None),
    )


def prep(messages, count_tokens, **cfg):
    return build(messages, PERSONA, PrepareConfig(me=["u1"], **cfg), count_tokens)


def all_samples(p):
    return p.train + p.val


def test_burst_becomes_one_turn_with_line_breaks(count_tokens):
    ms = [
        msg(1, "u2", "hey, free tonight?", 0),
        msg(2, "u1", "yes!!", 1),
        msg(3, "u1", "what time\nand where", 1.5),
        msg(4, "u2", "8, the usual", 3),
        msg(5, "u1", "ok", 4),
    ]
    [sample] = all_samples(prep(ms, count_tokens))
    roles = [m["role"] for m in sample["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert sample["messages"][2]["content"] == "yes!!\nwhat time\nand where"
    assert sample["messages"][1]["content"] == "hey, free tonight?"  # no name prefix in a DM
    assert "Sam" in sample["messages"][0]["content"]


def test_silence_splits_but_a_reply_keeps_the_thread(count_tokens):
    ms = [
        msg(1, "u2", "how was the trip", 0),
        msg(2, "u1", "great", 1),
        msg(3, "u2", "new topic after a day", 60 * 24),
        msg(4, "u1", "sure", 60 * 24 + 1),
    ]
    assert len(all_samples(prep(ms, count_tokens))) == 2
    linked = [*ms[:3], msg(4, "u1", "replying to the trip question", 60 * 24 + 1, reply_to="1")]
    linked[2] = msg(3, "u2", "so?", 60 * 24, reply_to="2")
    samples = all_samples(prep(linked, count_tokens))
    assert len(samples) == 1
    assert [m["role"] for m in samples[0]["messages"]][-1] == "assistant"


def test_group_chat_names_speakers_and_quotes_replies_upthread(count_tokens):
    ms = [
        msg(1, "u2", "who is bringing snacks", 0, name="Ana"),
        msg(2, "u3", "not me", 1, name="Bo"),
        msg(3, "u1", "i can", 2),
        msg(4, "u3", "thanks!", 3, name="Bo"),
        msg(5, "u2", "also the drinks?", 4, name="Ana", reply_to="1"),
        msg(6, "u1", "fine", 5),
    ]
    [sample] = all_samples(prep(ms, count_tokens))
    turns = sample["messages"]
    assert turns[1]["content"] == "Ana: who is bringing snacks\nBo: not me"
    assert turns[3]["content"] == "Bo: thanks!\n> who is bringing snacks\nAna: also the drinks?"


def test_filters_are_counted(count_tokens):
    ms = [
        msg(1, "u2", "hi", 0),
        msg(2, "u2", "", 1, kind="service"),
        msg(3, "u1", "", 2, kind="media"),
        msg(4, "u1", "look at this", 2.5, kind="media"),
        msg(5, "u1", "   ", 3),
        msg(6, "u1", "x" * 3000, 4),
    ]
    p = prep(ms, count_tokens)
    skipped = p.card.skipped
    assert skipped["service message"] == 1
    assert skipped["media without text"] == 1
    assert skipped["empty"] == 1
    assert skipped["too long"] == 1
    [sample] = all_samples(p)
    assert sample["messages"][-1]["content"] == "look at this"


def test_reimport_and_overlap_change_nothing(count_tokens):
    ms = [msg(i, "u1" if i % 2 else "u2", f"message number {i}", i * 3) for i in range(1, 41)]
    once = prep(ms, count_tokens)
    twice = prep(ms + ms, count_tokens)
    overlapping = prep(ms[:30] + ms[10:], count_tokens)
    assert once.train + once.val  # something was built
    for other in (twice, overlapping):
        assert other.train == once.train and other.val == once.val
        assert other.card.fingerprint == once.card.fingerprint
    assert twice.card.skipped["duplicate"] == 40


def test_near_duplicates_dropped_but_short_habits_kept(count_tokens):
    ms = [
        msg(1, "u2", "hi", 0),
        msg(2, "u1", "Did you see the game last night?!", 1),
        msg(3, "u1", "did you see the game last night", 2),  # sent again, re-typed
        msg(4, "u2", "lol", 3),
        msg(5, "u1", "lol", 4),
        msg(6, "u2", "yes", 5),
        msg(7, "u1", "lol", 6),
    ]
    p = prep(ms, count_tokens)
    assert p.card.skipped["near duplicate"] == 1
    text = "".join(m["content"] for s in all_samples(p) for m in s["messages"])
    assert text.count("lol") == 3


def test_samples_fit_the_token_budget(tokenizer, count_tokens):
    ms = []
    for i in range(300):
        who = "u1" if i % 3 else "u2"
        ms.append(msg(i, who, f"this is message {i} about the weather and lunch plans", i * 0.5))
    p = prep(ms, count_tokens, max_tokens=256, val_fraction=0.0)
    samples = all_samples(p)
    assert len(samples) > 5
    for s in samples:
        ids = tokenizer.apply_chat_template(s["messages"], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        assert len(ids) <= 256
        assert s["messages"][0]["role"] == "system"
        assert s["messages"][-1]["role"] == "assistant"
        roles = [m["role"] for m in s["messages"][1:]]
        assert all(a != b for a, b in itertools.pairwise(roles))
    # Every one of the person's messages lands in exactly one sample as a trained turn.
    trained = [
        line
        for s in samples
        for m in s["messages"]
        if m["role"] == "assistant"
        for line in m["content"].split("\n")
    ]
    assert len(trained) == 200 and len(set(trained)) == 200


def test_a_turn_too_big_for_one_sample_is_split_between_messages(count_tokens):
    ms = [msg(0, "u2", "tell me everything", 0)]
    ms += [msg(i, "u1", f"part {i} of a very long story about my holiday", i) for i in range(1, 60)]
    p = prep(ms, count_tokens, max_tokens=200, val_fraction=0.0)
    samples = all_samples(p)
    assert len(samples) > 2
    assert samples[0]["messages"][1] == {"role": "user", "content": "tell me everything"}
    assert all(s["messages"][-1]["role"] == "assistant" for s in samples)


def test_split_is_by_conversation_and_deterministic(count_tokens):
    ms = []
    for c in range(40):
        for j in range(4):
            ms.append(msg(c * 10 + j, "u1" if j % 2 else "u2", f"conv {c} line {j}", c * 600 + j))
    a = prep(ms, count_tokens, val_fraction=0.25, seed=1)
    b = prep(ms, count_tokens, val_fraction=0.25, seed=1)
    c = prep(ms, count_tokens, val_fraction=0.25, seed=2)
    assert (a.train, a.val) == (b.train, b.val)
    assert a.val != c.val
    assert 4 <= a.card.conversations["val"] <= 18
    train_text = {m["content"] for s in a.train for m in s["messages"]}
    val_text = {m["content"] for s in a.val for m in s["messages"] if m["role"] != "system"}
    assert not train_text & val_text


def test_split_keeps_both_sides_non_empty():
    assert dataset.split(["a", "b"], 0.0001, seed=0) != set()
    assert len(dataset.split(["a", "b", "c"], 0.9999, seed=0)) == 2


def test_redaction_in_place_and_counted_never_recorded(count_tokens):
    ms = [
        msg(1, "u2", "mail me at ana.lopez@example.com", 0, name="Ana Lopez"),
        msg(2, "u1", "card 4111 1111 1111 1111 ok, call +44 20 7946 0958", 1),
    ]
    persona = Persona(name="Sam", me=("u1",), blocklist=("Lopez",))
    p = build(ms, persona, PrepareConfig(me=["u1"], val_fraction=0), count_tokens)
    [s] = p.train
    assert s["messages"][1]["content"] == "mail me at [EMAIL]"
    assert s["messages"][2]["content"] == "card [CARD] ok, call [PHONE]"
    # "Lopez" is in the author name (the speaker prefix in groups), redacted too.
    assert p.card.redactions == {"blocked": 1, "card": 1, "email": 1, "phone": 1}
    assert "4111" not in json.dumps(dataset.asdict(p.card))


def test_only_the_person_speaking_becomes_style_text(count_tokens):
    ms = [msg(i, "u1", f"note to self {i}", i) for i in range(3)]
    ms += [msg(10 + i, "u2", f"nobody answered {i}", 1000 + i, chat="c2") for i in range(3)]
    p = prep(ms, count_tokens, val_fraction=0)
    [s] = p.train
    assert [m["role"] for m in s["messages"]] == ["system", "assistant"]
    assert p.card.skipped["message in a conversation without the person"] == 3


def test_write_is_atomic_and_card_matches_files(tmp_path, count_tokens):
    # Ten two-message conversations, five hours apart.
    ms = [msg(i, "u1" if i % 2 else "u2", f"m{i}", (i // 2) * 300 + i % 2) for i in range(20)]
    p = prep(ms, count_tokens, val_fraction=0.3)
    out = tmp_path / "ds"
    write(p, out)
    card = json.loads((out / "card.json").read_text())
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    assert card["fingerprint"] == dataset.fingerprint(train, val)
    assert card["samples"] == {"train": len(train), "val": len(val)}
    assert card["date_range"]["first"] == T0.isoformat()
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    class Boom(Exception):
        pass

    broken = dataset.Prepared(p.train[:1], p.val, p.card)
    broken.card.settings = {"unserialisable": Boom()}
    with pytest.raises(TypeError):
        write(broken, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["ds"]  # no staging leftovers


def test_a_crash_between_renames_is_recovered(tmp_path):
    from training.atomic import recover_dir, staged_dir

    dest = tmp_path / "ds"
    with staged_dir(dest) as tmp:
        (tmp / "f").write_text("good")
    dest.rename(tmp_path / ".ds.old-123")  # as if killed right after moving it aside
    recover_dir(dest)
    assert (dest / "f").read_text() == "good"
