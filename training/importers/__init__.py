"""Read chat exports of every supported kind into one stream of normalized messages.

The format of each file is detected from its content (`--format` forces one); folders are
walked. A file that is named explicitly but cannot be read is an error that names the file and
the place; inside a walked folder, files that are not exports (photos, voice notes, HTML, pipes,
broken links) are passed over and counted. What one input may hold is in training.limits.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from training.importers import discord, tables, telegram, whatsapp
from training.importers.common import bounded_lines
from training.limits import MAX_EXPORT_BYTES, MAX_MESSAGE_CHARS, TOO_LONG, size_text
from training.message import FIELDS, ExportError, ImportReport, Message

Reader = Callable[[Path, ImportReport], Iterator[Message]]
HEAD_BYTES = 64 * 1024
# Files that sit beside the chat in real export folders and are never chats themselves.
NOT_CHATS = {
    ".jpg", ".jpeg", ".png", ".gif", ".webp", ".heic", ".mp4", ".mov", ".webm", ".opus", ".ogg",
    ".mp3", ".m4a", ".wav", ".pdf", ".vcf", ".tgs", ".html", ".htm", ".css", ".js", ".ico",
}


def read_messages_jsonl(path: Path, report: ImportReport) -> Iterator[Message]:
    """Re-read the output of `clone import`. A line of the wrong shape (edited by hand) is
    skipped and counted; a first line of the wrong shape means another kind of file."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(bounded_lines(f, path), start=1):
            if not raw.strip():
                continue
            try:
                message = Message.from_dict(json.loads(raw))
            except (ValueError, KeyError, TypeError, RecursionError):
                report.skip("malformed message")
                if lineno == 1:
                    raise ExportError(path, "line 1", "not a normalized messages file") from None
                continue
            yield message


READERS: dict[str, Reader] = {
    "telegram": telegram.read_telegram,
    "whatsapp": whatsapp.read_whatsapp,
    "discord-json": discord.read_discord_json,
    "discord-csv": discord.read_discord_csv,
    "discord-package": discord.read_discord_package,
    "qa-csv": tables.read_qa_csv,
    "speaker-csv": tables.read_speaker_csv,
    "messages-jsonl": read_messages_jsonl,
}
FORMATS = tuple(READERS)


def _decode_head(head: bytes) -> str | None:
    """The head as text, or None when it is not UTF-8 (a cut at the end is forgiven)."""
    try:
        return head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and len(head) == HEAD_BYTES:
            return head[: e.start].decode("utf-8-sig")
        return None


def detect_format(path: Path) -> str:
    """Name the format of one file or folder from what it contains."""
    if path.is_dir():
        if discord.is_discord_package(path):
            return "discord-package"
        raise ExportError(path, None, "a folder that is not a Discord data package")
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    if not head.strip():
        raise ExportError(path, None, "empty file")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = [n.lower() for n in z.namelist()]
        except zipfile.BadZipFile:
            raise ExportError(path, None, "damaged zip file") from None
        if any(n.endswith("messages/index.json") for n in names):
            raise ExportError(path, None, "a Discord data package: extract the zip and pass the folder")
        return "whatsapp"
    text = _decode_head(head)
    if text is None or "\x00" in text:
        raise ExportError(path, "start of file", "binary data or not UTF-8 text: not a chat export")
    stripped = text.lstrip("\ufeff \t\r\n")
    if whatsapp.sniff_whatsapp(text):  # before JSON: iOS lines start with "[31.12.21, ..."
        return "whatsapp"
    if stripped.startswith(("{", "[")):
        if discord.sniff_discord_json(head):
            return "discord-json"
        if telegram.sniff_telegram(head):
            return "telegram"
        first = stripped.split("\n", 1)[0]
        try:
            if set(json.loads(first)) >= set(FIELDS):
                return "messages-jsonl"
        except (ValueError, TypeError, RecursionError):  # deep nesting: json recurses per level
            pass
        raise ExportError(path, "start of file", "JSON, but not a chat export this tool knows")
    header = stripped.split("\n", 1)[0].strip()
    if discord.sniff_discord_csv(header):
        return "discord-csv"
    table = tables.sniff_table(header)
    if table:
        return table
    raise ExportError(path, "start of file", "unknown format (use --format to force one)")


def _not_regular(mode: int) -> str:
    """What a path that is neither a file nor a folder is, in a user's words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _checked_size(path: Path, st_size: int) -> None:
    if st_size > MAX_EXPORT_BYTES:
        raise ExportError(path, None, f"{st_size:,} bytes, over the {size_text(MAX_EXPORT_BYTES)} "
                                      "one export may take")


class _Walk:
    """The export files under folders, in name order. What is not an export is counted in
    the report, never opened: a pipe would block, a device never end, a link loop never stop."""

    def __init__(self, report: ImportReport, fmt: str | None) -> None:
        self.report, self.fmt = report, fmt
        self.sources: list[tuple[Path, str]] = []
        self._folders: set[tuple[int, int]] = set()  # (device, inode) of each folder walked

    def folder(self, folder: Path, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self._folders:
            self.report.skip("folder reached twice (a link loop)")
            return
        self._folders.add(key)
        if discord.is_discord_package(folder):
            self.sources.append((folder, "discord-package"))
            return
        for child in sorted(folder.iterdir()):
            if not child.name.startswith("."):
                self.entry(child)

    def entry(self, child: Path) -> None:
        try:
            st = child.stat()
        except FileNotFoundError:
            self.report.skip("broken link")
            return
        except OSError:  # a link to itself, no permission
            self.report.skip("file that cannot be read")
            return
        if stat.S_ISDIR(st.st_mode):
            self.folder(child, st)
        elif not stat.S_ISREG(st.st_mode):
            self.report.skip("not a regular file (a pipe, socket or device)")
        elif child.suffix.lower() in NOT_CHATS:
            self.report.skip("file that is not a chat export")
        else:
            _checked_size(child, st.st_size)
            try:
                self.sources.append((child, self.fmt or detect_format(child)))
            except ExportError:
                self.report.skip("file that is not a chat export")
            except OSError:
                self.report.skip("file that cannot be read")


def find_sources(
    paths: list[Path], report: ImportReport, fmt: str | None = None
) -> list[tuple[Path, str]]:
    """Each export file (or data-package folder) under `paths`, with its format."""
    walk = _Walk(report, fmt)
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ExportError(path, None, "no such file or folder") from None
        except OSError as e:
            raise ExportError(path, None, f"cannot read it ({e.strerror})") from None
        if stat.S_ISDIR(st.st_mode) and fmt != "discord-package":
            walk.folder(path, st)
        elif stat.S_ISREG(st.st_mode) or fmt == "discord-package":
            _checked_size(path, st.st_size)
            walk.sources.append((path, fmt or detect_format(path)))
        else:
            raise ExportError(path, None, f"{_not_regular(st.st_mode)}, not an export file")
    return walk.sources


def import_messages(
    paths: list[Path], report: ImportReport, fmt: str | None = None
) -> Iterator[Message]:
    """Every message of every export under `paths`, in file order; one longer than
    MAX_MESSAGE_CHARS is skipped and counted, whichever reader it came from."""
    if fmt is not None and fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for path, source_fmt in find_sources(paths, report, fmt):
        report.files.append((str(path), source_fmt))
        for message in READERS[source_fmt](path, report):
            if len(message.text) > MAX_MESSAGE_CHARS:
                report.skip(TOO_LONG)
            else:
                yield message
