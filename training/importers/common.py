"""Small helpers every importer shares: stable ids, bounded lines, and the JSON guard."""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import ijson

from training.limits import (
    MAX_JSON_DEPTH,
    MAX_JSON_INTEGER_DIGITS,
    MAX_JSON_VALUE_BYTES,
    MAX_RECORD_BYTES,
    size_text,
)
from training.message import ExportError


class StableIds:
    """Deterministic ids for sources that have none (WhatsApp, CSV tables).

    The id is a hash of what identifies a message, plus how many identical messages came
    before it in the same chat, so two overlapping exports of one chat give each message the
    same id and the dataset can drop the overlap.
    """

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def __call__(self, *parts: object) -> str:
        key = hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:16]
        n = self._seen[key]
        self._seen[key] += 1
        return key if n == 0 else f"{key}-{n}"


def bounded_lines(f: IO[bytes], path: Path | str) -> Iterator[bytes]:
    """A binary file's lines, none longer than MAX_RECORD_BYTES: a longer one refuses the file
    before it is ever held whole (a zip can inflate to one line of gigabytes)."""
    read = functools.partial(f.readline, MAX_RECORD_BYTES + 1)
    for lineno, raw in enumerate(iter(read, b""), start=1):
        if len(raw) > MAX_RECORD_BYTES:
            raise ExportError(path, f"line {lineno}",
                              f"a line over {size_text(MAX_RECORD_BYTES)}: not a chat export")
        yield raw


def decoded_lines(f: IO[bytes], path: Path | str) -> Iterator[str]:
    """A binary file's lines as UTF-8 (a leading BOM dropped), naming the line that fails."""
    for lineno, raw in enumerate(bounded_lines(f, path), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ExportError(
                path, f"line {lineno}, byte {e.start + 1}", "not UTF-8 text (wrong encoding?)"
            ) from None


# ijson's C backend makes a Python int of each integer literal, and one longer than Python
# allows (int_max_str_digits, 4,300 digits by default) crashes the process outright. So either
# yajl reads integers itself (use_float: 64 bits, exact; a longer one is a parse error, and a
# fraction becomes a float, which no id accepts), or, where ids may pass 64 bits (`big_ints`),
# the reader's JsonGuard stops any integer over MAX_JSON_INTEGER_DIGITS before ijson sees it.


def json_events(f: Any, buf_size: int = 64 * 1024, big_ints: bool = False) -> Iterator[tuple[str, str, Any]]:
    return ijson.parse(f, buf_size=buf_size, use_float=not big_ints)


def json_items(f: Any, prefix: str, big_ints: bool = False) -> Iterator[Any]:
    """ijson.items: each item built by the C backend."""
    return ijson.items(f, prefix, use_float=not big_ints)


class LimitError(ExportError):
    """JSON past one of training.limits; raised from inside a parser's read(), so the parser
    never sees the bytes that would make it nest or buffer without bound."""


# translate() deletes every byte but these: quotes, to tell strings apart, and brackets.
_NOT_MARKS = bytes(c for c in range(256) if c not in b'"[]{}')
_OPENERS = frozenset(b"[{")
_PARENS = bytes.maketrans(b"[{]}", b"(())")
# translate() makes every digit "0" and every other byte ".": a run of zeros is a run of digits.
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x2E for c in range(256))
_LONG_INTEGER = b"0" * (MAX_JSON_INTEGER_DIGITS + 1)
_STRING = re.compile(rb'"[^"]*"')  # once escaped quotes are gone


class JsonGuard:
    """Watches the bytes on their way to ijson: how deep the JSON nests, and how long one string
    or number runs. Both must be stopped before the parser sees them: ijson keeps a prefix per
    level (100,000 levels, 200 KB of brackets, take gigabytes) and yajl holds a whole token.

    Exact, across chunks, at C speed: escapes are dropped, then everything but quotes and
    brackets, and what lies between quote pairs is string (see _nest for the depth).
    """

    def __init__(self, path: Path | str, big_ints: bool = False) -> None:
        self.path = path
        self.pos = 0           # bytes fed so far
        self.depth = 0
        self.in_string = False
        self.run = 0           # bytes fed since the last quote or bracket: one string or number
        self._carry = b""      # a backslash run that may continue in the next chunk
        self._big_ints = big_ints  # the parser makes Python ints: check how long they are
        self._digits = 0       # digits at the end of what was fed, outside strings

    def feed(self, data: bytes) -> None:
        start = self.pos
        self.pos += len(data)
        data = self._carry + data if self._carry else data
        body = data.rstrip(b"\\")
        self._carry = data[len(body):]
        if b"\\" in body:  # an escaped quote is no quote; pairs first, so `\\"` still closes
            body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
        if self._big_ints:
            self._check_integers(body, start)
        marks = body.translate(None, _NOT_MARKS)
        quiet = b'"' not in marks if self.in_string else not marks
        self.run = self.run + len(data) if quiet else 0
        if self.run > MAX_JSON_VALUE_BYTES:
            raise LimitError(self.path, f"bytes {start + 1}-{self.pos}",
                             f"one JSON value over {size_text(MAX_JSON_VALUE_BYTES)}: not a chat export")
        if self.in_string:  # as if the string opened here: the same brackets fall inside it
            marks = b'"' + marks
        # Dropping two adjacent quotes moves no bracket in or out of a string, and most strings
        # hold no bracket: what is left is mostly brackets, with few quotes to pair.
        marks = marks.replace(b'""', b"")
        self.in_string = False
        if b'"' in marks:
            parts = marks.split(b'"')
            self.in_string = len(parts) % 2 == 0
            marks = b"".join(parts[::2])
        self._nest(marks, start)

    def _nest(self, brackets: bytes, start: int) -> None:
        """Follow the depth through `brackets` (those outside strings), refusing past the limit.

        Matched pairs are dropped innermost first, one level a pass, in C: what remains is the
        closers that end levels open before this chunk, then the openers left open after it.
        The deepest point is at most the depth before, plus those openers, plus the passes;
        only when that bound passes the limit is the chunk walked bracket by bracket.
        """
        parens = brackets.translate(_PARENS)
        passes = 0
        while b"()" in parens and passes <= MAX_JSON_DEPTH:
            parens = parens.replace(b"()", b"")
            passes += 1
        closers = len(parens) - len(parens.lstrip(b")"))
        openers = len(parens) - closers
        if passes <= MAX_JSON_DEPTH and self.depth + openers + passes <= MAX_JSON_DEPTH:
            self.depth += openers - closers
        else:
            self._walk(brackets, start)

    def _check_integers(self, body: bytes, start: int) -> None:
        """No run of digits over MAX_JSON_INTEGER_DIGITS outside strings, across chunks too.
        Runs are looked for anywhere first (one pass, in C); only a chunk that has one (a
        message of digits, say) is looked at again with its strings taken out."""
        digits = body.translate(_DIGITS)
        lead = len(digits) - len(digits.lstrip(b"0"))
        if _LONG_INTEGER in digits or self._digits + lead > MAX_JSON_INTEGER_DIGITS:
            text = (b'"' if self.in_string else b"") + body
            text = _STRING.sub(b".", text)
            text = text[:text.find(b'"')] if b'"' in text else text  # a string left open
            digits = text.translate(_DIGITS)
            lead = len(digits) - len(digits.lstrip(b"0"))
            if _LONG_INTEGER in digits or self._digits + lead > MAX_JSON_INTEGER_DIGITS:
                raise LimitError(self.path, f"bytes {start + 1}-{self.pos}",
                                 f"an integer over {MAX_JSON_INTEGER_DIGITS:,} digits: not a chat export")
        tail = len(digits) - len(digits.rstrip(b"0"))
        self._digits = self._digits + tail if tail == len(digits) else tail

    def _walk(self, brackets: bytes, start: int) -> None:
        depth = self.depth
        for c in brackets:
            depth += 1 if c in _OPENERS else -1
            if depth > MAX_JSON_DEPTH:
                raise LimitError(self.path, f"bytes {start + 1}-{self.pos}",
                                 f"JSON nested deeper than {MAX_JSON_DEPTH} levels: not a chat export")
        self.depth = depth
