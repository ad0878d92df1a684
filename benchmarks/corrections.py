"""Do the owner's corrections teach the next adapter? Retrain without them, with them as samples,
and with them as samples plus DPO over preference pairs, in one run, on the sample persona.

  1. prepare     a copy of the sample persona (its exports and notes), as `clone start` does
  2. before      an adapter trained on the chats alone (`--steps` steps): the clone being corrected
  3. correct     corrections synthesized from validation conversations (never trained on): the
                 context is the conversation before one of the person's real replies (with what
                 serving would recall for it), the clone's reply is what `before` generates there
                 (serving's encoding, sampling and post-processing), the owner's text is the
                 person's real reply. A fifth of them, whole conversations, is held out.
  4. retrain     the other four fifths stored in the persona's corrections.jsonl, prepared again,
                 then three new adapters of the same supervised steps and a seed other than
                 before's: (a) without corrections, (b) with them as samples (weight 3, no DPO),
                 (c) with them as samples and the DPO stage (`clone retrain`'s defaults)
  5. score       on the held-out corrections, for before, (a), (b) and (c): the perplexity of the
                 owner's replies, and the share of pairs in which the adapter gives the owner's
                 reply a higher log-probability (summed over its tokens) than the clone's old one;
                 the same share on the trained four fifths (did the adapter learn them at all?);
                 and how many pairs each adapter moved towards the owner against a fair
                 reference: (a), and for DPO its supervised state (b) (see moved_towards_owner)

    python benchmarks/corrections.py                      # 20 steps each, 60 corrections (~25 min)
    python benchmarks/corrections.py --steps 8 --corrections 20   # quick check
    python benchmarks/corrections.py --json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HELD_OUT = 0.2
RUNS = ("before", "a_no_corrections", "b_sft", "c_sft_dpo")
TUNED = ("correction_weight", "preference_epochs", "preference_lr", "preference_beta")  # TrainConfig's


class CachedEmbedder:
    """The packaged embedder, each text embedded once across the two prepares."""

    def __init__(self) -> None:
        from training.embed import Embedder

        self.inner, self.cache = Embedder(), {}
        self.name = self.inner.name

    def embed(self, texts, batch_size: int = 64, progress: bool = False):
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.inner.embed(missing, batch_size, progress), strict=True))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), dtype=np.float32)


def sample_persona(folder: Path):
    """A copy of the sample persona (settings; exports and notes linked) under `folder`."""
    from training.persona import Persona

    sample = REPO / "persona_data" / "sample"
    copy = folder / "sample"
    copy.mkdir(parents=True)
    (copy / "persona.toml").write_bytes((sample / "persona.toml").read_bytes())
    for part in ("exports", "knowledge"):
        (copy / part).symlink_to(sample / part)
    return Persona.load(copy)


def prepare(persona, count_tokens, embedder) -> None:
    from training.config import PrepareConfig
    from training.prepare import prepare as run_prepare

    run_prepare([persona.exports], persona, PrepareConfig(me=list(persona.me)), count_tokens,
                embedder=embedder)


# -- 3. synthesized corrections --------------------------------------------------------------------


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def positions(val: list[dict], n: int) -> list[tuple[dict, int]]:
    """(sample, index of one of the person's replies that answers a message): every sample's last
    reply first, then earlier ones, `n` in all, in a stable order."""
    found = []
    for s in val:
        replies = [i for i, m in enumerate(s["messages"]) if m["role"] == "assistant" and i >= 2
                   and s["messages"][i - 1]["role"] == "user"]
        for depth, i in enumerate(reversed(replies)):
            found.append((depth, _rank(f"{s['conversation']}:{i}"), s, i))
    found.sort(key=lambda f: f[:2])
    return [(s, i) for _, _, s, i in found[:n]]


def recalled_for(sample: dict, i: int, persona_index, embedder, count_tokens) -> list:
    """What serving would recall for the message before reply `i` (as prepare gives samples)."""
    from training.index import query_of, recall
    from training.prompt import RECALL_TOKENS, fit_recalled

    query = query_of(sample["messages"][: i + 1])
    if not query:
        return []
    found = recall(persona_index, embedder.embed([query])[0], sample["conversation"])
    return fit_recalled(found, count_tokens, RECALL_TOKENS)


def clone_replies(model, tokenizer, prompts: list[list[dict]], others: list[set[str]]) -> list[str]:
    """What the clone says to each prompt, as serving sends it (messages joined by lines)."""
    import torch

    from bot.postprocess import to_messages
    from training.generate import generate_turns

    torch.manual_seed(0)
    out = []
    for k in range(0, len(prompts), 8):
        turns = generate_turns(model, tokenizer, prompts[k : k + 8], max_new_tokens=64)
        for j, (text, cut) in enumerate(turns):
            out.append("\n".join(to_messages(text, others[k + j], truncated=cut)))
    return out


def speakers_of(context: list[dict]) -> set[str]:
    """Who else speaks (group chats name them: "Dana: ..."), for post-processing as serving does."""
    names = {m["content"].split(":", 1)[0] for m in context if m["role"] == "user" and ":" in m["content"]}
    return {n for n in names if 0 < len(n) <= 32 and "\n" not in n}


def synthesize(persona, data: Path, model, tokenizer, embedder, count_tokens, n: int) -> list[dict]:
    """Corrections of the clone's replies to validation conversations: the person's real reply is
    the owner's text."""
    from training.encode import load_jsonl
    from training.index import PersonaIndex
    from training.prompt import system_prompt

    persona_index = PersonaIndex.load(data / "index")
    chosen = positions(load_jsonl(data / "val.jsonl"), n)
    items = []
    for s, i in chosen:
        recalled = recalled_for(s, i, persona_index, embedder, count_tokens)
        items.append({"id": _rank(f"{s['conversation']}:{i}")[:16], "conversation": s["conversation"],
                      "context": s["messages"][1:i], "recalled": [asdict(r) for r in recalled],
                      "text": s["messages"][i]["content"],
                      "system": system_prompt(persona, recalled)})
    prompts = [[{"role": "system", "content": c["system"]}, *c["context"]] for c in items]
    speakers = [speakers_of(c["context"]) for c in items]
    for c, reply in zip(items, clone_replies(model, tokenizer, prompts, speakers), strict=True):
        c["reply"] = reply
    return [c for c in items if c["reply"] and c["reply"] != c["text"]]  # a pair needs two answers


def hold_out(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(trained, held out): whole conversations held out until they hold a fifth of the items."""
    convs = sorted({c["conversation"] for c in items}, key=_rank)
    held: set[str] = set()
    for conv in convs:
        if sum(c["conversation"] in held for c in items) >= HELD_OUT * len(items):
            break
        held.add(conv)
    trained = [c for c in items if c["conversation"] not in held]
    return trained, [c for c in items if c["conversation"] in held]


def store(persona, items: list[dict]) -> None:
    from training import corrections

    path = corrections.corrections_file(persona.root)
    for c in items:
        corrections.add(path, reply_id=c["id"], context=c["context"], reply=c["reply"], text=c["text"],
                        recalled=c["recalled"], source="benchmark")


# -- 4. training -----------------------------------------------------------------------------------


def train_one(data: Path, out: Path, steps: int, seed: int, preference: str, args) -> dict:
    from training.train import TrainConfig, train

    tuned = {k: getattr(args, k) for k in TUNED}
    cfg = TrainConfig(data=data, out=out, base=args.base, max_steps=steps, seed=seed, eval_steps=10**6,
                      save_steps=10**6, activate=False, preference=preference, **tuned)
    started = time.monotonic()
    result = train(cfg)
    gc.collect()
    m = result.manifest["metrics"]
    return {"version": result.version, "seconds": round(time.monotonic() - started, 1),
            "val_perplexity": m["val_perplexity"], "steps": m["steps"], "preference": m["preference"],
            "train_samples": result.manifest["dataset"]["train_samples"]}


# -- 5. scoring ------------------------------------------------------------------------------------


def reply_row(c: dict, answer: str, tokenizer) -> dict:
    """The answer labelled alone after the correction's prompt (its end-of-turn token included)."""
    from training.encode import IGNORE, encode

    prompt = [{"role": "system", "content": c["system"]}, *c["context"]]
    prefix = len(encode(prompt, tokenizer, add_generation_prompt=True).input_ids)
    e = encode([*prompt, {"role": "assistant", "content": answer}], tokenizer)
    return {"input_ids": e.input_ids, "labels": [IGNORE] * prefix + e.labels[prefix:]}


def nll_of(model, row: dict, pad_id: int) -> tuple[float, int]:
    import torch

    from training.encode import collate, token_nll

    with torch.no_grad():
        nll, n = token_nll(model, collate([row], pad_id))
    return float(nll), n


def score(model, tokenizer, items: list[dict]) -> dict:
    """Perplexity of the owner's replies, the pairs whose owner reply is the likelier, and each
    pair's two summed negative log-likelihoods (`nll`: owner's, clone's old reply)."""
    model.eval()
    pad = tokenizer.pad_token_id
    owner_nll = owner_tokens = 0.0
    won = won_per_token = 0
    pairs = []
    for c in items:
        own, n_own = nll_of(model, reply_row(c, c["text"], tokenizer), pad)
        old, n_old = nll_of(model, reply_row(c, c["reply"], tokenizer), pad)
        owner_nll, owner_tokens = owner_nll + own, owner_tokens + n_own
        won += own < old  # log-probability summed over the reply: -nll
        won_per_token += own / n_own < old / n_old
        pairs.append([round(own, 4), round(old, 4)])
    return {"perplexity": round(math.exp(owner_nll / owner_tokens), 3), "pairs": len(items),
            "owner_preferred": round(won / len(items), 3),
            "owner_preferred_per_token": round(won_per_token / len(items), 3), "nll": pairs}


def moved_towards_owner(scores: dict, reference: dict) -> float:
    """The share of pairs in which the adapter, against `reference`, raised the owner's reply's
    log-probability more than the old reply's: DPO's implicit reward accuracy. Plain
    log-probability rarely favours the owner: the old reply is a short sample of `before` itself
    (about 2 nats a token), the owner's a person's longer words (3-4). Against `before` any
    retrain moves most pairs (a new seed finds before's own samples less likely), so the fair
    references are (a), the retrain without corrections, and, for DPO, its supervised state (b)."""
    now, then = scores["nll"], reference["nll"]
    return round(sum((o0 - o) > (r0 - r) for (o, r), (o0, r0) in zip(now, then, strict=True)) / len(now), 3)


def references(name: str) -> tuple[str, ...]:
    """The runs `name` is fairly compared with: (b) with (a); (c) and every DPO variant (`c_...`,
    all trained on (b)'s supervised state) with (a) and (b); before and (a) with none."""
    if name.startswith("c_"):
        return ("a_no_corrections", "b_sft")
    return ("a_no_corrections",) if name == "b_sft" else ()


def add_moves(runs: dict) -> None:
    """Each run's moved_towards_owner against its fair references, on the held-out and the
    trained pairs."""
    for name, r in runs.items():
        for ref in references(name):
            for part in ("held_out", "trained"):
                share = moved_towards_owner(r[part], runs[ref][part])
                r[part].setdefault("moved_towards_owner", {})[ref] = share


def score_version(out: Path, version: str, held: list[dict], trained: list[dict], base: str | None) -> dict:
    from training import adapters

    model, tokenizer, _ = adapters.load(out, version, base=base)
    scores = {"held_out": score(model, tokenizer, held), "trained": score(model, tokenizer, trained)}
    del model
    gc.collect()
    return scores


def dpo_variant(out: Path, sft_version: str, data: Path, lr: float, held: list[dict], trained: list[dict],
                args) -> dict:
    """The DPO stage with another learning rate on (b)'s adapter, which is (c)'s supervised state
    (the same data, seed and steps), scored in memory: a setting tried without a whole retrain."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from training import adapters
    from training.base_model import load_model
    from training.preference import train_preferences
    from training.train import TrainConfig, load_pairs, load_split, mean_nll, pick_precision

    folder, manifest = adapters.resolve(out, sft_version)
    base = adapters.locate_base(manifest, folder, args.base)
    model = PeftModel.from_pretrained(load_model(base), str(folder), is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    cfg = TrainConfig(data=data, base=args.base, seed=1, **{k: getattr(args, k) for k in TUNED}
                      | {"preference_lr": lr})
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        stage = train_preferences(model, tokenizer, load_pairs(data, tokenizer, cfg.max_length), cfg,
                                     Path(work), pick_precision("auto"))
    val_nll, _ = mean_nll(model, load_split(data, "val", tokenizer, cfg.max_length), tokenizer.pad_token_id)
    result = {"seconds": round(time.monotonic() - started, 1), "val_perplexity": round(math.exp(val_nll), 3),
              "preference": stage, "held_out": score(model, tokenizer, held),
              "trained": score(model, tokenizer, trained)}
    del model
    gc.collect()
    return result


# -- the run ---------------------------------------------------------------------------------------


def partial(name: str, result: dict) -> None:
    """Each adapter's figures as soon as they are known (stderr): a long run cut short keeps them."""
    print(json.dumps({"run": name, **result}), file=sys.stderr, flush=True)



def run(args) -> dict:
    from training import adapters
    from training.base_model import load_tokenizer, token_counter

    timings, started = {}, time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        persona = sample_persona(Path(tmp))
        count_tokens, embedder = token_counter(load_tokenizer()), CachedEmbedder()
        prepare(persona, count_tokens, embedder)
        plain = Path(tmp) / "plain"
        shutil.copytree(persona.dataset, plain)
        timings["prepare"] = time.monotonic() - started

        out = persona.adapters
        runs = {"before": train_one(plain, out, args.steps, 0, "none", args)}
        model, tokenizer, _ = adapters.load(out, runs["before"]["version"], base=args.base)
        items = synthesize(persona, plain, model, tokenizer, embedder, count_tokens, args.corrections)
        del model
        gc.collect()
        trained, held = hold_out(items)
        store(persona, trained)
        prepare(persona, count_tokens, embedder)  # what `clone retrain` does: corrections included
        card = json.loads((persona.dataset / "card.json").read_text())
        timings["before_and_corrections"] = time.monotonic() - started - timings["prepare"]

        runs["a_no_corrections"] = train_one(plain, out, args.steps, 1, "none", args)
        runs["b_sft"] = train_one(persona.dataset, out, args.steps, 1, "none", args)
        runs["c_sft_dpo"] = train_one(persona.dataset, out, args.steps, 1, "dpo", args)
        for name in RUNS:
            runs[name] |= score_version(out, runs[name]["version"], held, trained, args.base)
        for lr in args.dpo_lrs:
            name = f"c_dpo_lr_{lr:g}"
            runs[name] = dpo_variant(out, runs["b_sft"]["version"], persona.dataset, lr, held, trained, args)
        add_moves(runs)
        for name, r in runs.items():
            partial(name, r)
    return {"steps": args.steps, "corrections": {"made": len(items), "trained": len(trained),
                                                 "held_out": len(held), "card": card.get("corrections")},
            "settings": {k: getattr(args, k) for k in TUNED},
            "runs": runs, "timings": {k: round(v, 1) for k, v in timings.items()},
            "seconds": round(time.monotonic() - started, 1)}


def print_table(result: dict) -> None:
    runs, before = result["runs"], result["runs"]["before"]["held_out"]
    c = result["corrections"]
    print(f"{c['made']} corrections: {c['trained']} trained on, {c['held_out']} held out; "
          f"{result['steps']} supervised steps each; {result['settings']}")
    print(f"{'':18}{'held-out ppl':>13}{'/ before':>9}{'owner wins':>11}{'per token':>10}"
          f"{'moved vs (a)':>13}{'vs (b)':>7}{'trained wins':>13}{'chat val ppl':>13}{'seconds':>9}")

    def moved(r: dict, ref: str) -> str:
        share = r["held_out"].get("moved_towards_owner", {}).get(ref)
        return "" if share is None else f"{share:.0%}"

    for name in runs:
        r, h = runs[name], runs[name]["held_out"]
        print(f"{name:18}{h['perplexity']:>13.2f}{h['perplexity'] / before['perplexity']:>9.3f}"
              f"{h['owner_preferred']:>11.0%}{h['owner_preferred_per_token']:>10.0%}"
              f"{moved(r, 'a_no_corrections'):>13}{moved(r, 'b_sft'):>7}"
              f"{r['trained']['owner_preferred']:>13.0%}{r['val_perplexity']:>13.2f}{r['seconds']:>9.0f}")
    dpo = runs["c_sft_dpo"]["preference"]
    if dpo:
        print(f"DPO stage: {dpo['pairs']} pairs, {dpo['steps']} steps in {dpo['runtime_s']} s, "
              f"last reward accuracy {dpo['reward_accuracy']}, margin {dpo['reward_margin']}")
    print(f"whole run: {result['seconds'] / 60:.1f} minutes")


def main() -> None:
    from training.config import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="supervised steps of every adapter")
    ap.add_argument("--corrections", type=int, default=60, help="corrections to synthesize")
    for name in TUNED:
        default = TrainConfig.__dataclass_fields__[name].default  # `clone retrain`'s
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--dpo-lrs", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="more DPO learning rates to try on (b)'s adapter, e.g. 1e-4,2e-4")
    ap.add_argument("--base", help="another base model folder (a tiny one checks the harness quickly)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
