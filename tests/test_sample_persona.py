"""The committed sample persona: made by persona_data/make_sample.py, a valid Telegram export."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "persona_data" / "sample"
EXPORT = SAMPLE / "exports" / "result.json"


def load_make_sample():
    # persona_data/ is a folder of data and scripts, not a package: load the script by path.
    script = ROOT / "persona_data" / "make_sample.py"
    spec = importlib.util.spec_from_file_location("make_sample", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_regenerates_the_committed_sample_byte_for_byte(tmp_path):
    assert load_make_sample().main(["--out", str(tmp_path)]) == 0
    for name in ("exports/result.json", "persona.toml", "CREDITS.md"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_committed_export_is_a_valid_full_account_export():
    assert EXPORT.stat().st_size < 5_000_000  # small enough to commit
    with open(EXPORT, encoding="utf-8") as f:
        export = json.load(f)
    persona = tomllib.loads((SAMPLE / "persona.toml").read_text(encoding="utf-8"))

    assert list(export) == ["about", "personal_information", "contacts", "chats", "left_chats"]
    me = export["personal_information"]
    assert persona["me"] == [f"user{me['user_id']}"]
    assert persona["name"] == f"{me['first_name']} {me['last_name']}" == "Sam Rivera"
    assert me["phone_number"] == "+1 555 0100"
    assert export["contacts"]["list"] == [] and export["left_chats"]["list"] == []
    owner = persona["me"][0]

    chats = export["chats"]["list"]
    assert len(chats) == 100
    assert len({c["id"] for c in chats}) == 100
    total = owned = 0
    all_ids = []
    for chat in chats:
        assert list(chat) == ["name", "type", "id", "messages"]
        assert chat["type"] == "personal_chat"
        assert isinstance(chat["id"], int)
        messages = chat["messages"]
        partner_ids = {m["from_id"] for m in messages} - {owner}
        assert len(partner_ids) == 1, chat["name"]
        partner = partner_ids.pop()
        previous_time = previous_id = 0
        for m in messages:
            assert list(m) == [
                "id", "type", "date", "date_unixtime", "from", "from_id", "text", "text_entities",
            ]
            assert m["type"] == "message"
            assert m["id"] > previous_id
            epoch = int(m["date_unixtime"])
            assert epoch >= previous_time
            previous_id, previous_time = m["id"], epoch
            # `date` is the exporting computer's local time (Utah, UTC-6 in spring 2018).
            local = datetime.fromisoformat(m["date"])
            assert local.tzinfo is None
            assert epoch - _naive_epoch(local) == 6 * 3600
            assert m["from_id"] in (owner, partner)
            assert m["from"] == ("Sam Rivera" if m["from_id"] == owner else chat["name"])
            assert m["text"] and m["text"] == m["text"].strip()
            assert m["text_entities"] == [{"type": "plain", "text": m["text"]}]
            total += 1
            owned += m["from_id"] == owner
            all_ids.append(m["id"])
        assert any(m["from_id"] == owner for m in messages)
    # Telegram numbers private-chat messages per account: ids are unique in the whole export.
    assert len(set(all_ids)) == len(all_ids) == total
    assert (total, owned) == (8171, 4028)
    # Dialogs come most recent first.
    last_times = [int(c["messages"][-1]["date_unixtime"]) for c in chats]
    assert last_times == sorted(last_times, reverse=True)


def _naive_epoch(local: datetime) -> int:
    return int((local - datetime(1970, 1, 1)).total_seconds())


def test_bursts_become_separate_messages_and_empty_utterances_are_dropped(tmp_path):
    me, other = "aaaaaaaa-0000-0000-0000-000000000001", "bbbbbbbb-0000-0000-0000-000000000002"
    dataset = {
        "conv-late": {"messages": [
            [{"text": "later chat", "timestamp": "2018-05-03T10:00:00Z", "sender": me}],
            [{"text": "ok", "timestamp": "2018-05-03T10:00:05Z", "sender": other}],
        ]},
        "conv-early": {"messages": [
            [{"text": "hey", "timestamp": "2018-05-02T19:38:15Z", "sender": me},
             {"text": "  how are you?  ", "timestamp": "2018-05-02T19:38:20Z", "sender": me}],
            [{"text": " ", "timestamp": "2018-05-02T19:38:25Z", "sender": other},
             {"text": "good!", "timestamp": "2018-05-02T19:38:29Z", "sender": other}],
        ]},
        # A monologue: the partner never answers, so it is left out.
        "conv-alone": {"messages": [
            [{"text": "anyone?", "timestamp": "2018-05-01T08:00:00Z", "sender": me}],
        ]},
    }
    source = tmp_path / "dataset.json"
    source.write_text(json.dumps(dataset), encoding="utf-8")
    make_sample = load_make_sample()
    out = tmp_path / "persona"
    assert make_sample.main(
        ["--speaker", me, "--max-conversations", "1", "--out", str(out), "--dataset", str(source)]
    ) == 0

    export = json.loads((out / "exports" / "result.json").read_text(encoding="utf-8"))
    [chat] = export["chats"]["list"]  # only the earliest two-person conversation
    partner_id, partner_name = make_sample.partner_identities(dataset, me)[other]
    assert chat["name"] == partner_name
    assert [(m["id"], m["from_id"], m["text"]) for m in chat["messages"]] == [
        (1, "user5550100042", "hey"),
        (2, "user5550100042", "how are you?"),
        (3, f"user{partner_id}", "good!"),
    ]
    first = chat["messages"][0]
    assert first["date"] == "2018-05-02T19:38:15"
    assert first["date_unixtime"] == "1525311495"  # 2018-05-03T01:38:15Z
    assert "first 1 two-person" in (out / "CREDITS.md").read_text(encoding="utf-8")
    assert "--speaker " + me in (out / "CREDITS.md").read_text(encoding="utf-8")


def test_reserved_benchmark_speakers_cannot_be_the_persona(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        load_make_sample().main(
            ["--speaker", "31267496-e50f-4f91-a197-c5b1bfde803b", "--out", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert not (tmp_path / "exports").exists()


def test_the_question_sets_are_kept_apart():
    """retrieval_dev.csv tunes retrieval, eval_questions.csv measures the clone: no question of
    either is in the other, the development set asks none of the knowledge base's own questions
    (the quiz asks one: "how tall are you?"), and each expects a word the knowledge base holds."""
    from bot.quiz import read_questions

    dev, quiz = (read_questions(SAMPLE / name) for name in ("retrieval_dev.csv", "eval_questions.csv"))
    faq = (SAMPLE / "exports" / "faq.csv").read_text(encoding="utf-8").casefold()
    notes = (SAMPLE / "knowledge" / "about-sam.md").read_text(encoding="utf-8").casefold()
    asked = {line.split(",")[0] for line in faq.splitlines()}
    assert len(dev) >= 40 and len(quiz) >= 30
    assert not {q.text.casefold() for q in dev} & {q.text.casefold() for q in quiz}
    assert not {q.text.casefold() for q in dev} & asked
    for q in (*dev, *quiz):
        assert q.answered_by(faq + notes), q.text
