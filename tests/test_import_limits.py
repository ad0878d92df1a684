"""training.limits at the level of one reader: the JSON guard is exact (it never refuses what a
real export holds, whatever the chunking), and malformed rows are skipped, not fatal. The whole
adversarial set, end to end, is tests/test_fuzz_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import limits
from training.importers.common import JsonGuard, LimitError
from training.limits import MAX_JSON_DEPTH, size_text
from training.message import Message

README = Path(__file__).resolve().parent.parent / "README.md"

# Strings full of what could fool a scanner: brackets, quotes, backslashes, escapes.
_TEXT = st.text(alphabet=st.sampled_from('ab[]{}"\\/\n\u00e9\U0001f600 :,'), max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=30,
)


def feed_in_chunks(data: bytes, cuts: list[int]) -> JsonGuard:
    guard = JsonGuard("x.json")
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        guard.feed(data[start:cut])
        start = max(start, cut)
    guard.feed(data[start:])
    return guard


@settings(max_examples=300, deadline=None)
@given(_JSON, st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_the_guard_tracks_real_json_exactly_across_any_chunking(value, cuts, ascii_only):
    data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    guard = feed_in_chunks(data, cuts)
    assert (guard.depth, guard.in_string) == (0, False)


@pytest.mark.parametrize("cuts", [[], [7, 100], list(range(0, 400, 3))])
@pytest.mark.parametrize("opener", ["[", '{"k":'])
def test_the_guard_stops_one_level_past_the_limit(opener, cuts):
    closer = "]" if opener == "[" else "}"
    deep_enough = (opener * MAX_JSON_DEPTH + "1" + closer * MAX_JSON_DEPTH).encode()
    assert feed_in_chunks(deep_enough * 3, cuts).depth == 0
    too_deep = (opener * (MAX_JSON_DEPTH + 1) + "1" + closer * (MAX_JSON_DEPTH + 1)).encode()
    with pytest.raises(LimitError, match=f"deeper than {MAX_JSON_DEPTH}"):
        feed_in_chunks(deep_enough + too_deep, cuts)


def test_brackets_inside_strings_are_not_nesting():
    text = json.dumps({"text": "[" * 5000 + '\\"{' * 5000, "more": ["}" * 10]}).encode()
    assert feed_in_chunks(text, [1, 2, 4099, 4100, 9000]).depth == 0


@pytest.mark.parametrize(
    "row",
    [{"text": 5}, {"author": 5}, {"chat_id": [1]}, {"id": 1.5}, {"id": True}, {"kind": "poll"},
     {"timestamp": 5}, {"platform": None}],
)
def test_a_normalized_row_of_the_wrong_type_is_refused(row):
    good = Message("csv", "c", None, "1", "a", "a", None, "hi", "text", None).to_dict()
    assert Message.from_dict(good).text == "hi"
    with pytest.raises((TypeError, ValueError)):
        Message.from_dict({**good, **row})


def test_the_readme_states_the_limits_the_code_has():
    section = README.read_text(encoding="utf-8").split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows == {
        "what": "limit",
        "one message's text": f"{limits.MAX_MESSAGE_CHARS:,} characters",
        "one line (WhatsApp, CSV, `messages-jsonl`), CSV record, JSON message object, or JSON file "
        "read whole": size_text(limits.MAX_RECORD_BYTES),
        "one JSON string or number": size_text(limits.MAX_JSON_VALUE_BYTES),
        "one JSON integer (in a Discord data package; elsewhere 64 bits)":
            f"{limits.MAX_JSON_INTEGER_DIGITS:,} digits",
        "JSON nesting": f"{limits.MAX_JSON_DEPTH} levels",
        "one export file": size_text(limits.MAX_EXPORT_BYTES),
        "a zip's chat text, inflated": size_text(limits.MAX_ZIP_TEXT_BYTES),
        f"how much a zip's chat text inflates (from {size_text(limits.ZIP_RATIO_FROM_BYTES)} on)":
            f"{limits.MAX_ZIP_RATIO} times",
    }


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=20_000), st.lists(st.integers(min_value=0), max_size=6))
def test_digits_in_a_string_are_text_and_a_long_integer_is_refused(n, cuts):
    # A data package's ids are numbers of any size: ijson makes them Python ints, and one past
    # Python's digit limit crashed the process, so the guard stops it first.
    text = json.dumps([{"ID": 12345678901234567890123, "Contents": "7" * n}]).encode()
    guard = JsonGuard("messages.json", big_ints=True)
    start = 0
    for cut in sorted(c % (len(text) + 1) for c in cuts):
        guard.feed(text[start:cut])
        start = max(start, cut)
    guard.feed(text[start:])
    number = b'[{"ID": ' + b"7" * n + b"}]"
    cut = (cuts[0] % len(number)) if cuts else 0
    guard = JsonGuard("messages.json", big_ints=True)
    if n > limits.MAX_JSON_INTEGER_DIGITS:
        with pytest.raises(LimitError, match="integer over"):
            guard.feed(number[:cut])
            guard.feed(number[cut:])
    else:
        guard.feed(number[:cut])
        guard.feed(number[cut:])
