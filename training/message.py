"""The normalized message every importer yields, and the report an import fills in.

This is the contract between the importers and everything after them: a message from any
platform looks the same once it is here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

Kind = Literal["text", "media", "service"]
KINDS: tuple[Kind, ...] = ("text", "media", "service")
PLATFORMS = ("telegram", "whatsapp", "discord", "csv")
# The exact keys of one line of `clone import` output, in this order.
FIELDS = (
    "platform", "chat_id", "chat_name", "id", "author_id", "author",
    "timestamp", "text", "kind", "reply_to",
)


@dataclass(frozen=True, slots=True)
class Message:
    platform: str            # one of PLATFORMS
    chat_id: str             # stable across re-exports of the same chat
    chat_name: str | None
    id: str                  # unique within (platform, chat_id); strings, because Discord ids exceed 2**53
    author_id: str | None
    author: str | None
    timestamp: datetime | None  # aware where the source gives a zone or epoch, naive where it does not
    text: str                # the visible text; a media message's caption; "" when there is none
    kind: Kind
    reply_to: str | None     # id of the message this one answers, in the same chat

    def to_dict(self) -> dict:
        return {
            "platform": self.platform,
            "chat_id": self.chat_id,
            "chat_name": self.chat_name,
            "id": self.id,
            "author_id": self.author_id,
            "author": self.author,
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "text": self.text,
            "kind": self.kind,
            "reply_to": self.reply_to,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> Message:
        """The inverse of to_dict. A field of the wrong type (a file edited by hand) raises
        TypeError, an unknown kind ValueError, a missing required field KeyError."""
        if not isinstance(d, dict):
            raise TypeError("a message is a JSON object")
        kind = d.get("kind", "text")
        if kind not in KINDS:
            raise ValueError("unknown kind")
        ts = _opt_str(d, "timestamp")
        return cls(
            platform=_str(d["platform"]),
            chat_id=_ident(d["chat_id"]),
            chat_name=_opt_str(d, "chat_name"),
            id=_ident(d["id"]),
            author_id=None if d.get("author_id") is None else _ident(d["author_id"]),
            author=_opt_str(d, "author"),
            timestamp=datetime.fromisoformat(ts) if ts else None,
            text=_opt_str(d, "text") or "",
            kind=kind,
            reply_to=None if d.get("reply_to") is None else _ident(d["reply_to"]),
        )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _opt_str(d: dict, key: str) -> str | None:
    value = d.get(key)
    return None if value is None else _str(value)


def _ident(value: object) -> str:
    """An id: a string, or an integer written as a number (never a float: ids exceed 2**53)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _str(value)


class ExportError(Exception):
    """A file that cannot be read as an export at all. Names the file and the place."""

    def __init__(self, path: Path | str, where: str | None, reason: str) -> None:
        self.path, self.where, self.reason = str(path), where, reason
        place = f" ({where})" if where else ""
        super().__init__(f"{self.path}{place}: {reason}")


@dataclass
class ImportReport:
    """What an import saw besides the messages: skipped items by reason, detected owners, files."""

    skipped: Counter[str] = field(default_factory=Counter)
    # Owner ids found in the export itself (Telegram's personal_information, a Discord data
    # package's account, a Q/A table's answers) mapped to a display name.
    owners: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, format)
    notes: list[str] = field(default_factory=list)  # things the user should know, e.g. a guess made

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n
