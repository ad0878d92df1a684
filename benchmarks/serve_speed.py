"""Serving speed (issue 13): the same real prompts three ways in one run, interleaved.

  bare    the base model in fp32, `model.generate` on the encoded prompt: the baseline
  today   the serving path before issue 13: LocalBackend.generate_batch with the adapter attached
          (peft), fp32, a fixed 64-token cap
  new     the serving path now: bot.generation.load_clone (the adapter merged into the weights,
          bf16 where the CPU has AMX, else fp16 weights with fp32 arithmetic where fbgemm runs
          them, else fp32) behind LocalBackend, each reply capped at the person's natural
          length (the 95th percentile of their replies in train.jsonl)

Prompts are the held-out samples of a prepared dataset (`--data`, default: the sample persona,
prepared into a temporary folder, about a minute), each cut before its last reply of the person:
system prompt with recalled items and conversation, 100-500 tokens.

Measured, every variant in the same round before the next round (A B C A B C ...), so a change
in the machine's load hits all of them alike:
  same length   every reply forced to `--tokens` new tokens (end of turn suppressed): per-reply
                time p50/p95, tokens/s, for one user and for 8 channels at once (8 concurrent
                LocalBackend.generate calls, which the queue batches; bare: one batch of 8); and
                one user's reply forced to the person's median reply length ("typical")
  first token   time to the first token: a reply of max_new_tokens=1 (prefill and one step)
  as served     sampled replies as the bot makes them (temperature 0.8, top-p 0.9, seeded):
                today capped at 64, new at the natural length; per-reply time and length
  quality       held-out perplexity of the person's replies (training.train.mean_nll over
                training.encode.encode rows, as training.evaluate builds them): the served model
                against the attached fp32 adapter; target within 1%
  --levers L,.. adds, to the same interleaved rounds, single levers: fp32 (merged), bf16-unpacked
                (merged, bf16 without PackedLinear), int8 (merged, torch dynamic quantisation
                with per-channel weight scales), all-threads (`new` on torch's own thread count
                rather than serving_threads', half the cores)

The adapter: `--adapter DIR` (an adapter folder, as `clone train` writes it), else a fresh LoRA
(clone train's default shape: `training.train.with_lora` with TrainConfig's defaults)
whose B matrices are random noise (std `--noise`) instead of zeros, so that merged and attached
differ from the base and from each other as a trained adapter would. It is not a trained
adapter: speed does not depend on the weights' values, perplexity figures do (the 1% check
compares two forms of the same adapter, which is what matters).

    python benchmarks/serve_speed.py                      # sample persona, 5 rounds (~10 min idle)
    python benchmarks/serve_speed.py --rounds 2 --quick   # a check in a few minutes
    python benchmarks/serve_speed.py --levers fp32,int8,all-threads   # single levers beside
    python benchmarks/serve_speed.py --data persona/dataset --adapter persona/adapters/<version>

The load average is printed at the start and the end: on shared cores, torch's threads wait for
each other and every figure slows (the ratios, measured in the same rounds, hold up better).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.generation import (  # noqa: E402
    NATURAL_ATTR,
    PRECISIONS,
    GenerationSettings,
    LocalBackend,
    load_clone,
    natural_reply_tokens,
)
from training import adapters  # noqa: E402
from training.base_model import load_model, load_tokenizer, resolve_base  # noqa: E402
from training.encode import encode, load_jsonl  # noqa: E402
from training.prompt import CONTRACT_VERSION, turn_text, without_recall  # noqa: E402

TARGET_RATIO = 0.5   # per-reply time of the serving path / bare fp32 generate, same length
TARGET_P50_S = 2.0   # one reply, as served
TARGET_BATCH = 4.0   # 8 channels at once / one at a time, throughput
TARGET_PPL = 0.01    # served perplexity within 1% of the attached fp32 adapter
# Single levers (--levers): the merged adapter in fp32, in bf16 without PackedLinear, with int8
# weights (torch dynamic quantisation), and the served model on torch's own thread count.
LEVERS = ("fp32", "bf16-unpacked", "int8", "all-threads")


# -- the prompts and the adapter -------------------------------------------------------------------


def prepare_sample(folder: Path) -> Path:
    """The sample persona's dataset, built as `clone prepare` builds it, in a copy under `folder`."""
    from training.base_model import token_counter
    from training.persona import Persona
    from training.prepare import prepare_persona

    sample = REPO / "persona_data" / "sample"
    copy_ = folder / "sample"
    copy_.mkdir(parents=True)
    (copy_ / "persona.toml").write_bytes((sample / "persona.toml").read_bytes())
    (copy_ / "exports").symlink_to(sample / "exports")
    if (sample / "knowledge").is_dir():
        (copy_ / "knowledge").symlink_to(sample / "knowledge")
    prepare_persona(Persona.load(copy_), token_counter(load_tokenizer()))
    return copy_ / "dataset"


def reply_prompts(val: list[dict]) -> list[list[dict]]:
    """Each held-out sample up to (not including) its last reply of the person."""
    out = []
    for s in val:
        msgs = s["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=0)
        if last >= 2:
            out.append(msgs[:last])
    return out


def random_adapter(root: Path, noise: float, seed: int = 0) -> str:
    """A fresh LoRA of clone train's default shape with noisy B matrices, saved as an adapter
    registry entry (manifest included) so that load_clone loads it as it loads a trained one."""
    from training.config import TrainConfig
    from training.train import base_reference, with_lora

    base = resolve_base()
    model = with_lora(load_model(base), TrainConfig(data=root))  # clone train's LoRA, as configured
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, noise)
    folder = root / "random"
    model.save_pretrained(folder, save_embedding_layers=False)
    load_tokenizer(base).save_pretrained(folder)
    manifest = {"version": "random", "persona": {"id": None}, "base_model": base_reference(None, base),
                "prompt_contract": CONTRACT_VERSION, "dataset": {"train_samples": 0}}
    (folder / adapters.MANIFEST).write_text(json.dumps(manifest))
    return "random"


# -- the variants ----------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    model: object
    backend: LocalBackend | None  # None: bare model.generate
    times: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    def add(self, key: str, seconds: float, tokens: int = 0) -> None:
        self.times.setdefault(key, []).append(seconds)
        self.tokens.setdefault(key, []).append(tokens)


@contextlib.contextmanager
def threads_kept() -> Iterator[None]:
    """torch's thread count as it was: a backend sets its own (GenerationSettings.threads)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def forced_length(model, n: int | None) -> Iterator[None]:
    """Every reply exactly `n` new tokens (the end of turn suppressed until then); None: as is."""
    config = model.generation_config
    before = config.min_new_tokens
    config.min_new_tokens = n
    try:
        yield
    finally:
        config.min_new_tokens = before


def bare_generate(model, tokenizer, conversations: list[list[dict]], n: int) -> list[int]:
    """The baseline: the encoded prompts, left-padded, through `model.generate`, sampled as the
    bot samples. New tokens per row (up to its end of turn)."""
    prompts = [encode(c, tokenizer, add_generation_prompt=True).input_ids for c in conversations]
    width, pad = max(len(p) for p in prompts), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=True,
                             temperature=0.8, top_p=0.9, repetition_penalty=1.1, pad_token_id=pad)
    return [new_tokens(row, tokenizer) for row in out[:, width:].tolist()]


def new_tokens(row: list[int], tokenizer) -> int:
    return row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)


def served_tokens(texts: list, tokenizer) -> list[int]:
    """New tokens of each reply: its text up to the end of its turn, and the end-of-turn token."""
    return [len(tokenizer(turn_text(g.text), add_special_tokens=False).input_ids) + (0 if g.truncated else 1)
            for g in texts]


async def channels(backend: LocalBackend, conversations: list[list[dict]]) -> list:
    """Concurrent generate calls, as channels of a bot make them: the queue batches them."""
    try:
        return list(await asyncio.gather(*(backend.generate(c) for c in conversations)))
    finally:
        await backend.close()
        backend._queue = backend._worker = None  # a fresh queue in the next event loop


def reply(v: Variant, tokenizer, conversations: list[list[dict]], n: int,
          seed: int) -> tuple[float, list[int]]:
    """(seconds, new tokens per row) of one call: a batch of `conversations`."""
    torch.manual_seed(seed)
    with threads_kept():
        started = time.perf_counter()
        if v.backend is None:
            counts = bare_generate(v.model, tokenizer, conversations, n)
        else:
            v.backend.settings.max_new_tokens = n
            texts = asyncio.run(channels(v.backend, conversations))
            counts = served_tokens(texts, tokenizer)
        return time.perf_counter() - started, counts


# -- one round -------------------------------------------------------------------------------------


def one_round(variants: list[Variant], tokenizer, prompts: list[list[dict]], r: int, args) -> None:
    """Every variant on prompt r (one user) and on 8 prompts at once, forced to the same length;
    then as served, on `--served` prompts one at a time and on 8 at once."""
    one = [prompts[r % len(prompts)]]
    eight = [prompts[(r * args.channels + k) % len(prompts)] for k in range(args.channels)]
    served = [prompts[(r * args.served + k) % len(prompts)] for k in range(args.served)]
    for v in variants:
        natural = v.backend is not None and v.backend.settings.natural_length
        with forced_length(v.model, args.tokens):
            if v.backend is not None:
                v.backend.settings.natural_length = False
            v.add("ttft", reply(v, tokenizer, one, 1, r)[0])
            t, c = reply(v, tokenizer, one, args.tokens, r)
            v.add("one", t, sum(c))
            with forced_length(v.model, args.typical):
                t, c = reply(v, tokenizer, one, args.typical, r)
                v.add("typical_one", t, sum(c))
            if not args.quick:
                t, c = reply(v, tokenizer, eight, args.tokens, r)
                v.add("eight", t, sum(c))
            if v.backend is not None:
                v.backend.settings.natural_length = natural
        for k, conversation in enumerate(served):
            t, c = reply(v, tokenizer, [conversation], 64, r * args.served + k)
            v.add("served_one", t, sum(c))
        if not args.quick:
            t, c = reply(v, tokenizer, eight, 64, r)
            v.add("served_eight", t, sum(c))
        served_s = statistics.median(v.times["served_one"][-args.served:])
        print(f"  round {r + 1} {v.name:<22} first token {v.times['ttft'][-1]:5.2f} s  "
              f"one {v.times['one'][-1]:6.2f} s  served {served_s:5.2f} s  load {os.getloadavg()[0]:.1f}",
              flush=True)


# -- quality ---------------------------------------------------------------------------------------


def perplexity(model, tokenizer, val: list[dict]) -> float:
    from training.train import mean_nll

    rows = [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (encode(s["messages"], tokenizer) for s in val)]
    nll, _ = mean_nll(model, rows, tokenizer.pad_token_id, desc="Scoring")
    return math.exp(nll)


def held_out_quality(variants: list[Variant], attached, tokenizer, sample: list[dict]) -> dict:
    """Perplexity of the served model (and of each lever's model) against the attached fp32
    adapter's, on the same held-out samples."""
    reference = perplexity(attached, tokenizer, sample)
    quality = {"samples": len(sample), "attached_fp32": round(reference, 4)}
    scored = set()
    for v in variants[2:]:
        if id(v.model) not in scored:  # the same model on another thread count scores the same
            scored.add(id(v.model))
            ppl = perplexity(v.model, tokenizer, sample)
            key = "served" if v.name == "new" else v.name
            quality[key], quality[f"{key}_vs_attached"] = round(ppl, 4), round(ppl / reference, 4)
    return quality


# -- the report ------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summary(v: Variant) -> dict:
    out: dict = {}
    for key, times in v.times.items():
        tokens = v.tokens[key]
        out[key] = {"p50_s": round(pct(times, 0.5), 3), "p95_s": round(pct(times, 0.95), 3),
                    "tokens_per_s": round(sum(tokens) / sum(times), 1) if sum(tokens) else None,
                    "mean_tokens": round(statistics.mean(tokens), 1)}
    return out


def ratios(variants: list[Variant]) -> dict:
    """The targets' ratios: the median over rounds of each round's ratio (both sides measured
    seconds apart, so a burst of load on the shared cores mostly hits both)."""
    by = {v.name: v for v in variants}

    def r(a: str, b: str, key: str) -> float | None:
        if key not in by[a].times or key not in by[b].times:
            return None
        pairs = zip(by[a].times[key], by[b].times[key], strict=True)
        return round(statistics.median(x / y for x, y in pairs), 3)

    out = {f"{v.name}_per_reply_vs_bare": r(v.name, "bare", "one") for v in variants if v.name != "bare"}
    out["today_ttft_vs_bare"], out["new_ttft_vs_bare"] = r("today", "bare", "ttft"), r("new", "bare", "ttft")
    out["new_served_vs_today_served"] = r("new", "today", "served_one")
    for v in variants:
        if "eight" in v.times:  # tokens/s of 8 channels at once / tokens/s of one, round by round
            rates = zip(v.tokens["eight"], v.times["eight"], v.tokens["one"], v.times["one"], strict=True)
            out[f"{v.name}_8_channels_throughput_vs_one"] = round(
                statistics.median((n8 / t8) / (n1 / t1) for n8, t8, n1, t1 in rates), 2)
    return out


COLUMNS = (("ttft", "p50_s", "1st token"), ("one", "p50_s", "one p50"), ("one", "p95_s", "p95"),
           ("one", "tokens_per_s", "tok/s"), ("typical_one", "p50_s", "typical"),
           ("eight", "p50_s", "8ch p50"), ("eight", "p95_s", "p95"), ("eight", "tokens_per_s", "tok/s"),
           ("served_one", "p50_s", "served p50"), ("served_one", "p95_s", "p95"),
           ("served_one", "mean_tokens", "tokens"), ("served_eight", "p50_s", "8ch served"),
           ("served_eight", "p95_s", "p95"))


def print_report(result: dict) -> None:
    r = result
    print(f"\n{r['prompts']} prompts of {r['prompt_tokens']} tokens (min, median, max); same length: "
          f"{r['tokens']} new tokens, typical: {r['typical_tokens']}; rounds: {r['rounds']}; "
          f"natural cap: {r['natural_cap']} tokens; fixed prompt prefix: {r['fixed_prefix_tokens']} "
          f"tokens; served dtype {r['dtype']}, {r['threads']} threads")
    print(f"{'variant':<22}" + "".join(f"{label:>11}" for _, _, label in COLUMNS))
    for name, s in result["variants"].items():
        cells = (s.get(key, {}).get(column) for key, column, _ in COLUMNS)
        print(f"{name:<22}" + "".join(f"{c:>11.2f}" if c is not None else f"{'-':>11}" for c in cells))
    print("(seconds per reply; tok/s: new tokens per second; served: sampled as the bot does, at most "
          "64 tokens (today) or the natural cap (new); 8ch: each of 8 channels at once)")
    print("\nratios:", json.dumps(result["ratios"], indent=1))
    print("quality:", json.dumps(result["quality"], indent=1))
    print("targets:", json.dumps(result["targets"], indent=1))
    print(f"load average: start {result['load_start']}  end {result['load_end']}")


def targets(result: dict) -> dict:
    r, s, q = result["ratios"], result["variants"]["new"], result["quality"]
    out = {
        f"per-reply time new / bare fp32, same length <= {TARGET_RATIO}": r["new_per_reply_vs_bare"],
        f"one reply p50 as served <= {TARGET_P50_S} s": s["served_one"]["p50_s"],
        f"perplexity served / attached fp32 within {TARGET_PPL:.0%}": q.get("served_vs_attached"),
    }
    if "new_8_channels_throughput_vs_one" in r:
        key = f"8 channels / one at a time, throughput >= {TARGET_BATCH}x"
        out[key] = r["new_8_channels_throughput_vs_one"]
    met = [out[k] is not None and (abs(out[k] - 1) <= TARGET_PPL if "perplexity" in k else
                                   out[k] >= TARGET_BATCH if "channels" in k else
                                   out[k] <= (TARGET_RATIO if "bare" in k else TARGET_P50_S)) for k in out]
    return {k: {"value": v, "met": m} for (k, v), m in zip(out.items(), met, strict=True)}


# -- main ------------------------------------------------------------------------------------------


def build_variants(root: Path, version: str, data: Path, args) -> tuple[list[Variant], object, object]:
    """bare, today, new (and with --levers the single levers); the attached fp32 model and the
    tokenizer, for the quality check."""
    attached, tokenizer, manifest = adapters.load(root, version)
    base = load_model(adapters.locate_base(manifest, root / version))
    new_model, _, _ = load_clone(root, version, precision=args.precision, dataset=data)
    fixed = GenerationSettings(natural_length=False, threads=None)
    variants = [Variant("bare", base.eval(), None),
                Variant("today", attached, LocalBackend(attached, tokenizer, fixed)),
                Variant("new", new_model, LocalBackend(new_model, tokenizer))]
    levers = set(args.levers.split(",")) if args.levers else set()
    if unknown := levers - set(LEVERS):
        raise SystemExit(f"--levers: unknown {sorted(unknown)}; known: {','.join(LEVERS)}")
    floats = levers - {"all-threads"}
    merged = load_clone(root, version, precision="fp32", dataset=data)[0] if floats else None
    derived = {"fp32": lambda: merged, "bf16-unpacked": lambda: copy.deepcopy(merged).to(torch.bfloat16),
               "int8": lambda: quantize_int8(copy.deepcopy(merged))}
    for lever in (lever for lever in LEVERS if lever in floats):
        model = derived[lever]()
        setattr(model, NATURAL_ATTR, getattr(merged, NATURAL_ATTR))
        variants.append(Variant(f"merged {lever}", model, LocalBackend(model, tokenizer)))
    if "all-threads" in levers:
        everything = LocalBackend(new_model, tokenizer, GenerationSettings(threads=None))
        variants.append(Variant(f"new, {torch.get_num_threads()} threads", new_model, everything))
    return variants, attached, tokenizer


def quantize_int8(model):
    """torch dynamic quantisation, int8 weights with one scale per output channel, activations
    quantised per call: the int8 lever."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def fixed_prefix(prompts: list[list[dict]], tokenizer) -> int:
    """Tokens every prompt shares at its start (the system prompt before the recalled items):
    what a cached key/value prefix could skip."""
    return len(encode(without_recall(prompts[0])[:1], tokenizer).input_ids)


def run(args, data: Path, root: Path, version: str) -> dict:
    val = load_jsonl(data / "val.jsonl")
    prompts = reply_prompts(val)
    variants, attached, tokenizer = build_variants(root, version, data, args)
    args.typical = natural_reply_tokens(data, tokenizer, 0.5) or 16
    lengths = sorted(len(encode(p, tokenizer, add_generation_prompt=True).input_ids) for p in prompts)
    print(f"{len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]})", flush=True)
    for v in variants:  # warm-up: first calls allocate
        reply(v, tokenizer, prompts[:1], 2, 0)
    load_start = [round(x, 2) for x in os.getloadavg()]
    for r in range(args.rounds):
        one_round(variants, tokenizer, prompts, r, args)
    quality = held_out_quality(variants, attached, tokenizer, val[: args.ppl_samples or None])
    result = {"prompts": len(prompts), "prompt_tokens": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
              "tokens": args.tokens, "rounds": args.rounds,
              "threads": variants[2].backend.settings.threads or torch.get_num_threads(),
              "dtype": str(variants[2].model.dtype), "natural_cap": getattr(variants[2].model, NATURAL_ATTR),
              "fixed_prefix_tokens": fixed_prefix(prompts, tokenizer), "typical_tokens": args.typical,
              "variants": {v.name: summary(v) for v in variants}, "quality": quality,
              "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()]}
    result["ratios"] = ratios(variants)
    result["targets"] = targets(result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a prepared dataset folder (default: the sample persona's)")
    ap.add_argument("--adapter", type=Path,
                    help="an adapter folder (default: a fresh LoRA with noisy weights)")
    ap.add_argument("--noise", type=float, default=0.02, help="std of the fresh LoRA's B weights")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens of the same-length replies")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--served", type=int, default=3, help="prompts answered as served, per round")
    ap.add_argument("--ppl-samples", type=int, default=0, help="held-out samples scored (0: all)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--levers", default="", help=f"levers measured on their own, in the same rounds, "
                    f"comma-separated: {','.join(LEVERS)}")
    ap.add_argument("--quick", action="store_true", help="one user only (no 8-channel batches)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepare_sample(Path(tmp))
        if args.adapter:
            root, version = args.adapter.resolve().parent, args.adapter.resolve().name
        else:
            root, version = Path(tmp) / "adapters", random_adapter(Path(tmp) / "adapters", args.noise)
        result = run(args, data, root, version)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
