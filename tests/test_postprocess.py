from bot.postprocess import to_messages


def test_a_burst_becomes_separate_messages():
    assert to_messages("haha yes\n\nsee you at 8 \n") == ["haha yes", "see you at 8"]


def test_template_tokens_end_the_reply():
    text = "sure thing<|im_end|>\n<|im_start|>user\nAna: hi"
    assert to_messages(text) == ["sure thing"]
    assert to_messages("<|im_start|>assistant\nhello") == []


def test_never_speaks_for_someone_else():
    text = "i'm in\nAna: me too\nBo: see you"
    assert to_messages(text, other_speakers=["Ana", "Bo"]) == ["i'm in"]
    # An ordinary colon is not a speaker prefix.
    assert to_messages("note: bring chips", other_speakers=["Ana"]) == ["note: bring chips"]


def test_quotes_are_not_sent_and_length_is_capped():
    assert to_messages("> what time\n8pm") == ["8pm"]
    many = "\n".join(f"line {i}" for i in range(20))
    assert to_messages(many, max_messages=3) == ["line 0", "line 1", "line 2"]
    [long] = to_messages("x" * 5000, max_chars=100)
    assert len(long) == 100 and long.endswith("…")


def test_typing_delay_grows_with_length_and_is_bounded():
    from bot.engine import Delivery

    off = Delivery()
    assert off.delay("a long message " * 20) == 0.0
    on = Delivery(enabled=True, chars_per_second=10, min_s=0.5, max_s=3.0)
    assert on.delay("ok") == 0.5
    assert on.delay("x" * 20) == 2.0
    assert on.delay("x" * 500) == 3.0


def test_a_reply_cut_by_the_token_cap_is_not_sent_cut_off():
    # Two lines: the unfinished last one goes.
    assert to_messages("see you at 8\nand bring the just w", truncated=True) == ["see you at 8"]
    # One line: it ends at its last sentence, else at its last whole word.
    assert to_messages("sure thing. i was just w", truncated=True) == ["sure thing."]
    assert to_messages("i was just w", truncated=True) == ["i was just…"]
    assert to_messages("supercalifragilistic", truncated=True) == []
    # A turn that ended before the cap is whole, truncated flag or not.
    assert to_messages("all good<|im_end|>", truncated=True) == ["all good"]
    assert to_messages("i was just w") == ["i was just w"]


def test_one_end_of_turn_rule_for_the_bots_and_the_model_server():
    from training.prompt import turn_text

    for raw, expected in [("hi there<|im_end|>\n<|im_start|>user", "hi there"), ("ok<|endoftext|>", "ok"),
                          ("a | b < c", "a | b < c"), ("yes</s>no", "yes"), ("fine [INST] more", "fine ")]:
        assert turn_text(raw) == expected
        assert to_messages(raw) == [m for m in [expected.strip()] if m]


def test_a_recalled_answer_marker_is_not_sent():
    from bot.postprocess import to_messages

    assert to_messages("A: I'm studying industrial design\nA: B and C") == [
        "I'm studying industrial design", "A: B and C"]
