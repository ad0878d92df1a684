"""WhatsApp "Export chat" text files (.txt, or the .zip WhatsApp produces with media).

A message starts with a header (date, time, then ` - ` on Android or `[...] ` on iOS); lines
without one continue the previous message. Dates carry no zone, so timestamps are naive, and
whether `03/04/21` is day-first or month-first is decided from the whole file in a first pass.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO

from training.importers.common import StableIds, decoded_lines
from training.limits import (
    MAX_MESSAGE_CHARS,
    MAX_ZIP_RATIO,
    MAX_ZIP_TEXT_BYTES,
    TOO_LONG,
    ZIP_RATIO_FROM_BYTES,
    size_text,
)
from training.message import ExportError, ImportReport, Message

# How many non-empty lines may come before the first header (sniffing and reading agree).
SNIFF_LINES = 5

_SP = r"[ \u00a0\u202f]"  # WhatsApp puts NBSP / narrow NBSP where a space would be
_DATE = (
    r"(?:(?P<y1>\d{4})(?P<s1>[./-])(?P<m1>\d{1,2})(?P=s1)(?P<d1>\d{1,2})"  # year first
    r"|(?P<f1>\d{1,2})(?P<s2>[./-])(?P<f2>\d{1,2})(?P=s2)(?P<y2>\d{4}|\d{2}))"  # d/m or m/d
)
_TIME = (
    r"(?P<H>\d{1,2})[:.](?P<M>\d{2})(?:[:.](?P<S>\d{2}))?"
    rf"(?:{_SP}*(?P<ampm>[AaPp]\.?{_SP}?[Mm]\.?))?"
)
# Android: `DATE, TIME - rest`; iOS: `[DATE, TIME] rest`. Marks may precede either.
_HEADER = re.compile(
    r"^[\ufeff\u200e\u200f]*(?P<br>\[)?"
    + _DATE
    + rf",?{_SP}+"
    + _TIME
    + rf"(?(br)\]{_SP}|{_SP}[-–]{_SP})(?P<rest>.*)$"
)

_MARKS = re.compile("[\ufeff\u200e\u200f\u202a\u202c]")
_AUTHOR = re.compile(r"^(?P<author>[^:]{1,100}?):(?P<body>.*)$")
# A colon inside a system line ("X changed the subject to "a: b"") must not make "X changed..."
# an author: names do not contain these verb phrases.
_SYSTEM_AUTHOR = re.compile(
    r" (?:changed (?:the|this|their|his|her)|created (?:group|this group)|added|removed|left"
    r"|joined using|was added|were added|pinned a message)\b"
)
# iOS writes system events as `Group: \u200eAlice added Bob`; the mark plus one of these says so.
_SYSTEM_TEXT = re.compile(
    r"end-to-end encrypted|created (?:the )?group|created this group|\bwas added\b|\bwere added\b"
    r"|\badded\b|\bremoved\b|\bleft$|joined using|changed the (?:subject|group)"
    r"|changed this group|changed their phone number|security code|Missed (?:voice|video|group)"
    r"|disappearing messages|pinned a message",
    re.IGNORECASE,
)
_MEDIA = re.compile(
    r"^(?:<(?:Media omitted|Multimedia omitido|Medien ausgeschlossen|Médias omis|Mídia oculta"
    r"|Media weggelaten|Media omessi)>"
    r"|(?:image|video|audio|sticker|GIF|Contact card) omitted|(?:.+\s)?document omitted"
    r"|(?:imagen|video|audio|sticker|GIF|documento) omitid[oa]"
    r"|(?:Bild|Video|Audio|Sticker|GIF|Dokument) weggelassen"
    r"|<\s*(?:attached|adjunto|Anhang|pièce jointe|anexado):\s*[^>]*>"
    r"|.+\s\((?:file attached|archivo adjunto|Datei angehängt|fichier joint|arquivo anexado)\)"
    r"|(?:location|ubicación|Standort): https?://\S+)$",
    re.IGNORECASE,
)
_DELETED = re.compile(
    r"^(?P<you>You deleted this message|Eliminaste este mensaje|Du hast diese Nachricht gelöscht"
    r"|Vous avez supprimé ce message)\.?$"
    r"|^(?:This message was deleted|Se eliminó este mensaje|Este mensaje fue eliminado"
    r"|Diese Nachricht wurde gelöscht|Ce message a été supprimé)\.?$",
    re.IGNORECASE,
)
_EDITED = re.compile(
    r"\s*<(?:This message was edited|Se editó este mensaje|Diese Nachricht wurde bearbeitet"
    r"|Ce message a été modifié)\.?>\s*\Z",
    re.IGNORECASE,
)
# A poll's question and option lines follow the marker; they are not a caption.
_POLL = re.compile(r"^(?:POLL|ENCUESTA|UMFRAGE|SONDAGE):$", re.IGNORECASE)
_VIEW_ONCE = {".", "null"}
_CHAT_FILE = re.compile(
    r"^(?:WhatsApp Chat with|WhatsApp Chat -|WhatsApp-Chat mit|WhatsApp Chat mit"
    r"|Chat de WhatsApp con|Conversa do WhatsApp com|Discussion WhatsApp avec|Chat WhatsApp con)"
    r"\s+(?P<name>.+)$",
    re.IGNORECASE,
)
_COPY_SUFFIX = re.compile(r"\s\(\d+\)$")


def sniff_whatsapp(head: str) -> bool:
    """True when one of the first few non-empty lines of `head` is a WhatsApp message header."""
    seen = 0
    for line in head.lstrip("\ufeff").splitlines():
        if not line.strip():
            continue
        if _HEADER.match(line):
            return True
        seen += 1
        if seen >= SNIFF_LINES:
            break
    return False


def read_whatsapp(path: Path, report: ImportReport) -> Iterator[Message]:
    """Messages of one WhatsApp export (a .txt, or a .zip holding one), in file order."""
    path = Path(path)
    source = _zip_source(path) if _is_zip(path) else _Source(path, None, _chat_name(path.name))
    day_first = _infer_day_first(source, report)
    chat_id = "wa:" + source.chat_name
    ids = StableIds()
    pending: _Pending | None = None
    for _, line in source.lines():
        m = _HEADER.match(line)
        if m:
            if pending is not None:
                yield from _finish(pending, chat_id, source.chat_name, ids, report)
            pending = _Pending(_timestamp(m, day_first), m["rest"])
        elif pending is not None:
            pending.add(line)
        elif line.strip():
            report.skip("text before first message")  # pass 1 allows a few such lines
    if pending is not None:
        yield from _finish(pending, chat_id, source.chat_name, ids, report)


# --- sources --------------------------------------------------------------------------------


@dataclass
class _Source:
    """One chat text: a plain file, or a member of a zip. Re-openable, for the two passes."""

    path: Path
    member: str | None
    chat_name: str

    @property
    def label(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def lines(self) -> Iterator[tuple[int, str]]:
        try:
            with self._open() as raw:
                for lineno, line in enumerate(decoded_lines(raw, self.label), start=1):
                    yield lineno, line.rstrip("\r\n")
        except zipfile.BadZipFile as e:  # a corrupt member shows only once it is read
            raise ExportError(self.label, None, f"corrupt zip member ({e})") from None
        except (RuntimeError, NotImplementedError) as e:  # encrypted, or an unknown compression
            raise ExportError(self.label, None, f"cannot unzip it ({e})") from None

    @contextmanager
    def _open(self) -> Iterator[IO[bytes]]:
        if self.member is None:
            with open(self.path, "rb") as f:
                yield f
        else:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                yield f


def _is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _zip_source(path: Path) -> _Source:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [
                n
                for n in zf.namelist()
                if n.lower().endswith(".txt") and not n.startswith("__MACOSX/")
            ]
            member = _pick_member(zf, names)
            info = zf.getinfo(member) if member is not None else None
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as e:
        raise ExportError(path, None, f"not a readable zip file ({e})") from None
    if member is None or info is None:
        raise ExportError(path, None, "no WhatsApp chat .txt inside the zip")
    _check_inflated_size(path, info)
    base = PurePosixPath(member).name
    zip_name = _chat_name(path.name)
    if base == "_chat.txt":
        name = zip_name
    else:
        name = _chat_name(base) if _CHAT_FILE.match(PurePosixPath(base).stem) else zip_name
    return _Source(path, member, name)


def _check_inflated_size(path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a zip bomb before inflating it, by the size its chat text declares: zipfile stops
    at that size (and a member that lies about it fails its checksum there)."""
    label = f"{path}!{info.filename}"
    if info.file_size > MAX_ZIP_TEXT_BYTES:
        raise ExportError(label, None, f"inflates to {info.file_size:,} bytes, over the "
                                       f"{size_text(MAX_ZIP_TEXT_BYTES)} a chat text may take (a zip bomb?)")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > ZIP_RATIO_FROM_BYTES and ratio > MAX_ZIP_RATIO:
        raise ExportError(label, None, f"inflates {ratio:,.0f} times its compressed size, over "
                                       f"{MAX_ZIP_RATIO} times (a zip bomb?)")


def _pick_member(zf: zipfile.ZipFile, names: list[str]) -> str | None:
    """The chat text in a zip: `_chat.txt` (iOS), `WhatsApp Chat ...txt` (Android), else any
    .txt whose start looks like a chat (media folders can hold unrelated .txt documents)."""
    for n in names:
        if PurePosixPath(n).name == "_chat.txt":
            return n
    for n in names:
        if _CHAT_FILE.match(PurePosixPath(n).stem):
            return n
    for n in names:
        with zf.open(n) as f:
            head = f.read(65536).decode("utf-8", errors="replace")
        if sniff_whatsapp(head):
            return n
    return None


def _chat_name(filename: str) -> str:
    stem = _COPY_SUFFIX.sub("", PurePosixPath(filename).stem)
    m = _CHAT_FILE.match(stem)
    return _COPY_SUFFIX.sub("", m["name"]).strip() if m else stem


# --- pass 1: is it WhatsApp, and which date order ------------------------------------------


def _infer_day_first(source: _Source, report: ImportReport) -> bool:
    """Day-first unless the file shows otherwise; mixed evidence is an error."""
    day_first_at: int | None = None  # a line whose first field can only be a day
    month_first_at: int | None = None
    first_text_at: int | None = None
    ambiguous_order = False  # a header with day and month in either order (not year-first)
    nonempty_before_header = 0
    found_header = False
    for lineno, line in source.lines():
        m = _HEADER.match(line)
        if not found_header and not m:
            if line.strip():
                first_text_at = first_text_at or lineno
                nonempty_before_header += 1
                if nonempty_before_header >= SNIFF_LINES:
                    break
            continue
        found_header = True
        if not m or m["f1"] is None:
            continue
        ambiguous_order = True
        a, b = int(m["f1"]), int(m["f2"])
        if 12 < a <= 31 and 1 <= b <= 12 and day_first_at is None:
            day_first_at = lineno
        elif 12 < b <= 31 and 1 <= a <= 12 and month_first_at is None:
            month_first_at = lineno
    if not found_header:
        if first_text_at is None:
            raise ExportError(source.label, None, "empty file")
        raise ExportError(
            source.label,
            f"line {first_text_at}",
            "no WhatsApp message header (not a WhatsApp export?)",
        )
    if day_first_at and month_first_at:
        raise ExportError(
            source.label,
            f"lines {day_first_at} and {month_first_at}",
            "dates are day-first on one line and month-first on the other",
        )
    if month_first_at:
        return False
    if not day_first_at and ambiguous_order:
        report.notes.append(
            f"{source.label}: no date has a day above 12, so day and month cannot be told apart;"
            " read as day/month (the usual order outside the US)."
        )
    return True


# --- pass 2: messages ------------------------------------------------------------------------


@dataclass
class _Pending:
    timestamp: datetime | None  # None: the header's date is impossible
    rest: str  # the header line after the time
    more: list[str] = field(default_factory=list)  # continuation lines
    size: int = 0  # characters past `rest`; past MAX_MESSAGE_CHARS lines are counted, not kept

    def add(self, line: str) -> None:
        self.size += len(line) + 1
        if len(self.rest) + self.size <= MAX_MESSAGE_CHARS:
            self.more.append(line)


def _timestamp(m: re.Match[str], day_first: bool) -> datetime | None:
    if m["y1"]:
        year, month, day = int(m["y1"]), int(m["m1"]), int(m["d1"])
    else:
        a, b, year = int(m["f1"]), int(m["f2"]), int(m["y2"])
        day, month = (a, b) if day_first else (b, a)
        if len(m["y2"]) == 2:
            year += 2000
    hour = int(m["H"])
    if m["ampm"]:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if m["ampm"][0] in "Pp" else 0)
    try:
        return datetime(year, month, day, hour, int(m["M"]), int(m["S"] or 0))
    except ValueError:
        return None


def _clean_author(name: str) -> str:
    # `~\u202fName` marks a number not in the contacts; phone numbers come wrapped in U+202A/C.
    name = _MARKS.sub("", name).strip(" \u00a0\u202f")
    if name.startswith("~"):
        name = name[1:].strip(" \u00a0\u202f")
    return name


def _finish(
    p: _Pending, chat_id: str, chat_name: str, ids: StableIds, report: ImportReport
) -> Iterator[Message]:
    if p.timestamp is None:
        report.skip("bad timestamp")
        return
    if len(p.rest) + p.size > MAX_MESSAGE_CHARS:
        report.skip(TOO_LONG)
        return
    author: str | None = None
    body = p.rest
    m = _AUTHOR.match(p.rest)
    if m and not _SYSTEM_AUTHOR.search(m["author"]):
        author = _clean_author(m["author"]) or None
        body = m["body"][1:] if m["body"].startswith(" ") else m["body"]
    marked = body.lstrip(" ")[:1] in ("\u200e", "\u200f")
    lines = [_MARKS.sub("", line) for line in [body, *p.more]]
    text = _EDITED.sub("", "\n".join(lines).rstrip())
    kind = "text"
    if author is None:
        kind, text = "service", text.strip()
    else:
        first, _, rest = text.partition("\n")
        first = first.strip()
        deleted = _DELETED.match(text.strip())
        if deleted:
            if deleted["you"]:
                report.owners[author] = author  # "You deleted..." is the exporter's own message
            report.skip("deleted")
            return
        if text.strip() in _VIEW_ONCE:
            report.skip("view_once")
            return
        if _POLL.match(first):
            kind, text = "media", ""
        elif _MEDIA.match(first):
            kind, text = "media", rest.strip()
        elif marked and _SYSTEM_TEXT.search(first):
            kind, author, text = "service", None, text.strip()  # iOS: `Group: \u200eX added Y`
        elif not text.strip():
            report.skip("empty")
            return
    ts = p.timestamp
    yield Message(
        platform="whatsapp",
        chat_id=chat_id,
        chat_name=chat_name,
        id=ids(chat_id, ts.isoformat(), author, text),
        author_id=author,
        author=author,
        timestamp=ts,
        text=text,
        kind=kind,
        reply_to=None,
    )
