"""Discord: DiscordChatExporter JSON and CSV exports, and Discord's own data package.

Discord ids exceed 2**53, so they stay strings (or exact Python ints turned into strings) and
never pass through a float.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from training.importers.common import JsonGuard, LimitError, StableIds, json_events, json_items
from training.importers.tables import header_names, table_rows
from training.limits import MAX_RECORD_BYTES, size_text
from training.message import ExportError, ImportReport, Kind, Message

PLATFORM = "discord"
_BOM = b"\xef\xbb\xbf"
_DM_GUILD = "Direct Messages"  # DCE's stand-in guild for DMs and group DMs
_CHAT_TYPES = ("Default", "Reply")  # every other DCE message type is a system event
_ATTACHED = ("attachments", "stickers", "embeds")

# Raw Discord markdown tokens that DCE leaves in `content` unless asked to render them.
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_CUSTOM_EMOJI = re.compile(r"<a?:(\w+):\d+>")

# DCE names files "Guild - Channel [channel id].csv", with " [part N]" when partitioned.
_DCE_FILE_NAME = re.compile(r"(?P<name>.*?) \[(?P<id>\d+)\](?: \[part \d+\])?")
# DCE's CSV writes a system message as its fallback text; these are those texts, whole.
_DCE_SYSTEM_TEXT = re.compile(
    r"Added a recipient\.|Removed a recipient\.|Left the group\."
    r"|Added .+ to the group\.|Removed .+ from the group\."
    r"|Started a call that lasted \d+ minutes?\."
    r"|Changed the channel (?:name|icon)(?:: .*)?\.?"
    r"|Pinned a message\.|Started a thread\.|Joined the server\."
)
# Older DCE CSV dates, written in the en-US culture: "31-Dec-21 10:01 PM", "12/31/2021 10:01 PM".
_DCE_OLD_DATES = (
    "%d-%b-%y %I:%M %p", "%d-%b-%y %I:%M:%S %p", "%d-%b-%Y %I:%M %p",
    "%m/%d/%Y %I:%M %p", "%m/%d/%Y %I:%M:%S %p", "%m/%d/%y %I:%M %p",
)
_PACKAGE_CHANNEL_DIR = re.compile(r"c?(\d+)", re.IGNORECASE)


# --- shared helpers -----------------------------------------------------------------------------

class _CountingReader:
    """A binary file for ijson that drops a leading BOM and counts the bytes handed out,
    so a parse error can name roughly where the file broke, and keeps within training.limits.

    ijson's C backend builds each message itself, out of reach; with `records`, the reader
    refuses to go on once MAX_RECORD_BYTES have passed since the caller last set `quiet` to 0
    (which it does for each message it gets), so no message object grows without bound.
    """

    def __init__(self, f: BinaryIO, path: Path | str, records: bool = False, big_ints: bool = False) -> None:
        self._f = f
        self._first = True
        self.pos = 0
        self._guard = JsonGuard(path, big_ints)
        self.quiet: int | None = 0 if records else None

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self._first and data:  # ijson's first call is read(0), to tell bytes from text
            self._first = False
            data = data.removeprefix(_BOM)
        self.pos += len(data)
        self._guard.feed(data)
        if self.quiet is not None:
            self.quiet += len(data)
            if self.quiet > MAX_RECORD_BYTES:
                raise LimitError(self._guard.path, f"bytes {self.pos - self.quiet + 1}-{self.pos}",
                                 f"one message over {size_text(MAX_RECORD_BYTES)}: not a chat export")
        return data


def _json_error(path: Path, where: str, e: Exception) -> ExportError:
    # Only yajl's first line: the rest quotes the file's text, which may be private.
    arg = e.args[0] if e.args else ""
    if isinstance(arg, bytes):
        arg = arg.decode("utf-8", "replace")
    reason = (str(arg).strip().splitlines() or ["invalid JSON"])[0]
    return ExportError(path, where, f"truncated or invalid JSON: {reason}")


def _id(value: Any) -> str | None:
    """A Discord id as a string of digits, or None. Floats would have lost digits: refused."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip().isdigit():
        return value.strip()
    return None


def _find_child(folder: Path, name: str) -> Path | None:
    """folder's child called `name`, compared case-insensitively (package casing varies)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return None
    return next((c for c in children if c.name.lower() == name), None)


# --- DiscordChatExporter JSON -------------------------------------------------------------------

def sniff_discord_json(head: bytes) -> bool:
    """Whether the first bytes of a file are a DCE JSON export: an object whose top-level keys
    include "guild", "channel" and "messages" (nested keys do not count)."""
    seen: set[str] = set()
    try:
        # Small reads: the keys that decide are seen before the guard stops at a bomb further on.
        for prefix, event, value in json_events(_CountingReader(io.BytesIO(head), ""), buf_size=64):
            if prefix == "" and event == "map_key":
                seen.add(value)
                if {"guild", "channel", "messages"} <= seen:
                    return True
            elif prefix == "" and event != "start_map":
                return False  # the top level is not an object
    except (ijson.JSONError, LimitError):
        pass  # the head ends mid-document, or nests too deep
    return False


def _dce_header(path: Path, f: BinaryIO) -> tuple[dict, dict]:
    """The export's `guild` and `channel` objects, read without building `messages`."""
    reader = _CountingReader(f, path, records=True)  # both come first, and are small
    found: dict[str, Any] = {}
    key, builder = None, None
    try:
        for prefix, event, value in json_events(reader):
            if prefix == "":
                if event == "map_key":
                    if value == "messages" and "channel" in found:
                        break  # DCE writes guild and channel first; nothing more to learn
                    key = value
                    builder = ijson.ObjectBuilder() if value in ("guild", "channel") else None
                elif event != "start_map" and event != "end_map":
                    raise ExportError(path, None, "not a DiscordChatExporter export")
                continue
            if builder is not None:
                builder.event(event, value)
                if prefix == key and event not in ("start_map", "start_array", "map_key"):
                    found[key] = builder.value
                    builder = None
                    if len(found) == 2:
                        break
    except ijson.JSONError as e:
        if reader.pos == 0:
            raise ExportError(path, None, "empty file") from None
        raise _json_error(path, f"near byte {reader.pos}", e) from None
    guild, channel = found.get("guild"), found.get("channel")
    if not isinstance(channel, dict) or _id(channel.get("id")) is None:
        raise ExportError(path, None, "not a DiscordChatExporter export: no channel id")
    return (guild if isinstance(guild, dict) else {}), channel


def _dce_chat_name(guild: dict, channel: dict) -> str | None:
    channel_name = channel.get("name") or None
    guild_name = guild.get("name") or None
    if not guild_name or guild_name == _DM_GUILD:
        return channel_name
    return f"{guild_name} / #{channel_name or channel.get('id')}"


def _render_markdown(content: str, mentions: Any, channel_id: str, channel_name: str | None) -> str:
    """Turn raw mention and custom-emoji tokens into what the Discord client shows."""
    if "<" not in content:
        return content
    names: dict[str, str] = {}
    for user in mentions if isinstance(mentions, list) else ():
        if isinstance(user, dict) and (uid := _id(user.get("id"))):
            name = user.get("nickname") or user.get("name")
            if isinstance(name, str) and name:
                names[uid] = name

    def channel(m: re.Match) -> str:
        # Only the exported channel's own name is known; others stay generic.
        return f"#{channel_name}" if m[1] == channel_id and channel_name else "#channel"

    content = _ROLE_MENTION.sub("@role", content)
    content = _USER_MENTION.sub(lambda m: f"@{names.get(m[1], 'user')}", content)
    content = _CHANNEL_MENTION.sub(channel, content)
    return _CUSTOM_EMOJI.sub(lambda m: f":{m[1]}:", content)


def _dce_message(
    m: Any, chat_id: str, chat_name: str | None, channel_name: str | None, report: ImportReport
) -> Message | None:
    if not isinstance(m, dict):
        report.skip("malformed message")
        return None
    mid = _id(m.get("id"))
    if mid is None:
        report.skip("missing id")
        return None
    try:
        timestamp = datetime.fromisoformat(m["timestamp"])
    except (KeyError, TypeError, ValueError):
        report.skip("bad timestamp")
        return None
    content = m.get("content") or ""
    if not isinstance(content, str):
        report.skip("malformed message")
        return None
    author = m.get("author") if isinstance(m.get("author"), dict) else {}
    name = author.get("nickname") or author.get("name")
    text = _render_markdown(content, m.get("mentions"), chat_id, channel_name)

    kind: Kind = "service"
    reply_to = None
    if (m.get("type") or "Default") in _CHAT_TYPES:
        if text.strip():
            kind = "text"
        elif any(m.get(k) for k in _ATTACHED):
            kind, text = "media", ""
        else:
            report.skip("empty")
            return None
        ref = m.get("reference")
        # A reply across channels (a forward, a thread starter) points outside this chat.
        if isinstance(ref, dict) and ref.get("channelId") in (None, "", chat_id):
            reply_to = _id(ref.get("messageId"))
    return Message(
        platform=PLATFORM, chat_id=chat_id, chat_name=chat_name, id=mid,
        author_id=_id(author.get("id")), author=name if isinstance(name, str) else None,
        timestamp=timestamp, text=text, kind=kind, reply_to=reply_to,
    )


def read_discord_json(path: Path, report: ImportReport) -> Iterator[Message]:
    """A DiscordChatExporter JSON export of one channel, streamed one message at a time."""
    path = Path(path)
    with open(path, "rb") as f:
        guild, channel = _dce_header(path, f)
        chat_id = _id(channel["id"]) or ""
        chat_name = _dce_chat_name(guild, channel)
        channel_name = channel.get("name") or None
        # Second pass: the C backend builds each message itself, far faster than events.
        f.seek(0)
        reader = _CountingReader(f, path, records=True)
        n = 0
        try:
            for m in json_items(reader, "messages.item"):
                n += 1
                reader.quiet = 0
                msg = _dce_message(m, chat_id, chat_name, channel_name, report)
                if msg is not None:
                    yield msg
        except ijson.JSONError as e:
            raise _json_error(path, f"message {n + 1}, near byte {reader.pos}", e) from None
        except LimitError as e:
            raise ExportError(path, f"message {n + 1}, {e.where}", e.reason) from None


# --- DiscordChatExporter CSV --------------------------------------------------------------------

def sniff_discord_csv(header_line: str) -> bool:
    """Whether a CSV header line is DCE's (`AuthorID,Author,Date,Content,...` or older)."""
    return {"author", "date", "content"} <= set(header_names(header_line))


def _dce_csv_time(value: str) -> datetime:
    value = value.strip()
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        pass
    for fmt in _DCE_OLD_DATES:
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    raise ValueError(value)


def read_discord_csv(path: Path, report: ImportReport) -> Iterator[Message]:
    """A DiscordChatExporter CSV export of one channel."""
    path = Path(path)
    named = _DCE_FILE_NAME.fullmatch(path.stem)
    chat_id, chat_name = (named["id"], named["name"]) if named else (path.stem, path.stem)
    ids = StableIds()
    rows = table_rows(
        path, ("author", "date", "content"), ("authorid", "attachments", "reactions"),
        report, "DiscordChatExporter CSV",
    )
    for _, cells in rows:
        author = cells["author"].strip() or None
        author_id = cells.get("authorid", "").strip() or author
        try:
            timestamp = _dce_csv_time(cells["date"])
        except ValueError:
            report.skip("bad timestamp")
            continue
        text = cells["content"]
        attachments = cells.get("attachments", "").strip()
        kind: Kind = "text"
        if not text.strip():
            if not attachments:
                report.skip("empty")
                continue
            kind, text = "media", ""
        elif not attachments and _DCE_SYSTEM_TEXT.fullmatch(text.strip()):
            kind = "service"
        yield Message(
            platform=PLATFORM, chat_id=chat_id, chat_name=chat_name,
            id=ids(chat_id, cells["date"], author_id, cells["content"]),
            author_id=author_id, author=author, timestamp=timestamp, text=text, kind=kind,
            reply_to=None,
        )


# --- Discord's data package ---------------------------------------------------------------------

def _package_messages_dir(folder: Path) -> Path | None:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [folder] if folder.name.lower() == "messages" else []
    if (child := _find_child(folder, "messages")) is not None:
        candidates.append(child)
    for c in candidates:
        index = _find_child(c, "index.json") if c.is_dir() else None
        if index is not None and index.is_file():
            return c
    return None


def is_discord_package(folder: Path) -> bool:
    """Whether `folder` is a Discord data package (its root, or its messages folder)."""
    return _package_messages_dir(folder) is not None


def _load_small_json(path: Path) -> Any:
    """A small metadata file (index.json, channel.json), read whole: so one record at most."""
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ExportError(path, None, f"over {size_text(MAX_RECORD_BYTES)}: not Discord's metadata")
    data = path.read_bytes().removeprefix(_BOM)
    JsonGuard(path).feed(data)  # json.loads would recurse once per level
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ExportError(path, f"byte {e.start + 1}", "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise ExportError(path, where, f"invalid JSON: {e.msg}") from None
    except ValueError:  # an integer longer than Python reads
        raise ExportError(path, None, "invalid JSON: a number too long to read") from None


def _package_owner(root: Path, report: ImportReport) -> tuple[str, str]:
    """The account's id and display name from account/user.json, streamed (it can be large)."""
    account = _find_child(root, "account")
    user = _find_child(account, "user.json") if account is not None else None
    fields: dict[str, Any] = {}
    if user is not None and user.is_file():
        try:
            with open(user, "rb") as f:
                reader = _CountingReader(f, user, big_ints=True)  # the id may be a number
                for prefix, event, value in json_events(reader, big_ints=True):
                    if prefix in ("id", "username", "global_name") and event != "map_key":
                        fields[prefix] = value
                        if len(fields) == 3:
                            break
        except (ijson.JSONError, LimitError):
            report.notes.append(f"{user}: unreadable, so the data package owner is called 'me'")
    owner_id = _id(fields.get("id")) or "me"
    names = [fields.get("global_name"), fields.get("username")]
    owner = next((n for n in names if isinstance(n, str) and n.strip()), "me")
    return owner_id, owner


def _package_time(value: Any) -> datetime:
    """`YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM]`, UTC when no offset is given."""
    if not isinstance(value, str):
        raise ValueError(value)
    ts = datetime.fromisoformat(value.strip())
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _package_records(path: Path, report: ImportReport) -> Iterator[dict[str, Any]]:
    """The records of one channel's messages.json (streamed) or older messages.csv, keys
    lower-cased: id, timestamp, contents, attachments."""
    if path.suffix.lower() == ".csv":
        rows = table_rows(
            path, ("id", "timestamp", "contents"), ("attachments",), report,
            "Discord data package messages table",
        )
        for _, cells in rows:
            yield cells  # table_rows already gives lower-case column names
        return
    with open(path, "rb") as f:
        reader = _CountingReader(f, path, records=True, big_ints=True)
        n = 0
        try:
            # Ids are numbers here: exact ints, of any size (Decimal for a fraction, refused).
            for record in json_items(reader, "item", big_ints=True):
                n += 1
                reader.quiet = 0
                if isinstance(record, dict):
                    # Key casing is not guaranteed across package generations.
                    yield {str(k).lower(): v for k, v in record.items()}
                else:
                    report.skip("malformed message")
        except ijson.JSONError as e:
            if reader.pos == 0:
                raise ExportError(path, None, "empty file") from None
            raise _json_error(path, f"message {n + 1}, near byte {reader.pos}", e) from None
        except LimitError as e:
            raise ExportError(path, f"message {n + 1}, {e.where}", e.reason) from None


def _package_chat_name(index_name: Any, channel: dict) -> str:
    if isinstance(index_name, str) and index_name.strip():
        return index_name
    name = channel.get("name")
    if isinstance(name, str) and name:
        guild = channel.get("guild")
        guild_name = guild.get("name") if isinstance(guild, dict) else None
        return f"{guild_name} / #{name}" if guild_name else name
    return "DM"


def read_discord_package(path: Path, report: ImportReport) -> Iterator[Message]:
    """Discord's own data package: only the owner's messages, each channel newest first."""
    path = Path(path)
    messages_dir = _package_messages_dir(path)
    if messages_dir is None:
        raise ExportError(path, None, "not a Discord data package: no messages/index.json")
    owner_id, owner = _package_owner(messages_dir.parent, report)
    report.owners[owner_id] = owner
    index_path = _find_child(messages_dir, "index.json")
    assert index_path is not None  # _package_messages_dir found it
    index = _load_small_json(index_path)
    if not isinstance(index, dict):
        raise ExportError(index_path, None, "index.json is not an object of channel ids")

    for folder in sorted(messages_dir.iterdir()):
        named = _PACKAGE_CHANNEL_DIR.fullmatch(folder.name)
        if named is None or not folder.is_dir():
            continue
        channel_file = _find_child(folder, "channel.json")
        channel = _load_small_json(channel_file) if channel_file is not None else {}
        channel = channel if isinstance(channel, dict) else {}
        chat_id = _id(channel.get("id")) or named[1]
        chat_name = _package_chat_name(index.get(chat_id, index.get(named[1])), channel)
        source = _find_child(folder, "messages.json") or _find_child(folder, "messages.csv")
        if source is None:
            report.notes.append(f"{folder}: no messages.json or messages.csv, channel skipped")
            continue
        for record in _package_records(source, report):
            msg = _package_message(record, chat_id, chat_name, owner_id, owner, report)
            if msg is not None:
                yield msg


def _package_message(
    record: dict[str, Any], chat_id: str, chat_name: str, owner_id: str, owner: str,
    report: ImportReport,
) -> Message | None:
    mid = _id(record.get("id"))
    if mid is None:
        report.skip("missing id")
        return None
    try:
        timestamp = _package_time(record.get("timestamp"))
    except ValueError:
        report.skip("bad timestamp")
        return None
    text = record.get("contents") or ""
    if not isinstance(text, str):
        report.skip("malformed message")
        return None
    kind: Kind = "text"
    if not text.strip():
        attachments = record.get("attachments")
        if not (attachments.strip() if isinstance(attachments, str) else attachments):
            report.skip("empty")
            return None
        kind, text = "media", ""
    return Message(
        platform=PLATFORM, chat_id=chat_id, chat_name=chat_name, id=mid,
        author_id=owner_id, author=owner, timestamp=timestamp, text=text, kind=kind,
        reply_to=None,
    )
