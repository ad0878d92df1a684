"""Small helpers every importer shares."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def decoded_lines(raw_lines: Iterable[bytes], path: Path | str) -> Iterator[str]:
    """Decode a byte-line stream as UTF-8 (a leading BOM dropped), naming the line that fails."""
    for lineno, raw in enumerate(raw_lines, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ExportError(
                path, f"line {lineno}, byte {e.start + 1}", "not UTF-8 text (wrong encoding?)"
            ) from None
