"""training.knowledge: notes cut into passages, exchanges as items, note files read and redacted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import knowledge
from training.knowledge import (
    EXCHANGE_CHARS,
    Item,
    KnowledgeError,
    exchanges,
    notes,
    passages,
    read_note,
)
from training.privacy import PLACEHOLDERS, Redactor
from training.prompt import Recalled, Utterance


def words(texts: list[str]) -> list[str]:
    return [w for t in texts for w in t.split()]


def chars(texts: list[str]) -> str:
    """The non-space characters, in order: what a hard split of a word must keep."""
    return "".join("".join(t.split()) for t in texts)


# -- passages -------------------------------------------------------------------------------------

def test_headings_are_dropped_and_paragraphs_kept_apart():
    text = ("# About me\n\nI grew up in the south.\nI study design.\n\n"
            "## Work\n\nI take photos of houses.\n\n\n   \n\nI play the piano.\n")
    assert passages(text) == ["I grew up in the south. I study design.",
                              "I take photos of houses.", "I play the piano."]


def test_a_heading_inside_a_paragraph_is_dropped_but_its_lines_are_not():
    assert passages("## Family\nMy sister Maria does a PhD.\n  # aside\nShe researches lasers.") == [
        "My sister Maria does a PhD. She researches lasers."]


def test_a_hashtag_line_is_text_not_a_heading():
    """A markdown heading is '#'s then a space; '#1 rule' or '#blessed' are words of the note."""
    assert passages("#1 rule: family first.\n#blessed") == ["#1 rule: family first. #blessed"]


def test_an_empty_or_heading_only_note_gives_nothing():
    assert passages("") == []
    assert passages("# Title\n\n## Subtitle\n\n   \n") == []


def test_a_long_paragraph_is_split_at_sentence_ends():
    sentences = [f"Sentence number {i} is here." for i in range(10)]  # 26 or so characters each
    out = passages(" ".join(sentences), limit=60)
    assert len(out) > 1
    assert all(len(p) <= 60 for p in out)
    # Every passage is whole sentences: each ends where a sentence ends.
    assert all(p.endswith(".") for p in out)
    assert " ".join(out) == " ".join(sentences)


def test_a_long_sentence_without_punctuation_is_split_at_word_boundaries():
    sentence = " ".join(f"word{i}" for i in range(100))  # about 600 characters, no sentence end
    out = passages(sentence, limit=50)
    assert len(out) > 1
    assert all(len(p) <= 50 for p in out)
    assert words(out) == sentence.split()  # no word cut in two


def test_one_giant_word_is_split_hard():
    giant = "x" * 1000
    out = passages(giant, limit=300)
    assert out == ["x" * 300, "x" * 300, "x" * 300, "x" * 100]


def test_a_giant_word_keeps_its_place_among_the_words_around_it():
    """A URL or hash longer than the limit, between other words: the note still reads in order."""
    text = "see " + "a" * 25 + " for details"
    out = passages(text, limit=10)
    assert all(len(p) <= 10 for p in out)
    assert chars(out) == chars([text])


_word = st.text(alphabet="abcdefgh", min_size=1, max_size=12)
_sentence = st.builds(lambda ws, end: " ".join(ws) + end, st.lists(_word, min_size=1, max_size=30),
                      st.sampled_from(["", ".", "!", "?", ","]))
_paragraph = st.builds(" ".join, st.lists(_sentence, min_size=1, max_size=6))
_note = st.builds("\n\n".join, st.lists(_paragraph, min_size=0, max_size=4))


@settings(max_examples=50, deadline=None)
@given(note=_note, limit=st.integers(min_value=13, max_value=120))  # a word and its mark fit
def test_passages_fit_the_limit_and_lose_no_word(note, limit):
    out = passages(note, limit=limit)
    assert all(0 < len(p) <= limit for p in out)
    assert words(out) == note.split()


@settings(max_examples=50, deadline=None)
@given(note=st.lists(st.one_of(_word, st.text(alphabet="xyz", min_size=13, max_size=80)), max_size=20)
       .map(" ".join), limit=st.integers(min_value=5, max_value=12))
def test_passages_with_words_over_the_limit_fit_and_lose_no_character(note, limit):
    out = passages(note, limit=limit)
    assert all(0 < len(p) <= limit for p in out)
    assert sorted(chars(out)) == sorted(chars([note]))  # order: the giant-word test above


# -- exchanges ------------------------------------------------------------------------------------

def other(text: str) -> Utterance:
    return Utterance("Jordan", text, False)


def me(text: str) -> Utterance:
    return Utterance("Sam", text, True)


def test_runs_of_each_side_make_one_item_each():
    utts = [other("hey"), other("what are you studying?"), me("industrial design"), me("at BYU"),
            other("cool"), me("yeah")]
    assert list(exchanges(utts, "chat1")) == [
        Item("exchange", "industrial design\nat BYU", "hey\nwhat are you studying?", "chat1"),
        Item("exchange", "yeah", "cool", "chat1"),
    ]


def test_the_kind_is_passed_on():
    [item] = exchanges([other("Where are you from?"), me("South Carolina")], "faq.csv", kind="fact")
    assert item == Item("fact", "South Carolina", "Where are you from?", "faq.csv")


def test_a_conversation_ending_on_the_other_side_leaves_no_dangling_item():
    utts = [other("hi"), me("hello"), other("are you there?"), other("hello??")]
    assert list(exchanges(utts, "c")) == [Item("exchange", "hello", "hi", "c")]


def test_the_person_speaking_first_makes_no_item_without_a_question():
    utts = [me("morning"), me("anyone up?"), other("me"), me("nice")]
    assert list(exchanges(utts, "c")) == [Item("exchange", "nice", "me", "c")]


def test_no_utterances_make_no_item():
    assert list(exchanges([], "c")) == []
    assert list(exchanges([me("talking to myself")], "c")) == []


def test_long_sides_are_cut_to_their_end():
    asked = "blah " * 200 + "so what do you study?"
    reply = "well " * 200 + "industrial design at BYU"
    [item] = exchanges([other(asked), me(reply)], "c")
    for side, full in ((item.asked, asked), (item.text, reply)):
        assert len(side) == EXCHANGE_CHARS
        assert side.startswith("…")
        assert full.endswith(side[1:])
    short = next(exchanges([other("short?"), me("short")], "c"))
    assert (short.asked, short.text) == ("short?", "short")


# -- Item -----------------------------------------------------------------------------------------

def test_embedded_text_is_what_was_asked_when_something_was():
    assert Item("fact", "South Carolina", "Where are you from?").embedded_text() == "Where are you from?"
    assert Item("note", "I play the piano.").embedded_text() == "I play the piano."
    assert Item("exchange", "ok", "").embedded_text() == "ok"


def test_an_item_is_recalled_with_its_question():
    assert Item("fact", "BYU", "Where do you go to school?").recalled() == Recalled(
        "BYU", asked="Where do you go to school?")
    assert Item("note", "I play the piano.", source="a.md").recalled() == Recalled("I play the piano.")


# -- note files -----------------------------------------------------------------------------------

def test_notes_are_read_recursively_md_and_txt_only(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "about.md").write_text("# Me\n\nI play the piano.\n", encoding="utf-8")
    (tmp_path / "sub" / "work.TXT").write_text("I take photos of houses.", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "food.txt").write_text("\ufeffBanana bread is the best.", encoding="utf-8")
    (tmp_path / "sub" / "data.csv").write_text("question,answer\nq,a\n", encoding="utf-8")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not text")
    (tmp_path / "folder.md").mkdir()  # a folder named like a note is no note
    items = notes(tmp_path, Redactor())
    assert sorted((i.source, i.text) for i in items) == [
        ("about.md", "I play the piano."),
        ("sub/deeper/food.txt", "Banana bread is the best."),
        ("sub/work.TXT", "I take photos of houses."),
    ]
    assert {i.kind for i in items} == {"note"} and all(i.asked is None for i in items)


def test_notes_are_redacted(tmp_path):
    (tmp_path / "contact.md").write_text("Email me at sam.rivera@example.com any time.", encoding="utf-8")
    [item] = notes(tmp_path, Redactor())
    assert "sam.rivera@example.com" not in item.text
    assert item.text == f"Email me at {PLACEHOLDERS['email']} any time."


def test_notes_blocklist_is_applied(tmp_path):
    (tmp_path / "a.md").write_text("My roommate Jake makes pasta.", encoding="utf-8")
    [item] = notes(tmp_path, Redactor(["Jake"]))
    assert "Jake" not in item.text and PLACEHOLDERS["blocked"] in item.text


def test_a_note_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "good.md").write_text("fine", encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Ich wohne in München.".encode("latin-1"))
    with pytest.raises(KnowledgeError) as e:
        notes(tmp_path, Redactor())
    message = str(e.value)
    assert str(bad) in message and "UTF-8" in message and "\n" not in message


def test_a_note_over_the_size_limit_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(knowledge, "MAX_NOTE_BYTES", 100)
    big = tmp_path / "book.md"
    big.write_text("word " * 30, encoding="utf-8")  # 150 bytes
    (tmp_path / "small.md").write_text("word " * 10, encoding="utf-8")
    with pytest.raises(KnowledgeError) as e:
        notes(tmp_path, Redactor())
    assert str(big) in str(e.value) and "\n" not in str(e.value)
    assert read_note(tmp_path / "small.md") == "word " * 10


def test_an_unreadable_note_is_named(tmp_path):
    with pytest.raises(KnowledgeError) as e:
        read_note(tmp_path / "gone.md")
    assert str(tmp_path / "gone.md") in str(e.value)


def test_a_missing_folder_has_no_notes(tmp_path):
    assert notes(tmp_path / "no-such-folder", Redactor()) == []
    assert notes(None, Redactor()) == []
    (tmp_path / "a-file.md").write_text("not a folder", encoding="utf-8")
    assert notes(tmp_path / "a-file.md", Redactor()) == []


def test_a_long_note_is_split_into_passages_within_the_limit(tmp_path):
    text = " ".join(f"I like thing number {i} a lot." for i in range(100))
    (tmp_path / "likes.md").write_text(text, encoding="utf-8")
    items = notes(tmp_path, Redactor())
    assert len(items) > 1
    assert all(len(i.text) <= knowledge.PASSAGE_CHARS for i in items)
    assert " ".join(i.text for i in items) == text
