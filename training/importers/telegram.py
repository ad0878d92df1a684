"""Telegram Desktop JSON export ("result.json") -> normalized messages.

Both shapes are read: a single-chat export (an object with name/type/id/messages) and a
full-account export (personal_information, contacts, chats.list[], left_chats.list[]). The file
is streamed with ijson, so memory stays bounded however big the export is.

Quirks handled (see /work/shared/EXPORT_FORMATS.md):
- `text` is a string or a list of strings and entity objects; the visible text is every part's
  text joined. `text_entities` is the fallback when `text` is absent.
- `date_unixtime` (epoch seconds, a string) is trusted; `date` (local time, no zone, jumps at
  DST) is used only when it is absent (exports older than 2021), giving a naive datetime.
- Saved Messages / Replies chats have no `name`; a deleted account's chat has `name: null`.
- Telegram Desktop escapes control characters as `\\xHH`, which is not JSON (tdesktop
  issue #27571); those escapes are rewritten to `\\u00HH` while streaming.
- Older exports write `from_id` / `actor_id` as a bare number; it becomes "user<number>".
- Chat metadata comes before `messages` in real exports. When it does not, the file is scanned
  once more, streaming, for that chat's id/type/name, so the result is the same.
- Minimal exports made by other tools may leave a chat's `id` out. Such a chat gets a stable
  id derived from its type and name (or its place in the file) instead of being skipped.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import ijson

from training.importers.common import JsonGuard, LimitError, json_events
from training.limits import MAX_RECORD_BYTES, size_text
from training.message import ExportError, ImportReport, Kind, Message

__all__ = ["read_telegram", "sniff_telegram"]

PLATFORM = "telegram"
_CHUNK = 64 * 1024
# What the parser asks for at a time: ijson's C backend spends fewer instructions a byte on
# 32 KiB reads than on its default 64 KiB (5% less CPU over a whole export, measured), which
# pays for the limit checks each read now goes through.
_PARSE_READ = 32 * 1024
_BOM = b"\xef\xbb\xbf"
_SCALARS = frozenset({"string", "number", "boolean", "null"})
_OPEN = frozenset({"start_map", "start_array"})
_CLOSE = frozenset({"end_map", "end_array"})
# ijson prefixes of the chat objects of a full-account export.
_CHAT_LISTS = ("chats.list.item", "left_chats.list.item")
_FULL_EXPORT_KEYS = frozenset({"personal_information", "chats", "left_chats"})
_CHAT_TYPES = frozenset({
    "personal_chat", "bot_chat", "private_group", "private_supergroup", "public_supergroup",
    "private_channel", "public_channel", "saved_messages", "replies",
})
_NAMELESS_CHATS = {"saved_messages": "Saved Messages", "replies": "Replies"}
_MEDIA_KEYS = (
    "photo", "file", "media_type", "poll", "location_information", "contact_information",
    "game_title", "invoice_information",
)
# Keys only Telegram's message objects have; used to recognise a single-chat export.
_TELEGRAM_MESSAGE_KEYS = frozenset({"date_unixtime", "from_id", "actor_id", "text_entities"})
# `\xHH` preceded by an even run of backslashes (so the backslash before x is an escape).
_BAD_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\x([0-9A-Fa-f]{2})")


class _NotUtf8(Exception):
    def __init__(self, offset: int, hint: str = "") -> None:
        super().__init__(offset)
        self.offset, self.hint = offset, hint  # 0-based byte offset in the file


class _Malformed(Exception):
    """One message object with a field of the wrong type."""


def _fix_escapes(data: bytes) -> bytes:
    if b"\\x" not in data:
        return data
    return _BAD_ESCAPE.sub(rb"\1\\u00\2", data)


def _safe_cut(data: bytes) -> int:
    """Where to split `data` so no backslash run and no `\\xHH` escape is cut in two."""
    i = data.rfind(b"\\", max(0, len(data) - 4))
    if i < 0:
        return len(data)
    while i > 0 and data[i - 1] == 0x5C:
        i -= 1
    return i


class _Source:
    """The byte stream ijson pulls from: counts bytes, checks UTF-8, repairs `\\xHH` escapes,
    and keeps within training.limits (nesting, one value, one message object)."""

    def __init__(self, raw: BinaryIO, path: Path | str = "") -> None:
        self._raw = raw
        self.pos = 0          # raw bytes consumed so far
        self.last_start = 0   # where the last chunk began, for error messages
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._carry = b""
        self._first = True
        self._guard = JsonGuard(path)
        self.record_from: int | None = None  # `pos` when the object being built began

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson probes the type with read(0)
            return b""
        while True:
            chunk = self._raw.read(n if n > 0 else _CHUNK)
            start = self.pos
            if chunk:
                self.last_start = start
            self.pos += len(chunk)
            if self._first:
                self._first = False
                if chunk[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in chunk[:4]:
                    raise _NotUtf8(0, " (it looks like UTF-16)")
                if chunk.startswith(_BOM):  # a BOM that a Windows editor added
                    chunk, start = chunk[len(_BOM):], start + len(_BOM)
            pending = len(self._decoder.getstate()[0])
            try:
                self._decoder.decode(chunk, not chunk)
            except UnicodeDecodeError as e:
                raise _NotUtf8(start - pending + e.start) from None
            if not chunk:
                out, self._carry = self._carry, b""
                return self._checked(_fix_escapes(out))
            data = self._carry + chunk
            cut = _safe_cut(data)
            self._carry = data[cut:]
            if cut:  # an empty return would tell ijson the file ended
                return self._checked(_fix_escapes(data[:cut]))

    def _checked(self, data: bytes) -> bytes:
        self._guard.feed(data)
        if self.record_from is not None and self.pos - self.record_from > MAX_RECORD_BYTES:
            raise LimitError("", f"bytes {self.record_from + 1}-{self.pos}",
                             f"one message object over {size_text(MAX_RECORD_BYTES)}: not a chat export")
        return data


@dataclass(slots=True)
class _Chat:
    no: int                  # 1-based, across chats.list and left_chats.list, for error places
    prefix: str              # ijson prefix of the chat object; "" for a single-chat export
    list_index: int = 0      # 1-based position within its list (for the re-scan)
    meta: dict = field(default_factory=dict)
    meta_prefixes: dict = field(default_factory=dict)
    messages_prefix: str = ""
    item_prefix: str = ""
    msg_no: int = 0
    chat_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        key = (lambda k: f"{self.prefix}.{k}") if self.prefix else (lambda k: k)
        self.meta_prefixes = {key(k): k for k in ("id", "name", "type")}
        self.messages_prefix = key("messages")
        self.item_prefix = key("messages.item")


def read_telegram(path: Path, report: ImportReport) -> Iterator[Message]:
    """Yield the messages of a Telegram Desktop JSON export, streaming.

    Raises ExportError for a file that cannot be read as a Telegram export at all; a single bad
    message is skipped and counted in `report` instead.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ExportError(path, None, f"cannot read the file ({e.strerror})") from None
    if size == 0:
        raise ExportError(path, None, "empty file")
    yield from _Reader(path, report).run()


class _Reader:
    def __init__(self, path: Path, report: ImportReport) -> None:
        self.path, self.report = path, report
        self.chat: _Chat | None = None
        self.chat_count = 0
        self.list_counts = dict.fromkeys(_CHAT_LISTS, 0)
        self.src: _Source | None = None
        self.any_event = False
        self.derived_ids: Counter[str] = Counter()  # chats without an id, by what names them

    # -- stream and errors -------------------------------------------------------------------

    def _events(self, f: BinaryIO) -> Iterator[tuple[str, str, object]]:
        self.src = _Source(f, self.path)
        events = json_events(self.src, _PARSE_READ)
        try:
            for event in events:  # the first event only: `yield from` hands on the rest in C
                self.any_event = True
                yield event
                yield from events
        except _NotUtf8 as e:
            raise ExportError(
                self.path, f"byte {e.offset + 1}",
                f"not UTF-8 text{e.hint}: Telegram Desktop writes UTF-8; was the file re-saved "
                "in another encoding?",
            ) from None
        except ijson.JSONError as e:
            raise self._json_error(e) from None
        except LimitError as e:
            raise ExportError(self.path, self._where(e.where or ""), e.reason) from None

    def _where(self, place: str) -> str:
        chat = self.chat
        if chat is None or not chat.no:
            return place
        msg = f", message {chat.msg_no}" if chat.msg_no else ""
        return f"chat {chat.no}{msg}, {place}"

    def _json_error(self, e: Exception) -> ExportError:
        detail = e.args[0] if e.args else ""
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        # Only the first line: yajl's next lines quote the file, i.e. someone's messages.
        first = next(iter(str(detail).strip().splitlines()), "").strip()
        src = self.src
        assert src is not None
        if "premature EOF" in first or "Incomplete JSON" in first:
            if not self.any_event:
                return ExportError(self.path, None, "empty file (no JSON in it)")
            return ExportError(
                self.path, self._where(f"byte {src.pos} (end of file)"),
                "truncated JSON: the file ends in the middle (interrupted export or cut copy?)",
            )
        return ExportError(
            self.path, self._where(f"bytes {src.last_start + 1}-{src.pos}"),
            f"invalid JSON ({first or 'parse error'})",
        )

    # -- structure ----------------------------------------------------------------------------

    def run(self) -> Iterator[Message]:
        with open(self.path, "rb") as f:
            events = self._events(f)
            first = next(events)  # an empty stream raises through _json_error
            if first[1] != "start_map":
                raise ExportError(
                    self.path, None, "not a Telegram export: the top level is not a JSON object"
                )
            top = _Chat(no=0, prefix="")
            self.chat = top
            top_keys: set[str] = set()
            for prefix, event, value in events:
                chat = self.chat
                if chat is not None and prefix == chat.item_prefix:
                    if event == "start_map":
                        chat.msg_no += 1
                        msg = self._message(_build(events, event, value, self.src), chat)
                        if msg is not None:
                            yield msg
                    elif event in _SCALARS or event == "start_array":
                        chat.msg_no += 1
                        self.report.skip("malformed message")
                elif prefix == "":
                    if event == "map_key":
                        top_keys.add(value)
                        if value in ("guild", "channel"):
                            raise ExportError(
                                self.path, None,
                                "not a Telegram export: this looks like a DiscordChatExporter file",
                            )
                elif prefix in self.list_counts:
                    if event == "start_map":
                        self.chat_count += 1
                        self.list_counts[prefix] += 1
                        self.chat = _Chat(self.chat_count, prefix, self.list_counts[prefix])
                    elif event == "end_map":
                        self.chat = None
                elif chat is not None and prefix in chat.meta_prefixes:
                    if event in _SCALARS:
                        chat.meta[chat.meta_prefixes[prefix]] = value
                elif (chat is not None and prefix == chat.messages_prefix
                      and event not in _CLOSE):
                    self._open_messages(chat, event)
                elif prefix == "personal_information" and event == "start_map":
                    self._owner(_build(events, event, value, self.src))
            if "messages" not in top_keys and not top_keys & _FULL_EXPORT_KEYS:
                raise ExportError(
                    self.path, None,
                    "not a Telegram export: the JSON object has neither 'messages' nor 'chats'",
                )
            if "personal_information" in top_keys and not top_keys & {"chats", "left_chats"}:
                self.report.notes.append(
                    f"{self.path}: the Telegram export holds no chats (were they left out "
                    "when exporting?)"
                )

    def _open_messages(self, chat: _Chat, event: str) -> None:
        """At the start of a chat's `messages`: settle its id and name."""
        if not chat.prefix:
            self.chat_count += 1
            chat.no = self.chat_count
        if event != "start_array":
            raise ExportError(self.path, f"chat {chat.no}", "'messages' is not a list")
        meta = chat.meta
        complete = "id" in meta and "type" in meta and (
            "name" in meta or meta["type"] in _NAMELESS_CHATS
        )
        if not complete:
            meta = {**self._rescan(chat), **meta}
        chat_id = meta.get("id")
        if isinstance(chat_id, int) and not isinstance(chat_id, bool):
            chat.chat_id = str(chat_id)
        elif isinstance(chat_id, str) and chat_id.strip():
            chat.chat_id = chat_id.strip()
        elif not chat.prefix and "name" not in meta and "type" not in meta:
            # A lone {"messages": [...]} says nothing that is Telegram's: some other JSON.
            raise ExportError(
                self.path, None, "not a Telegram export: the chat has no 'id', 'name' or 'type'"
            )
        else:
            chat.chat_id = self._derived_id(chat, meta)
            self.report.notes.append(
                f"{self.path}: chat {chat.no} has no usable id; it goes by {chat.chat_id} instead"
            )
        if "name" in meta:
            name = meta["name"]
            chat.name = "Deleted Account" if name is None else str(name)
        else:
            chat.name = _NAMELESS_CHATS.get(meta.get("type"))

    def _derived_id(self, chat: _Chat, meta: dict) -> str:
        """A stable id for a chat the export gives none (minimal exports of other tools).

        From the chat's type and name, so a re-export with more chats keeps it; from its place
        in the file when it has neither. A second chat with the same type and name gets the
        next number, so no two chats of one export share an id. Real ids are digits: the
        "noid-" prefix keeps derived ones apart from them.
        """
        if "name" in meta or "type" in meta:
            basis = json.dumps(["chat", meta.get("type"), meta.get("name")], ensure_ascii=False)
        else:
            basis = json.dumps(["place", chat.prefix, chat.list_index])
        self.derived_ids[basis] += 1
        seen = self.derived_ids[basis]
        digest = hashlib.sha256(basis.encode()).hexdigest()[:16]
        return f"noid-{digest}" if seen == 1 else f"noid-{digest}-{seen}"

    def _rescan(self, chat: _Chat) -> dict:
        """Find a chat's id/type/name anywhere in its object: for files where they follow
        `messages`. Streams the file once more; errors are left for the main pass to report."""
        found: dict = {}
        seen = 0
        with open(self.path, "rb") as f:
            try:
                for prefix, event, value in json_events(_Source(f, self.path)):
                    if chat.prefix and prefix == chat.prefix:
                        if event == "start_map":
                            seen += 1
                        elif event == "end_map" and seen == chat.list_index:
                            break
                    elif (prefix in chat.meta_prefixes and event in _SCALARS
                          and (not chat.prefix or seen == chat.list_index)):
                        found[chat.meta_prefixes[prefix]] = value
            except (ijson.JSONError, _NotUtf8, LimitError):
                pass
        return found

    def _owner(self, info: object) -> None:
        if not isinstance(info, dict):
            return
        try:
            uid = _int_str(info.get("user_id"))
        except _Malformed:
            return
        parts = (info.get("first_name"), info.get("last_name"))
        name = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
        username = info.get("username")
        if not name and isinstance(username, str):
            name = username.strip()
        self.report.owners[f"user{uid}"] = name or f"user{uid}"

    # -- one message --------------------------------------------------------------------------

    def _message(self, m: dict, chat: _Chat) -> Message | None:
        chat_id = chat.chat_id
        assert chat_id is not None  # `_open_messages` settles it before the first message
        mtype = m.get("type", "message")
        if mtype == "unsupported":
            self.report.skip("unsupported")
            return None
        if mtype == "message":
            if "forwarded_from" in m:  # someone else's words
                self.report.skip("forwarded")
                return None
            if "via_bot" in m:  # written by an inline bot
                self.report.skip("via_bot")
                return None
        elif mtype != "service":
            self.report.skip("unknown message type")
            return None
        try:
            msg_id = _int_str(m.get("id"))
            timestamp = _timestamp(m)
            kind: Kind
            if mtype == "service":
                author, author_id = _opt_str(m.get("actor")), _peer(m.get("actor_id"))
                text, kind = _opt_str(m.get("action")) or "", "service"
                reply_to = None
            else:
                author, author_id = _opt_str(m.get("from")), _peer(m.get("from_id"))
                text = _text(m["text"] if "text" in m else m.get("text_entities", ""))
                kind = "media" if any(k in m for k in _MEDIA_KEYS) else "text"
                reply_to = _reply_to(m, chat_id)
        except _Malformed:
            self.report.skip("malformed message")
            return None
        return Message(
            platform=PLATFORM, chat_id=chat_id, chat_name=chat.name, id=msg_id,
            author_id=author_id, author=author, timestamp=timestamp, text=text, kind=kind,
            reply_to=reply_to,
        )


def _build(
    events: Iterator[tuple[str, str, object]], event: str, value: object, src: _Source
) -> object:
    """The value starting with (event, value), built from the following events. While it is
    built, `src` refuses to read more than one record's worth past its start."""
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    depth = 1
    src.record_from = src.pos
    for _, ev, val in events:
        builder.event(ev, val)
        if ev in _OPEN:
            depth += 1
        elif ev in _CLOSE:
            depth -= 1
            if not depth:
                break
    src.record_from = None
    return builder.value


def _int_str(value: object) -> str:
    """An integer id, given as a number or a string of digits, as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip().isdigit():
        return str(int(value))
    raise _Malformed


def _opt_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Malformed


def _peer(value: object) -> str | None:
    """`from_id` / `actor_id` as written ("user123", "channel456"); old exports: a bare number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"user{value}"
    return _opt_str(value)


def _timestamp(m: dict) -> datetime | None:
    if "date_unixtime" in m:
        try:
            return datetime.fromtimestamp(int(_int_str(m["date_unixtime"])), tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise _Malformed from None
    date = m.get("date")
    if date is None:
        return None
    if not isinstance(date, str):
        raise _Malformed
    try:
        return datetime.fromisoformat(date)  # the exporting computer's local time, no zone
    except ValueError:
        raise _Malformed from None


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _Malformed
    parts = []
    for part in value:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            text = part.get("text", "")
            if not isinstance(text, str):
                raise _Malformed
            parts.append(text)
        else:
            raise _Malformed
    return "".join(parts)


def _reply_to(m: dict, chat_id: str) -> str | None:
    if "reply_to_message_id" not in m:
        return None
    reply_to = _int_str(m["reply_to_message_id"])
    peer = m.get("reply_to_peer_id")
    # A reply to a message of another chat (e.g. a channel post answered in its discussion
    # group): that id means nothing in this chat.
    if peer is not None and re.sub(r"^(user|chat|channel)", "", str(peer)) != chat_id:
        return None
    return reply_to


def sniff_telegram(head: bytes) -> bool:
    """True when `head` (the first ~64 KB of a file) looks like a Telegram Desktop JSON export."""
    data = head.removeprefix(_BOM).lstrip()
    if not data.startswith(b"{"):
        return False
    top_keys: set[str] = set()
    chat_type = None
    try:
        # Small reads: the keys that decide are seen before a guard stops at a bomb further on.
        for prefix, event, value in json_events(_Source(io.BytesIO(data)), buf_size=64):
            if prefix == "" and event == "map_key":
                if value in ("guild", "channel"):
                    return False
                if value == "personal_information":
                    return True
                top_keys.add(value)
            elif prefix in ("chats.list", "left_chats.list"):
                return True
            elif prefix == "type" and event == "string":
                chat_type = value
            elif prefix == "messages.item" and event == "map_key":
                if value in _TELEGRAM_MESSAGE_KEYS:
                    return True
            elif prefix == "messages" and event == "end_array":
                break
    except (ijson.JSONError, _NotUtf8, LimitError):
        pass  # the head is cut mid-file, or too deep: decide on what was read
    # Telegram's chat types are distinctive enough without an `id` (minimal exports omit it).
    return "messages" in top_keys and chat_type in _CHAT_TYPES
