"""The engine's overhead over a bare `model.generate` on the same prompt.

Each of N iterations sends one message to `Engine.handle` (in-process memory, greedy, exactly
`--new-tokens` new tokens) and, alternately before or after it, runs a bare `model.generate` on
the identical input ids: the messages the engine builds (`engine.prompt` over the channel's
recalled history) encoded by `training.encode.encode`, with the same generation arguments. What
the engine adds: memory recall and append, prompt building and token counting, encoding, the
batching queue and its worker thread, decoding and post-processing.

    python benchmarks/engine_overhead.py             # 10 calls each
    python benchmarks/engine_overhead.py -n 6 --json
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
from training.encode import encode  # noqa: E402
from training.persona import Persona  # noqa: E402

MESSAGES = [
    "hey, are you coming to the party on saturday?",
    "did you see the match last night? unbelievable ending",
    "can you send me the notes from today's lecture please",
    "what do you think about moving the meeting to friday?",
    "I just finished that book you recommended, loved it",
]


class FixedLengthBackend(LocalBackend):
    """LocalBackend forcing exactly max_new_tokens new tokens, so both sides generate as much."""

    def generate_batch(self, conversations: list[list[dict[str, str]]]) -> list[Generated]:
        real = self.model.generate

        def generate(*args, **kwargs):
            return real(*args, **kwargs, min_new_tokens=kwargs["max_new_tokens"])

        self.model.generate = generate  # the worker thread is the model's only user here
        try:
            return super().generate_batch(conversations)
        finally:
            del self.model.generate  # back to the class's method


async def run(args: argparse.Namespace) -> dict:
    base = resolve_base()
    tokenizer = load_tokenizer(base)
    model = load_model(base).eval()
    settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0, max_batch=1)
    backend = FixedLengthBackend(model, tokenizer, settings)
    engine = Engine(Persona(name="Sam"), backend, EmbeddedMemory(None), token_counter(tokenizer))

    @torch.no_grad()
    def bare(ids: list[int]) -> int:
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            repetition_penalty=settings.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out.shape[1] - len(ids)

    async def one(i: int, engine_first: bool) -> tuple[float, float, int]:
        message = Incoming("bench", "c", "u1", "Alex", MESSAGES[i % len(MESSAGES)])
        # The prompt the engine will build: the same recall, the same prompt contract.
        history, _ = await engine.memory.recall(engine.key(message.platform, message.channel))
        ids = encode(engine.prompt(history, message), tokenizer, add_generation_prompt=True).input_ids
        timed: dict[str, float] = {}
        for side in (["engine", "bare"] if engine_first else ["bare", "engine"]):
            started = time.perf_counter()
            if side == "engine":
                await engine.handle(message)
            else:
                new = bare(ids)
                assert new == args.new_tokens, new
            timed[side] = time.perf_counter() - started
        return timed["engine"], timed["bare"], len(ids)

    await one(0, True)  # warm-up (first-call costs), then a fresh memory for the measured calls
    engine.memory = EmbeddedMemory(None)
    engine_s, bare_s, prompt_lengths = [], [], []
    for i in range(args.n):
        e, b, n = await one(i, engine_first=i % 2 == 0)
        engine_s.append(e)
        bare_s.append(b)
        prompt_lengths.append(n)
        print(f"call {i + 1}/{args.n}: prompt {n} tokens, engine {e:.3f}s, bare {b:.3f}s", flush=True)
    await backend.close()
    total_e, total_b = sum(engine_s), sum(bare_s)
    return {
        "calls": args.n,
        "max_new_tokens": args.new_tokens,
        "prompt_tokens": prompt_lengths,
        "torch_threads": torch.get_num_threads(),
        "engine_seconds": round(total_e, 3),
        "bare_seconds": round(total_b, 3),
        "engine_per_call_s": round(total_e / args.n, 4),
        "bare_per_call_s": round(total_b / args.n, 4),
        "overhead_pct": round((total_e / total_b - 1) * 100, 2),
        "overhead_per_call_ms": round((total_e - total_b) / args.n * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="calls on each side")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"\n{args.n} calls, {args.new_tokens} new tokens each (greedy), prompts of "
        f"{min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens"
    )
    print(f"Engine.handle     {result['engine_per_call_s']:.3f} s/call")
    print(f"bare generate     {result['bare_per_call_s']:.3f} s/call")
    print(
        f"overhead: {result['overhead_pct']:+.1f} % ({result['overhead_per_call_ms']:+.1f} ms/call; "
        f"target <= 10 %)"
    )


if __name__ == "__main__":
    main()
