"""How much of an input an import will read, in one place (README, "Limits").

Every reader streams, so memory should stay flat whatever the size of an export; these numbers
bound what streaming alone cannot: one value a parser must hold whole, nesting it must track,
and a zip that inflates far beyond its size on disk. Each is far above anything a chat app
writes. Past a message limit the message is skipped and counted; past any other the file is
refused with one line naming it and the place.
"""

from __future__ import annotations

MiB = 1024 * 1024
GiB = 1024 * MiB

# One message's text. Telegram allows 4,096 characters, Discord 4,000, WhatsApp 65,536; the
# dataset keeps 2,000 at most. Longer: skipped and counted.
MAX_MESSAGE_CHARS = 65_536
# One record of a file: a line of a text export, one CSV record, one JSON message object, a
# JSON file read whole (index.json). Longer: the file is refused.
MAX_RECORD_BYTES = 8 * MiB
# One JSON string or number, which the parser holds whole (and re-reads as it grows): a message
# of MAX_MESSAGE_CHARS takes 768 KiB at most (every character an escaped surrogate pair, 12
# bytes). Longer: the file is refused.
MAX_JSON_VALUE_BYTES = 1 * MiB
# One JSON integer where ids may pass 64 bits (a Discord data package): Python refuses to read
# more than 4,300 digits (640 when so configured), and ijson then crashes. Longer: refused.
# Elsewhere integers are read as 64 bits, and a longer one is invalid JSON.
MAX_JSON_INTEGER_DIGITS = 600
# How deep JSON may nest. Real exports stay under 10 levels. Deeper: the file is refused.
MAX_JSON_DEPTH = 64
# One export file, checked before it is opened.
MAX_EXPORT_BYTES = 64 * GiB
# A chat text inside a zip, inflated, and how many times its compressed size it may inflate to
# (from ZIP_RATIO_FROM_BYTES on: a small file of repeats compresses well and is no bomb).
# WhatsApp's own zips hold at most some tens of MB of text, compressed about 3 to 1.
MAX_ZIP_TEXT_BYTES = 256 * MiB
MAX_ZIP_RATIO = 100
ZIP_RATIO_FROM_BYTES = 1 * MiB

# The skip reason for a message over MAX_MESSAGE_CHARS, the same whichever reader saw it.
TOO_LONG = f"message over {MAX_MESSAGE_CHARS:,} characters"


def size_text(n: int) -> str:
    """A byte count as people read it in a limit: '8 MiB', '64 GiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"
