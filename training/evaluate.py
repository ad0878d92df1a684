"""How well does the clone imitate the person? Perplexity and style, against two baselines.

On the validation split (conversations the adapter never saw), three models score the
person's real replies, token by token:
  base      the base model with the persona's system prompt
  prompted  the same, with a handful of the person's own messages as examples in the system
            prompt: what a user would try without fine-tuning
  adapter   the fine-tuned clone
each with the items recalled for the reply (as served) and, for base and adapter, without them
(retrieval gain: perplexity without / with). Context gain: the perplexity of the person's last
reply after another conversation / after its own; a clone that ignores the conversation
scores about 1.
Then the clone and the base model write replies to the same contexts, and the style of the
clone's replies is compared with the real ones (length, bursts, case, punctuation, emoji...).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from training import adapters
from training.encode import IGNORE, encode, load_jsonl
from training.generate import generate_turns
from training.prompt import turn_text, without_recall
from training.report import verdict, write_report
from training.style import compare_style
from training.train import mean_nll, nll_sums

N_EXAMPLES = 8  # the person's messages shown to the prompted baseline
CONTEXT_SAMPLES = 64  # validation samples scored for the context gain and last-reply retrieval gain


def example_lines(train: list[dict], n: int = N_EXAMPLES) -> list[str]:
    """A deterministic handful of the person's own messages from the training split."""
    lines = {
        line.strip()
        for s in train
        for m in s["messages"]
        if m["role"] == "assistant"
        for line in m["content"].split("\n")
        if 3 <= len(line.strip()) <= 200
    }
    return sorted(lines, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n]


def with_examples(messages: list[dict], lines: list[str]) -> list[dict]:
    shown = "\n".join(f"- {line}" for line in lines)
    system = {"role": "system", "content": f"{messages[0]['content']}\n\nMessages you wrote before:\n{shown}"}
    return [system, *messages[1:]]


def reply_prompts(val: list[dict], n: int) -> list[tuple[list[dict], str]]:
    """(context, real reply) pairs: each validation sample up to its last turn of the person."""
    pairs = []
    for s in val[:n]:
        msgs = s["messages"]
        if len(msgs) >= 3 and msgs[-1]["role"] == "assistant":
            pairs.append((msgs[:-1], msgs[-1]["content"]))
    return pairs


def generate(model, tokenizer, contexts: list[list[dict]], max_new_tokens: int, seed: int = 0) -> list[str]:
    """Replies to each context, sampled (seeded) as serving samples them: the same injection-safe
    encoding, batched and left-padded, cut where the turn ends."""
    out: list[str] = []
    torch.manual_seed(seed)
    for i in tqdm(range(0, len(contexts), 8), desc="Generating", unit="batch", disable=None, leave=False):
        turns = generate_turns(model, tokenizer, contexts[i : i + 8], max_new_tokens=max_new_tokens)
        out += [turn_text(text).strip() for text, _ in turns]
    return out


def context_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[1:])


def perplexities(model, tokenizer, val: list[dict], lines: list[str],
                 last_of: int = CONTEXT_SAMPLES) -> tuple[dict[str, float], int, dict[str, dict[str, float]]]:
    """Per-token perplexity of the real replies under base, prompted base and adapter, with the
    recalled items and (`*_no_recall`) without; the number of tokens scored; and, from the same
    passes, the mean negative log-likelihood of the last reply of the first `last_of` samples, per
    model, after its own conversation with its recalled items ("recalled items") and without them
    ("true context"), for last_reply_gains."""

    def rows(prompted: bool = False, recall: bool = True) -> list[dict]:
        out = []
        for i, sample in enumerate(val):
            chat = sample["messages"] if recall else without_recall(sample["messages"])
            e = encode(with_examples(chat, lines) if prompted else chat, tokenizer)
            start = last_reply_start(chat, tokenizer) if i < last_of and not prompted else None
            out.append({"input_ids": e.input_ids, "labels": e.labels, **({"last": start} if start else {})})
        return out

    pad = tokenizer.pad_token_id
    told, untold = rows(), rows(recall=False)  # each scored by both models
    passes = {}
    with model.disable_adapter():
        passes["base"] = nll_sums(model, told, pad, desc="Scoring base")
        passes["base_no_recall"] = nll_sums(model, untold, pad, desc="Scoring base, no recall")
        passes["prompted"] = nll_sums(model, rows(prompted=True), pad, desc="Scoring prompted")
    passes["adapter"] = nll_sums(model, told, pad, desc="Scoring adapter")
    passes["adapter_no_recall"] = nll_sums(model, untold, pad, desc="Scoring adapter, no recall")
    ppl = {k: round(math.exp(p.mean), 3) for k, p in passes.items()}
    last = {}
    for name in ("adapter", "base"):
        with_items, without = passes[name], passes[f"{name}_no_recall"]
        if with_items.last_count and without.last_count:
            last[name] = {"recalled items": with_items.last_mean, "true context": without.last_mean}
    return ppl, passes["base"].count, last


def last_reply_start(messages: list[dict], tokenizer) -> int | None:
    """Where the person's last reply begins in the encoded `messages` (its first labelled
    position), when the sample ends with one after a conversation (3 messages at least)."""
    if len(messages) < 3 or messages[-1]["role"] != "assistant":
        return None
    return len(encode(messages[:-1], tokenizer, add_generation_prompt=True).input_ids)


def last_reply_rows(val: list[dict], tokenizer, wrong: bool, recall: bool = False) -> list[dict]:
    """Each sample's last reply of the person, labelled alone, after its own conversation or
    (`wrong`) after the next sample's; without recalled items, which would tell the true
    conversation's topic, unless `recall` (and not `wrong`)."""
    shown = (lambda m: m) if recall and not wrong else without_recall
    pairs = [(shown(s["messages"])[:-1], s["messages"][-1]) for s in val
             if len(s["messages"]) >= 3 and s["messages"][-1]["role"] == "assistant"]
    rows = []
    for i, (context, reply) in enumerate(pairs):
        if wrong:
            other = pairs[(i + 1) % len(pairs)][0]
            context = [context[0], *other[1:]]  # the same system prompt, another conversation
        prefix = last_reply_start([*context, reply], tokenizer) or 0
        e = encode([*context, reply], tokenizer)
        rows.append({"input_ids": e.input_ids, "labels": [IGNORE] * prefix + e.labels[prefix:]})
    return rows


def last_reply_gains(model, tokenizer, val: list[dict],
                     scored: dict[str, dict[str, float]]) -> dict[str, dict[str, float] | None]:
    """Two perplexity ratios of each sample's last reply, labelled alone, for the adapter and the
    base model (the adapter off). `scored`: perplexities' last-reply scores of these samples
    (the reply after its own conversation, with and without its recalled items); the reply after
    a wrong conversation is scored here.
    - context_gain: after a wrong conversation / after the true one, both without recalled items
      (they would tell the true conversation's topic); None with fewer than two samples.
    - retrieval_gain_last_reply: without its recalled items / with them. The items were recalled
      for the message that reply answers, as serving recalls them for each message; the
      perplexities' retrieval gain also counts a sample's earlier replies, which serving would
      answer with items of their own. None without samples."""
    wrong = last_reply_rows(val, tokenizer, wrong=True) if len(val) >= 2 else []
    pad = tokenizer.pad_token_id
    by_model = {name: dict(scored.get(name, {})) for name in ("adapter", "base")}
    if wrong and scored:
        desc = "Scoring last replies, wrong context"
        with model.disable_adapter():
            by_model["base"]["wrong context"] = mean_nll(model, wrong, pad, desc=desc)[0]
        by_model["adapter"]["wrong context"] = mean_nll(model, wrong, pad, desc=desc)[0]

    def ratio(worse: str, better: str) -> dict[str, float] | None:
        if any(worse not in nll or better not in nll for nll in by_model.values()):
            return None
        return {name: round(math.exp(nll[worse] - nll[better]), 3) for name, nll in by_model.items()}

    return {"context_gain": ratio("wrong context", "true context"),
            "retrieval_gain_last_reply": ratio("true context", "recalled items")}


def reply_retrieval_gain(model, tokenizer, prefixes: list[dict]) -> dict[str, float] | None:
    """Retrieval gain as serving meets it, per model (adapter, base): every reply scored alone
    after its own conversation, without the items recalled for the message it answers / with
    them. `prefixes`: training.index.reply_prefixes of the held-out samples, each with its own
    recalled items attached. None without any."""
    if not prefixes:
        return None
    pad = tokenizer.pad_token_id
    told, untold = (last_reply_rows(prefixes, tokenizer, wrong=False, recall=r) for r in (True, False))

    def gain(name: str) -> float:
        with_items, without = (mean_nll(model, rows, pad, desc=f"Scoring {name}, each reply")[0]
                               for rows in (told, untold))
        return round(math.exp(without - with_items), 3)

    with model.disable_adapter():
        base = gain("base")
    return {"adapter": gain("adapter"), "base": base}


def sample_replies(model, tokenizer, val: list[dict], samples: int, max_new_tokens: int) -> dict:
    """The clone's (and, for a few, the base model's) replies beside the real ones."""
    pairs = reply_prompts(val, samples)
    contexts = [c for c, _ in pairs]
    generated = generate(model, tokenizer, contexts, max_new_tokens)
    with model.disable_adapter():
        base_replies = generate(model, tokenizer, contexts[:5], max_new_tokens)
    return {
        "style": compare_style(generated, [r for _, r in pairs]),
        "examples": [
            {"context": context_text(c), "real": r, "generated": g, "base": b}
            for (c, r), g, b in zip(pairs[:5], generated[:5], base_replies, strict=False)
        ],
    }


def evaluate(
    root: Path,
    data: Path,
    version: str | None = None,
    samples: int = 16,
    max_new_tokens: int = 48,
    persona_id: str | None = None,
    base: str | None = None,
    quiz: Callable[..., dict | None] | None = None,
) -> dict:
    """Score one adapter (the active one by default) on the validation split in `data` and write
    its report into `<adapter>/eval/`. `quiz(model, tokenizer, folder)` asks the clone
    questions about the person through the serving path (bot.quiz) and gives its result."""
    model, tokenizer, manifest = adapters.load(root, version, persona_id, base)
    folder = root / manifest["version"]
    train, val = load_jsonl(data / "train.jsonl"), load_jsonl(data / "val.jsonl")
    if not val:
        raise ValueError(f"{data}/val.jsonl is empty: nothing held out to evaluate on")
    lines = example_lines(train)
    ppl, n_tokens, last = perplexities(model, tokenizer, val, lines)
    card = json.loads((data / "card.json").read_text(encoding="utf-8"))
    result = {
        "version": manifest["version"],
        "perplexity": ppl,
        "val_replies": sum(m["role"] == "assistant" for s in val for m in s["messages"]),
        "val_tokens": n_tokens,
        "dataset": card.get("fingerprint"),
        **last_reply_gains(model, tokenizer, val[:CONTEXT_SAMPLES], last),
        "knowledge": quiz(model, tokenizer, folder) if quiz else None,
        **sample_replies(model, tokenizer, val, samples, max_new_tokens),
        "model": {
            "base_model": manifest["base_model"]["id"],
            "train_steps": manifest.get("metrics", {}).get("steps"),
            "train_samples": manifest["dataset"]["train_samples"],
            "trained_on_dataset": manifest["dataset"]["fingerprint"],
            "prompted_examples": len(lines),
        },
    }
    result["verdict"] = verdict(result)
    history_file = folder / "log_history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else None
    result["report"] = str(write_report(result, folder / "eval", history))
    return result
