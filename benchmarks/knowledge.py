"""Does the clone know its person, use what it recalls, follow the conversation, and remember
its users? Issue 12's measures, in one run, with their baselines beside them.

    python benchmarks/knowledge.py                  # a copy of the sample, clone start's 4 minutes
    python benchmarks/knowledge.py --minutes 8
    python benchmarks/knowledge.py --persona DIR    # an existing prepared persona with an adapter
    python benchmarks/knowledge.py --persona DIR --skip perplexity,longterm --variants alone,answers

Issue 12's levers, each beside the model alone: `grounded` (a question with a knowledge item at
least --grounded-min similar among those recalled is decoded against the prompt without them,
weight --contrast: training.generate.RecallContrast; --candidates such replies are sampled and
the one nearest in meaning to that knowledge is sent), `answers` (the person's own answer
when the message asks a knowledge-base question at --fact-answer-min or more), `both`. The
fact-answer threshold is calibrated on ordinary messages, never on the evaluation questions:
`calibration` counts how often each threshold fires on the incoming messages of the persona's
own training and validation conversations (each searched without its own conversation's items).

1. prepare a copy of the sample persona (index build time and size), train for `--minutes`
   (the budget `clone start` uses), unless --persona names one already trained;
2. retrieval: is the right item recalled first for each question of the persona's
   retrieval_dev.csv (where retrieval is tuned) and eval_questions.csv, facts searched by their
   question or their question with its answer (serving), and by their question alone;
   knowledge accuracy: the persona's eval_questions.csv (paraphrases kept out of its knowledge
   base), asked through the engine: adapter with recall, adapter without, base model with;
   cost: seconds per grounded reply, one candidate against --candidates;
3. retrieval gain (held-out perplexity without recalled items / with) and context gain
   (wrong conversation / true), adapter and base model; the retrieval gain three ways: every
   reply of a held-out sample with the items recalled for its last message (as the dataset
   holds them), that last reply alone, and each reply alone with the items recalled for the
   message it answers (`retrieval_gain_each_reply`: what serving does at every turn);
4. long-term recall: 30 users each tell the clone a fact, the window is cleared (/reset, or 100
   unrelated messages), they ask for it back: answered right, and recalled into the prompt at
   all; with Redis (when one answers on 127.0.0.1:6379) and with the embedded store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.engine import Incoming  # noqa: E402
from bot.generation import GenerationSettings  # noqa: E402
from bot.longterm import EmbeddedLongTerm, RedisLongTerm  # noqa: E402
from bot.quiz import Fact, knowledge_quiz, quiz_engine, read_questions, recall_quiz  # noqa: E402
from bot.recall import (  # noqa: E402
    GROUNDED_CANDIDATES,
    GROUNDED_MIN,
    FactAnswers,
    RecallAnswers,
    Scored,
    about_self,
    asks_about_self,
    fact_answer,
    grounding,
    grounds,
    is_question,
    recall_answer,
    scored,
)
from training.persona import SAMPLE, Persona  # noqa: E402

FACTS = [Fact(tell, ask, tuple(expect.split("|"))) for tell, ask, expect in (
    ("my dog's name is Rex", "what's my dog's name?", "rex"),
    ("I work as a plumber", "what do I do for work?", "plumber"),
    ("my sister lives in Denver", "where does my sister live?", "denver"),
    ("my favorite color is teal", "what's my favorite color?", "teal"),
    ("I drive a red Subaru", "what car do I drive?", "subaru"),
    ("my birthday is on July 9", "when is my birthday?", "july"),
    ("I'm allergic to peanuts", "what am I allergic to?", "peanut"),
    ("my cat is called Mochi", "what's my cat called?", "mochi"),
    ("I play the cello", "which instrument do I play?", "cello"),
    ("my girlfriend's name is Priya", "what's my girlfriend's name?", "priya"),
    ("I grew up in Lisbon", "where did I grow up?", "lisbon"),
    ("my favorite band is Radiohead", "what's my favorite band?", "radiohead"),
    ("I'm studying chemistry", "what am I studying?", "chemistry"),
    ("my son is named Theo", "what's my son's name?", "theo"),
    ("I support Arsenal", "which team do I support?", "arsenal"),
    ("my favorite food is ramen", "what's my favorite food?", "ramen"),
    ("I have a turtle named Shelly", "what's my turtle's name?", "shelly"),
    ("I'm training for the Boston marathon", "which marathon am I training for?", "boston"),
    ("my mom is a dentist", "what does my mom do?", "dentist"),
    ("I speak Portuguese", "which language do I speak?", "portuguese"),
    ("my best friend is called Marco", "who is my best friend?", "marco"),
    ("I live in Seattle", "where do I live?", "seattle"),
    ("my favorite movie is Inception", "what's my favorite movie?", "inception"),
    ("I'm 34 years old", "how old am I?", "34"),
    ("my favorite drink is matcha", "what's my favorite drink?", "matcha"),
    ("my brother is a pilot", "what does my brother do?", "pilot"),
    ("I collect vinyl records", "what do I collect?", "vinyl"),
    ("my wife's name is Elena", "what's my wife's name?", "elena"),
    ("I'm going to Iceland in May", "where am I going in May?", "iceland"),
    ("my favorite sport is badminton", "what's my favorite sport?", "badminton"),
)]


def clone(*args: str) -> None:
    import subprocess

    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=REPO)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def trained_copy(minutes: float, work: Path) -> tuple[Persona, dict]:
    derived = shutil.ignore_patterns("dataset", "adapters", "memory.json*", "longterm.json*")
    root = shutil.copytree(SAMPLE, work / "sample", ignore=derived)
    started = time.monotonic()
    clone("prepare", "--persona", str(root))
    prepared = time.monotonic() - started
    clone("train", "--persona", str(root), "--max-minutes", str(minutes))
    return Persona.load(root), {"prepare_s": round(prepared, 1),
                                "index_mb": round(folder_mb(root / "dataset" / "index"), 2)}


def redis_answers() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Seeing:
    """The real backend; counts the prompts whose recalled items hold the expected words."""

    def __init__(self, inner) -> None:
        self.inner, self.prompts = inner, []

    async def generate(self, messages):
        self.prompts.append(messages[0]["content"])
        return await self.inner.generate(messages)

    async def close(self) -> None:
        await self.inner.close()


# name: (adapter, recall, grounded decoding's candidates (0: off, None: --candidates), fact answers)
VARIANTS = {
    "alone": ("adapter, recall", True, True, 0, False),
    "grounded": ("adapter, recall, grounded decoding", True, True, None, False),
    "answers": ("adapter, recall, fact answers", True, True, 0, True),
    "both-one": ("adapter, recall, fact answers + grounded decoding, one candidate", True, True, 1, True),
    "both": ("adapter, recall, fact answers + grounded decoding", True, True, None, True),
    "no-recall": ("adapter, no recall", True, False, 0, False),
    "base": ("base model, recall", False, True, 0, False),
    "base-both": ("base model, recall, fact answers + grounded decoding", False, True, None, True),
}


def variant_engine(persona: Persona, model, tokenizer, index: Path, embedder, args, grounded: int | None,
                   answers: bool):
    engine = quiz_engine(persona, model, tokenizer, index, embedder,
                         settings=GenerationSettings(temperature=args.temperature, contrast=args.contrast,
                                                     enough_candidates=args.enough))
    engine.grounded_min = args.grounded_min if grounded != 0 else None
    engine.grounded_candidates = grounded or args.candidates
    engine.fact_answers = FactAnswers(args.fact_answer_min, args.fact_answer_margin) if answers else None
    return engine


def knowledge(persona: Persona, model, tokenizer, index: Path, embedder, args) -> dict:
    """The knowledge quiz of each variant asked for (serving's sampling, seeds 0 to --seeds - 1:
    `right` is their mean, `wrong` counts how many seeds missed each question)."""
    import contextlib

    import torch

    questions = read_questions(persona.root / args.questions)
    out = {}
    for key in args.variants.split(","):
        name, adapter, recall, grounded, answers = VARIANTS[key]
        results = []
        for seed in range(args.seeds):  # an engine per event loop: its backend's queue belongs to one
            with contextlib.nullcontext() if adapter else model.disable_adapter():
                engine = variant_engine(persona, model, tokenizer, index, embedder if recall else None, args,
                                        grounded, answers)
                torch.manual_seed(seed)
                results.append(asyncio.run(knowledge_quiz(engine, questions)))
        right = sum(r["right"] for r in results) / len(results)
        out[name] = {"asked": len(questions), "right": right, "accuracy": round(right / len(questions), 3),
                     "by_seed": [r["right"] for r in results],
                     "wrong": dict(Counter(a["question"] for r in results for a in r["answers"]
                                           if not a["right"]))}
        print(json.dumps({name: out[name]}), flush=True)
    return out


RETRIEVAL_SETS = ("retrieval_dev.csv", "eval_questions.csv")  # the first tunes retrieval; the quiz never does


def retrieval(persona: Persona, index_folder: Path, embedder) -> dict:
    """Is the right item recalled for each paraphrased question of the persona's question sets?
    `first`: the best item holds an expected word, `knowledge_first`: the best fact or note does,
    `shown`: one of the items a prompt shows does. Facts searched by their question or their
    question with its answer (serving), and by their question alone, on the same index."""
    from training.index import MIN_SCORE, RECALL_ITEMS, PersonaIndex

    index = PersonaIndex.load(index_folder, embedder.name)
    arms = {"question_or_answer": index,
            "question_alone": PersonaIndex(index.items, index.vectors, index.model)}
    out = {}
    for name in RETRIEVAL_SETS:
        if not (persona.root / name).is_file():
            continue
        questions = read_questions(persona.root / name)
        vectors = embedder.embed([q.text for q in questions])
        for arm, searched in arms.items():
            counts = Counter()
            for q, v in zip(questions, vectors, strict=True):
                found = [item for _, item in searched.search(v, len(searched), MIN_SCORE)]
                right = [q.answered_by(f"{i.asked or ''} {i.text}") for i in found]
                knowledge = [r for r, i in zip(right, found, strict=True) if i.kind != "exchange"]
                counts["first"] += bool(right[:1] and right[0])
                counts["knowledge_first"] += bool(knowledge[:1] and knowledge[0])
                counts["shown"] += any(right[:RECALL_ITEMS])
            out.setdefault(name, {"asked": len(questions)})[arm] = dict(counts)
    return out


def grounded_cost(persona: Persona, model, tokenizer, index: Path, embedder, args) -> dict:
    """Seconds per grounded reply, one question at a time (the quiz questions that ground and get
    no fact answer): one candidate against --candidates, alternating round by round."""
    import statistics

    from training.index import MIN_SCORE, RECALL_ITEMS, PersonaIndex

    found = PersonaIndex.load(index, embedder.name)
    answers = FactAnswers(args.fact_answer_min, args.fact_answer_margin)
    texts = [q.text for q in read_questions(persona.root / "eval_questions.csv")]
    hits = [scored(found.search(v, RECALL_ITEMS, MIN_SCORE)) for v in embedder.embed(texts)]
    asked = [t for t, f in zip(texts, hits, strict=True)
             if grounds(f, t, args.grounded_min) and fact_answer(f, t, answers) is None]
    times: dict[int, list[float]] = {1: [], args.candidates: []}

    async def one_by_one(engine) -> list[float]:
        took = []
        for i, text in enumerate(asked):
            started = time.perf_counter()
            await engine.handle(Incoming("quiz", f"cost{i}", "cost-user", "Alex", text))
            took.append(time.perf_counter() - started)
        await engine.backend.close()
        return took

    for _ in range(args.cost_rounds):
        for n in times:
            engine = variant_engine(persona, model, tokenizer, index, embedder, args, n, True)
            times[n] += asyncio.run(one_by_one(engine))
    p50 = {n: statistics.median(t) for n, t in times.items()}
    return {"questions": len(asked), "rounds": args.cost_rounds,
            "p50_s": {str(n): round(s, 2) for n, s in p50.items()},
            "ratio": round(p50[args.candidates] / p50[1], 2)}


def incoming_messages(persona: Persona) -> dict[str, str | None]:
    """Each line other people sent in the persona's chats (training and validation, knowledge-base
    rows left out), with the conversation its training sample came from."""
    from training.encode import load_jsonl

    out: dict[str, str | None] = {}
    for split in ("train", "val"):
        for sample in load_jsonl(persona.dataset / f"{split}.jsonl"):
            if sample.get("knowledge"):
                continue
            for m in sample["messages"][1:]:
                for line in m["content"].split("\n") if m["role"] == "user" else ():
                    out.setdefault(line.strip(), sample.get("conversation")) if line.strip() else None
    return out


def calibration(persona: Persona, index_folder: Path, embedder, args) -> dict:
    """How often fact answers fire on ordinary incoming messages, per threshold (each message
    searched without its own conversation's exchanges, as a new message would be); the messages
    that fire at the chosen threshold are listed, to be read."""
    from training.index import MIN_SCORE, RECALL_ITEMS, PersonaIndex

    index = PersonaIndex.load(index_folder, embedder.name)
    messages = incoming_messages(persona)
    vectors = embedder.embed(list(messages))
    found = [scored(index.search(v, RECALL_ITEMS, MIN_SCORE, source))
             for v, source in zip(vectors, messages.values(), strict=True)]
    rates, fired = {}, []
    for least in (0.6, 0.65, 0.7, 0.75, 0.8, 0.85):
        rule = FactAnswers(least, args.fact_answer_margin)
        answered = (fact_answer(f, t, rule) for t, f in zip(messages, found, strict=True))
        hits = [(t, f) for t, f in zip(messages, answered, strict=True) if f is not None]
        rates[str(least)] = {"fired": len(hits), "rate": round(len(hits) / len(messages), 4)}
        if least == args.fact_answer_min:
            fired = [{"message": t, "similarity": round(f.similarity, 3), "asked": f.item.asked}
                     for t, f in hits]
    return {"messages": len(messages), "margin": args.fact_answer_margin, "by_threshold": rates,
            "fired_at_chosen": fired, "grounded": grounded_rates(messages, found, args)}


def grounded_rates(messages: dict[str, str | None], found: list[list[Scored]], args) -> dict:
    """How often grounded decoding would weigh a reply against its plain prompt, per threshold,
    among ordinary incoming messages (a fact answer takes precedence where it fires); a sample
    of those grounded at the chosen threshold, to be read."""
    answers = FactAnswers(args.fact_answer_min, args.fact_answer_margin)
    rates, grounded = {}, []
    for least in (0.45, 0.5, 0.55, 0.6, 0.65, 0.7):
        hits = [(t, f) for t, f in zip(messages, found, strict=True)
                if grounds(f, t, least) and fact_answer(f, t, answers) is None]
        rates[str(least)] = {"grounded": len(hits), "rate": round(len(hits) / len(messages), 4)}
        if least == args.grounded_min:
            grounded = [{"message": t, "knowledge": grounding(f, least)[0].item.text}
                        for t, f in hits[:: max(1, len(hits) // 20)]]
    return {"by_threshold": rates, "sample_at_chosen": grounded}


def told_statements(texts) -> list[str]:
    """What recall answers can tell back: statements about their writer (serving remembers every
    message, but chooses among these only, so the rest changes nothing here)."""
    return [t for t in texts if not is_question(t) and about_self(t)]


def recall_fires(cases: list[tuple[str, list[str]]], embedder, args) -> dict:
    """Per threshold, how many of `cases` (a question, the user's earlier statements) a recall
    answer fires on; those at the chosen threshold listed, to be read."""
    import numpy as np

    from training.index import MIN_SCORE, RECALL_ITEMS
    from training.prompt import Recalled

    texts = list(dict.fromkeys(t for q, said in cases for t in (q, *said)))
    vectors = dict(zip(texts, embedder.embed(texts, progress=True), strict=True))
    found = []
    for question, said in cases:  # as the long-term memory ranks them, best first
        sims = np.array([vectors[t] for t in said]) @ vectors[question] if said else np.zeros(0)
        found.append([Scored(Recalled(said[i], speaker="u"), "said", float(sims[i]), float(sims[i]))
                      for i in np.argsort(-sims)[:RECALL_ITEMS] if sims[i] >= MIN_SCORE])
    rates, fired = {}, []
    for least in (0.4, 0.45, 0.5, 0.55, 0.6, 0.7):
        rule = RecallAnswers(least, args.recall_answer_margin)
        hits = [(q, recall_answer(f, q, rule), f) for (q, _), f in zip(cases, found, strict=True)]
        hits = [h for h in hits if h[1] is not None]
        rates[str(least)] = len(hits)
        if least == args.recall_answer_min:
            fired = [{"message": q, "told_back": told, "said": f[0].item.text,
                      "similarity": round(f[0].similarity, 3)} for q, told, f in hits]
    return {"questions_about_self": len(cases), "fired_by_threshold": rates, "fired_at_chosen": fired}


def chitchat_cases(keep: int) -> tuple[int, list[tuple[str, list[str]]]]:
    """Real users' questions about themselves in the chitchat-dataset corpus (the sample persona's
    source, 258,145 messages of 1,315 people), each with the newest `keep` statements that user
    made before it, in any conversation: what their long-term memory would hold."""
    from collections import defaultdict

    import chitchat_dataset

    by_user: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for conversation in chitchat_dataset.Dataset().values():
        for turn in conversation["messages"]:
            for m in turn:
                by_user[m["sender"]].append((m["timestamp"], m["text"]))
    cases, total = [], 0
    for said in by_user.values():
        said.sort()
        total += len(said)
        for n, (_, text) in enumerate(said):
            if asks_about_self(text):
                cases.append((text, told_statements(t for _, t in said[:n])[-keep:]))
    return total, cases


def recall_calibration(persona: Persona, embedder, args) -> dict:
    """How often recall answers fire on ordinary chats, never on the recall quiz:
    - chitchat: every question a real user of the sample's source corpus asked about themselves,
      against what that user had said before (a long-term memory's newest 500 items);
    - persona: the other speakers' questions in the persona's chats, against the statements of
      every other conversation, as if one user had said them all (an upper bound)."""
    from bot.longterm import DEFAULT_MAX_ITEMS

    messages = incoming_messages(persona)
    said = told_statements(messages)
    cases = [(t, [s for s in said if messages[s] != c]) for t, c in messages.items() if asks_about_self(t)]
    total, corpus = chitchat_cases(DEFAULT_MAX_ITEMS)
    return {"chitchat": {"messages": total, **recall_fires(corpus, embedder, args)},
            "persona": {"messages": len(messages), **recall_fires(cases, embedder, args)},
            "margin": args.recall_answer_margin}


def perplexity(persona: Persona, model, tokenizer, index_folder: Path, embedder) -> dict:
    from training.base_model import token_counter
    from training.encode import load_jsonl
    from training.evaluate import example_lines, last_reply_gains, perplexities, reply_retrieval_gain
    from training.index import PersonaIndex, attach_recalled, reply_prefixes
    from training.prompt import RECALL_TOKENS

    data = persona.dataset
    val = load_jsonl(data / "val.jsonl")
    ppl, _, last = perplexities(model, tokenizer, val, example_lines(load_jsonl(data / "train.jsonl")),
                                last_of=len(val))
    # Every held-out reply with the items serving recalls for the message it answers.
    prefixes = reply_prefixes(val)
    index = PersonaIndex.load(index_folder, embedder.name)
    attach_recalled(prefixes, index, embedder, persona, token_counter(tokenizer), RECALL_TOKENS)
    return {"perplexity": ppl,
            "retrieval_gain": {k: round(ppl[f"{k}_no_recall"] / ppl[k], 3) for k in ("adapter", "base")},
            **last_reply_gains(model, tokenizer, val, last),
            "replies": len(prefixes),
            "retrieval_gain_each_reply": reply_retrieval_gain(model, tokenizer, prefixes)}


def recall_once(persona: Persona, model, tokenizer, index: Path, embedder, longterm, fillers: int,
                told: bool, args) -> dict:
    import dataclasses
    import uuid

    engine = quiz_engine(persona, model, tokenizer, index, embedder, longterm)
    engine.recall_answers = RecallAnswers(args.recall_answer_min, args.recall_answer_margin) if told else None
    if args.longterm_variant != "alone":
        *_, grounded, answers = VARIANTS[args.longterm_variant]
        served = variant_engine(persona, model, tokenizer, index, embedder, args, grounded, answers)
        engine.backend, engine.grounded_min = served.backend, served.grounded_min
        engine.grounded_candidates = served.grounded_candidates
        engine.fact_answers = served.fact_answers
    engine.persona = dataclasses.replace(persona, id=f"bench-{uuid.uuid4().hex[:8]}")  # keys of its own
    engine.recaller.persona_id = engine.persona.id
    engine.backend = seeing = Seeing(engine.backend)

    async def run() -> dict:  # one event loop: a Redis client belongs to the loop it was made in
        try:
            return await recall_quiz(engine, FACTS, fillers)
        finally:
            for i in range(len(FACTS)):
                await engine.forget(f"lt-user{i}")
            await longterm.close()

    result = asyncio.run(run())
    tells = [f.tell for f in FACTS]
    shown = sum(1 for p in seeing.prompts if any(f"told you: {tell}" in p for tell in tells))
    return {**result, "in_prompt": shown}


def longterm(persona: Persona, model, tokenizer, index: Path, embedder, args) -> dict:
    stores = {"embedded": lambda: EmbeddedLongTerm(None)}
    if redis_answers():
        stores["redis"] = lambda: RedisLongTerm("redis://127.0.0.1:6379/0")
    clears = (("/reset", 0), ("100 messages", 100))
    ways = (("", False), (", told back", True))  # generated from the prompt; the user's words told back
    return {f"{store}, after {clear}{way}": recall_once(persona, model, tokenizer, index, embedder, make(),
                                                        n, told, args)
            for store, make in stores.items() for clear, n in clears for way, told in ways}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persona", type=Path,
                        help="a prepared, trained persona folder (default: train a copy of the sample)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget (clone start's: 4)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", type=Path, help="train the copy in this existing folder and keep it")
    parser.add_argument("--skip", default="",
                        help="comma-separated: calibration, recall_calibration, retrieval, knowledge, cost, "
                             "perplexity, longterm")
    parser.add_argument("--variants", default="alone,grounded,answers,both,no-recall,base",
                        help=f"knowledge quiz variants, comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--questions", default="eval_questions.csv",
                        help="the knowledge quiz's questions, in the persona folder (retrieval_dev.csv: "
                             "the set retrieval is tuned on)")
    parser.add_argument("--temperature", type=float, default=0.8, help="serving's sampling temperature")
    parser.add_argument("--grounded-min", type=float, default=GROUNDED_MIN,
                        help="grounded decoding: a question, with a recalled knowledge item this similar")
    parser.add_argument("--contrast", type=float, default=1.0, help="grounded decoding's weight")
    parser.add_argument("--candidates", type=int, default=GROUNDED_CANDIDATES,
                        help="grounded replies sampled; the one nearest the knowledge is sent")
    parser.add_argument("--enough", type=int, default=GenerationSettings.enough_candidates,
                        help="grounded candidates stop once this many have ended")
    parser.add_argument("--cost-rounds", type=int, default=2, help="cost: rounds of the questions")
    parser.add_argument("--seeds", type=int, default=1, help="knowledge quiz: sampling seeds, averaged")
    parser.add_argument("--fact-answer-min", type=float, default=FactAnswers.min_similarity)
    parser.add_argument("--fact-answer-margin", type=float, default=FactAnswers.margin)
    parser.add_argument("--recall-answer-min", type=float, default=RecallAnswers.min_similarity)
    parser.add_argument("--recall-answer-margin", type=float, default=RecallAnswers.margin)
    parser.add_argument("--longterm-variant", default="alone", choices=list(VARIANTS),
                        help="the serving variant the long-term recall quiz runs with")
    args = parser.parse_args()
    from bot.runtime import index_folder
    from training import adapters
    from training.embed import Embedder

    with tempfile.TemporaryDirectory() as work:
        if args.persona:
            persona, build = Persona.load(args.persona), {}
        else:
            persona, build = trained_copy(args.minutes, args.keep or Path(work))
        skip = set(args.skip.split(","))
        model = tokenizer = None
        figures = dict(build)
        if not {"knowledge", "cost", "perplexity", "longterm"} <= skip:  # calibrations alone need no model
            model, tokenizer, manifest = adapters.load(persona.adapters)
            figures.update(adapter=manifest["version"], steps=manifest["metrics"]["steps"])
        index, embedder = index_folder(persona, None), Embedder()
        parts = (persona, model, tokenizer, index, embedder)
        for name, measure in (("calibration", lambda: calibration(persona, index, embedder, args)),
                              ("recall_calibration", lambda: recall_calibration(persona, embedder, args)),
                              ("retrieval", lambda: retrieval(persona, index, embedder)),
                              ("knowledge", lambda: knowledge(*parts, args)),
                              ("cost", lambda: grounded_cost(*parts, args)),
                              ("perplexity", lambda: perplexity(persona, model, tokenizer, index, embedder)),
                              ("longterm", lambda: longterm(*parts, args))):
            if name in skip:
                continue
            figures[name] = measure()
            print(json.dumps({name: figures[name]}, indent=2), flush=True)  # each as soon as it is known
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
