"""How well does the clone imitate the person? Perplexity and style, against two baselines.

On the validation split (conversations the adapter never saw), three models score the
person's real replies, token by token:
  base      the base model with the persona's system prompt
  prompted  the same, with a handful of the person's own messages as examples in the system
            prompt: what a user would try without fine-tuning
  adapter   the fine-tuned clone
Then the clone and the base model write replies to the same contexts, and the style of the
clone's replies is compared with the real ones (length, bursts, case, punctuation, emoji...).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from training import adapters
from training.encode import encode, load_jsonl
from training.report import write_report
from training.style import compare_style
from training.train import mean_nll

N_EXAMPLES = 8  # the person's messages shown to the prompted baseline


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


@torch.no_grad()
def generate(model, tokenizer, contexts: list[list[dict]], max_new_tokens: int, seed: int = 0) -> list[str]:
    """Replies to each context, sampled (seeded) as serving would: batched, left-padded."""
    tokenizer.padding_side = "left"
    out: list[str] = []
    torch.manual_seed(seed)
    for i in tqdm(range(0, len(contexts), 8), desc="Generating", unit="batch", disable=None, leave=False):
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in contexts[i : i + 8]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=0.8,
            top_p=0.9,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = ids[:, batch["input_ids"].shape[1] :]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def context_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[1:])


def evaluate(
    root: Path,
    version: str | None = None,
    data: Path | None = None,
    samples: int = 16,
    max_new_tokens: int = 48,
) -> dict:
    """Score one adapter (the active one by default) and write its report into `<adapter>/eval/`."""
    model, tokenizer, manifest = adapters.load(root, version)
    folder = root / manifest["version"]
    data = data or Path(manifest["dataset"]["path"])
    train = load_jsonl(data / "train.jsonl")
    val = load_jsonl(data / "val.jsonl")
    if not val:
        raise ValueError(f"{data}/val.jsonl is empty: nothing held out to evaluate on")
    lines = example_lines(train)

    def rows(samples_: list[dict], prompted: bool = False) -> list[dict]:
        out = []
        for s in samples_:
            e = encode(with_examples(s["messages"], lines) if prompted else s["messages"], tokenizer)
            out.append({"input_ids": e.input_ids, "labels": e.labels})
        return out

    pad = tokenizer.pad_token_id
    with model.disable_adapter():
        base_nll, n_tokens = mean_nll(model, rows(val), pad, desc="Scoring base")
        prompted_nll, _ = mean_nll(model, rows(val, prompted=True), pad, desc="Scoring prompted")
    adapter_nll, _ = mean_nll(model, rows(val), pad, desc="Scoring adapter")

    pairs = reply_prompts(val, samples)
    contexts = [c for c, _ in pairs]
    real = [r for _, r in pairs]
    generated = generate(model, tokenizer, contexts, max_new_tokens)
    with model.disable_adapter():
        base_replies = generate(model, tokenizer, contexts[:5], max_new_tokens)

    result = {
        "version": manifest["version"],
        "perplexity": {
            "base": round(math.exp(base_nll), 3),
            "prompted": round(math.exp(prompted_nll), 3),
            "adapter": round(math.exp(adapter_nll), 3),
        },
        "val_replies": sum(m["role"] == "assistant" for s in val for m in s["messages"]),
        "val_tokens": n_tokens,
        "data": str(data),
        "style": compare_style(generated, real),
        "examples": [
            {"context": context_text(c), "real": r, "generated": g, "base": b}
            for (c, r), g, b in zip(pairs[:5], generated[:5], base_replies, strict=False)
        ],
        "model": {
            "base_model": manifest["base_model"]["id"],
            "train_steps": manifest.get("metrics", {}).get("steps"),
            "train_samples": manifest["dataset"]["train_samples"],
            "prompted_examples": len(lines),
        },
    }
    history_file = folder / "log_history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else None
    result["report"] = str(write_report(result, folder / "eval", history))
    return result
