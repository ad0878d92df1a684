"""Discord importers: DiscordChatExporter JSON and CSV, and Discord's own data package."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from training.importers.discord import (
    is_discord_package,
    read_discord_csv,
    read_discord_json,
    read_discord_package,
    sniff_discord_csv,
    sniff_discord_json,
)
from training.message import ExportError, ImportReport, Message

FIXTURES = Path(__file__).parent / "fixtures" / "discord"
GUILD_JSON = FIXTURES / "guild_channel.json"
DM_JSON = FIXTURES / "dm.json"
CSV_NOW = FIXTURES / "Cool Server - general [222222222222222222].csv"
CSV_OLD = FIXTURES / "Old Server - random [987654321098765432] [part 2].csv"
PACKAGE = FIXTURES / "package"
PACKAGE_OLD = FIXTURES / "package_old"
PLUS_ONE = timezone(timedelta(hours=1))


def read(reader, path: Path) -> tuple[list[Message], ImportReport]:
    report = ImportReport()
    return list(reader(path, report)), report


def by_id(messages: list[Message]) -> dict[str, Message]:
    return {m.id: m for m in messages}


# --- DiscordChatExporter JSON -------------------------------------------------------------------

def test_dce_json_guild_channel_order_and_skips():
    messages, report = read(read_discord_json, GUILD_JSON)
    assert [m.id for m in messages] == [
        "1000000000000000001", "1000000000000000002", "1000000000000000003",
        "1000000000000000004", "1000000000000000005", "1000000000000000006",
        "1000000000000000007", "1000000000000000008", "1000000000000000009",
        "1000000000000000012",
    ]
    # ...010 has no content and nothing attached; ...011 has an unreadable timestamp.
    assert report.skipped == {"empty": 1, "bad timestamp": 1}
    assert report.owners == {}
    assert {m.platform for m in messages} == {"discord"}
    assert {m.chat_id for m in messages} == {"222222222222222222"}
    assert {m.chat_name for m in messages} == {"Cool Server / #general"}


def test_dce_json_raw_markdown_is_rendered():
    first = by_id(read(read_discord_json, GUILD_JSON)[0])["1000000000000000001"]
    # <@id> and <@!id> by the mentions list (nickname first, else name; unknown -> @user),
    # the export's own channel by name, other channels and roles generically, custom emoji by name.
    assert first.text == (
        "hey @Alice A and @bob, see #general and #channel, ping @role :pepe: :dance: @user"
    )
    assert first.author == "Alice A"
    assert first.author_id == "333333333333333333"
    assert first.kind == "text"
    assert first.reply_to is None
    assert first.timestamp == datetime(2021, 12, 31, 22, 1, 5, 123000, tzinfo=PLUS_ONE)
    assert first.timestamp.utcoffset() == timedelta(hours=1)


def test_dce_json_replies():
    msgs = by_id(read(read_discord_json, GUILD_JSON)[0])
    reply = msgs["1000000000000000002"]
    assert reply.kind == "text"
    assert reply.text == "yes!\nsecond line"
    assert reply.author == "Bobby"
    assert reply.reply_to == "1000000000000000001"
    # Seven fractional digits (.NET's round-trip format) still parse.
    assert reply.timestamp == datetime(2021, 12, 31, 22, 2, tzinfo=PLUS_ONE)
    # A reference into another channel is not a reply inside this chat.
    assert msgs["1000000000000000003"].reply_to is None


def test_dce_json_system_messages_are_service():
    msgs = by_id(read(read_discord_json, GUILD_JSON)[0])
    pinned, call = msgs["1000000000000000004"], msgs["1000000000000000005"]
    join, thread = msgs["1000000000000000008"], msgs["1000000000000000012"]
    assert (pinned.kind, pinned.text, pinned.reply_to) == ("service", "Pinned a message.", None)
    assert (call.kind, call.text) == ("service", "Started a call that lasted 251 minutes.")
    assert (join.kind, join.text, join.author) == ("service", "Joined the server.", "newbie")
    # An empty nickname falls back to the account name.
    assert (thread.kind, thread.text, thread.author) == ("service", "Started a thread.", "alice")


def test_dce_json_media_and_bots():
    msgs = by_id(read(read_discord_json, GUILD_JSON)[0])
    attachment, sticker = msgs["1000000000000000006"], msgs["1000000000000000009"]
    assert (attachment.kind, attachment.text, attachment.author) == ("media", "", "Bobby")
    assert (sticker.kind, sticker.text) == ("media", "")
    bot = msgs["1000000000000000007"]
    assert (bot.kind, bot.text, bot.author, bot.author_id) == (
        "text", "Beep boop, I am a bot.", "HelperBot", "999000000000000001"
    )


def test_dce_json_direct_messages():
    messages, report = read(read_discord_json, DM_JSON)
    assert report.skipped == {}
    assert [(m.id, m.kind, m.text, m.reply_to) for m in messages] == [
        ("1100000000000000001", "text", "hi @alice, rendered already :smile:", None),
        ("1100000000000000002", "service", "Started a call that lasted 3 minutes.", None),
        # A reference without channelId stays inside this chat.
        ("1100000000000000003", "text", "answering", "1100000000000000001"),
    ]
    assert {(m.chat_id, m.chat_name) for m in messages} == {("666666666666666666", "alice")}
    assert messages[0].timestamp == datetime(2022, 1, 1, 9, 0, tzinfo=UTC)


def test_dce_json_with_bom_reads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + DM_JSON.read_bytes())
    assert [m.id for m in read(read_discord_json, path)[0]] == [
        "1100000000000000001", "1100000000000000002", "1100000000000000003",
    ]


def test_dce_json_channel_after_messages(tmp_path):
    # Not what DCE writes, but still one valid export: the header pass reads on to find it.
    path = tmp_path / "reordered.json"
    path.write_text(
        '{"messages": [{"id": "5", "type": "Default", "timestamp": "2022-01-01T00:00:00Z",'
        ' "content": "hi", "author": {"id": "7", "name": "zed"}}],'
        ' "channel": {"id": "9", "name": "side"}, "guild": {"id": "1", "name": "G"}}',
        encoding="utf-8",
    )
    [m] = read(read_discord_json, path)[0]
    assert (m.chat_id, m.chat_name, m.id, m.author_id, m.author, m.text) == (
        "9", "G / #side", "5", "7", "zed", "hi"
    )
    assert m.timestamp == datetime(2022, 1, 1, tzinfo=UTC)


def test_dce_json_truncated_streams_then_fails(tmp_path):
    data = GUILD_JSON.read_bytes()
    cut = data.index(b'"id": "1000000000000000004"')
    path = tmp_path / "truncated.json"
    path.write_bytes(data[:cut])
    report = ImportReport()
    got = []
    with pytest.raises(ExportError) as err:
        for m in read_discord_json(path, report):
            got.append(m.id)
    # The messages before the cut arrived before the error: the file is streamed.
    assert got == ["1000000000000000001", "1000000000000000002", "1000000000000000003"]
    assert err.value.path == str(path)
    assert "truncated.json" in str(err.value)
    assert err.value.where.startswith("message 4, near byte ")
    assert "premature EOF" in err.value.reason


def test_dce_json_not_utf8(tmp_path):
    data = DM_JSON.read_bytes().replace(b"answering", b"answ\xe9ring")
    path = tmp_path / "latin1.json"
    path.write_bytes(data)
    with pytest.raises(ExportError) as err:
        list(read_discord_json(path, ImportReport()))
    assert "latin1.json" in str(err.value)
    assert err.value.where.startswith("message 3, near byte ")
    assert "UTF8" in err.value.reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"[1, 2, 3]", "not a DiscordChatExporter export"),
        (b'{"guild": {"id": "1", "name": "G"}, "messages": []}', "no channel id"),
        (b'{"guild": {"id": "1", "na', "truncated or invalid JSON"),
    ],
)
def test_dce_json_unreadable(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ExportError) as err:
        list(read_discord_json(path, ImportReport()))
    assert err.value.path == str(path)
    assert reason in err.value.reason


def test_sniff_discord_json():
    data = GUILD_JSON.read_bytes()
    # Enough of the head to reach the "messages" key is enough, even cut mid-message.
    head = data[: data.index(b'"messages"') + 40]
    assert sniff_discord_json(head)
    assert sniff_discord_json(b"\xef\xbb\xbf" + DM_JSON.read_bytes())
    # Before "messages" the head cannot tell yet.
    assert not sniff_discord_json(data[: data.index(b'"messages"')])
    # A Telegram export, a list, nested keys, garbage.
    assert not sniff_discord_json(b'{"name": "x", "type": "personal_chat", "messages": []}')
    assert not sniff_discord_json(b'[{"guild": 1, "channel": 2, "messages": 3}]')
    assert not sniff_discord_json(b'{"messages": [{"guild": {}, "channel": {}}]}')
    assert not sniff_discord_json(b"hello")


# --- DiscordChatExporter CSV --------------------------------------------------------------------

def test_dce_csv_current_header():
    messages, report = read(read_discord_csv, CSV_NOW)
    assert [(m.author_id, m.author, m.text, m.kind) for m in messages] == [
        ("333333333333333333", "alice", 'hello "world"', "text"),
        ("444444444444444444", "bob", "line one\nline two, with comma", "text"),
        ("444444444444444444", "bob", "", "media"),
        ("333333333333333333", "alice", "Pinned a message.", "service"),
        ("333333333333333333", "alice", "Started a call that lasted 251 minutes.", "service"),
        ("333333333333333333", "alice", 'hello "world"', "text"),
    ]
    # One row has 7 cells for 6 columns, one a date nobody can read, one nothing at all.
    assert report.skipped == {"malformed row": 1, "bad timestamp": 1, "empty": 1}
    assert {(m.platform, m.chat_id, m.chat_name) for m in messages} == {
        ("discord", "222222222222222222", "Cool Server - general")
    }
    assert messages[0].timestamp == datetime(2021, 12, 31, 22, 1, 5, 123000, tzinfo=PLUS_ONE)
    assert {m.reply_to for m in messages} == {None}
    # Ids are stable hashes: same on a re-read, distinct for equal text at another time.
    ids = [m.id for m in messages]
    assert ids == [m.id for m in read(read_discord_csv, CSV_NOW)[0]]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 for i in ids)


def test_dce_csv_older_header_and_dates():
    messages, report = read(read_discord_csv, CSV_OLD)
    assert report.skipped == {}
    assert [(m.author_id, m.author, m.timestamp, m.text, m.kind) for m in messages] == [
        ("carol#1234", "carol#1234", datetime(2021, 12, 31, 22, 1),
         'old style,\nmulti-line "quoted"', "text"),
        ("dave#5678", "dave#5678", datetime(2021, 12, 31, 22, 2), "month-first date", "text"),
        ("carol#1234", "carol#1234", datetime(2022, 1, 1, 9, 15), "", "media"),
    ]
    # Locale dates carry no zone: naive.
    assert all(m.timestamp.tzinfo is None for m in messages)
    # " [part 2]" of a partitioned export is not part of the chat.
    assert {(m.chat_id, m.chat_name) for m in messages} == {
        ("987654321098765432", "Old Server - random")
    }


def test_dce_csv_without_id_in_name_uses_stem(tmp_path):
    path = tmp_path / "my export.csv"
    path.write_text('author,date,content\nzed,2022-01-01T00:00:00Z,"hi"\n', encoding="utf-8")
    [m] = read(read_discord_csv, path)[0]
    assert (m.chat_id, m.chat_name, m.author_id, m.text) == ("my export", "my export", "zed", "hi")
    assert m.timestamp == datetime(2022, 1, 1, tzinfo=UTC)


def test_dce_csv_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "Guild - chan [5].csv"
    path.write_bytes(
        b"AuthorID,Author,Date,Content,Attachments,Reactions\n"
        b'"1","a","2022-01-01T00:00:00Z","ok","",""\n'
        b'"1","a","2022-01-01T00:01:00Z","caf\xe9","",""\n'
    )
    with pytest.raises(ExportError) as err:
        list(read_discord_csv(path, ImportReport()))
    assert "Guild - chan [5].csv" in str(err.value)
    assert err.value.where.startswith("line 3")


@pytest.mark.parametrize(
    ("content", "where", "reason"),
    [
        (b"", None, "empty file"),
        (b"Author,Content\nx,y\n", "line 1", "lacks column(s) date"),
        (b"just some text\n", "line 1", "lacks column(s) author, date, content"),
    ],
)
def test_dce_csv_unreadable(tmp_path, content, where, reason):
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(ExportError) as err:
        list(read_discord_csv(path, ImportReport()))
    assert err.value.path == str(path)
    assert err.value.where == where
    assert reason in err.value.reason


def test_sniff_discord_csv():
    assert sniff_discord_csv("AuthorID,Author,Date,Content,Attachments,Reactions")
    assert sniff_discord_csv("\ufeffAuthor,Date,Content,Attachments\r\n")
    assert sniff_discord_csv("authorid,author,date,content")
    assert not sniff_discord_csv("author,text,timestamp")
    assert not sniff_discord_csv("question,answer")
    assert not sniff_discord_csv("12/31/21, 10:01 PM - Ana: hi")


# --- Discord's data package ---------------------------------------------------------------------

def test_package_messages_and_owner():
    messages, report = read(read_discord_package, PACKAGE)
    assert report.owners == {"123456789012345678": "Neo Anderson"}
    assert report.skipped == {"empty": 1, "bad timestamp": 1, "missing id": 1}
    assert [(m.chat_id, m.chat_name, m.id, m.timestamp, m.text, m.kind) for m in messages] == [
        ("1111111111111111111", "Direct Message with trinity#0", "1234567890123456789",
         datetime(2023, 5, 2, 10, 0, tzinfo=UTC), "newest first", "text"),
        ("1111111111111111111", "Direct Message with trinity#0", "1234567890123456700",
         datetime(2023, 5, 1, 9, 0, 0, 123000, tzinfo=UTC), "", "media"),
        # +02:00 in the file, UTC here.
        ("1111111111111111111", "Direct Message with trinity#0", "1234567890123456001",
         datetime(2023, 5, 1, 6, 0, tzinfo=UTC), "with an offset\nand two lines", "text"),
        # index.json maps this channel to null: the name comes from channel.json.
        ("2222222222222222222", "Zion / #general", "2345678901234567891",
         datetime(2023, 6, 1, 12, 0, 0, 500000, tzinfo=UTC), "in a server", "text"),
    ]
    assert all(m.timestamp.tzinfo is UTC for m in messages)
    assert {(m.platform, m.author_id, m.author, m.reply_to) for m in messages} == {
        ("discord", "123456789012345678", "Neo Anderson", None)
    }


def test_package_big_ids_are_exact():
    messages, _ = read(read_discord_package, PACKAGE)
    ids = [m.id for m in messages]
    assert ids[0] == "1234567890123456789"
    assert ids[1] == "1234567890123456700"
    # Through a float these would have come out different.
    for i in ids:
        assert int(i) > 2**53
        assert str(int(float(i))) != i
    old, _ = read(read_discord_package, PACKAGE_OLD)
    assert [m.id for m in old] == ["9223372036854775807", "3456789012345678901"]


def test_package_given_its_messages_folder():
    from_root, _ = read(read_discord_package, PACKAGE)
    from_messages, report = read(read_discord_package, PACKAGE / "messages")
    assert from_messages == from_root
    assert report.owners == {"123456789012345678": "Neo Anderson"}


def test_package_old_layout_without_account():
    # "Messages" casing, a channel folder without the "c", Channel.json, messages.csv.
    messages, report = read(read_discord_package, PACKAGE_OLD)
    assert report.owners == {"me": "me"}
    assert report.skipped == {}
    assert [(m.chat_id, m.chat_name, m.author_id, m.author, m.timestamp, m.text, m.kind)
            for m in messages] == [
        ("3333333333333333333", "general in Old Guild", "me", "me",
         datetime(2019, 3, 4, 5, 6, 7, 891000, tzinfo=UTC),
         "old csv, with comma\nand a second line", "text"),
        ("3333333333333333333", "general in Old Guild", "me", "me",
         datetime(2019, 3, 4, 5, 0, tzinfo=UTC), "", "media"),
    ]
    assert read(read_discord_package, PACKAGE_OLD / "Messages")[0] == messages


def test_package_numeric_owner_id_and_fallbacks(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(PACKAGE, root)
    # An id written as a JSON number above 2**53, no global name: exact digits, the username.
    (root / "account" / "user.json").write_text(
        '{"id": 123456789012345678901, "username": "neo", "global_name": null}', encoding="utf-8"
    )
    # A channel neither index.json nor channel.json names.
    chan = root / "messages" / "c3333333333333333333"
    chan.mkdir()
    (chan / "channel.json").write_text('{"id": "3333333333333333333", "type": 1}')
    (chan / "messages.json").write_text(
        '[{"ID": 3333333333333333334, "Timestamp": "2023-01-01 00:00:00", "Contents": "x"}]'
    )
    messages, report = read(read_discord_package, root)
    assert report.owners == {"123456789012345678901": "neo"}
    assert messages[-1].chat_name == "DM"
    assert messages[-1].id == "3333333333333333334"
    assert messages[-1].author_id == "123456789012345678901"


def test_package_truncated_messages_json(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(PACKAGE, root)
    target = root / "messages" / "c2222222222222222222" / "messages.json"
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(ExportError) as err:
        list(read_discord_package(root, ImportReport()))
    assert err.value.path == str(target)
    assert err.value.where.startswith("message 1, near byte ")


def test_package_without_index_is_an_error(tmp_path):
    (tmp_path / "messages" / "c1").mkdir(parents=True)
    with pytest.raises(ExportError) as err:
        list(read_discord_package(tmp_path, ImportReport()))
    assert err.value.path == str(tmp_path)
    assert "messages/index.json" in err.value.reason


def test_is_discord_package():
    assert is_discord_package(PACKAGE)
    assert is_discord_package(PACKAGE / "messages")
    assert is_discord_package(PACKAGE_OLD)
    assert is_discord_package(PACKAGE_OLD / "Messages")
    assert not is_discord_package(FIXTURES)
    assert not is_discord_package(PACKAGE / "messages" / "c1111111111111111111")
    assert not is_discord_package(GUILD_JSON)
