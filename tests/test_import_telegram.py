"""Telegram Desktop JSON importer: fixtures under tests/fixtures/telegram/."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from training.importers.telegram import read_telegram, sniff_telegram
from training.message import ExportError, ImportReport, Message

FIXTURES = Path(__file__).parent / "fixtures" / "telegram"
SINGLE = FIXTURES / "single_chat.json"
FULL = FIXTURES / "full_export.json"
OWNER = ("user1000001", "Owen Owner")
ALICE = ("user4000001", "Alice Example")


def read(path: Path) -> tuple[list[Message], ImportReport]:
    report = ImportReport()
    return list(read_telegram(path, report)), report


def by_id(messages: list[Message]) -> dict[str, Message]:
    return {m.id: m for m in messages}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def tg_message(i: int, text: object = "hi", **extra: object) -> dict:
    return {"id": i, "type": "message", "date": "2021-01-01T10:00:00",
            "date_unixtime": str(1609495200 + i), "from": "Alice Example",
            "from_id": "user4000001", "text": text, **extra}


# -- single-chat export --------------------------------------------------------------------------


def test_single_chat_yields_every_usable_message_in_order() -> None:
    messages, report = read(SINGLE)
    assert [m.id for m in messages] == [
        "101", "102", "103", "104", "107", "108", "110", "111", "112", "113", "114", "115",
        "116", "117", "118", "119", "120", "121", "122", "123", "124",
    ]
    assert report.skipped == Counter({"forwarded": 1, "via_bot": 1, "unsupported": 1})
    assert report.owners == {}  # a single-chat export does not say who exported it
    assert {(m.platform, m.chat_id, m.chat_name) for m in messages} == {
        ("telegram", "4000001", "Alice Example")
    }


def test_plain_text_message_fields() -> None:
    m = by_id(read(SINGLE)[0])["101"]
    assert m == Message(
        platform="telegram", chat_id="4000001", chat_name="Alice Example", id="101",
        author_id="user4000001", author="Alice Example", timestamp=utc(2021, 10, 30, 8, 0),
        text="Hi Owen! Are you coming on Saturday?", kind="text", reply_to=None,
    )


def test_text_list_parts_are_joined() -> None:
    msgs = by_id(read(SINGLE)[0])
    # link, bold and mention parts between plain strings
    assert msgs["102"].text == (
        "Yes! See https://example.org/hike — bring boots, and ask @bob_hiker."
    )
    # text_link (href dropped), mention_name (user_id dropped), custom_emoji, spoiler, pre
    assert msgs["103"].text == "this map from Bob 🥾 surprise cake\nprint('hi')"
    assert (msgs["102"].author_id, msgs["102"].author) == OWNER
    assert msgs["103"].kind == "text"


def test_text_entities_used_when_text_is_absent() -> None:
    m = by_id(read(SINGLE)[0])["124"]
    assert (m.text, m.kind) == ("only entities", "text")


def test_replies_and_ids_are_strings() -> None:
    messages, _ = read(SINGLE)
    msgs = by_id(messages)
    assert msgs["102"].reply_to == "101"
    assert msgs["120"].reply_to == "103"
    assert msgs["101"].reply_to is None
    assert all(isinstance(m.id, str) and isinstance(m.chat_id, str) for m in messages)


def test_edited_message_keeps_final_text() -> None:
    m = by_id(read(SINGLE)[0])["104"]
    assert (m.text, m.kind, m.timestamp) == ("See you at 10", "text", utc(2021, 10, 30, 8, 3))


def test_service_messages() -> None:
    msgs = by_id(read(SINGLE)[0])
    call, pin = msgs["107"], msgs["108"]
    assert (call.kind, call.text, call.author_id, call.author) == ("service", "phone_call", *OWNER)
    assert (pin.kind, pin.text, pin.author_id, pin.author) == ("service", "pin_message", *ALICE)
    assert pin.reply_to is None  # the pinned message id is not a reply


@pytest.mark.parametrize(
    ("msg_id", "text"),
    [
        ("110", "Summit view"),  # photo with caption
        ("111", ""),             # photo without caption, "(File not included...)" placeholder
        ("112", "Trail video"),  # file placeholder, video_file
        ("113", ""),             # sticker: sticker_emoji is not the person's words
        ("114", ""),             # voice_message
        ("115", ""),             # poll
        ("116", ""),             # location_information
        ("117", ""),             # contact_information
        ("121", ""),             # video_message
        ("122", "lol"),          # animation with caption
        ("123", "our song"),     # audio_file with caption
    ],
)
def test_media_messages(msg_id: str, text: str) -> None:
    m = by_id(read(SINGLE)[0])[msg_id]
    assert (m.kind, m.text) == ("media", text)


def test_dst_jump_uses_date_unixtime() -> None:
    msgs = by_id(read(SINGLE)[0])
    # local `date` goes 02:45 -> 02:05 when clocks go back; date_unixtime moves forward
    assert msgs["118"].timestamp == utc(2021, 10, 31, 0, 45)
    assert msgs["119"].timestamp == utc(2021, 10, 31, 1, 5)
    assert msgs["118"].timestamp.tzinfo is UTC


# -- full-account export -------------------------------------------------------------------------


def test_full_export_owner_and_chats() -> None:
    messages, report = read(FULL)
    assert report.owners == {"user1000001": "Owen Owner"}  # last name's trailing space stripped
    chats = list(dict.fromkeys((m.chat_id, m.chat_name) for m in messages))
    assert chats == [
        ("1000001", "Saved Messages"),   # saved_messages: no "name" key
        ("5000001", "Hiking Club"),      # private_supergroup
        ("4000009", "Deleted Account"),  # "name": null
        ("6000001", "Old Team"),         # from left_chats.list
    ]
    assert [m.id for m in messages] == [
        "201", "301", "302", "303", "304", "305", "306", "307", "401", "402", "403", "501", "502",
    ]
    # the saved, forwarded note and the left chat's unsupported message
    assert report.skipped == Counter({"forwarded": 1, "unsupported": 1})


def test_full_export_group_quirks() -> None:
    msgs = by_id(read(FULL)[0])
    assert (msgs["301"].kind, msgs["301"].text) == ("service", "invite_members")
    assert (msgs["302"].author_id, msgs["302"].author) == ("channel7000001", "Hiking Club News")
    assert (msgs["303"].author_id, msgs["303"].author) == ("user4000009", None)  # from: null
    assert msgs["306"].reply_to == "302"
    assert msgs["307"].reply_to is None  # reply_to_peer_id: a message of another chat
    # spring forward: local 01:55 -> 03:05 is ten real minutes
    assert msgs["305"].timestamp - msgs["304"].timestamp == utc(2021, 1, 1, 0, 10) - utc(2021, 1, 1)
    joined = msgs["401"]
    assert (joined.kind, joined.text, joined.author, joined.author_id) == (
        "service", "joined_telegram", None, "user4000009"
    )
    assert (msgs["501"].kind, msgs["501"].text, msgs["501"].chat_name) == (
        "service", "create_group", "Old Team"
    )


def test_replies_chat_has_a_name(tmp_path: Path) -> None:
    path = write_json(tmp_path / "result.json", {
        "personal_information": {"user_id": 7, "first_name": "", "last_name": "",
                                 "username": "@solo"},
        "chats": {"about": "", "list": [
            {"type": "replies", "id": 708513, "messages": [tg_message(1)]}]},
    })
    messages, report = read(path)
    assert [(m.chat_id, m.chat_name, m.id) for m in messages] == [("708513", "Replies", "1")]
    assert report.owners == {"user7": "@solo"}  # no first/last name: the username


def test_old_export_without_date_unixtime() -> None:
    messages, report = read(FIXTURES / "old_export.json")
    assert [(m.id, m.author_id, m.timestamp, m.text, m.kind, m.reply_to) for m in messages] == [
        ("11", "user4000003", datetime(2019, 5, 31, 21, 28, 30), "Hello from 2019", "text", None),
        ("12", "user1000001", datetime(2019, 5, 31, 21, 29), "Hi Carol", "text", "11"),
        ("13", "user4000003", datetime(2019, 5, 31, 21, 30), "phone_call", "service", None),
    ]
    assert messages[0].timestamp.tzinfo is None  # local time with no zone stays naive
    assert report.skipped == Counter()


def test_control_character_escapes_are_repaired() -> None:
    messages, _ = read(FIXTURES / "control_escapes.json")
    assert [m.text for m in messages] == [
        "bell\x01here\x0b!",
        "path C:\\xampp\\x01 is \\\x10 odd",  # escaped backslashes before x stay as they are
    ]


@pytest.mark.parametrize("shift", range(-7, 7))
def test_control_escape_across_read_boundary(tmp_path: Path, shift: int) -> None:
    # Put `\\\x01` (an escaped backslash, then Telegram's bad escape) across the 64 KiB read.
    head = '{"name": "A", "type": "personal_chat", "id": 1, "messages": [{"id": 1, "text": "'
    pad = "a" * (65536 + shift - len(head))
    raw = (head + pad + '\\\\\\x01z"}, {"id": 2, "text": "\\\\x41"}]}').encode()
    path = tmp_path / "result.json"
    path.write_bytes(raw)
    messages, _ = read(path)
    assert [m.text for m in messages] == [pad + "\\\x01z", "\\x41"]


def test_metadata_after_messages_is_found(tmp_path: Path) -> None:
    single = write_json(tmp_path / "single.json", {
        "messages": [tg_message(1, "first")], "name": "Late Meta", "type": "personal_chat",
        "id": 99,
    })
    messages, _ = read(single)
    assert [(m.chat_id, m.chat_name, m.text) for m in messages] == [("99", "Late Meta", "first")]

    full = write_json(tmp_path / "full.json", {"chats": {"about": "", "list": [
        {"name": "One", "type": "private_group", "id": 1, "messages": [tg_message(1)]},
        {"messages": [tg_message(2)], "type": "saved_messages", "id": 2},
    ]}})
    messages, _ = read(full)
    assert [(m.chat_id, m.chat_name, m.id) for m in messages] == [
        ("1", "One", "1"), ("2", "Saved Messages", "2"),
    ]


def minimal_export(chats: list[dict]) -> dict:
    """A full-account export as other tools write it: chats without an `id`."""
    return {"chats": {"list": chats}}


def test_chats_without_id_get_stable_distinct_ids(tmp_path: Path) -> None:
    chats = [
        {"name": "Alice", "type": "personal_chat", "messages": [tg_message(1, "a")]},
        {"name": "Bob", "type": "personal_chat", "messages": [tg_message(1, "b")]},
        {"name": "Alice", "type": "private_group", "messages": [tg_message(1, "c")]},
        {"name": "Alice", "type": "personal_chat", "messages": [tg_message(1, "d")]},  # namesake
        {"messages": [tg_message(1, "e")]},  # neither name nor type: its place names it
        {"messages": [tg_message(1, "f")]},
        {"name": "Carol", "type": "personal_chat", "id": 77, "messages": [tg_message(1, "g")]},
    ]
    path = write_json(tmp_path / "result.json", minimal_export(chats))
    messages, report = read(path)
    assert [m.text for m in messages] == list("abcdefg")  # no chat skipped
    ids = [m.chat_id for m in messages]
    assert len(set(ids)) == len(chats)  # one message per chat, and no two chats share an id
    assert ids[-1] == "77"  # a real id is kept as it is
    assert all(not i.isdigit() for i in ids[:-1])  # derived ids cannot be mistaken for real ones
    assert [m.chat_name for m in messages[:2]] == ["Alice", "Bob"]
    assert len(report.notes) == 6 and all("no usable id" in n for n in report.notes)
    assert [m.chat_id for m in read(path)[0]] == ids  # the same export, the same ids

    # Another export of the same account, with a chat more in front: named chats keep their ids.
    again = write_json(tmp_path / "again.json", minimal_export([
        {"name": "Dana", "type": "personal_chat", "messages": [tg_message(1, "z")]}, *chats[:4],
    ]))
    assert [m.chat_id for m in read(again)[0]][1:] == ids[:4]


def test_chats_without_id_keep_their_replies(tmp_path: Path) -> None:
    chat = {"name": "Alice", "type": "personal_chat", "messages": [
        tg_message(1, "question?"), tg_message(2, "answer", reply_to_message_id=1)]}
    path = write_json(tmp_path / "result.json", minimal_export([chat]))
    first, second = read(path)[0]
    assert second.reply_to == first.id and first.chat_id == second.chat_id


def test_single_chat_export_without_id(tmp_path: Path) -> None:
    raw = {"name": "Alice", "type": "personal_chat", "messages": [tg_message(1), tg_message(2)]}
    path = write_json(tmp_path / "result.json", raw)
    assert sniff_telegram(path.read_bytes())
    messages, _ = read(path)
    assert [m.id for m in messages] == ["1", "2"]
    assert len({m.chat_id for m in messages}) == 1 and messages[0].chat_name == "Alice"
    # The same chat inside a full export is the same chat: the same derived id.
    full = write_json(tmp_path / "full.json", minimal_export([raw]))
    assert read(full)[0][0].chat_id == messages[0].chat_id


def test_bad_messages_are_skipped_and_counted(tmp_path: Path) -> None:
    path = write_json(tmp_path / "result.json", {
        "name": "Alice Example", "type": "personal_chat", "id": 4000001, "messages": [
            tg_message(1, "good one"),
            {**tg_message(2), "id": "abc"},
            {**tg_message(3), "date_unixtime": "soon"},
            tg_message(4, 42),
            {**tg_message(5), "from": 7},
            tg_message(6, ["ok ", 3]),
            42,
            ["not", "an", "object"],
            {**tg_message(9), "type": "something_new"},
            tg_message(10, "good two"),
        ]})
    messages, report = read(path)
    assert [(m.id, m.text) for m in messages] == [("1", "good one"), ("10", "good two")]
    assert report.skipped == Counter({"malformed message": 7, "unknown message type": 1})


# -- broken files ---------------------------------------------------------------------------------


def test_truncated_single_chat_names_file_and_place(tmp_path: Path) -> None:
    raw = SINGLE.read_bytes()
    cut = raw[: raw.index(b'"id": 105') + 20]  # inside the 5th message
    path = tmp_path / "result.json"
    path.write_bytes(cut)
    got = []
    report = ImportReport()
    with pytest.raises(ExportError) as err:
        for m in read_telegram(path, report):
            got.append(m.id)
    assert got == ["101", "102", "103", "104"]  # what came before the cut was read
    assert err.value.path == str(path)
    assert err.value.where == f"chat 1, message 5, byte {len(cut)} (end of file)"
    assert "truncated JSON" in err.value.reason
    assert str(path) in str(err.value)


def test_truncated_full_export_names_the_chat(tmp_path: Path) -> None:
    raw = FULL.read_bytes()
    cut = raw[: raw.index(b'"id": 303') + 5]
    path = tmp_path / "result.json"
    path.write_bytes(cut)
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert err.value.where == f"chat 2, message 3, byte {len(cut)} (end of file)"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b" \n\t\n", "empty file (no JSON in it)"),
        (b"[1, 2, 3]", "not a Telegram export: the top level is not a JSON object"),
        (b'{"foo": 1, "bar": [1, 2]}',
         "not a Telegram export: the JSON object has neither 'messages' nor 'chats'"),
        (b'{"guild": {"id": "1", "name": "G"}, "channel": {"id": "2"}, "messages": []}',
         "not a Telegram export: this looks like a DiscordChatExporter file"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}',
         "not a Telegram export: the chat has no 'id', 'name' or 'type'"),
        (b'{"name": "A", "type": "personal_chat", "id": 1, "messages": {"a": 1}}',
         "'messages' is not a list"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(content)
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert err.value.reason == reason
    assert err.value.path == str(path)


def test_invalid_json_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    raw = b'{"name": "A", "type": "personal_chat", "id": 1, "messages": [{"id": tru}]}'
    path.write_bytes(raw)
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert err.value.where == f"chat 1, message 1, bytes 1-{len(raw)}"
    assert err.value.reason.startswith("invalid JSON (lexical error")
    assert "tru" not in err.value.reason  # the parser's quote of the file is left out

    path.write_bytes(b"hello, this is not JSON")
    with pytest.raises(ExportError, match="invalid JSON"):
        list(read_telegram(path, ImportReport()))

    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert (err.value.where, err.value.reason.startswith("not UTF-8 text")) == ("byte 1", True)


def test_wrong_encoding_names_file_and_byte(tmp_path: Path) -> None:
    text = json.dumps({"name": "Café", "type": "personal_chat", "id": 1,
                       "messages": [tg_message(1, "x" * 70_000 + " café")]}, ensure_ascii=False)
    path = tmp_path / "result.json"
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert err.value.path == str(path)
    assert err.value.where == f"byte {text.index('é') + 1}"
    assert err.value.reason.startswith("not UTF-8 text")

    # the same mistake past the first 64 KiB read: the offset is still exact
    late = text.replace("Café", "Cafe")
    path.write_bytes(late.encode("cp1252"))
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert err.value.where == f"byte {late.index('é') + 1}"

    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(ExportError) as err:
        list(read_telegram(path, ImportReport()))
    assert "UTF-16" in err.value.reason


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(b"\xef\xbb\xbf" + SINGLE.read_bytes())
    assert len(read(path)[0]) == 21


# -- sniffing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single_chat.json", "full_export.json", "old_export.json"])
def test_sniff_accepts_telegram_exports(name: str) -> None:
    raw = (FIXTURES / name).read_bytes()
    assert sniff_telegram(raw[:65536])
    assert sniff_telegram(raw[:400])  # a head cut mid-file


def test_sniff_accepts_empty_chat_export() -> None:
    assert sniff_telegram(b'{"name": "A", "type": "personal_chat", "id": 1, "messages": []}')


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"[1, 2]",
        b'{"guild": {"id": "1", "name": "G"}, "channel": {"id": "2", "name": "c"}, "messages": '
        b'[{"id": "3", "type": "Default", "timestamp": "2021-01-01T00:00:00+00:00"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}]}',
        b'{"name": "x", "type": "pkg", "id": 3, "version": "1.0"}',
        b"12/31/21, 10:01 PM - Alice: hello",
        b"\x89PNG\r\n\x1a\n\x00\x00",
        b"\xff\xfe{\x00\"\x00",
    ],
)
def test_sniff_rejects_other_files(head: bytes) -> None:
    assert not sniff_telegram(head)


# -- streaming ------------------------------------------------------------------------------------


def test_large_export_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('{\n "name": "Big Chat",\n "type": "personal_chat",\n "id": 42,\n "messages": [')
        while f.tell() < 30_000_000:
            text = ["héllo ", {"type": "bold", "text": f"wörld {n} " * 60}]
            m = tg_message(n, text, text_entities=[{"type": "plain", "text": "héllo "}])
            f.write(("," if n else "") + "\n  " + json.dumps(m, ensure_ascii=False))
            n += 1
        f.write("\n ]\n}\n")
    size = path.stat().st_size

    report = ImportReport()
    count = last = 0
    tracemalloc.start()
    try:
        for m in read_telegram(path, report):
            count += 1
            last = m
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert last.id == str(n - 1) and last.text.startswith(f"héllo wörld {n - 1} ")
    assert peak < size / 20, f"peak {peak} bytes while reading a {size} byte file"
