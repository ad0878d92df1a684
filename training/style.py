"""How someone texts, in numbers: the style of generated replies set against the person's real ones.

A reply is one turn of the person, and each of its lines is a separate chat message (a burst):
"haha yes\\nsee you at 8" is one reply of two messages. Blank lines are not messages.

Conventions, so that the numbers read the same everywhere:
  - every rate is a share in [0, 1] (or a count per message) rounded to 4 decimals, and None when
    its denominator is empty, so an empty input never crashes and never pretends to be 0 %;
  - a message's length is its number of code points after stripping surrounding whitespace
    (a skin-toned emoji is 2, a flag 2);
  - an emoji is one visible pictograph: "👍🏽", "🇫🇷", "👨‍👩‍👧" and "1️⃣" each count once;
  - ":)"-style emoticons are counted apart from emoji;
  - words are runs of letters/digits (apostrophes inside allowed), lowercased; a redaction
    placeholder such as "[EMAIL]" is one word.
"""

from __future__ import annotations

import functools
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LENGTH_BINS: tuple[tuple[str, int, float], ...] = (  # label, low (inclusive), high (exclusive)
    ("0-10", 0, 10),
    ("10-20", 10, 20),
    ("20-40", 20, 40),
    ("40-80", 40, 80),
    ("80-160", 80, 160),
    ("160+", 160, float("inf")),
)
BURST_BINS: tuple[str, ...] = ("1", "2", "3", "4", "5+")

# The per-message rates (shares of messages), in the order the report shows them.
RATE_KEYS: tuple[str, ...] = (
    "lowercase_rate",
    "end_punctuation_rate",
    "question_rate",
    "exclamation_rate",
    "uppercase_rate",
    "emoji_per_message",
    "emoticons_per_message",
)
# Every scalar that `compare_style` sets side by side (generated - real).
SCALAR_KEYS: tuple[str, ...] = (
    "messages_per_burst",
    "length_mean",
    "length_median",
    "length_p90",
    *RATE_KEYS,
)

_PLACEHOLDER = r"\[[A-Z][A-Z_]*\]"
_PLACEHOLDER_RE = re.compile(_PLACEHOLDER)
_EMOTICON_RE = re.compile(
    r"(?:(?<![/:])[:;=][-'^o]?[)(\]\[]+"                 # :) ;-) :'( =) :))) also glued: "thanks:)"
    r"|(?<![\w/:])(?:[:;=][-'^o]?[DPpOo3/\\|*]"         # :D :P :/ but not "re:open", "http://"
    r"|<3|\^[_.-]?\^|[xX]D))"                           # <3 ^^ ^_^ xD
    r"(?![\w/])"
)

_ZWJ, _VS15, _VS16, _KEYCAP = "\u200d", "\ufe0e", "\ufe0f", "\u20e3"
# Pictographs outside the emoji blocks that are emoji without a variation selector.
_LONE_EMOJI = frozenset(
    "\u231a\u231b\u23e9\u23ea\u23eb\u23ec\u23ed\u23ee\u23ef\u23f0\u23f1\u23f2\u23f3"
    "\u23f8\u23f9\u23fa\u2b1b\u2b1c\u2b50\u2b55\u303d\u3297\u3299"
)


@functools.cache
def _word_re() -> re.Pattern[str]:
    # Python's \w leaves out combining marks, which would cut "नमस्ते" or a decomposed "é" apart:
    # add every mark of the Basic Multilingual Plane (computed once, a few milliseconds).
    marks: list[str] = []
    start = prev = None
    for cp in range(0x300, 0x10000):
        if unicodedata.category(chr(cp)).startswith("M"):
            if prev is not None and cp == prev + 1:
                prev = cp
                continue
            if start is not None:
                marks.append(f"\\u{start:04x}-\\u{prev:04x}")
            start = prev = cp
    if start is not None:
        marks.append(f"\\u{start:04x}-\\u{prev:04x}")
    part = f"[^\\W_](?:[^\\W_]|[{''.join(marks)}])*"
    return re.compile(f"{_PLACEHOLDER}|{part}(?:['’]{part})*")


def words(text: str) -> list[str]:
    """The lowercased word tokens of `text` ("[EMAIL]" is one token, "don't" one too)."""
    return [w.lower() for w in _word_re().findall(unicodedata.normalize("NFC", text))]


def _is_pictograph(ch: str) -> bool:
    cp = ord(ch)
    if 0x1F000 <= cp <= 0x1FAFF:  # all emoji blocks (newer ones may be unknown to unicodedata)
        return True
    if 0x2600 <= cp <= 0x27BF:    # miscellaneous symbols and dingbats: ☀ ☺ ♥ ✅ ❤
        return unicodedata.category(ch) == "So"
    return ch in _LONE_EMOJI


def _emoji_starts(text: str, i: int) -> bool:
    ch = text[i]
    if _is_pictograph(ch):
        return True
    # Any symbol becomes an emoji with the emoji variation selector: ↔️ ©️ ‼️
    return i + 1 < len(text) and text[i + 1] == _VS16 and not ch.isalnum() and not ch.isspace()


def _is_modifier(ch: str) -> bool:
    cp = ord(ch)
    return (
        ch in (_VS15, _VS16, _KEYCAP)
        or 0x1F3FB <= cp <= 0x1F3FF   # skin tones
        or 0xE0020 <= cp <= 0xE007F   # tag sequences (the flag of England)
    )


def count_emoji(text: str) -> int:
    """Emoji in `text`, each multi-code-point sequence (skin tone, ZWJ family, flag, keycap) once."""
    n, i, end = 0, 0, len(text)
    while i < end:
        ch = text[i]
        if 0x1F1E6 <= ord(ch) <= 0x1F1FF:  # regional indicators: a pair is one flag
            pair = i + 1 < end and 0x1F1E6 <= ord(text[i + 1]) <= 0x1F1FF
            i += 2 if pair else 1
            n += 1
            continue
        if ch in "0123456789#*":  # keycap: 1️⃣ (the selector is often left out)
            j = i + 1 + (i + 1 < end and text[i + 1] == _VS16)
            if j < end and text[j] == _KEYCAP:
                i, n = j + 1, n + 1
                continue
        if _emoji_starts(text, i):
            i += 1
            while i < end:
                if _is_modifier(text[i]):
                    i += 1
                elif text[i] == _ZWJ and i + 1 < end and _emoji_starts(text, i + 1):
                    i += 2
                else:
                    break
            n += 1
            continue
        i += 1
    return n


def count_emoticons(text: str) -> int:
    """ASCII emoticons such as :) ;-) :D :P <3 ^^ xD (":)))" counts once; "http://" and "10:30" never)."""
    return len(_EMOTICON_RE.findall(text))


def _messages(reply: str) -> list[str]:
    return [line.strip() for line in reply.split("\n") if line.strip()]


def _first_letter(text: str) -> str | None:
    for ch in _PLACEHOLDER_RE.sub(" ", text):
        if ch.isalpha():
            return ch
    return None


def _cased(text: str) -> list[str]:
    return [ch for ch in _PLACEHOLDER_RE.sub(" ", text) if ch.lower() != ch.upper()]


def _share(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), so small samples give exact values.
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def _length_bin(n: int) -> str:
    return next(label for label, lo, hi in LENGTH_BINS if lo <= n < hi)


@dataclass
class _Tally:
    """Running counts over the messages of many replies: what `style_stats` summarises."""

    empty: int = 0
    bursts: Counter[str] = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    vocab: set[str] = field(default_factory=set)
    words: int = 0
    lower: int = 0         # messages whose first letter is lowercase ...
    first_cased: int = 0   # ... out of those whose first letter has a case
    upper: int = 0         # messages shouting ("LOL") ...
    any_cased: int = 0     # ... out of those with a cased letter
    end_punct: int = 0
    question: int = 0
    exclaim: int = 0
    emoji: int = 0
    emoticons: int = 0

    def add_reply(self, reply: str) -> None:
        msgs = _messages(reply)
        if not msgs:
            self.empty += 1
            return
        self.bursts[str(len(msgs)) if len(msgs) < 5 else "5+"] += 1
        for m in msgs:
            self.add_message(m)

    def add_message(self, m: str) -> None:
        self.lengths.append(len(m))
        tokens = words(m)
        self.words += len(tokens)
        self.vocab.update(tokens)
        first = _first_letter(m)
        if first is not None and first.lower() != first.upper():
            self.first_cased += 1
            self.lower += first.islower()
        cased = _cased(m)
        if cased:
            self.any_cased += 1
            self.upper += len(cased) >= 2 and all(ch.isupper() for ch in cased)
        self.end_punct += m[-1] in ".!?"
        self.question += "?" in m
        self.exclaim += "!" in m
        self.emoji += count_emoji(m)
        self.emoticons += count_emoticons(m)


def _length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    histogram = Counter(_length_bin(n) for n in lengths)
    return {
        "length_mean": round(statistics.fmean(lengths), 4) if lengths else None,
        # Its standard error: how far the mean of this many messages may be from the person's.
        "length_sem": round(statistics.stdev(lengths) / len(lengths) ** 0.5, 4) if len(lengths) > 1 else None,
        "length_median": round(float(statistics.median(ordered)), 4) if lengths else None,
        "length_p90": round(_percentile(ordered, 0.9), 4) if lengths else None,
        "length_histogram": {label: histogram[label] for label, _, _ in LENGTH_BINS},
    }


def style_stats(replies: Sequence[str]) -> dict:
    """Style numbers over all `replies` (see the module docstring for the conventions).

    Keys: replies, empty_replies (no non-blank line), messages, words, vocabulary_size;
    messages_per_burst (mean over non-empty replies) and burst_counts {"1".."4", "5+"};
    length_mean, length_median, length_p90 and length_histogram {LENGTH_BINS label: count};
    lowercase_rate (messages whose first letter is lowercase, over messages whose first letter
    has a case); uppercase_rate (messages with 2+ cased letters all uppercase, "LOL", over
    messages with a cased letter); end_punctuation_rate (ending with . ! or ?), question_rate
    and exclamation_rate (containing ? / !), emoji_per_message, emoticons_per_message (over all
    messages). Rates and means are None when there is nothing to divide by.
    """
    t = _Tally()
    for reply in replies:
        t.add_reply(reply)
    n_msgs = len(t.lengths)
    return {
        "replies": len(replies),
        "empty_replies": t.empty,
        "messages": n_msgs,
        "words": t.words,
        "vocabulary_size": len(t.vocab),
        "messages_per_burst": _share(n_msgs, sum(t.bursts.values())),
        "burst_counts": {label: t.bursts[label] for label in BURST_BINS},
        **_length_stats(t.lengths),
        "lowercase_rate": _share(t.lower, t.first_cased),
        "uppercase_rate": _share(t.upper, t.any_cased),
        "end_punctuation_rate": _share(t.end_punct, n_msgs),
        "question_rate": _share(t.question, n_msgs),
        "exclamation_rate": _share(t.exclaim, n_msgs),
        "emoji_per_message": _share(t.emoji, n_msgs),
        "emoticons_per_message": _share(t.emoticons, n_msgs),
    }


def _vocabulary(replies: Iterable[str]) -> Counter[str]:
    return Counter(w for reply in replies for w in words(reply))


def total_variation(a: dict[str, int], b: dict[str, int]) -> float | None:
    """Half the L1 distance between two count histograms as shares: 0 same shape, 1 disjoint.

    None when either histogram is empty.
    """
    total_a, total_b = sum(a.values()), sum(b.values())
    if not total_a or not total_b:
        return None
    keys = a.keys() | b.keys()
    return round(sum(abs(a.get(k, 0) / total_a - b.get(k, 0) / total_b) for k in keys) / 2, 4)


def compare_style(generated: Sequence[str], real: Sequence[str]) -> dict:
    """`style_stats` of both sides, their vocabulary overlap and how far apart they are.

    vocabulary_overlap.jaccard: |G ∩ R| / |G ∪ R| over distinct words (None if both have none);
    vocabulary_overlap.generated_in_real: share of generated word tokens, by count, whose word
    the real replies use (None if nothing generated has words). differences: generated - real
    for every key of SCALAR_KEYS (None where either side is None). length_distance and
    burst_distance: total variation between the histograms (None if either side is empty).
    """
    gen, ref = style_stats(generated), style_stats(real)
    gen_vocab, real_vocab = _vocabulary(generated), _vocabulary(real)
    union = gen_vocab.keys() | real_vocab.keys()
    inside = sum(c for w, c in gen_vocab.items() if w in real_vocab)
    differences = {
        key: None if gen[key] is None or ref[key] is None else round(gen[key] - ref[key], 4)
        for key in SCALAR_KEYS
    }
    return {
        "generated": gen,
        "real": ref,
        "vocabulary_overlap": {
            "jaccard": _share(len(gen_vocab.keys() & real_vocab.keys()), len(union)),
            "generated_in_real": _share(inside, sum(gen_vocab.values())),
        },
        "differences": differences,
        "length_distance": total_variation(gen["length_histogram"], ref["length_histogram"]),
        "burst_distance": total_variation(gen["burst_counts"], ref["burst_counts"]),
    }
