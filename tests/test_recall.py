"""The clone recalls: the persona index built by prepare, facts and notes in the served prompt,
long-term memory of each user across /reset (Redis and the embedded store), /forget, outages,
knowledge edits without retraining, and the adapter carrying its index. Real parts throughout:
the packaged embedding model, a tiny real llama, a real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from bot.engine import BUSY_REPLY, Busy, Engine, Generated, Incoming
from bot.longterm import EmbeddedLongTerm, RedisLongTerm
from bot.quiz import Question, knowledge_quiz, quiz_engine
from training.config import PrepareConfig
from training.persona import Persona
from training.prepare import prepare
from training.prompt import RECALL_HEADER, system_prompt

REPO = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"
FAQ = ("question,answer\nWhat's your dog's name?,Biscuit. He's a corgi\n"
       "Where did you grow up?,Tucson Arizona\n")
NOTE = "# Me\n\nI work night shifts as a nurse at St. Mary's hospital. Write to me at sam.r@example.com\n"


def chat_csv(rows: int = 24) -> str:
    topics = ["pizza", "the beach", "homework", "football", "music", "coffee"]
    lines = ["author,text,timestamp"]
    for i in range(rows):
        t = 1_700_000_000 + i * 60 + (i // 4) * 86_400  # a new conversation every 4 exchanges
        topic = topics[i % len(topics)]
        lines += [f"Kim,what do you think about {topic} {i}?,{t}", f"Sam,haha {topic} {i} is great,{t + 30}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def embedder():
    from training.embed import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def known(tmp_path_factory, count_tokens, embedder) -> Persona:
    """A prepared persona with a chat, a question/answer table and a note."""
    root = tmp_path_factory.mktemp("known") / "sam"
    (root / "exports").mkdir(parents=True)
    (root / "knowledge").mkdir()
    (root / "persona.toml").write_text('name = "Sam"\nme = ["Sam"]\n')
    (root / "exports" / "chat.csv").write_text(chat_csv())
    (root / "exports" / "faq.csv").write_text(FAQ)
    (root / "knowledge" / "bio.md").write_text(NOTE)
    persona = Persona.load(root)
    prepare([root / "exports"], persona, PrepareConfig(me=["Sam"], val_fraction=0.2), count_tokens,
            embedder=embedder)
    return persona


class Recording:
    """The real backend, with every prompt it was given kept for the test to read."""

    def __init__(self, inner) -> None:
        self.inner, self.prompts = inner, []

    async def generate(self, messages):
        self.prompts.append(messages)
        return await self.inner.generate(messages)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def model(tiny_base):
    from training.base_model import load_model, load_tokenizer, resolve_base

    base = resolve_base(str(tiny_base))
    return load_model(base), load_tokenizer(base)


def engine_for(persona: Persona, model, embedder, longterm=None) -> tuple[Engine, Recording]:
    engine = quiz_engine(persona, *model, persona.dataset / "index", embedder, longterm)
    engine.backend = recording = Recording(engine.backend)
    return engine, recording


def said(text: str, channel: str = "c1", user: str = "u1") -> Incoming:
    return Incoming("test", channel, user, "Alex", text)


def system_of(recording: Recording) -> str:
    return recording.prompts[-1][0]["content"]


def test_prepare_indexes_facts_notes_and_exchanges_redacted(known):
    card = json.loads((known.dataset / "card.json").read_text())
    kinds = card["index"]["kinds"]
    assert kinds["fact"] == 2 and kinds["note"] == 1 and kinds["exchange"] >= 4
    items = (known.dataset / "index" / "items.jsonl").read_text()
    assert "St. Mary" in items
    for path in known.dataset.rglob("*"):  # the note's email was scrubbed before anything kept it
        if path.is_file():
            assert b"sam.r@example.com" not in path.read_bytes(), path
    dog = [json.loads(line) for line in (known.dataset / "train.jsonl").open()
           if "What's your dog's name?" in line and '"knowledge": true' in line]
    assert dog and "Biscuit" in dog[0]["messages"][0]["content"]  # the fact is recalled for itself


def test_no_training_sample_recalls_its_own_conversation(known):
    for line in (known.dataset / "train.jsonl").open():
        sample = json.loads(line)
        if sample.get("knowledge"):
            continue
        system, *turns = sample["messages"]
        recalled = system["content"].split("use it when it answers the message):")[-1]
        for turn in turns:
            for text in turn["content"].split("\n"):
                assert f"A: {text}" not in recalled and f"Q: {text} " not in recalled


def test_the_served_prompt_carries_the_recalled_fact(known, model, embedder):
    engine, recording = engine_for(known, model, embedder)
    replies = asyncio.run(engine.handle(said("how is your dog called?")))
    assert isinstance(replies, list)
    assert "Biscuit" in system_of(recording)


@pytest.mark.parametrize("store", ["redis", "embedded"])
def test_a_user_is_remembered_after_reset_and_forgotten_on_forget(known, model, embedder, store, tmp_path):
    persona_id = f"t{uuid.uuid4().hex[:8]}"
    longterm = RedisLongTerm(REDIS) if store == "redis" else EmbeddedLongTerm(tmp_path / "lt.json")
    engine, recording = engine_for(known, model, embedder, longterm)
    engine.persona = Persona(name="Sam", id=persona_id)  # keys of this test's own

    async def go() -> None:
        await engine.handle(said("my cat is named Pickles"))
        await engine.handle(said("what's my cat called?"))
        assert "Pickles" not in system_of(recording)  # still in the window: not recalled twice
        await engine.reset("test", "c1")
        await engine.handle(said("what's my cat called?"))
        assert "Alex told you: my cat is named Pickles" in system_of(recording)
        await engine.handle(said("what's my cat called?", user="someone-else", channel="c2"))
        assert "Pickles" not in system_of(recording)  # another user's memory is not theirs
        assert await engine.forget("u1") >= 2
        await engine.reset("test", "c1")
        await engine.handle(said("what's my cat called?"))
        assert "Pickles" not in system_of(recording)
        await engine.forget("u1")
        await engine.forget("someone-else")
        await longterm.close()

    asyncio.run(go())


def test_long_term_memory_keeps_only_redacted_text(known, model, embedder, tmp_path):
    path = tmp_path / "lt.json"
    engine, _ = engine_for(known, model, embedder, EmbeddedLongTerm(path))
    asyncio.run(engine.handle(said("my email is alex.q@example.org, write me")))
    stored = path.read_text()
    assert "write me" in stored and "alex.q@example.org" not in stored


def test_with_redis_down_the_clone_still_answers_from_its_index(known, model, embedder):
    engine, recording = engine_for(known, model, embedder, RedisLongTerm("redis://127.0.0.1:1/0"))
    replies = asyncio.run(engine.handle(said("where did you grow up?")))
    assert isinstance(replies, list) and "Tucson" in system_of(recording)


def test_a_knowledge_edit_reaches_a_running_engine_without_retraining(
    known, model, embedder, monkeypatch, tmp_path,
):
    import shutil

    import bot.recall
    from training import index, knowledge
    from training.privacy import Redactor

    copy = Persona.load(shutil.copytree(known.root, tmp_path / "sam"))
    monkeypatch.setattr(bot.recall, "INDEX_CHECK_S", 0.0)
    engine, recording = engine_for(copy, model, embedder)
    (copy.knowledge / "hobby.md").write_text("My favourite board game is Carcassonne, I play it weekly.\n")
    notes = knowledge.notes(copy.knowledge, Redactor())
    index.reindex(copy.dataset / "index", notes, embedder)
    asyncio.run(engine.handle(said("which board game do you like?")))
    assert "Carcassonne" in system_of(recording)


def test_the_knowledge_quiz_asks_through_the_engine(known, model, embedder):
    engine, recording = engine_for(known, model, embedder)
    questions = [Question("how is your dog called?", ("biscuit",)),
                 Question("where are you from?", ("tucson",))]
    result = asyncio.run(knowledge_quiz(engine, questions))
    assert result["asked"] == 2 and len(recording.prompts) == 2
    for answer, question in zip(result["answers"], questions, strict=True):
        assert answer["right"] == question.answered_by(answer["reply"])
    assert result["right"] == sum(a["right"] for a in result["answers"])


def test_an_adapter_carries_its_index_and_eval_reports_recall(known, tiny_base, tmp_path):
    import shutil

    from training.config import TrainConfig
    from training.evaluate import evaluate
    from training.train import train

    persona = Persona.load(shutil.copytree(known.root, tmp_path / "sam"))
    result = train(TrainConfig(data=persona.dataset, out=persona.adapters, base=str(tiny_base), max_steps=2,
                               batch_size=2, eval_steps=100, save_steps=100))
    card = json.loads((persona.dataset / "card.json").read_text())
    assert result.manifest["index"]["fingerprint"] == card["index"]["fingerprint"]
    assert (result.path / "index" / "index.json").is_file()
    report = evaluate(persona.adapters, persona.dataset, samples=2, max_new_tokens=4, base=str(tiny_base))
    assert {"adapter_no_recall", "base_no_recall"} <= set(report["perplexity"])
    assert set(report["context_gain"]) == {"adapter", "base"}
    assert set(report["retrieval_gain_last_reply"]) == {"adapter", "base"}
    assert report["verdict"].startswith("Your clone")
    text = Path(report["report"]).read_text()
    assert "Retrieval gain, adapter" in text and "Which is the real reply?" in text
    assert "Retrieval gain on the reply the items were recalled for" in text


def test_the_last_reply_retrieval_gain_scores_that_reply_with_and_without_its_items(known, tokenizer):
    from training.encode import IGNORE, load_jsonl
    from training.evaluate import last_reply_rows

    val = load_jsonl(known.dataset / "val.jsonl") + load_jsonl(known.dataset / "train.jsonl")
    told = last_reply_rows(val, tokenizer, wrong=False, recall=True)
    untold = last_reply_rows(val, tokenizer, wrong=False)
    assert len(told) == len(untold) > 0

    def scored(row: dict) -> list[int]:
        return [t for t in row["labels"] if t != IGNORE]

    assert all(scored(a) == scored(b) and scored(a) for a, b in zip(told, untold, strict=True))  # that reply
    longer = [len(a["input_ids"]) - len(b["input_ids"]) for a, b in zip(told, untold, strict=True)]
    assert min(longer) >= 0 and max(longer) > 0  # after its recalled items, where it has some


def test_one_pass_scores_every_reply_and_the_last_as_scoring_them_apart(known, tokenizer, tiny_base):
    from training.base_model import load_model, resolve_base
    from training.encode import encode, load_jsonl
    from training.evaluate import last_reply_rows, last_reply_start
    from training.train import mean_nll, nll_sums

    model = load_model(resolve_base(str(tiny_base))).eval()
    val = load_jsonl(known.dataset / "val.jsonl") + load_jsonl(known.dataset / "train.jsonl")
    pad = tokenizer.pad_token_id
    whole = [{"input_ids": e.input_ids, "labels": e.labels}
             for e in (encode(s["messages"], tokenizer) for s in val)]
    marked = [{**row, "last": start} if (start := last_reply_start(s["messages"], tokenizer)) else row
              for row, s in zip(whole, val, strict=True)]
    total, count, last_total, last_count = nll_sums(model, marked, pad)
    every, every_count = mean_nll(model, whole, pad)
    last, last_n = mean_nll(model, last_reply_rows(val, tokenizer, wrong=False, recall=True), pad)
    assert count == every_count and abs(total / count - every) < 1e-4
    assert last_count == last_n > 0 and abs(last_total / last_count - last) < 1e-4
    assert last_count < count  # the last replies alone


def test_clone_knowledge_add_search_and_a_damaged_index(known, tmp_path):
    import shutil

    root = shutil.copytree(known.root, tmp_path / "sam")

    def clone(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", "knowledge", *args, "--persona", str(root)],
                              capture_output=True, text=True, cwd=REPO, timeout=180)

    missing = clone("add", str(tmp_path / "bio.md"))  # a note file that is not there
    assert missing.returncode == 2 and "bio.md: no such file" in missing.stderr
    (tmp_path / "bio.pdf").write_bytes(b"%PDF")
    assert "a knowledge note is a .md or .txt file" in clone("add", str(tmp_path / "bio.pdf")).stderr
    added = clone("add", "--text", "I collect vintage typewriters, seven of them so far.")
    assert added.returncode == 0, added.stderr
    assert "Re-indexed" in added.stdout
    found = clone("search", "do you collect anything?")
    assert found.returncode == 0, found.stderr
    assert "typewriters" in found.stdout.splitlines()[0]
    (root / "dataset" / "index" / "vectors.npy").write_bytes(b"not a numpy file")
    broken = clone("reindex")
    assert broken.returncode == 2
    [line] = broken.stderr.strip().splitlines()
    assert "dataset/index" in line and "clone prepare" in line


def test_clone_knowledge_add_before_prepare_keeps_the_note_for_prepare(tmp_path):
    """A new user adds a note before preparing: it is kept, and said to wait for `clone prepare`
    (not an error: there is no index to update yet)."""
    root = tmp_path / "new"
    run = subprocess.run([sys.executable, "-m", "cli", "init", str(root), "--name", "Sam"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    added = subprocess.run([sys.executable, "-m", "cli", "knowledge", "add", "--persona", str(root),
                            "--text", "I collect vintage typewriters."],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert added.returncode == 0, added.stderr
    assert "No index yet" in added.stdout and "clone prepare" in added.stdout
    [note] = (root / "knowledge").glob("*.md")
    assert "typewriters" in note.read_text(encoding="utf-8")


# -- the person's own answer for a near-certain knowledge-base question; grounded decoding ------


def scored_list(*rows: tuple[str, float, float]):
    from bot.recall import Scored
    from training.prompt import Recalled

    return [Scored(Recalled(f"answer {i}", asked="q"), kind, sim, score)
            for i, (kind, sim, score) in enumerate(rows)]


def test_fact_answer_needs_a_question_a_fact_the_threshold_and_the_margin():
    from bot.recall import FactAnswers, fact_answer

    rule = FactAnswers(min_similarity=0.7, margin=0.05)
    close = scored_list(("fact", 0.8, 0.9), ("exchange", 0.7, 0.7))
    assert fact_answer(close, "what's your dog called?", rule) is close[0]
    assert fact_answer(close, "what genre do you listen to", rule) is close[0]  # a question without "?"
    assert fact_answer(close, "I love my dog", rule) is None  # a statement does not ask for it
    assert fact_answer(close, "what's your dog called?", None) is None  # off
    assert fact_answer(scored_list(("fact", 0.65, 0.75)), "what?", rule) is None  # below the threshold
    assert fact_answer(scored_list(("fact", 0.8, 0.9), ("fact", 0.78, 0.88)), "what?", rule) is None  # a tie
    assert fact_answer(scored_list(("note", 0.9, 1.0)), "what?", rule) is None  # only a fact is an answer
    assert fact_answer([], "what?", rule) is None


def test_a_near_paraphrase_gets_the_persons_own_answer_and_the_console_sees_the_fact(known, model, embedder):
    from bot.recall import FactAnswers

    engine, recording = engine_for(known, model, embedder)
    engine.fact_answers = FactAnswers()
    shown = []
    engine.on_prompt = lambda key, prompt, recalled: shown.append(recalled)
    replies = asyncio.run(engine.handle(said("what's your dog called?")))
    assert replies == ["Biscuit. He's a corgi"]
    assert recording.prompts == []  # nothing was generated
    assert any(r.text == "Biscuit. He's a corgi" for r in shown[0])  # what it drew on: the fact


@pytest.mark.parametrize("rule", ["unrelated", "threshold", "margin", "off"])
def test_no_fact_answer_when_unrelated_below_threshold_or_margin_or_off(known, model, embedder, rule):
    from bot.recall import FactAnswers

    engine, recording = engine_for(known, model, embedder)
    engine.fact_answers = {"unrelated": FactAnswers(), "threshold": FactAnswers(min_similarity=0.99),
                           "margin": FactAnswers(margin=0.9), "off": None}[rule]
    text = "did you watch the game last night?" if rule == "unrelated" else "what's your dog called?"
    asyncio.run(engine.handle(said(text)))
    assert len(recording.prompts) == 1  # generated


class Steered:
    """A backend that says which way it was asked: sampling, or grounded (against the prompt
    without its recalled items, which it keeps)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.grounded: list[tuple[list, list]] = []

    async def generate(self, messages):
        self.calls.append("sampled")
        return "ok"

    async def generate_grounded(self, messages, plain, candidates=1):
        self.calls.append("grounded")
        self.grounded.append((messages, plain))
        return [Generated("ok")] * candidates

    async def close(self) -> None:
        pass


def test_grounded_decoding_when_a_knowledge_item_scores_high(known, model, embedder):
    engine, _ = engine_for(known, model, embedder)
    engine.backend = steered = Steered()
    engine.grounded_min = 0.6

    async def go() -> None:
        await engine.handle(said("what's your dog called?", channel="g1"))
        await engine.handle(said("did you watch the game last night?", channel="g2"))
        await engine.handle(said("my dog is called Rex", channel="g3"))  # not a question
        engine.grounded_min = None  # off
        await engine.handle(said("what's your dog called?", channel="g4"))

    asyncio.run(go())
    assert steered.calls == ["grounded", "sampled", "sampled", "sampled"]
    [(messages, plain)] = steered.grounded
    assert RECALL_HEADER in messages[0]["content"] and RECALL_HEADER not in plain[0]["content"]
    assert plain[0]["content"] == system_prompt(engine.persona)  # the persona's, nothing recalled
    assert plain[1:] == messages[1:]  # the same conversation: only the recalled items differ


class Candidates(Steered):
    """Grounded candidates as given (a reply, or a Generated to say it was cut); or refused."""

    def __init__(self, replies: list) -> None:
        super().__init__()
        self.replies = replies

    async def generate_grounded(self, messages, plain, candidates=1):
        await super().generate_grounded(messages, plain, candidates)
        if self.replies is Busy:
            raise Busy()
        assert candidates == len(self.replies)
        return [r if isinstance(r, Generated) else Generated(r) for r in self.replies]


FACT = "my dog is Biscuit, he's a corgi"
ASIDES = ["I went to the beach yesterday", "haha no idea, ask me later"]


@pytest.mark.parametrize("at", [0, 1, 2])
def test_of_grounded_candidates_the_one_nearest_the_knowledge_is_sent(known, model, embedder, at):
    engine, _ = engine_for(known, model, embedder)
    engine.grounded_min, engine.grounded_candidates = 0.6, 3
    engine.backend = backend = Candidates([*ASIDES[:at], FACT, *ASIDES[at:]])
    sent = asyncio.run(engine.handle(said("what's your dog called?", channel=f"c{at}")))
    assert backend.calls == ["grounded"]  # one request for all three
    assert sent == [FACT]


def test_grounded_candidates_are_judged_by_what_they_would_send(known, model, embedder):
    engine, _ = engine_for(known, model, embedder)
    engine.grounded_min, engine.grounded_candidates = 0.6, 4
    # Cut before its end, the first would send its first line only, not the fact after it.
    cut = Generated(f"{ASIDES[0]}\nBiscuit. He's a corgi", truncated=True)
    engine.backend = Candidates([cut, "", ASIDES[1], "my dog is Biscuit"])
    assert asyncio.run(engine.handle(said("what's your dog called?", channel="f1"))) == ["my dog is Biscuit"]
    engine.backend = Candidates(Busy)  # refused: the usual apology
    assert asyncio.run(engine.handle(said("what's your dog called?", channel="f2"))) == [BUSY_REPLY]


def test_nearest_to_the_knowledge():
    from bot.recall import nearest_to

    replies = np.eye(3, dtype=np.float32)
    assert nearest_to(replies, np.array([[0.1, 0.9, 0.0]], dtype=np.float32)) == 1
    assert nearest_to(replies, np.array([[0.0, 0.2, 0.1], [0.0, 0.0, 0.5]], dtype=np.float32)) == 2


def test_the_fact_answer_setting(monkeypatch):
    from cli.settings import Settings

    monkeypatch.setenv("CLONE_FACT_ANSWER_MIN", "off")
    assert Settings(_env_file=None).clone_fact_answer_min is None
    monkeypatch.setenv("CLONE_FACT_ANSWER_MIN", "0.8")
    assert Settings(_env_file=None).clone_fact_answer_min == 0.8
    monkeypatch.delenv("CLONE_FACT_ANSWER_MIN")
    assert Settings(_env_file=None).clone_fact_answer_min == 0.7


def test_the_grounded_decoding_setting(monkeypatch):
    from bot.recall import GROUNDED_CANDIDATES, GROUNDED_MIN
    from bot.runtime import RecallChoice
    from cli.settings import Settings

    assert Settings(_env_file=None).clone_grounded_min == GROUNDED_MIN == RecallChoice().grounded_min
    monkeypatch.setenv("CLONE_GROUNDED_MIN", "off")
    assert Settings(_env_file=None).clone_grounded_min is None
    monkeypatch.setenv("CLONE_GROUNDED_MIN", "0.65")
    assert Settings(_env_file=None).clone_grounded_min == 0.65
    candidates = Settings(_env_file=None).clone_grounded_candidates
    assert candidates == GROUNDED_CANDIDATES == RecallChoice().grounded_candidates
    monkeypatch.setenv("CLONE_GROUNDED_CANDIDATES", "0")
    with pytest.raises(ValueError, match="clone_grounded_candidates"):
        Settings(_env_file=None)


# -- a user's own earlier words told back when they ask about themselves ------------------------


def test_told_back_turns_the_users_words_to_them():
    from bot.recall import told_back

    assert told_back("my dog's name is Rex") == "your dog's name is Rex"
    assert told_back("I was born in Lisbon, you know") == "You were born in Lisbon, I know"
    assert told_back("I told you my sister lives in Denver!") == "You told me your sister lives in Denver!"
    assert told_back("i\u2019m 34") == "you're 34"


@pytest.mark.parametrize(("text", "asks"), [
    ("what's my dog's name?", True),
    ("do you remember where I live?", True),
    ("ok so what did I tell you my sister does?", True),
    ("whats my cats name", True),  # short and one question: no "?" needed
    ("I am well, how about yourself?", False),  # asks about the clone
    ("did I talk to you about this?", False),  # not a wh-question
    ("what's your dog's name?", False),  # the person's knowledge, not the user's
    ("which i suppose is design in a manner of speaking", False),  # "which" opening a statement
    ("what do you think about the weather lately and my plans for the long weekend?", False),  # long
    ("when I go see it", False),  # a clause
    ("what's up my man", False),  # a greeting
    ("how do I get into the honors program?", False),  # advice, not memory
    ("what should I watch tonight?", False),
    ("what if I never find my keys?", False),
])
def test_which_messages_ask_about_their_writer(text, asks):
    from bot.recall import asks_about_self

    assert (asks_about_self(text) is not None) is asks


def said_list(*rows: tuple[str, float]):
    from bot.recall import Scored
    from training.prompt import Recalled

    return [Scored(Recalled(text, speaker="Alex"), "said", sim, sim) for text, sim in rows]


def test_recall_answer_needs_the_threshold_a_margin_and_a_shared_word():
    from bot.recall import RecallAnswers, recall_answer

    rule = RecallAnswers(min_similarity=0.45, margin=0.05)
    told = said_list(("my cat is named Pickles", 0.7), ("lol ok", 0.3))
    assert recall_answer(told, "what's my cat called?", rule) == "your cat is named Pickles"
    assert recall_answer(told, "what's my cat called?", None) is None  # off
    assert recall_answer(said_list(("my cat is named Pickles", 0.4)), "what's my cat called?", rule) is None
    tie = said_list(("my cat is named Pickles", 0.7), ("my cat hates baths", 0.68))
    assert recall_answer(tie, "what's my cat called?", rule) is None  # two answers near a tie
    again = said_list(("my cat is named Pickles", 0.7), ("My cat is named Pickles", 0.7))
    assert recall_answer(again, "what's my cat called?", rule) == "your cat is named Pickles"  # said twice
    unrelated = said_list(("I love pizza", 0.6))
    assert recall_answer(unrelated, "what's my cat called?", rule) is None  # no word in common
    long = said_list(("haha no way. my cat is named Pickles. anyway gtg", 0.6))
    assert recall_answer(long, "what's my cat called?", rule) == "your cat is named Pickles."  # its sentence
    knowledge = scored_list(("fact", 0.9, 1.0))
    assert recall_answer(knowledge, "what's my cat called?", rule) is None  # only what the user said


@pytest.mark.parametrize("store", ["redis", "embedded"])
def test_a_user_asking_after_reset_gets_their_own_words_back(known, model, embedder, store, tmp_path):
    from bot.recall import RecallAnswers

    longterm = RedisLongTerm(REDIS) if store == "redis" else EmbeddedLongTerm(tmp_path / "lt.json")
    engine, recording = engine_for(known, model, embedder, longterm)
    engine.persona = Persona(name="Sam", id=f"t{uuid.uuid4().hex[:8]}")  # keys of this test's own
    engine.recall_answers = RecallAnswers()

    async def go() -> list[list[str]]:
        try:
            await engine.handle(said("my cat is named Pickles"))
            await engine.reset("test", "c1")
            generated = len(recording.prompts)
            back = await engine.handle(said("what's my cat called?"))
            assert len(recording.prompts) == generated  # told back, nothing generated
            other = await engine.handle(said("what's my cat called?", user="someone-else", channel="c2"))
            await engine.forget("u1")
            await engine.reset("test", "c1")
            forgotten = await engine.handle(said("what's my cat called?"))
            return [back, other, forgotten]
        finally:
            await engine.forget("u1")
            await engine.forget("someone-else")
            await longterm.close()

    back, other, forgotten = asyncio.run(go())
    assert back == ["your cat is named Pickles"]
    assert "Pickles" not in " ".join(other)  # another user's words are not theirs
    assert "Pickles" not in " ".join(forgotten)  # /forget took it away


def test_the_recall_answer_setting(monkeypatch):
    from cli.settings import Settings

    monkeypatch.setenv("CLONE_RECALL_ANSWER_MIN", "off")
    assert Settings(_env_file=None).clone_recall_answer_min is None
    monkeypatch.setenv("CLONE_RECALL_ANSWER_MIN", "0.6")
    assert Settings(_env_file=None).clone_recall_answer_min == 0.6


@pytest.mark.parametrize(("text", "to_clone"), [
    ("what's your cat's name?", True), ("you have a cat?", True), ("how are you?", True),
    ("do you remember my cat?", False), ("did I tell you about my cat?", False),
    ("what's my cat called?", False), ("I love cats", False)])
def test_which_messages_ask_the_clone_about_itself(text, to_clone):
    from bot.recall import asks_about_clone

    assert asks_about_clone(text) is to_clone


def test_a_users_words_are_not_offered_as_the_clones_own(known, model, embedder, tmp_path):
    longterm = EmbeddedLongTerm(tmp_path / "lt.json")
    engine, recording = engine_for(known, model, embedder, longterm)

    async def go() -> list[str]:
        await engine.handle(said("my cat is named Pickles"))
        await engine.handle(said("I grew up in Lisbon"))
        await engine.reset("test", "c1")
        systems = []
        for question in ("what's your cat's name?", "what's my cat called?", "where did you grow up?"):
            await engine.handle(said(question))
            systems.append(system_of(recording))
        await longterm.close()
        return systems

    yours, mine, elsewhere = asyncio.run(go())
    assert "Pickles" not in yours  # the user's cat is not offered as the clone's
    assert "Pickles" in mine  # asked about their own cat, their words are recalled
    assert "Lisbon" not in elsewhere and "Tucson" in elsewhere  # the clone's own fact, not theirs


def test_each_reply_retrieval_gain_scores_every_reply_with_its_own_items(known, tokenizer, tiny_base,
                                                                           embedder, count_tokens):
    import math

    from peft import LoraConfig, get_peft_model

    from training.base_model import load_model, resolve_base
    from training.encode import load_jsonl
    from training.evaluate import last_reply_rows, reply_retrieval_gain
    from training.index import PersonaIndex, attach_recalled, reply_prefixes
    from training.prompt import RECALL_TOKENS
    from training.train import mean_nll

    val = load_jsonl(known.dataset / "val.jsonl") + load_jsonl(known.dataset / "train.jsonl")
    prefixes = reply_prefixes(val)
    assert len(prefixes) > len(val)  # samples of several replies give one prefix each
    stale = [p["messages"][0]["content"] for p in prefixes]
    attach_recalled(prefixes, PersonaIndex.load(known.dataset / "index"), embedder, known, count_tokens,
                    RECALL_TOKENS)
    assert sum(p["messages"][0]["content"] != s for p, s in zip(prefixes, stale, strict=True)) > 0

    base = load_model(resolve_base(str(tiny_base))).eval()
    pad = tokenizer.pad_token_id
    told, untold = (mean_nll(base, last_reply_rows(prefixes, tokenizer, wrong=False, recall=r), pad)[0]
                    for r in (True, False))
    expected = round(math.exp(untold - told), 3)
    # A new LoRA adapter starts as the identity, so it must score exactly as the base model does.
    fresh = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).eval()
    assert reply_retrieval_gain(fresh, tokenizer, prefixes) == {"adapter": expected, "base": expected}
    assert reply_retrieval_gain(fresh, tokenizer, []) is None
