from hypothesis import given
from hypothesis import strategies as st

from bot.chunks import split_message


def test_short_text_is_one_piece():
    assert split_message("  hello  ", 2000) == ["hello"]
    assert split_message("", 2000) == []


def test_prefers_lines_then_sentences_then_words():
    assert split_message("aaaa\nbbbb", 6) == ["aaaa", "bbbb"]
    assert split_message("One two. Three four.", 12) == ["One two.", "Three four."]
    assert split_message("alpha beta gamma", 11) == ["alpha beta", "gamma"]
    assert split_message("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


@given(st.text(alphabet=st.sampled_from("ab .\n!"), max_size=400), st.integers(min_value=5, max_value=60))
def test_pieces_fit_and_keep_every_character(text, limit):
    pieces = split_message(text, limit)
    assert all(0 < len(p) <= limit for p in pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
