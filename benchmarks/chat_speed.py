"""Replies in a chat (issue 13): what the clone costs once conversations are going, through the engine.

The other side's messages of a few held-out conversations of a prepared persona go, in order, one
channel per conversation, through the engine as `clone chat` builds it (recall on, the served
model behind LocalBackend), every reply forced to `--tokens` new tokens (0: as served, sampled to
the person's natural length). Each turn's prompt is also given to **bare**, the base model in
fp32 through `model.generate` (serve_speed.py's baseline), interleaved turn by turn, and, where
the served model keeps bf16 copies for prompts (bot.generation.HalfWeightLinear on a CPU with
native bf16), to the served path with them switched off ("served, fp16 only"). It prints
per-reply seconds (p50, p95, mean) and their ratios. With `--channels N`, N chats then go on at
once, turn by turn, through engines that send the N messages of a turn together (each after
its own recall, as a bot's channels do; also without the batching gap, and with the batch's
prompts read the other way than served: padded to the longest, or each at its own length,
GenerationSettings.padded_reads) and one that sends them one after another; the ratio of their
times is the throughput of N channels against one at a time.

    python benchmarks/chat_speed.py --persona DIR                # a prepared (and trained) persona
    python benchmarks/chat_speed.py --persona DIR --tokens 0 --chats 3 --turns 8   # as served
    python benchmarks/chat_speed.py --persona DIR --chats 0 --channels 8 --turns 4
    python benchmarks/chat_speed.py --persona DIR --tokens 0 --fp16-only   # without bf16 prompts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_speed import REPO, bare_generate, forced_length, pct, threads_kept

sys.path.insert(0, str(REPO))
from bot.engine import Incoming
from bot.generation import GenerationSettings, HalfWeightLinear, LocalBackend, load_clone
from bot.quiz import quiz_engine
from bot.runtime import index_folder
from training.base_model import load_model, resolve_base
from training.embed import Embedder
from training.encode import encode, load_jsonl
from training.persona import Persona
from training.prompt import without_recall


def chats(val: list[dict], count: int, turns: int) -> list[list[str]]:
    """The other side's messages of the `count` held-out conversations with the most of them."""
    said = [[m["content"] for m in without_recall(s["messages"]) if m["role"] == "user"] for s in val]
    said.sort(key=len, reverse=True)
    return [messages[:turns] for messages in said[:count]]


@contextlib.contextmanager
def fp16_only(model):
    """The served model without its bf16 copies for prompts, for a while."""
    layers = wide_layers(model)
    kept = [(m.wide, m.wide_bias) for m in layers]
    for m in layers:
        m.wide = m.wide_bias = None
    try:
        yield
    finally:
        for m, (wide, bias) in zip(layers, kept, strict=True):
            m.wide, m.wide_bias = wide, bias


def wide_layers(model) -> list[HalfWeightLinear]:
    """The served model's layers that keep a bf16 copy for prompts."""
    return [m for m in model.modules() if isinstance(m, HalfWeightLinear) and m.wide is not None]


def timed(call, *args) -> tuple[float, object]:
    with threads_kept():
        started = time.perf_counter()
        out = call(*args)
        return time.perf_counter() - started, out


async def play(args, persona: Persona) -> dict:
    model, tokenizer, what = load_clone(persona.adapters, None, None, persona.id)
    what += ", fp16 only" if args.fp16_only else ""
    base = load_model(resolve_base(None)).eval()
    as_served = not args.tokens  # sampled to the person's natural length, as the bot replies
    settings = dict(max_new_tokens=args.tokens or 64, natural_length=as_served)
    engine = quiz_engine(persona, model, tokenizer, index_folder(persona, None), Embedder(),
                         settings=GenerationSettings(**settings))
    backend = engine.backend
    assert isinstance(backend, LocalBackend)
    prompts: list[list[dict]] = []
    engine.on_prompt = lambda _key, messages, _recalled: prompts.append(messages)
    served_s: list[float] = []
    inner = backend.generate_batch

    def served(*a, **k):
        t, out = timed(lambda: inner(*a, **k))
        served_s.append(t)
        return out

    backend.generate_batch = served
    times: dict[str, list[float]] = {"bare": [], "served": []}
    tokens: list[int] = []
    torch.manual_seed(0)
    val = load_jsonl(persona.dataset / "val.jsonl")
    if as_served:
        del times["bare"]
    elif wide_layers(model) and not args.fp16_only:
        times["served, fp16 only"] = []
    forced = args.tokens or None
    # --fp16-only: the whole run on the served path before its bf16 copies for prompts.
    whole = fp16_only(model) if args.fp16_only else contextlib.nullcontext()
    with whole, forced_length(model, forced), forced_length(base, forced):
        for c, messages in enumerate(chats(val, args.chats, args.turns)):
            for i, text in enumerate(messages):
                await engine.handle(Incoming("bench", f"chat{c}", "u1", "Alex", text))
                prompt = prompts[-1]
                tokens.append(len(encode(prompt, tokenizer, add_generation_prompt=True).input_ids))
                times["served"].append(served_s[-1])
                if not as_served:
                    times["bare"].append(timed(bare_generate, base, tokenizer, [prompt], args.tokens)[0])
                if "served, fp16 only" in times:
                    with fp16_only(model):
                        times["served, fp16 only"].append(timed(inner, [prompt])[0])
                took = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
                print(f"  chat {c} turn {i + 1}: prompt {tokens[-1]} tokens; {took}", flush=True)
    await engine.backend.close()
    return {"what": what, "tokens_per_reply": args.tokens, "turns": len(times["served"]),
            "seconds": {k: {"p50": round(pct(v, 0.5), 3), "p95": round(pct(v, 0.95), 3),
                            "mean": round(statistics.mean(v), 3)} for k, v in times.items()},
            "prompt_tokens_mean": round(statistics.mean(tokens), 1),
            "load": [round(x, 2) for x in os.getloadavg()]}


async def at_once(args, persona: Persona) -> dict:
    """Seconds per turn of --channels chats: their messages sent together (with the batching gap,
    and without it: GenerationSettings.batch_gap 0), and one at a time."""
    model, tokenizer, _ = load_clone(persona.adapters, None, None, persona.id)
    n = args.tokens or 64
    embedder = Embedder()
    served = GenerationSettings()
    other_read = f"together, prompts {'at their own lengths' if served.padded_reads else 'padded'}"
    ways = {"together": {}, "together, no gap": {"batch_gap": 0.0},
            other_read: {"padded_reads": not served.padded_reads}, "one at a time": {"batch_gap": 0.0}}
    index = index_folder(persona, None)
    engines = {name: quiz_engine(persona, model, tokenizer, index, embedder, settings=GenerationSettings(
                   max_new_tokens=n, natural_length=False, **changed)) for name, changed in ways.items()}
    played = chats(load_jsonl(persona.dataset / "val.jsonl"), args.channels, args.turns)
    times: dict[str, list[float]] = {name: [] for name in engines}
    torch.manual_seed(0)
    with forced_length(model, n):
        for i in range(min(len(m) for m in played)):
            said = [Incoming("bench", f"chat{c}", "u1", "Alex", m[i]) for c, m in enumerate(played)]
            for name, engine in engines.items():
                started = time.perf_counter()
                if name == "one at a time":
                    for m in said:
                        await engine.handle(m)
                else:
                    await asyncio.gather(*(engine.handle(m) for m in said))
                times[name].append(time.perf_counter() - started)
            took = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
            print(f"  turn {i + 1} of {len(said)} chats: {took}", flush=True)
    for engine in engines.values():
        await engine.backend.close()
    alone = sum(times["one at a time"])
    return {"channels": len(played), "turns": len(times["together"]),
            "seconds": {k: round(sum(v), 2) for k, v in times.items()},
            "throughput_ratio": {k: round(alone / sum(v), 3) for k, v in times.items()
                                 if k != "one at a time"}}


def report(result: dict) -> None:
    s = result["seconds"]
    length = f"{result['tokens_per_reply']} new tokens" if result["tokens_per_reply"] else "as served"
    print(f"\n{result['turns']} turns of {result['what']}, {length} a reply; "
          f"prompts {result['prompt_tokens_mean']} tokens on average")
    for name, v in s.items():
        print(f"  {name:<17} p50 {v['p50']:6.2f} s  p95 {v['p95']:6.2f} s  mean {v['mean']:6.2f} s")
    pairs = [("served", "bare")] if "bare" in s else []
    if "served, fp16 only" in s:
        pairs += [("served", "served, fp16 only"), ("served, fp16 only", "bare")]
    for a, b in pairs:
        print(f"  {a} / {b}: {s[a]['mean'] / s[b]['mean']:.3f}x (means), "
              f"{s[a]['p50'] / s[b]['p50']:.3f}x (p50)")
    result["ratios"] = {f"{a} / {b}": round(s[a]["mean"] / s[b]["mean"], 3) for a, b in pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--persona", type=Path, required=True, help="a prepared persona folder")
    ap.add_argument("--tokens", type=int, default=64,
                    help="new tokens of every reply (0: as served, the served path alone)")
    ap.add_argument("--chats", type=int, default=2, help="held-out conversations played")
    ap.add_argument("--turns", type=int, default=8, help="messages of each played")
    ap.add_argument("--channels", type=int, default=0, help="chats at once, against one at a time")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--fp16-only", action="store_true",
                    help="serve without the bf16 copies for prompts (the path before them)")
    args = ap.parse_args()
    persona = Persona.load(args.persona)
    result: dict = {}
    if args.chats:
        result = asyncio.run(play(args, persona))
        report(result)
    if args.channels:
        result["at_once"] = batched = asyncio.run(at_once(args, persona))
        print(f"\n{batched['channels']} chats, {batched['turns']} turns: {batched['seconds']} s; "
              f"throughput against one at a time: {batched['throughput_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
