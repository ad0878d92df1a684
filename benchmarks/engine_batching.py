"""Engine throughput with eight channels sending at once: LocalBackend batching against one at a time.

Each round, eight channels send one message each to `Engine.handle`:

  sequential  max_batch=1, the eight messages awaited one after another
  batched     max_batch=8, the eight sent together (asyncio.gather), so the backend's queue
              generates them in one left-padded batch

Both run greedy (temperature 0) with every reply forced to exactly `--new-tokens` tokens
(min_new_tokens = max_new_tokens), so both generate the same amount; the tokens really generated
are counted all the same. Rounds alternate between the two set-ups to cancel drift, each set-up
with its own in-process memory, so every channel's history grows the same way in both.

    python benchmarks/engine_batching.py               # 3 rounds of 8 replies each
    python benchmarks/engine_batching.py --rounds 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.engine import Engine, Generated, Incoming  # noqa: E402
from bot.generation import GenerationSettings, LocalBackend  # noqa: E402
from bot.memory import EmbeddedMemory  # noqa: E402
from training.base_model import load_model, load_tokenizer, resolve_base, token_counter  # noqa: E402
from training.persona import Persona  # noqa: E402

MESSAGES = [
    "hey, are you coming to the party on saturday?",
    "did you see the match last night? unbelievable ending",
    "can you send me the notes from today's lecture please",
    "what do you think about moving the meeting to friday?",
    "I just finished that book you recommended, loved it",
    "are we still on for lunch tomorrow at noon?",
    "my laptop died again, any idea what I should buy?",
    "happy birthday!! what are you doing to celebrate?",
]


class CountingBackend(LocalBackend):
    """LocalBackend that forces exactly max_new_tokens new tokens and counts what it generates."""

    def __init__(self, model, tokenizer, settings: GenerationSettings) -> None:
        super().__init__(model, tokenizer, settings)
        self.generated = 0
        self.batches: list[int] = []

    def generate_batch(self, conversations: list[list[dict[str, str]]]) -> list[Generated]:
        real = self.model.generate

        def generate(*args, **kwargs):
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            out = real(*args, **kwargs)
            self.generated += out.shape[0] * (out.shape[1] - kwargs["input_ids"].shape[1])
            return out

        self.model.generate = generate  # the worker thread is the model's only user here
        try:
            self.batches.append(len(conversations))
            return super().generate_batch(conversations)
        finally:
            del self.model.generate  # back to the class's method


def incoming(i: int) -> Incoming:
    return Incoming("bench", f"c{i}", f"u{i}", f"Friend{i}", MESSAGES[i % len(MESSAGES)])


async def run(args: argparse.Namespace) -> dict:
    base = resolve_base()
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    persona = Persona(name="Sam")
    count = token_counter(tokenizer)

    def setup(max_batch: int) -> tuple[Engine, CountingBackend]:
        settings = GenerationSettings(
            max_new_tokens=args.new_tokens, temperature=0, max_batch=max_batch
        )
        backend = CountingBackend(model, tokenizer, settings)
        return Engine(persona, backend, EmbeddedMemory(None), count), backend

    seq_engine, seq_backend = setup(1)
    bat_engine, bat_backend = setup(8)
    # Warm-up on a channel of its own (first-call costs: allocator, kernels, the worker task).
    await seq_engine.handle(Incoming("bench", "warm", "w", "W", "hello"))
    await bat_engine.handle(Incoming("bench", "warm", "w", "W", "hello"))
    seq_backend.generated = bat_backend.generated = 0
    seq_backend.batches.clear()
    bat_backend.batches.clear()

    times = {"sequential": 0.0, "batched": 0.0}
    for r in range(args.rounds):
        order = ["sequential", "batched"] if r % 2 == 0 else ["batched", "sequential"]
        for mode in order:
            started = time.perf_counter()
            if mode == "sequential":
                for i in range(args.channels):
                    await seq_engine.handle(incoming(i))
            else:
                await asyncio.gather(*(bat_engine.handle(incoming(i)) for i in range(args.channels)))
            times[mode] += time.perf_counter() - started
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    await seq_backend.close()
    await bat_backend.close()

    replies = args.rounds * args.channels
    result: dict = {
        "rounds": args.rounds,
        "channels": args.channels,
        "max_new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    for mode, backend in (("sequential", seq_backend), ("batched", bat_backend)):
        result[mode] = {
            "seconds": round(times[mode], 3),
            "replies": replies,
            "generated_tokens": backend.generated,
            "replies_per_s": round(replies / times[mode], 3),
            "tokens_per_s": round(backend.generated / times[mode], 2),
            "batch_sizes": sorted(set(backend.batches)),
        }
    result["speedup_replies"] = round(
        result["batched"]["replies_per_s"] / result["sequential"]["replies_per_s"], 2
    )
    result["speedup_tokens"] = round(
        result["batched"]["tokens_per_s"] / result["sequential"]["tokens_per_s"], 2
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{args.rounds} rounds x {args.channels} channels, {args.new_tokens} new tokens each (greedy)")
    print(f"{'':12} {'seconds':>8} {'replies/s':>10} {'tokens':>7} {'tokens/s':>9}  batch sizes")
    for mode in ("sequential", "batched"):
        m = result[mode]
        print(
            f"{mode:12} {m['seconds']:8.2f} {m['replies_per_s']:10.2f} {m['generated_tokens']:7d} "
            f"{m['tokens_per_s']:9.1f}  {m['batch_sizes']}"
        )
    print(f"batched / sequential: {result['speedup_replies']:.2f}x replies/s, "
          f"{result['speedup_tokens']:.2f}x tokens/s (target >= 3x)")


if __name__ == "__main__":
    main()
