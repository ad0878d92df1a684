"""Telegram adapter under load: many group chats at once through the fake Bot API, with a tiny model.

`--messages` updates (@mentions of the bot) arrive at `--rate` messages/s, spread at random (seeded)
over `--chats` group chats of `--users` people each, at the real python-telegram-bot Application
(`bot.telegram.build_application`) polling a local fake Bot API (tests/fake_telegram.py), in front
of the real Engine, a real `LocalBackend` on a tiny random two-layer llama with the packaged
tokenizer (as tests/conftest.py builds it), real `RedisMemory` and a real `Gate` with its state in
Redis (rate limit off). Two set-ups in one run, each with a fresh fake, backend, memory and persona
(so fresh Redis keys):

  baseline  concurrent_updates=False, python-telegram-bot's own default: one update at a time
  ours      concurrent_updates=True, as `clone serve` runs it: chats in parallel (one at a time
            within a chat), so the backend's queue batches replies across chats

Each message carries its id (`#<id>`, ids counted per chat in arrival order). Checks, as PASS/FAIL
lines (the exit status is 1 when one fails):

  - every message is answered exactly once: the engine handles it once, and exactly one first piece
    quotes it (`reply_parameters`), or none when the model's output post-processed to nothing
    (counted as "empty"); busy replies (`bot.engine.BUSY_REPLY`) are counted apart;
  - order is kept within each chat: the engine takes, and the fake receives, each chat's messages
    in arrival order;
  - memory is bounded: every chat's Redis turn list holds at most `max_turns` turns within the
    token budget, and no per-chat lock is left behind; peak and current RSS are printed.

It prints throughput (answered messages per second, first arrival to last reply) and reply
latency (arrival to the first piece of the reply reaching the fake) p50/p95/max, and the ratios
ours / baseline. Redis: 127.0.0.1:6379 or `REDIS_URL`; the run's keys are deleted at the end.

    python benchmarks/telegram_load.py                              # 1,000 messages, 50 chats
    python benchmarks/telegram_load.py --messages 100 --chats 10    # quick check
    python benchmarks/telegram_load.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from bot.chunks import TELEGRAM_LIMIT, split_message  # noqa: E402
from bot.engine import BUSY_REPLY, Engine, Generated, Incoming  # noqa: E402
from bot.gate import Gate, RedisState, Rules  # noqa: E402
from bot.generation import GenerationSettings, LocalBackend  # noqa: E402
from bot.memory import ChannelKey, RedisMemory, key_part  # noqa: E402
from bot.telegram import PLATFORM, build_application  # noqa: E402
from tests.fake_telegram import BOT, FakeTelegram  # noqa: E402
from training.base_model import load_model, load_tokenizer, resolve_base, token_counter  # noqa: E402
from training.persona import Persona  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MENTION = "@" + BOT["username"]
TAG = re.compile(r"#(\d+)$")
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Finn", "Gus", "Hana", "Ivo", "Jade"]
PHRASES = [
    "are you coming on saturday?",
    "did you see the match last night",
    "can you send me the notes from today",
    "what do you think about moving it to friday?",
    "I finished that book you recommended",
    "still on for lunch tomorrow?",
    "my laptop died again, what should I buy",
    "lol that's hilarious",
]


class TimedFake(FakeTelegram):
    """The fake Bot API, also noting when each sendMessage arrives (it answers at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[tuple[float, dict[str, Any]]] = []

    def _message(self, params: dict[str, Any]) -> dict[str, Any]:
        self.sends.append((time.perf_counter(), params))
        return super()._message(params)


class BatchCountingBackend(LocalBackend):
    """LocalBackend that notes the size of each batch it generates."""

    def __init__(self, model, tokenizer, settings: GenerationSettings) -> None:
        super().__init__(model, tokenizer, settings)
        self.batches: list[int] = []

    def generate_batch(self, conversations: list[list[dict[str, str]]]) -> list[Generated]:
        self.batches.append(len(conversations))
        return super().generate_batch(conversations)


def build_tiny_model(tokenizer, folder: Path):
    """A randomly initialised two-layer llama with the packaged tokenizer (as tests/conftest.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.4,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(resolve_base(str(folder)))


def plan(args: argparse.Namespace) -> list[tuple[int, int, dict[str, Any]]]:
    """(chat id, message id, user) of every message in arrival order: chats drawn at random
    (seeded), message ids counted per chat, every chat at least once."""
    rng = random.Random(args.seed)
    chats = [-(1000 + c) for c in range(args.chats)]
    order = chats[: args.messages] + [rng.choice(chats) for _ in range(args.messages - len(chats))]
    rng.shuffle(order)
    next_id: Counter[int] = Counter()
    out = []
    for chat in order:
        next_id[chat] += 1
        c = -chat - 1000
        k = rng.randrange(args.users)
        user = {"id": 100_000 + c * 100 + k, "is_bot": False, "first_name": NAMES[k % len(NAMES)],
                "last_name": f"C{c}"}
        out.append((chat, next_id[chat], user))
    return out


def group_message(chat: int, message_id: int, user: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    text = f"{MENTION} {rng.choice(PHRASES)} #{message_id}"
    return {"message_id": message_id, "date": int(time.time()), "from": user,
            "chat": {"id": chat, "type": "group", "title": f"group {chat}"}, "text": text,
            "entities": [{"type": "mention", "offset": 0, "length": len(MENTION)}]}


def rss_mib() -> tuple[float, float]:
    """(peak, current) resident memory of this process, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    current = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return round(peak, 1), round(current, 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def cleanup(persona: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"clone:{key_part(persona)}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return len(keys)


async def drive(
    name: str, concurrent: bool, engine: Engine, gate: Gate, fake: TimedFake, backend: LocalBackend,
    messages: list, arrivals: dict, handled: dict, args: argparse.Namespace,
) -> tuple[float, float]:
    """Start the Application against the fake, send the messages at `args.rate`, wait until every
    one is handled and its reply sent (or nothing moves for `args.stall` s), shut down; the
    times of the first and last arrival."""
    rng = random.Random(args.seed + 1)
    await fake.start()
    app = build_application(fake.token, engine, base_url=fake.base_url, gate=gate,
                            concurrent_updates=concurrent)
    logging.getLogger("telegram").setLevel(logging.WARNING)  # build_application sets INFO
    try:
        await app.initialize()
        await app.start()
        await app.updater.start_polling(poll_interval=0, timeout=1)
        started = time.perf_counter()
        for i, (chat, message_id, user) in enumerate(messages):
            delay = started + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            fake.queue(group_message(chat, message_id, user, rng))
            arrivals[(chat, message_id)] = time.perf_counter()
        last_arrival = time.perf_counter()

        def progress() -> tuple[int, int]:
            return sum(len(v) for v in handled.values()), len(fake.sends)

        def finished() -> bool:
            expected = sum(len(split_message(r, TELEGRAM_LIMIT)) for v in handled.values() for rs in v
                           for r in rs)
            return len(handled) == len(messages) and len(fake.sends) >= expected

        seen, still_since = progress(), time.perf_counter()
        while not finished():
            await asyncio.sleep(0.05)
            now = progress()
            if now != seen:
                seen, still_since = now, time.perf_counter()
            elif time.perf_counter() - still_since > args.stall:
                print(f"{name}: no progress for {args.stall:.0f} s, giving up waiting", file=sys.stderr,
                      flush=True)
                break
        await asyncio.sleep(0.5)  # anything sent twice would show up now
    finally:
        if app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        await app.shutdown()
        await fake.stop()
        await backend.close()
    return started, last_arrival


async def inspect_memory(memory: RedisMemory, persona: str, chats: set[int]) -> tuple[dict, dict, list, int]:
    """Each chat's turn count and token total in Redis, the chats whose remembered user turns are out
    of arrival order, and the bytes Redis holds for the persona."""
    lengths, budgets, memory_out = {}, {}, []
    for chat in chats:
        key = ChannelKey(persona, PLATFORM, str(chat)).redis_key()
        items = [json.loads(raw) for raw in await memory.client.lrange(key, 0, -1)]
        lengths[chat] = len(items)
        budgets[chat] = sum(t["t"] for t in items)
        user_tags = [int(m.group(1)) for t in items if not t["p"] and (m := TAG.search(t["x"]))]
        if user_tags != sorted(user_tags):
            memory_out.append(chat)
    redis_bytes = 0
    async for k in memory.client.scan_iter(f"clone:{key_part(persona)}:*", count=1000):
        redis_bytes += await memory.client.memory_usage(k) or 0
    return lengths, budgets, memory_out, redis_bytes


async def run_setup(name: str, concurrent: bool, model, tokenizer, args: argparse.Namespace) -> dict:
    persona = Persona(name=f"bench-tg-{name}-{uuid.uuid4().hex[:10]}")
    settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=args.temperature,
                                  max_batch=args.max_batch, max_queue=args.max_queue)
    backend = BatchCountingBackend(model, tokenizer, settings)
    memory = RedisMemory(REDIS_URL, count_tokens=token_counter(tokenizer))
    gate = Gate(Rules(messages_per_minute=0), persona.id, RedisState(REDIS_URL))
    engine = Engine(persona, backend, memory, token_counter(tokenizer))
    fake = TimedFake()

    handled: dict[tuple[int, int], list[list[str]]] = defaultdict(list)  # what the engine returned
    handle_order: dict[int, list[int]] = defaultdict(list)
    real_handle = engine.handle

    async def spy(incoming: Incoming) -> list[str]:
        key = (int(incoming.channel), int(TAG.search(incoming.text).group(1)))
        handle_order[key[0]].append(key[1])
        replies = await real_handle(incoming)
        handled[key].append(replies)
        return replies

    engine.handle = spy
    torch.manual_seed(args.seed)
    messages = plan(args)
    arrivals: dict[tuple[int, int], float] = {}
    rss_before = rss_mib()

    try:
        started, last_arrival = await drive(name, concurrent, engine, gate, fake, backend, messages,
                                            arrivals, handled, args)
        locks_left = len(engine._order) + len(memory._locks)
        lengths, budgets, memory_out, redis_bytes = await inspect_memory(
            memory, persona.id, {m[0] for m in messages})
    finally:
        await memory.close()
        await gate.close()
        deleted = await cleanup(persona.id)
    rss_after = rss_mib()

    # Replies as the fake saw them: the first piece of each quotes the message it answers.
    first_pieces: dict[tuple[int, int], list[float]] = defaultdict(list)
    quoted_order: dict[int, list[int]] = defaultdict(list)
    texts: dict[tuple[int, int], str] = {}
    for at, params in fake.sends:
        if "reply_parameters" not in params:
            continue
        chat, mid = int(params["chat_id"]), json.loads(params["reply_parameters"])["message_id"]
        first_pieces[(chat, mid)].append(at)
        quoted_order[chat].append(mid)
        texts[(chat, mid)] = params.get("text", "")

    keys = [(chat, mid) for chat, mid, _ in messages]
    twice_handled = [k for k in keys if len(handled.get(k, [])) > 1]
    never_handled = [k for k in keys if not handled.get(k)]
    empty = [k for k in keys if handled.get(k) and not any(handled[k]) and not first_pieces.get(k)]
    busy = [k for k in keys if len(first_pieces.get(k, [])) == 1 and texts[k] == BUSY_REPLY]
    answered = [k for k in keys if len(first_pieces.get(k, [])) == 1 and texts[k] != BUSY_REPLY]
    sent_twice = [k for k in keys if len(first_pieces.get(k, [])) > 1]
    unsent = [k for k in keys if handled.get(k) and any(handled[k]) and not first_pieces.get(k)]
    strangers = [k for k in first_pieces if k not in arrivals]
    exactly_once = not (twice_handled or never_handled or sent_twice or unsent or strangers)

    handle_out = [c for c, ids in handle_order.items() if ids != sorted(ids)]
    sent_out = [c for c, ids in quoted_order.items() if ids != sorted(ids)]

    latencies = [first_pieces[k][0] - arrivals[k] for k in answered]
    tenths: list[list[float]] = [[] for _ in range(10)]  # by arrival: does the set-up keep up?
    answered_set = set(answered)
    for i, k in enumerate(keys):
        if k in answered_set:
            tenths[i * 10 // len(keys)].append(first_pieces[k][0] - arrivals[k])
    last_reply = max((first_pieces[k][0] for k in answered), default=started)
    last_send = max((at for at, _ in fake.sends), default=started)
    first_arrival = min(arrivals.values())
    per_chat = Counter(m[0] for m in messages)
    batches = backend.batches
    result = {
        "concurrent_updates": concurrent,
        "messages": len(messages),
        "offered_rate": round((len(messages) - 1) / max(last_arrival - first_arrival, 1e-9), 2),
        "seconds": round(max(last_reply, last_send) - first_arrival, 2),
        "answered": len(answered),
        "busy": len(busy),
        "empty": len(empty),
        "throughput": round(len(answered) / max(last_reply - first_arrival, 1e-9), 2),
        "latency_s": {
            "p50": round(percentile(latencies, 50), 3) if latencies else None,
            "p95": round(percentile(latencies, 95), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None,
            "mean": round(statistics.fmean(latencies), 3) if latencies else None,
        },
        "p50_latency_s_by_tenth_of_arrivals": [round(percentile(t, 50), 2) if t else None for t in tenths],
        "batches": len(batches),
        "mean_batch": round(statistics.fmean(batches), 2) if batches else 0,
        "max_batch_seen": max(batches, default=0),
        "messages_per_chat_max": max(per_chat.values()),
        "turns_per_chat_max": max(lengths.values(), default=0),
        "turn_tokens_per_chat_max": max(budgets.values(), default=0),
        "max_turns": memory.max_turns,
        "token_budget": memory.token_budget,
        "redis_bytes": redis_bytes,
        "redis_keys_deleted": deleted,
        "locks_left": locks_left,
        "rss_mib_before": {"peak": rss_before[0], "current": rss_before[1]},
        "rss_mib_after": {"peak": rss_after[0], "current": rss_after[1]},
        "problems": {
            "handled_twice": twice_handled[:10], "never_handled": never_handled[:10],
            "sent_twice": sent_twice[:10], "handled_but_not_sent": unsent[:10],
            "quoting_unknown_messages": strangers[:10], "handled_out_of_order_chats": handle_out[:10],
            "sent_out_of_order_chats": sent_out[:10], "memory_out_of_order_chats": memory_out[:10],
        },
    }
    result["checks"] = {
        "answered exactly once": (
            exactly_once,
            f"{len(messages) - len(never_handled) - len(twice_handled)}/{len(messages)} handled once, "
            f"{len(answered)} replied, {len(busy)} busy, {len(empty)} empty (nothing to send); "
            f"{len(twice_handled)} handled twice, {len(never_handled)} never, {len(sent_twice)} sent "
            f"twice, {len(unsent)} handled but not sent",
        ),
        "order kept within each chat": (
            not (handle_out or sent_out or memory_out),
            f"chats out of order: {len(handle_out)} handled, {len(sent_out)} sent, "
            f"{len(memory_out)} in memory",
        ),
        "memory bounded": (
            all(n <= memory.max_turns for n in lengths.values())
            and all(t <= memory.token_budget for t in budgets.values()) and locks_left == 0,
            f"at most {result['turns_per_chat_max']} turns a chat (max_turns {memory.max_turns}; up "
            f"to {result['messages_per_chat_max']} messages a chat), at most "
            f"{result['turn_tokens_per_chat_max']} tokens (budget {memory.token_budget}), "
            f"{locks_left} chat locks left",
        ),
    }
    return result


async def run(args: argparse.Namespace) -> dict:
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(tokenizer, Path(folder))
    # Warm-up, not measured: first-call costs (allocator, kernels) of one and of a full batch.
    warm = BatchCountingBackend(model, tokenizer, GenerationSettings(max_new_tokens=args.new_tokens))
    for size in (1, args.max_batch):
        warm.generate_batch([[{"role": "user", "content": "hello there"}]] * size)
    result: dict = {
        "messages": args.messages, "chats": args.chats, "users_per_chat": args.users, "rate": args.rate,
        "max_new_tokens": args.new_tokens, "temperature": args.temperature, "max_batch": args.max_batch,
        "max_queue": args.max_queue, "torch_threads": torch.get_num_threads(),
    }
    for name, concurrent in (("baseline", False), ("ours", True)):
        print(f"{name}: {args.messages} messages at {args.rate:g}/s ...", file=sys.stderr, flush=True)
        result[name] = await run_setup(name, concurrent, model, tokenizer, args)
    ours, base = result["ours"], result["baseline"]
    result["throughput_ratio"] = (
        round(ours["throughput"] / base["throughput"], 2) if base["throughput"] else None
    )
    if ours["latency_s"]["p95"] and base["latency_s"]["p95"]:
        result["p95_latency_ratio"] = round(ours["latency_s"]["p95"] / base["latency_s"]["p95"], 4)
    result["passed"] = all(ok for s in ("baseline", "ours") for ok, _ in result[s]["checks"].values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--users", type=int, default=4, help="people in each chat")
    parser.add_argument("--rate", type=float, default=10.0, help="arrivals per second")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=GenerationSettings().temperature)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stall", type=float, default=60.0,
                        help="stop waiting after this many seconds without a reply")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.chats < 1 or args.messages < args.chats or args.rate <= 0:
        parser.error("need --chats >= 1, --messages >= --chats and --rate > 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    sys.exit(0 if result["passed"] else 1)


def report(result: dict) -> None:
    print(
        f"\n{result['messages']} messages over {result['chats']} group chats ({result['users_per_chat']} "
        f"people each) at {result['rate']:g}/s; tiny llama, {result['max_new_tokens']} new tokens, "
        f"temperature {result['temperature']:g}, max_batch {result['max_batch']}, max_queue "
        f"{result['max_queue']}, {result['torch_threads']} torch threads"
    )
    print(f"{'':9}{'offered/s':>10}{'seconds':>9}{'answered':>9}{'busy':>6}{'empty':>6}{'msg/s':>8}"
          f"{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'batch':>7}{'peak RSS':>10}")
    for name in ("baseline", "ours"):
        m = result[name]
        lat = {k: (f"{v:8.2f}" if v is not None else f"{'-':>8}") for k, v in m["latency_s"].items()}
        print(
            f"{name:9}{m['offered_rate']:10.1f}{m['seconds']:9.1f}{m['answered']:9d}{m['busy']:6d}"
            f"{m['empty']:6d}{m['throughput']:8.2f}{lat['p50']}{lat['p95']}{lat['max']}"
            f"{m['mean_batch']:7.2f}{m['rss_mib_after']['peak']:8.0f} MiB"
        )
    for name in ("baseline", "ours"):
        m = result[name]
        for check, (ok, detail) in m["checks"].items():
            print(f"{'PASS' if ok else 'FAIL'} {name}: {check}: {detail}")
        problems = {k: v for k, v in m["problems"].items() if v}
        if problems:
            print(f"     {name} problems (chat, message id), first ten: {problems}")
        print(
            f"     {name}: RSS peak {m['rss_mib_before']['peak']:.0f} -> {m['rss_mib_after']['peak']:.0f} "
            f"MiB, current {m['rss_mib_before']['current']:.0f} -> {m['rss_mib_after']['current']:.0f} MiB; "
            f"Redis {m['redis_bytes'] / 1024:.0f} KiB in {m['redis_keys_deleted']} keys (deleted)"
        )
        tenths = " ".join("-" if v is None else f"{v:.2f}" for v in m["p50_latency_s_by_tenth_of_arrivals"])
        print(f"     {name}: p50 latency by tenth of arrivals, s: {tenths}")
    ratio = result.get("p95_latency_ratio")
    p95 = f"p95 latency {ratio:.3f}x (baseline / ours {1 / ratio:.1f}x)" if ratio else "p95 latency: n/a"
    throughput = result["throughput_ratio"]
    throughput = f"{throughput:.2f}x throughput" if throughput else "throughput: n/a"
    print(f"ours / baseline: {throughput}, {p95}")


if __name__ == "__main__":
    main()
