"""Style metrics on hand-written replies, and the evaluation report written from plain data."""

from __future__ import annotations

import json

import pytest

from training.report import md_escape, verdict, write_report
from training.style import (
    SCALAR_KEYS,
    compare_style,
    count_emoji,
    count_emoticons,
    style_stats,
    total_variation,
    words,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

REPLIES = [
    "haha yes\nsee you at 8",                          # a burst of two messages
    "LOL",
    "Are you there?",
    "ok 👍🏽 :)\n\nwow!\n🇫🇷🇫🇷\ni mean\nyes.",          # five messages (the blank line is none)
    "   \n",                                            # no message at all
]


def png_size(data: bytes) -> tuple[int, int]:
    # The IHDR chunk follows the signature: 4 bytes length, b"IHDR", width, height.
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ---- style_stats ---------------------------------------------------------------------------------


def test_style_stats_on_hand_written_replies():
    assert style_stats(REPLIES) == {
        "replies": 5,
        "empty_replies": 1,
        "messages": 9,
        "words": 15,
        "vocabulary_size": 13,   # "yes" and "you" twice; "LOL" is "lol"
        "messages_per_burst": 2.25,
        "burst_counts": {"1": 2, "2": 1, "3": 0, "4": 0, "5+": 1},
        # lengths 8 12 3 14 8 4 4 6 4: "ok 👍🏽 :)" is 8 code points, two flags 4
        "length_mean": 7.0,
        "length_sem": 1.291,             # sample standard deviation sqrt(120 / 8) over sqrt(9)
        "length_median": 6.0,
        "length_p90": 12.4,
        "length_histogram": {"0-10": 7, "10-20": 2, "20-40": 0, "40-80": 0, "80-160": 0, "160+": 0},
        "lowercase_rate": 0.75,          # 6 of the 8 messages with a letter (flags have none)
        "uppercase_rate": 0.125,         # "LOL"
        "end_punctuation_rate": 0.3333,  # "there?", "wow!", "yes."
        "question_rate": 0.1111,
        "exclamation_rate": 0.1111,
        "emoji_per_message": 0.3333,     # 👍🏽 once, 🇫🇷🇫🇷 twice
        "emoticons_per_message": 0.1111,
    }


def test_style_stats_of_nothing_has_no_rates():
    stats = style_stats([])
    assert stats["replies"] == stats["messages"] == stats["vocabulary_size"] == 0
    assert stats["messages_per_burst"] is None
    assert stats["length_mean"] is stats["length_median"] is stats["length_p90"] is None
    assert all(stats[k] is None for k in SCALAR_KEYS)
    assert set(stats["length_histogram"].values()) == {0}
    assert style_stats(["", "\n \n"])["empty_replies"] == 2


def test_capitals_ignore_placeholders_and_single_letters():
    stats = style_stats(["[EMAIL] is mine", "I", "OK 👍", "ça va", "你好"])
    # first letters: i (after the placeholder), I, O, ç; "你好" has no case and is left out
    assert stats["lowercase_rate"] == 0.5
    # "I" is one letter, not shouting; "OK 👍" is
    assert stats["uppercase_rate"] == 0.25


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("👍🏽", 1),                 # skin tone
        ("👍🏽👍🏽 ok", 2),
        ("🇫🇷🇩🇪", 2),                # two flags
        ("👨‍👩‍👧", 1),                # ZWJ family
        ("👩🏽‍💻", 1),                # skin tone inside a ZWJ sequence
        ("🏳️‍🌈", 1),                # selector + ZWJ
        ("🏴󠁧󠁢󠁥󠁮󠁧󠁿", 1),                # tag sequence (England)
        ("1️⃣2️⃣", 2),                # keycaps
        ("❤️ ❤", 2),                 # with and without the emoji selector
        ("‼️", 1),                   # punctuation made emoji by the selector
        ("😂😂😂", 3),
        ("🫨", 1),                   # newer than Python's Unicode tables
        ("20°C, © 2024, 10 > 9", 0),
        ("plain words 123", 0),
    ],
)
def test_count_emoji(text, expected):
    assert count_emoji(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":) :-) ;) :D :P <3 ^^ xD", 8),
        ("thanks:)", 1),
        (":)))", 1),
        ("hmm :/ ok =(", 2),
        ("see http://x.org at 10:30, re:open, c:\\dir", 0),
        ("email:[EMAIL]", 0),
    ],
)
def test_count_emoticons(text, expected):
    assert count_emoticons(text) == expected


def test_words():
    assert words("Don't email [EMAIL], cafe\u0301 at 8!") == ["don't", "email", "[email]", "café", "at", "8"]
    assert words("नमस्ते दोस्त") == ["नमस्ते", "दोस्त"]   # vowel signs stay inside the word


# ---- compare_style -------------------------------------------------------------------------------


def test_identical_inputs_are_at_distance_zero():
    cmp = compare_style(REPLIES, REPLIES)
    assert cmp["generated"] == cmp["real"] == style_stats(REPLIES)
    assert cmp["vocabulary_overlap"] == {"jaccard": 1.0, "generated_in_real": 1.0}
    assert cmp["length_distance"] == 0.0
    assert cmp["burst_distance"] == 0.0
    assert cmp["differences"] == dict.fromkeys(SCALAR_KEYS, 0.0)


def test_compare_known_inputs():
    cmp = compare_style(["hello there", "Hello!\nbye"], ["hello you"])
    # generated words hello×2 there bye; real hello you: 1 shared word of 4
    assert cmp["vocabulary_overlap"] == {"jaccard": 0.25, "generated_in_real": 0.5}
    # lengths 11 6 3 -> 2/3 short, 1/3 medium; real 9 -> all short
    assert cmp["length_distance"] == 0.3333
    assert cmp["burst_distance"] == 0.5           # bursts 1 and 2 against one single message
    diff = cmp["differences"]
    assert diff["messages_per_burst"] == 0.5
    assert diff["length_mean"] == -2.3333
    assert diff["lowercase_rate"] == -0.3333
    assert diff["exclamation_rate"] == 0.3333
    assert diff["question_rate"] == 0.0


def test_compare_empty_sides_does_not_crash():
    both = compare_style([], [])
    assert both["vocabulary_overlap"] == {"jaccard": None, "generated_in_real": None}
    assert both["length_distance"] is None and both["burst_distance"] is None
    assert set(both["differences"].values()) == {None}
    one = compare_style([], ["hi there"])
    assert one["vocabulary_overlap"] == {"jaccard": 0.0, "generated_in_real": None}
    assert one["length_distance"] is None
    assert one["real"]["messages"] == 1


def test_total_variation():
    assert total_variation({"a": 2}, {"b": 5}) == 1.0
    assert total_variation({"a": 1, "b": 1}, {"a": 3, "b": 1}) == 0.25
    assert total_variation({"a": 0}, {"a": 1}) is None


# ---- write_report --------------------------------------------------------------------------------

PERPLEXITY = {"base": 80.1, "prompted": 60.2, "adapter": 30.3}


def full_result() -> dict:
    generated = ["Haha yes.", "See you at 8!\nok", "lol 😂", "What time?"]
    return {
        "version": "20261125-101500",
        "perplexity": PERPLEXITY,
        "val_replies": 123,
        "style": compare_style(generated, REPLIES),
        "examples": [
            {
                "context": "Alice: coming | tonight?\nBob: <b>maybe</b>",
                "real": "yes\nsee you",
                "generated": "Yes *sure*",
                "base": "As an AI <script>x</script>",
            }
        ]
        + [{"context": f"c{i}", "real": f"r{i}", "generated": f"g{i}", "base": ""} for i in range(2, 8)],
        "model": {"base": "tiny-model", "lora_r": 16},
    }


def log_history() -> list[dict]:
    train = [{"loss": 3.0 - 0.02 * i, "learning_rate": 1e-4, "step": 10 * i} for i in range(1, 31)]
    evals = [{"eval_loss": 2.9 - 0.1 * i, "step": 100 * i} for i in range(1, 4)]
    return [*train, *evals, {"train_runtime": 12.5, "step": 300}]


def test_full_report(tmp_path):
    result = full_result()
    out = tmp_path / "eval" / "20261125-101500"   # created by write_report
    path = write_report(result, out, log_history())
    assert path == out / "report.md"
    assert sorted(p.name for p in out.iterdir()) == [
        "eval.json", "loss.png", "report.md", "style_lengths.png", "style_rates.png",
    ]
    assert json.loads((out / "eval.json").read_text(encoding="utf-8")) == result

    md = path.read_text(encoding="utf-8")
    assert md.startswith("# Evaluation of adapter 20261125-101500\n")
    assert "Validation replies: **123**" in md
    for row in ("| base | 80.10 |", "| prompted | 60.20 |", "| adapter | 30.30 |"):
        assert row in md
    assert "Ratio adapter / prompted: **0.503**" in md
    # the style table: real 75.0 % lowercase; generated "lol", "ok" of 5 messages with a letter
    assert "| Starts lowercase | 75.0 % | 40.0 % | -35.0 pp |" in md
    for name in ("loss.png", "style_lengths.png", "style_rates.png"):
        assert f"]({name})" in md
    assert "| lora\\_r | 16 |" in md

    for name, size in (("loss.png", (800, 450)), ("style_lengths.png", (1100, 450)),
                       ("style_rates.png", (800, 450))):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000
        assert png_size(data) == size


def test_verdict_names_the_prompted_base_model_as_a_bar():
    # A tiny persona: the adapter beats the bare base model but not the base shown a few messages.
    said = verdict({"perplexity": {"base": 120.0, "prompted": 19.8, "adapter": 68.3}})
    assert "reads as you better than the base model on held-out chats (perplexity 68.3 against 120.0)" in said
    assert "no better than the base model shown a few of your messages (perplexity 19.8)" in said
    said = verdict({"perplexity": {"base": 80.1, "prompted": 60.2, "adapter": 30.3}})
    assert "; better than the base model shown a few of your messages (perplexity 60.2)" in said
    assert "shown" not in verdict({"perplexity": {"base": 80.1, "prompted": None, "adapter": 30.3}})


def test_verdict_compares_context_gains_as_it_prints_them():
    def said(adapter: float, base: float) -> str:
        return verdict({"context_gain": {"adapter": adapter, "base": base}})

    assert "follows the conversation as much as the base model does (context gain 1.00 against 1.00)" in said(
        1.001, 0.998)
    assert "follows the conversation less than the base model does (context gain 1.22 against 1.27)" in said(
        1.221, 1.271)
    assert "follows the conversation more than the base model does" in said(1.31, 1.27)


def test_examples_are_escaped_and_capped(tmp_path):
    md = write_report(full_result(), tmp_path).read_text(encoding="utf-8")
    assert "| # | Context | Real | Generated | Base model |" in md
    assert (
        "| 1 | Alice: coming \\| tonight?<br>Bob: &lt;b&gt;maybe&lt;/b&gt; | yes<br>see you | "
        "Yes \\*sure\\* | As an AI &lt;script&gt;x&lt;/script&gt; |"
    ) in md
    assert "<script>" not in md and "<b>" not in md
    assert "| 5 | c5 | r5 | g5 | — |" in md
    assert "| 6 |" not in md   # at most five examples


def test_minimal_result_still_reports(tmp_path):
    path = write_report({"perplexity": {"base": 80.1, "prompted": None}, "val_replies": 3}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "report.md"]
    md = path.read_text(encoding="utf-8")
    assert md.startswith("# Evaluation of adapter unknown\n")
    assert "| base | 80.10 |" in md
    assert "| prompted | — |" in md and "| adapter | — |" in md
    assert "Ratio" not in md and "![" not in md and "## Style" not in md and "## Examples" not in md


def test_loss_plot_needs_loss_entries(tmp_path):
    result = {"perplexity": PERPLEXITY, "val_replies": 1}
    write_report(result, tmp_path / "a", [{"train_runtime": 3.0, "step": 5}])
    assert not (tmp_path / "a" / "loss.png").exists()
    write_report(result, tmp_path / "b", [{"eval_loss": 2.0, "step": 5}, {"eval_loss": 1.5, "step": 10}])
    assert (tmp_path / "b" / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "](loss.png)" in (tmp_path / "b" / "report.md").read_text(encoding="utf-8")


def test_style_without_messages_has_no_plots(tmp_path):
    result = {"perplexity": PERPLEXITY, "val_replies": 0, "style": compare_style([], [])}
    md = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert not (tmp_path / "style_rates.png").exists()
    assert "| Starts lowercase | — | — | — |" in md


def test_md_escape():
    assert md_escape("a|b <i>x</i> & `y` [z](u) *w*\r\nnext") == (
        "a\\|b &lt;i&gt;x&lt;/i&gt; &amp; \\`y\\` \\[z\\](u) \\*w\\*<br>next"
    )
