"""training.index with the real packaged embedding model: search, the knowledge bonus, files,
reuse of vectors, and what training samples are shown (training.prompt.fit_recalled)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.index import (
    KNOWLEDGE_BONUS,
    MIN_SCORE,
    IndexProblem,
    PersonaIndex,
    answer_views,
    attach_recalled,
    build,
    paraphrase_samples,
    query_of,
    recall,
    reindex,
    reply_prefixes,
)
from training.knowledge import Item
from training.persona import Persona
from training.prompt import (
    RECALL_HEADER,
    Recalled,
    Utterance,
    fit_recalled,
    recall_block,
    system_prompt,
    to_chat_messages,
)

FACTS = [  # (asked, answer, source): facts of a CSV are read as exchanges of one conversation
    ("What are you studying?", "Industrial design! I'm a sophomore at BYU", "faq.csv"),
    ("Where are you from?", "South Carolina. I grew up in the country", "faq.csv"),
    ("Do you have any siblings?", "Just my older sister Maria", "faq.csv"),
    ("What is your favorite food?", "Banana bread, no contest", "faq.csv"),
    ("Do you have a pet?", "Our golden retriever Copper, he lives with my parents", "c3"),
    ("What music do you like?", "Country, always", "faq.csv"),
    ("What sports do you play?", "Tennis, soccer and ultimate frisbee", "faq.csv"),
    ("Where do you work?", "Construction and marketing for my dad's company", "faq.csv"),
    ("What do you do when you are stressed?", "I play the piano", "faq.csv"),
    ("Where did you serve your mission?", "Northern California", "faq.csv"),
]
EXCHANGES = [  # (asked, reply); the conversation is c<i % 5>
    ("did you watch the game last night?", "nope I was studying"),
    ("what are you up to this weekend?", "probably hiking"),
    ("how was the exam?", "brutal haha"),
    ("want to grab coffee tomorrow?", "sure! 10?"),
    ("have you seen the new star wars movie?", "not yet, no spoilers"),
    ("are you going to the party on friday?", "maybe, depends on homework"),
    ("how is your sister doing?", "she's good, busy with lasers"),
    ("can you send me the photos?", "sending now"),
    ("what time does class start?", "9 I think"),
    ("did you finish the homework?", "almost"),
    ("lol that is hilarious", "right??"),
    ("where should we eat tonight?", "cafe rio!"),
    ("are you free to call later?", "after 8"),
    ("how was your mission?", "amazing honestly"),
    ("do you like country music?", "obviously"),
    ("what did you think of the concert?", "so loud haha"),
    ("is it cold in provo right now?", "freezing"),
    ("did you get the job?", "yes! real estate photography"),
    ("do you have a dog at home?", "yes copper, best dog ever"),
    ("what classes are you taking this semester?", "drawing and design theory"),
]
NOTES = [
    ("I take photos of houses for real estate listings on the weekends.", "work.md"),
    ("Homemade pasta with my roommate is the best dinner there is.", "food.md"),
]
ITEMS = (
    [Item("fact", answer, asked, source) for asked, answer, source in FACTS]
    + [Item("exchange", reply, asked, f"c{i % 5}") for i, (asked, reply) in enumerate(EXCHANGES)]
    + [Item("note", text, source=source) for text, source in NOTES]
)
SAM = Persona(name="Sam", description="A student")


def words(text: str) -> int:
    return len(text.split())


class Counting:
    """An embedder that records every text it is asked to embed."""

    def __init__(self, inner, name: str | None = None) -> None:
        self.inner, self.name = inner, name or inner.name
        self.texts: list[str] = []

    def embed(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        self.texts += list(texts)
        return self.inner.embed(texts, batch_size)


@pytest.fixture(scope="module")
def embedder():
    from training.embed import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def index(embedder) -> PersonaIndex:
    counting = Counting(embedder)
    built = build(ITEMS, counting)
    wanted = {i.embedded_text() for i in ITEMS} | set(answer_views(ITEMS))
    assert sorted(counting.texts) == sorted(wanted)  # each once
    return built


def vector(embedder, text: str) -> np.ndarray:
    return embedder.embed([text])[0]


def first_of(index: PersonaIndex, embedder, text: str, **kw) -> Item:
    return index.search(vector(embedder, text), 1, **kw)[0][1]


# -- search ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("question, asked", [
    ("what's your major?", "What are you studying?"),
    ("got any brothers or sisters?", "Do you have any siblings?"),
    ("how do you deal with stress?", "What do you do when you are stressed?"),
    ("what kind of songs are you into?", "What music do you like?"),
])
def test_a_paraphrased_question_finds_its_fact_first(index, embedder, question, asked):
    found = first_of(index, embedder, question, min_score=MIN_SCORE)
    assert (found.kind, found.asked) == ("fact", asked)


@pytest.mark.parametrize("question, asked", [
    ("where did you grow up?", "Where are you from?"),       # "grew up" is in the answer only
    ("do you play the piano?", "What do you do when you are stressed?"),
    ("who is maria?", "Do you have any siblings?"),
])
def test_a_question_that_shares_words_with_the_answer_finds_its_fact(index, embedder, question, asked):
    found = first_of(index, embedder, question, min_score=MIN_SCORE)
    assert (found.kind, found.asked) == ("fact", asked)
    by_question = PersonaIndex(index.items, index.vectors, index.model)  # no answer vectors
    assert first_of(by_question, embedder, question, min_score=MIN_SCORE).asked != asked


def test_the_knowledge_bonus_lets_a_fact_outrank_a_slightly_closer_exchange(index, embedder):
    q = vector(embedder, "any animals at home?")
    fact = next(i for i in ITEMS if i.asked == "Do you have a pet?")
    exchange = next(i for i in ITEMS if i.asked == "do you have a dog at home?")
    fact_cos, exchange_cos = (float(vector(embedder, i.asked) @ q) for i in (fact, exchange))
    # The set-up: the exchange is closer to the message, by less than the bonus.
    assert 0 < exchange_cos - fact_cos < KNOWLEDGE_BONUS
    scored = {item: score for score, item in index.search(q, len(index), min_score=-1.0)}
    assert scored[fact] == pytest.approx(fact_cos + KNOWLEDGE_BONUS, abs=1e-4)
    assert scored[exchange] == pytest.approx(exchange_cos, abs=1e-4)
    order = [item for _, item in index.search(q, len(index), min_score=-1.0)]
    assert order.index(fact) < order.index(exchange)


def test_results_are_best_first_and_k_larger_than_the_index_gives_every_item(index, embedder):
    found = index.search(vector(embedder, "what's your major?"), 1000, min_score=-10.0)
    assert len(found) == len(index) == len(ITEMS)
    scores = [s for s, _ in found]
    assert scores == sorted(scores, reverse=True)
    assert {i for _, i in found} == set(ITEMS)


def test_k_zero_or_an_empty_index_finds_nothing(index, embedder):
    q = vector(embedder, "hello")
    assert index.search(q, 0) == []
    empty = build([], Counting(embedder))
    assert len(empty) == 0 and empty.search(q, 5) == []


def test_min_score_filters(index, embedder):
    q = vector(embedder, "what's your major?")
    every = index.search(q, len(index), min_score=-10.0)
    for threshold in (0.0, MIN_SCORE, 0.5):
        found = index.search(q, len(index), min_score=threshold)
        assert found == [(s, i) for s, i in every if s >= threshold]
    assert 0 < len(index.search(q, len(index), min_score=0.5)) < len(index)
    assert index.search(q, len(index), min_score=2.0) == []


def test_exclude_source_hides_that_conversations_exchanges_only(index, embedder):
    q = vector(embedder, "do you have a dog at home?")
    assert index.search(q, 1)[0][1].source == "c3"  # its own exchange, when not excluded
    found = [i for _, i in index.search(q, len(index), min_score=-10.0, exclude_source="c3")]
    assert not [i for i in found if i.kind == "exchange" and i.source == "c3"]
    hidden = [i for i in ITEMS if i.kind == "exchange" and i.source == "c3"]
    assert len(found) == len(ITEMS) - len(hidden)
    # Facts and notes are never hidden, even a fact read from that very conversation.
    assert {i for i in ITEMS if i.kind != "exchange"} <= set(found)
    assert next(i for i in found if i.kind == "fact" and i.source == "c3")


def test_an_exchange_repeated_in_several_chats_is_found_once(index, embedder):
    # The same reply to the same message in three chats: one item in the prompt, and k still met.
    repeats = [Item("exchange", "talk later", "haha ok", f"r{i}") for i in range(3)]
    both = build([*ITEMS, *repeats], embedder, reuse=index)
    q = vector(embedder, "haha ok")
    found = [i for _, i in both.search(q, 3)]
    assert found[0].text == "talk later" and len(found) == 3
    assert [i.recalled() for i in found].count(found[0].recalled()) == 1
    assert [i.text for _, i in both.search(q, 3, exclude_source="r0")] == [i.text for i in found]


# -- files ----------------------------------------------------------------------------------------

@pytest.fixture
def saved(index, tmp_path) -> Path:
    folder = tmp_path / "index"
    index.save(folder)
    return folder


def test_save_then_load_gives_the_same_index(index, saved, embedder):
    loaded = PersonaIndex.load(saved, index.model)
    assert loaded.items == index.items
    assert loaded.model == index.model
    assert loaded.fingerprint == index.fingerprint
    assert loaded.vectors.dtype == np.float32 and loaded.vectors.shape == index.vectors.shape
    np.testing.assert_allclose(loaded.vectors, index.vectors, atol=1e-3)  # stored as float16
    np.testing.assert_allclose(loaded.answers, index.answers, atol=1e-3)
    meta = json.loads((saved / "index.json").read_text())
    assert meta["items"] == len(ITEMS) and meta["fingerprint"] == index.fingerprint
    assert meta["kinds"] == {"fact": len(FACTS), "exchange": len(EXCHANGES), "note": len(NOTES)}
    q = vector(embedder, "what's your major?")
    assert [i for _, i in loaded.search(q, 5)] == [i for _, i in index.search(q, 5)]
    assert PersonaIndex.load(saved).fingerprint == index.fingerprint  # any model


def as_format_1(folder: Path) -> None:
    """Make a saved index what an index built before answers.npy looks like."""
    (folder / "answers.npy").unlink()
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**meta, "format": 1}))


def test_an_index_of_format_1_searches_facts_by_their_question_alone(index, saved, embedder):
    """Indexes built before answers.npy still serve (a knowledge edit or retrain rebuilds them)."""
    as_format_1(saved)
    old = PersonaIndex.load(saved)
    assert old.answers is None
    q = vector(embedder, "what's your major?")
    asked_only = old.vectors @ q
    np.testing.assert_allclose(old.similarities(q), asked_only, atol=1e-6)
    assert (index.similarities(q) >= asked_only - 1e-3).all()


def test_a_format_2_index_without_its_answer_vectors_is_refused(saved):
    (saved / "answers.npy").unlink()
    with pytest.raises(IndexProblem, match="cannot be read"):
        PersonaIndex.load(saved)


def test_an_index_of_another_model_is_refused(saved):
    with pytest.raises(IndexProblem, match="built by"):
        PersonaIndex.load(saved, "some-other-model==1.0")


def test_a_missing_index_is_refused(saved, tmp_path):
    (saved / "index.json").unlink()
    with pytest.raises(IndexProblem):
        PersonaIndex.load(saved)
    with pytest.raises(IndexProblem):
        PersonaIndex.load(tmp_path / "nowhere")


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_vectors_are_refused(saved, keep):
    path = saved / "vectors.npy"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(IndexProblem):
        PersonaIndex.load(saved)


def test_an_empty_vectors_file_is_refused(saved):
    """A zero-byte vectors.npy (a full disk, a copy cut short) is a damaged index like any other:
    bot.recall.IndexFollower catches IndexProblem only."""
    (saved / "vectors.npy").write_bytes(b"")
    with pytest.raises(IndexProblem):
        PersonaIndex.load(saved)


def test_a_damaged_items_file_is_refused(saved):
    path = saved / "items.jsonl"
    path.write_text(path.read_text(encoding="utf-8")[:-20], encoding="utf-8")  # last line cut
    with pytest.raises(IndexProblem):
        PersonaIndex.load(saved)


def test_items_and_vectors_that_do_not_match_are_refused(saved, index):
    lines = (saved / "items.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (saved / "items.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(IndexProblem, match="do not match"):
        PersonaIndex.load(saved)
    (saved / "items.jsonl").write_text("".join(lines), encoding="utf-8")
    np.save(saved / "vectors.npy", index.vectors[:-1].astype(np.float16))
    with pytest.raises(IndexProblem, match="do not match"):
        PersonaIndex.load(saved)
    with pytest.raises(IndexProblem):
        PersonaIndex(index.items, index.vectors[:-1], index.model)


# -- build ----------------------------------------------------------------------------------------

def test_build_reuses_the_vectors_it_has(index, embedder):
    new = [Item("fact", "Spanish and English", "What languages do you speak?", "faq.csv"),
           Item("note", "I draw charcoal portraits.", source="art.md"),
           Item("exchange", "sure", "What languages do you speak?", "c9")]  # same text as the fact
    counting = Counting(embedder)
    grown = build([*ITEMS, *new], counting, reuse=index)
    assert counting.texts == ["What languages do you speak?", "I draw charcoal portraits.",
                              "What languages do you speak? Spanish and English"]
    assert grown.items == [*ITEMS, *new]
    np.testing.assert_array_equal(grown.vectors[: len(ITEMS)], index.vectors)
    np.testing.assert_array_equal(grown.vectors[len(ITEMS)], grown.vectors[len(ITEMS) + 2])
    # Removing items embeds nothing; an index of another model is not reused.
    counting.texts.clear()
    shrunk = build(ITEMS[:5], counting, reuse=grown)
    assert counting.texts == [] and shrunk.items == ITEMS[:5]
    other = Counting(embedder, name="another-model")
    rebuilt = build(ITEMS[:3], other, reuse=index)
    assert sorted(other.texts) == sorted([*(i.embedded_text() for i in ITEMS[:3]), *answer_views(ITEMS[:3])])
    assert rebuilt.model == "another-model"


# -- what a training sample is shown ----------------------------------------------------------------

def test_query_of_is_the_last_user_turn_before_the_final_reply():
    sys = {"role": "system", "content": "You are Sam."}
    assert query_of([sys, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c\nd"}, {"role": "assistant", "content": "e"}]) == "c\nd"
    assert query_of([sys, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a"
    assert query_of([sys, {"role": "assistant", "content": "hi"}]) == ""
    assert query_of([sys]) == ""


def sample(conversation: str, *utts: Utterance) -> dict:
    return {"messages": to_chat_messages(SAM, utts), "conversation": conversation}


def recalled_lines(content: str) -> list[str]:
    base = system_prompt(SAM)
    assert content.startswith(base)
    block = content[len(base):]
    return block.split(RECALL_HEADER + "\n", 1)[1].splitlines() if block else []


def them(text: str) -> Utterance:
    return Utterance("Jordan", text, False)


def sam(text: str) -> Utterance:
    return Utterance("Sam", text, True)


def test_attach_recalled_shows_the_fact_never_the_samples_own_exchange(index, embedder):
    own = sample("c3", them("hey"), sam("hi!"), them("any animals at home?"), sam("yes a dog"))
    other = sample("c9", them("any animals at home?"), sam("yes a dog"))
    silent = sample("c3", sam("anyone up?"))
    turns = [[m.copy() for m in s["messages"]] for s in (own, other, silent)]
    budget = 50  # the header and two or three items
    attach_recalled([own, other, silent], index, embedder, SAM, words, budget)

    pet = "- Q: Do you have a pet? A: Our golden retriever Copper, he lives with my parents"
    dog = "- Q: do you have a dog at home? A: yes copper, best dog ever"
    own_lines = recalled_lines(own["messages"][0]["content"])
    assert own_lines[-1] == pet  # the best match last, nearest the conversation
    assert dog not in own_lines  # its own conversation's exchange, the closest match of all
    c3_replies = [reply for i, (_, reply) in enumerate(EXCHANGES) if i % 5 == 3]
    assert not [ln for ln in own_lines if any(ln.endswith(f"A: {r}") for r in c3_replies)]
    # Another conversation is shown that exchange: it was hidden only from its own.
    other_lines = recalled_lines(other["messages"][0]["content"])
    assert other_lines[-1] == pet and dog in other_lines
    for s, before in zip((own, other), turns[:2], strict=True):
        block = s["messages"][0]["content"][len(system_prompt(SAM)):]
        assert 0 < words(block) <= budget
        assert s["messages"][1:] == before[1:]  # only the system prompt changes
    assert silent["messages"] == turns[2]  # nothing asked, nothing recalled


def test_reply_prefixes_give_each_reply_the_items_recalled_for_its_own_message(index, embedder):
    whole = sample("c3", sam("morning"), them("where are you from?"), sam("the south"),
                   them("lol"), them("any animals at home?"), sam("yes a dog\nhe is old"))
    before = [m.copy() for m in whole["messages"]]
    prefixes = reply_prefixes([whole])
    # A reply counts when it answers the other side: the opening "morning" does not.
    assert [p["messages"][-1]["content"] for p in prefixes] == ["the south", "yes a dog\nhe is old"]
    assert [len(p["messages"]) for p in prefixes] == [4, 6]  # "lol" and the question: one turn
    assert all(p["conversation"] == "c3" for p in prefixes)
    attach_recalled(prefixes, index, embedder, SAM, words, 60)

    home = "- Q: Where are you from? A: South Carolina. I grew up in the country"
    pet = "- Q: Do you have a pet? A: Our golden retriever Copper, he lives with my parents"
    assert recalled_lines(prefixes[0]["messages"][0]["content"])[-1] == home
    assert recalled_lines(prefixes[1]["messages"][0]["content"])[-1] == pet
    for p in prefixes:  # the conversation itself as it was, and the sample untouched
        assert p["messages"][1:] == before[1 : len(p["messages"])]
    assert whole["messages"] == before


def test_attach_recalled_respects_the_token_budget(index, embedder):
    for budget in (0, 10, 25, 60, 200):
        s = sample("c9", them("any animals at home?"), sam("yes a dog"))
        attach_recalled([s], index, embedder, SAM, words, budget)
        block = s["messages"][0]["content"][len(system_prompt(SAM)):]
        assert words(block) <= budget
        found = recall(index, vector(embedder, "any animals at home?"), "c9")
        assert [r.line() for r in fit_recalled(found, words, budget)] == recalled_lines(
            s["messages"][0]["content"])
    assert s["messages"][0]["content"] != system_prompt(SAM)  # 200 tokens hold something


def test_paraphrase_samples_answer_the_chats_questions_near_a_fact_with_it(index, embedder):
    """A question the other side really asked, near one fact's question, becomes a knowledge
    sample answered with that fact after what serving would recall; statements, unrelated
    questions and the knowledge base's own rows do not."""
    chat = sample("c7", them("hey"), sam("hi!"),
                  them("got any brothers or sisters?\nI love my sister"), sam("haha yes"),
                  them("did you watch the game last night?"), sam("nope"))
    row = {**sample("faq", them("What is your favorite food?"), sam("Banana bread, no contest")),
           "knowledge": True}
    made = paraphrase_samples([chat, row], index, embedder, SAM, words, 200)
    assert [m["messages"][1:] for m in made] == [[
        {"role": "user", "content": "got any brothers or sisters?"},
        {"role": "assistant", "content": "Just my older sister Maria"}]]
    [one] = made
    assert one["knowledge"] is True and one["conversation"].startswith("c7:")
    lines = recalled_lines(one["messages"][0]["content"])
    assert lines[-1] == "- Q: Do you have any siblings? A: Just my older sister Maria"  # best last
    found = recall(index, vector(embedder, "got any brothers or sisters?"), "c7")
    assert lines == [r.line() for r in fit_recalled(found, words, 200)]  # what serving shows


def test_paraphrase_samples_need_a_near_fact_clearly_first(index, embedder):
    """A question no fact is near enough to (or two facts nearly tie) teaches nothing."""
    far = sample("c8", them("what do you think about the weather lately?"), sam("cold"))
    assert paraphrase_samples([far], index, embedder, SAM, words, 200) == []
    assert paraphrase_samples([], index, embedder, SAM, words, 200) == []


# -- fit_recalled -----------------------------------------------------------------------------------

def test_fit_recalled_puts_the_best_item_last():
    best_first = [Recalled("one"), Recalled("two"), Recalled("three")]
    assert fit_recalled(best_first, words, budget=1000) == best_first[::-1]


def test_fit_recalled_skips_what_does_not_fit_and_keeps_what_does():
    header = words(recall_block([Recalled("x")])) - 2  # the header's words, without "- x"
    big = Recalled(" ".join(["long"] * 50))
    best_first = [Recalled("best item"), big, Recalled("third"), Recalled("fourth")]
    chosen = fit_recalled(best_first, words, budget=header + 3 + 2 + 2)
    assert chosen == [Recalled("fourth"), Recalled("third"), Recalled("best item")]
    assert fit_recalled(best_first, words, budget=header + 3 + 2 + 2, most=2) == [Recalled("best item")]
    assert fit_recalled(best_first, words, budget=header) == []
    assert fit_recalled([], words) == []


def test_a_knowledge_edit_gives_a_format_1_index_its_answer_vectors(index, saved, embedder):
    """`clone knowledge reindex` is how an index made before answers.npy gets it; only the new
    texts (the facts' answer views, the new note) are embedded, the rest keep their vectors."""
    as_format_1(saved)
    counting = Counting(embedder)
    note = Item("note", "I draw charcoal portraits.", source="art.md")
    reindex(saved, [note], counting)
    assert sorted(counting.texts) == sorted([note.text, *answer_views(ITEMS)])
    upgraded = PersonaIndex.load(saved)
    assert upgraded.answers is not None and len(upgraded.answers) == len(FACTS)
    assert json.loads((saved / "index.json").read_text())["format"] == 2
    np.testing.assert_allclose(upgraded.answers, index.answers, atol=1e-3)
