"""The persona index: every recallable item with its embedding, searched by meaning.

    <folder>/items.jsonl   one item per line (kind, text, asked, source), redacted
    <folder>/vectors.npy   float16 unit vectors, one row per item (half the size of float32)
    <folder>/answers.npy   float16 unit vectors of each fact's question with its answer, in order
    <folder>/index.json    the embedding model, item counts and a fingerprint; written last

Search is brute force over an in-memory float32 matrix: 100,000 items x 384 dimensions is one
matrix-vector product (milliseconds on two cores), so no vector database is needed. An index
built by another embedding model, or one that does not read back whole, is refused with
IndexProblem; the caller rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from training.knowledge import Item, is_question
from training.persona import Persona
from training.prompt import RECALL_ITEMS, Recalled, Utterance, fit_recalled, system_prompt, to_chat_messages

INDEX_FORMAT = 2  # 2: answers.npy (an index of format 1 searches facts by question alone)
# The person's knowledge base is what they wrote down to be known: it outranks a chat exchange
# that happens to be a little closer (paraphrased questions, sample persona: the right fact
# first for 33 of 34 with this bonus, 31 without).
KNOWLEDGE_BONUS = 0.1


class IndexProblem(ValueError):
    """An index that cannot be used as it is (another model, missing or damaged files)."""


class TextEmbedder(Protocol):
    name: str

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


# search() looks this many times deeper than it returns, to skip items shown exactly as a better one.
SEARCH_POOL = 4


def answer_views(items: Sequence[Item]) -> list[str]:
    """Each fact's question with its answer (Item.answered_text), in the items' order: what the
    rows of an index's `answers` embed."""
    return [t for i in items if (t := i.answered_text())]


class PersonaIndex:
    def __init__(self, items: list[Item], vectors: np.ndarray, model: str,
                 answers: np.ndarray | None = None) -> None:
        """`answers`: one row per fact (Item.answered_text), in the items' order; None searches
        facts by their question alone."""
        if len(items) != len(vectors):
            raise IndexProblem(f"{len(items)} items but {len(vectors)} vectors")
        self.items, self.model = items, model
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._fact_rows = np.array([j for j, i in enumerate(items) if i.answered_text()], dtype=np.int64)
        if answers is not None and len(answers) != len(self._fact_rows):
            raise IndexProblem(f"{len(self._fact_rows)} facts but {len(answers)} answer vectors")
        self.answers = None if answers is None else np.ascontiguousarray(answers, dtype=np.float32)
        # Only exchanges belong to a conversation a sample could come from: facts and notes
        # are recalled for their own questions too (that is how the clone learns to use them).
        self._sources = np.array([i.source if i.kind == "exchange" else "" for i in items], dtype=object)
        self._bonus = np.array([0.0 if i.kind == "exchange" else KNOWLEDGE_BONUS for i in items],
                               dtype=np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def kinds(self) -> dict[str, int]:
        return dict(Counter(i.kind for i in self.items))

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.model.encode())
        for item in self.items:
            h.update(json.dumps(item.as_dict(), ensure_ascii=False, sort_keys=True).encode())
        return "sha256:" + h.hexdigest()[:32]

    def search(self, vector: np.ndarray, k: int, min_score: float = 0.0,
               exclude_source: str | None = None) -> list[tuple[float, Item]]:
        """The `k` items most similar to `vector`, best first, at least `min_score`; items of
        the conversation `exclude_source` never (a training sample must not see its own
        exchanges). An item the prompt would show exactly as a better one (the same exchange
        in several chats: "talk later" after "haha ok") is skipped, so each is shown once."""
        if not self.items or k <= 0:
            return []
        scores = self.similarities(vector) + self._bonus
        if exclude_source is not None:
            scores = np.where(self._sources == exclude_source, -np.inf, scores)
        pool = min(k * SEARCH_POOL, len(scores))  # room for the repeats skipped
        top = np.argpartition(-scores, pool - 1)[:pool]
        top = top[np.argsort(-scores[top])]
        found: dict[Recalled, tuple[float, Item]] = {}
        for i in top:
            if scores[i] < min_score or len(found) == k:
                break
            found.setdefault(self.items[i].recalled(), (float(scores[i]), self.items[i]))
        return list(found.values())

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Each item's cosine similarity to `vector`: a fact's is the closer of its question's
        and its question-with-answer's."""
        vector = vector.astype(np.float32)
        scores = self.vectors @ vector
        if self.answers is not None and len(self._fact_rows):
            rows = self._fact_rows
            scores[rows] = np.maximum(scores[rows], self.answers @ vector)
        return scores

    def save(self, folder: Path) -> None:
        """Into `folder` (a staging folder the caller renames into place)."""
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "items.jsonl").open("w", encoding="utf-8") as f:
            for item in self.items:
                f.write(json.dumps(item.as_dict(), ensure_ascii=False) + "\n")
        np.save(folder / "vectors.npy", self.vectors.astype(np.float16))
        if self.answers is not None:
            np.save(folder / "answers.npy", self.answers.astype(np.float16))
        meta = {"format": INDEX_FORMAT if self.answers is not None else 1,
                "embedding_model": self.model, "items": len(self.items),
                "kinds": self.kinds(), "fingerprint": self.fingerprint}
        (folder / "index.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, model: str | None = None) -> PersonaIndex:
        """The index in `folder`; IndexProblem if it is missing, damaged or of another model."""
        try:
            meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
            if model is not None and meta.get("embedding_model") != model:
                raise IndexProblem(f"{folder} was built by {meta.get('embedding_model')}, not {model}")
            with (folder / "items.jsonl").open(encoding="utf-8") as f:
                items = [Item(**json.loads(line)) for line in f if line.strip()]
            vectors = np.load(folder / "vectors.npy", allow_pickle=False)
            answers = (np.load(folder / "answers.npy", allow_pickle=False)
                       if meta.get("format", 1) >= 2 else None)
        except IndexProblem:
            raise
        except (OSError, ValueError, TypeError, EOFError, KeyError, AttributeError) as e:
            raise IndexProblem(f"{folder}: cannot be read ({type(e).__name__})") from None
        if vectors.ndim != 2 or len(items) != meta.get("items") or len(vectors) != len(items):
            raise IndexProblem(f"{folder}: items and vectors do not match")
        if answers is not None and answers.shape[1:] != vectors.shape[1:]:
            raise IndexProblem(f"{folder}: answer vectors and vectors do not match")
        return cls(items, vectors, meta["embedding_model"], answers)


def build(items: Sequence[Item], embedder: TextEmbedder, reuse: PersonaIndex | None = None,
          progress: bool = False) -> PersonaIndex:
    """Embed `items` (the same text once); vectors of `reuse` (same model) are taken as they are."""
    known: dict[str, np.ndarray] = {}
    if reuse is not None and reuse.model == embedder.name:
        known = {i.embedded_text(): v for i, v in zip(reuse.items, reuse.vectors, strict=True)}
        if reuse.answers is not None:
            known |= dict(zip(answer_views(reuse.items), reuse.answers, strict=True))
    answered = answer_views(items)
    wanted = [*(i.embedded_text() for i in items), *answered]
    texts = list(dict.fromkeys(t for t in wanted if t not in known))
    if texts:
        known.update(zip(texts, embedder.embed(texts, progress=progress), strict=True))
    vectors = np.stack([known[i.embedded_text()] for i in items]) if items else np.zeros((0, 384))
    answers = np.stack([known[t] for t in answered]) if answered else np.zeros((0, vectors.shape[1]))
    return PersonaIndex(list(items), vectors, embedder.name, answers)


# Items less similar than this to a message are not recalled for it: an unrelated fact in the
# prompt is noise the model may repeat. Serving and training use the same threshold.
MIN_SCORE = 0.3


def query_of(messages: list[dict[str, str]]) -> str:
    """What a sample answers: the other side's turn right before the person's last one."""
    users = [m["content"] for m in messages[1:-1] if m["role"] == "user"]
    return users[-1] if users else ""


def recall(index: PersonaIndex, vector: np.ndarray, exclude_source: str | None = None,
           k: int = RECALL_ITEMS) -> list[Recalled]:
    """The index's items for one message, best first (what serving and training both show)."""
    return [item.recalled() for _, item in index.search(vector, k, MIN_SCORE, exclude_source)]


def attach_recalled(samples: list[dict], index: PersonaIndex, embedder: TextEmbedder,
                    persona: Persona, count_tokens: Callable[[str], int], budget: int) -> None:
    """Give every sample the items serving would recall for its last message, from other
    conversations and the knowledge base (never its own conversation: nothing leaks), in its
    system prompt, within `budget` tokens. Samples are changed in place."""
    queries = [query_of(s["messages"]) for s in samples]
    unique = list(dict.fromkeys(q for q in queries if q))
    vectors = dict(zip(unique, embedder.embed(unique), strict=True)) if unique else {}
    for sample, query in zip(samples, queries, strict=True):
        if not query:
            continue
        found = recall(index, vectors[query], sample.get("conversation"))
        chosen = fit_recalled(found, count_tokens, budget)
        sample["messages"][0]["content"] = system_prompt(persona, chosen)


def reply_prefixes(samples: list[dict]) -> list[dict]:
    """Each sample cut after every reply of the person that answers the other side: one copy per
    reply, ending with it, as serving sees that reply's conversation. Their system prompts still
    hold the items recalled for the whole sample's last message; attach_recalled gives each its own."""
    out = []
    for sample in samples:
        msgs = sample["messages"]
        for end in range(3, len(msgs) + 1):
            if msgs[end - 1]["role"] == "assistant" and msgs[end - 2]["role"] == "user":
                out.append({**sample, "messages": [dict(m) for m in msgs[:end]]})
    return out


# An incoming chat line this near a fact's question, and this far ahead of the next item, asks
# that fact: serving sends the fact's answer (bot.recall.FactAnswers' defaults) and training
# makes it a knowledge sample (paraphrase_samples). On the sample's 3,812 incoming lines it picks
# 32, and 31 of them asked that very question (benchmarks/README.md).
FACT_ANSWER_MIN, FACT_ANSWER_MARGIN = 0.7, 0.02


def fact_is_answer(kind: str, similarity: float, scores: Sequence[float], least: float = FACT_ANSWER_MIN,
                   margin: float = FACT_ANSWER_MARGIN) -> bool:
    """Serving's fact-answer rule (bot.recall.fact_answer), which paraphrase samples follow too:
    the best item found is a fact at least `least` similar, and its ranking score is `margin`
    ahead of the next item's (`scores`, best first), so no other answer comes near."""
    return kind == "fact" and similarity >= least and (len(scores) < 2 or scores[0] - scores[1] >= margin)


def paraphrase_samples(samples: list[dict], index: PersonaIndex, embedder: TextEmbedder,
                       persona: Persona, count_tokens: Callable[[str], int], budget: int) -> list[dict]:
    """Knowledge samples asked the way people really ask: each question that the other side of
    the person's chats sent, near one fact's question, answered with that fact, after the items
    serving would recall for it (none of its own conversation). The knowledge base's own rows
    ask each question in one wording only; these teach the adapter that a recalled fact answers
    its paraphrases too."""
    asked: dict[str, str] = {}  # line -> its conversation
    for sample in samples:
        if sample.get("knowledge") or sample.get("correction"):
            continue
        for m in sample["messages"][1:]:
            for line in m["content"].split("\n") if m["role"] == "user" else ():
                if is_question(line.strip()):
                    asked.setdefault(line.strip(), sample.get("conversation", ""))
    lines = list(asked)
    out = []
    for line, vector in zip(lines, embedder.embed(lines) if lines else [], strict=True):
        found = index.search(vector, RECALL_ITEMS, MIN_SCORE, asked[line])
        scores = [s for s, _ in found]
        if not found or not fact_is_answer(found[0][1].kind, scores[0] - KNOWLEDGE_BONUS, scores):
            continue
        fact = found[0][1]
        chosen = fit_recalled([item.recalled() for _, item in found], count_tokens, budget)
        them = Utterance("them", line, False)
        you = Utterance(persona.name, fact.text, True)
        out.append({"messages": to_chat_messages(persona, [them, you], recalled=chosen),
                    "conversation": f"{asked[line]}:asks:{fact.source}", "knowledge": True})
    return out


def reindex(folder: Path, notes: list[Item], embedder: TextEmbedder) -> PersonaIndex:
    """The index in `folder` with its notes replaced by `notes` (a knowledge edit), rewritten
    atomically; unchanged texts keep their vectors. An index of another embedding model is
    re-embedded whole; one that cannot be read raises IndexProblem (prepare builds it anew)."""
    from training.atomic import staged_dir

    old = PersonaIndex.load(folder)
    kept = [i for i in old.items if i.kind != "note"]
    new = build([*kept, *notes], embedder, reuse=old, progress=True)
    with staged_dir(folder) as tmp:
        new.save(tmp)
    return new


def persona_indexes(persona: Persona) -> list[Path]:
    """Every index a knowledge edit must reach: the dataset's (the next adapter's) and each
    adapter's own, so that rolling back keeps today's notes too."""
    folders = [persona.dataset / "index"] if persona.dataset else []
    if persona.adapters is not None and persona.adapters.is_dir():
        folders += sorted(persona.adapters.glob("*/index"))
    # `active` points at one of the versions: each folder once.
    return list({f.resolve(): f for f in folders if f.is_dir()}.values())
