"""The in-process generation backend: the active adapter (or the base model) behind a batching queue.

Requests from different channels that arrive together are generated in one batch (on 2 cores,
about 2x the throughput of one at a time through the engine: benchmarks/README.md). The model
runs in a worker thread, off the event loop; the queue is bounded, and a full queue answers
`Busy` at once rather than making a user wait minutes.

Serving speed (issue 13; figures in benchmarks/README.md, from benchmarks/serve_speed.py):
`load_clone` serves the adapter merged into the base weights it loaded for serving (a new model
object per load: the adapter folder stays the source of truth, and AdapterWatcher's swap and
rollback load a fresh one), in bf16 where the CPU multiplies bf16 fast (AMX), else with its
weights in fp16 and its arithmetic in fp32 where fbgemm can (x86 with AVX2: a reply step reads
half the bytes), else in fp32; and a reply stops at the person's natural length (the 95th
percentile of their replies in the persona's dataset) rather than at a fixed cap.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bot.engine import Busy, Generated
from training import cpu
from training.generate import generate_turns

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # fp16: fp16 weights, fp32 arithmetic
NATURAL_ATTR = "natural_reply_tokens"  # set on a served model by load_clone: its reply cap
REPLY_PERCENTILE = 0.95
MIN_REPLY_TOKENS = 16  # a cap never below this, however terse the person


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_batch: int = 8
    max_queue: int = 32
    # Before a batch starts, requests still arriving (several channels at once reach the queue a
    # few milliseconds apart, each after its recall) join it while each comes within `batch_gap`
    # seconds of the last, for `batch_window` seconds at most. A lone reply waits `batch_gap`.
    batch_gap: float = 0.03
    batch_window: float = 0.25
    # Stop at the model's natural reply length (see natural_reply_tokens) when it is below
    # max_new_tokens: a batch runs until its longest row ends, so the cap is what it waits for.
    natural_length: bool = True
    # torch threads while generating (None: torch's own choice). See serving_threads.
    threads: int | None = field(default_factory=lambda: serving_threads())
    # torch threads for a batch of several channels and for reading any prompt (None: `threads`):
    # every core. One reply step is bound by memory, but a prompt to read and 8 rows a step are
    # arithmetic that more cores share (a 441-token prompt: 0.80 s on one thread, 0.48 s on two;
    # benchmarks/README.md, chat_speed.py).
    batch_threads: int | None = field(default_factory=lambda: os.cpu_count())
    # A batch's distinct prompts read as one batch padded to the longest (True), or each alone at
    # its own length (training.generate.read_once). On AMX a full batch keeps the tiles busy: 8
    # channels ran 9-12 % faster padded (4.26x one at a time against 3.84x); on an AMD EPYC with
    # AVX-512, own lengths were 1.37x faster (benchmarks/README.md, chat_speed.py).
    padded_reads: bool = field(default_factory=lambda: cpu_has_fast_bf16())
    # Grounded replies (generate_grounded): how far each step is pushed away from what the model
    # would say without the recalled items (training.generate.RecallContrast). 1.0 is the paper's
    # weight; 2 and 3 made the sample's clone copy the recall list's "- Q:" markup.
    contrast: float = 1.0
    # Grounded candidates of one reply stop once this many have ended (EnoughEnded): a batch waits
    # for its longest row, and the nearest of a few whole candidates is as good as of all.
    enough_candidates: int = 2


@dataclass
class _Request:
    messages: list[dict[str, str]]
    future: asyncio.Future = field(repr=False)
    plain: list[dict[str, str]] | None = None  # grounded: the prompt without its recalled items
    candidates: int = 1  # replies sampled for it, a batch row each


def serving_threads(cores: int | None = None) -> int:
    """Half the cores, at least one. A reply step reads every weight once: memory bandwidth, not
    arithmetic, bounds it, and a few threads already draw what the memory gives. The other
    cores stay free for the event loop, the recall embedder and Redis; and torch threads that
    wait for a busy core slow a step many times over (on 2 shared cores, one thread answered
    faster than two: benchmarks/serve_speed.py --levers 1-thread)."""
    return max(1, (cores or os.cpu_count() or 1) // 2)


def cpu_multiplies_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (many rows faster than fp32; see WIDE_ROWS)."""
    return cpu.cpu_multiplies_bf16()


def cpu_has_fast_bf16() -> bool:
    """AMX: bf16 matmuls faster than fp32 even on one row (training times its own matmul instead:
    training.train.pick_precision)."""
    return cpu.cpu_has_amx()


def serving_precision(precision: str = "auto") -> str:
    """What `precision` serves on this CPU: "auto" is bf16 where it is fast (AMX), else fp16
    weights where fbgemm multiplies them (HalfWeightLinear), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp16" if half_weights_work() else "fp32"
    return precision


def serving_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype the model's tensors are cast to: bf16 for bf16, fp32 otherwise (fp16 keeps fp32
    activations; only its linear weights are halved)."""
    return torch.bfloat16 if serving_precision(precision) == "bf16" else torch.float32


class PackedLinear(torch.nn.Module):
    """A bf16 linear layer whose weight oneDNN lays out once, for its own kernels. F.linear on a
    bf16 weight lays it out again at every call: on one token (each step of a reply) that makes
    bf16 no faster than fp32, while the packed weight runs about 2x fp32 there, and 6-7x on 8 rows
    (measured on this AMX CPU; benchmarks/serve_speed.py). The ops are the ones torch.compile's
    CPU weight packing uses."""

    def __init__(self, linear: torch.nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias
        if keep_weight:  # a weight tied to the embeddings costs nothing to keep, and is looked up
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


@functools.cache
def packing_works() -> bool:
    """Whether this torch can pack bf16 linears here (oneDNN), checked on a small one against
    F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            return torch.allclose(PackedLinear(linear)(x).float(), linear(x).float(), atol=0.05)
    except (AttributeError, RuntimeError):
        return False


# From this many rows at once (reading a prompt, not a reply's step), a layer with a bf16 copy
# multiplies with it: on 2 AVX-512 BF16 cores a 300-row input took half the fp16 weights' time,
# while one row (a reply's step) took 1.2-2.3x as long (benchmarks/README.md, chat_speed.py).
WIDE_ROWS = 16


class HalfWeightLinear(torch.nn.Module):
    """A linear layer whose weight fbgemm keeps in fp16, packed once, and multiplies in fp32.
    One reply step reads every weight once and this CPU's memory bounds it: half the bytes made
    a step 0.6-0.7x as long as fp32 on 2 AVX2 cores, with logits within 1e-3 (plain fp16 or bf16
    matmuls, converted by torch on the fly, took 8-11x; benchmarks/serve_speed.py). With `wide`
    (a CPU that multiplies bf16 natively) it also keeps a bf16 copy packed by oneDNN for inputs
    of WIDE_ROWS rows or more, where arithmetic, not memory, bounds the time."""

    def __init__(self, linear: torch.nn.Linear, keep_weight: bool = False, wide: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.wide = self.wide_bias = None
        if wide:
            weight = linear.weight.detach().to(torch.bfloat16)
            self.wide = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.wide_bias = bias.to(torch.bfloat16) if bias is not None else None
        if keep_weight:  # tied to the embeddings: kept for their lookup, costs nothing more
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wide is not None and x.numel() >= WIDE_ROWS * self.in_features:
            wide = x.to(torch.bfloat16).contiguous()
            return torch.ops.mkldnn._linear_pointwise(wide, self.wide, self.wide_bias, "none", [], "").float()
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


@functools.cache
def half_weights_work() -> bool:
    """Whether this torch multiplies fp16 weights here (fbgemm: x86 with AVX2), checked on a small
    linear layer against F.linear."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        linear = torch.nn.Linear(64, 32)
        x = torch.randn(3, 5, 64)
        with torch.no_grad():
            return torch.allclose(HalfWeightLinear(linear)(x), linear(x), atol=1e-2)
    except (AttributeError, RuntimeError):
        return False


def replace_linears(model, make, dtype: torch.dtype) -> int:
    """Every plain linear layer of `model` with weights in `dtype` replaced by `make(linear,
    keep_weight)` (keep_weight: the output layer whose weight the embeddings share); how many."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(embeddings.weight)} if embeddings is not None else set()
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and m.weight.dtype == dtype]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        replaced = make(linear, keep_weight=id(linear.weight) in tied)
        setattr(model.get_submodule(parent) if parent else model, child, replaced)
    return len(targets)


def pack_linears(model) -> int:
    """Every linear layer of a bf16 model packed (PackedLinear), where that works; how many."""
    if not packing_works():
        return 0
    return replace_linears(model, PackedLinear, torch.bfloat16)


def untie_adapted_head(model) -> None:
    """Give an adapted output layer its own copy of the weights it shares with the embeddings, so
    that merging its LoRA changes what the model says, not how it reads (SmolLM2 ties the two)."""
    lm = model.get_base_model()
    head, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    base = getattr(head, "base_layer", None)  # a peft LoRA layer wraps the original
    if base is None or embeddings is None or base.weight is not embeddings.weight:
        return
    base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    lm.config.tie_word_embeddings = False  # what they now are (and peft then merges without a warning)


def prepare_for_serving(model, precision: str = "auto", merge: bool = True):
    """The model as served: a peft adapter merged into the weights (no LoRA matmuls per layer),
    cast to `serving_dtype(precision)`, its linear layers packed in bf16 (PackedLinear) or with
    fp16 weights (HalfWeightLinear) when the precision says so. It merges in place: pass a model
    loaded for serving (load_clone's), never one that is also used with its adapter apart."""
    if merge and hasattr(model, "merge_and_unload"):
        untie_adapted_head(model)
        model = model.merge_and_unload()
    chosen = serving_precision(precision)
    model = model.to(serving_dtype(chosen)).eval()
    if not hasattr(model, "peft_config"):
        if chosen == "bf16":
            pack_linears(model)
        elif chosen == "fp16" and half_weights_work():
            wide = cpu_multiplies_bf16() and packing_works()
            replace_linears(model, functools.partial(HalfWeightLinear, wide=wide), torch.float32)
    return model


def served_precision(model) -> str:
    """How a served model multiplies, for the log: "bf16", "fp16 weights" or "fp32"."""
    halves = [m for m in model.modules() if isinstance(m, HalfWeightLinear)]
    if halves:
        return "fp16 weights" + (", bf16 for prompts" if halves[0].wide is not None else "")
    return str(model.dtype).removeprefix("torch.")


def natural_reply_tokens(dataset: Path | None, tokenizer, percentile: float = REPLY_PERCENTILE) -> int | None:
    """The person's natural reply length in tokens (end of turn included): the `percentile` of
    their replies in `dataset`/train.jsonl, at least MIN_REPLY_TOKENS; None without one."""
    train = dataset / "train.jsonl" if dataset is not None else None
    if train is None or not train.is_file():
        return None
    replies = []
    with train.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                replies += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    if not replies:
        return None
    counts = sorted(len(ids) + 1 for ids in tokenizer(replies, add_special_tokens=False)["input_ids"])
    return max(MIN_REPLY_TOKENS, counts[max(0, math.ceil(percentile * len(counts)) - 1)])


def load_clone(adapters_root: Path, version: str | None = None, base: str | None = None,
               persona_id: str | None = None, *, precision: str = "auto", merge: bool = True,
               dataset: Path | None = None):
    """(model, tokenizer, description): the active adapter, else the base model with a warning,
    prepared for serving (prepare_for_serving) and with the reply cap of the persona's dataset
    (`dataset`, by default the `dataset` folder beside `adapters_root`). Given `persona_id`, an
    adapter trained for another persona is refused (AdapterError)."""
    from training import adapters
    from training.base_model import load_model, load_tokenizer, resolve_base

    if version or adapters.active_version(adapters_root):
        model, tokenizer, manifest = adapters.load(adapters_root, version, persona_id, base)
        what = f"adapter {manifest['version']}"
    else:
        log.warning("No adapter in %s: answering with the base model, which imitates no one", adapters_root)
        resolved = resolve_base(base)
        model, tokenizer, what = load_model(resolved), load_tokenizer(resolved), f"base model {resolved.id}"
    merged = merge and hasattr(model, "merge_and_unload")
    model = prepare_for_serving(model, precision, merge)
    cap = natural_reply_tokens(dataset or adapters_root.parent / "dataset", tokenizer)
    setattr(model, NATURAL_ATTR, cap)
    log.info("serving %s (%s%s), reply cap %s", what, "merged, " if merged else "",
             served_precision(model), f"{cap} tokens" if cap else "fixed")
    return model, tokenizer, what


def candidate_groups(counts: list[int]) -> list[list[int]]:
    """The batch rows of each request that has several candidates, for requests of `counts` rows."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(range(start, start + n)) for start, n in zip(starts, counts, strict=True) if n > 1]


class LocalBackend:
    def __init__(self, model, tokenizer, settings: GenerationSettings | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or GenerationSettings()
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None

    async def generate(self, messages: list[dict[str, str]]) -> Generated:
        """The model's next turn after `messages` (raw text: post-processing is the engine's)."""
        [turn] = await self._queued(messages, None, 1)
        return turn

    async def generate_grounded(self, messages: list[dict[str, str]], plain: list[dict[str, str]],
                                candidates: int = 1) -> list[Generated]:
        """`candidates` next turns, each decoded against `plain`, the same prompt without its
        recalled items (training.generate.RecallContrast): what the items add is weighed more.
        One request, one place in the queue; rows that run on once enough others have ended are
        cut (truncated)."""
        return await self._queued(messages, plain, max(1, candidates))

    async def _queued(self, messages: list[dict[str, str]], plain: list[dict[str, str]] | None,
                      candidates: int) -> list[Generated]:
        if self._queue is None:
            self._queue = asyncio.Queue(self.settings.max_queue)
            self._worker = asyncio.create_task(self._run())
        request = _Request(messages, asyncio.get_running_loop().create_future(), plain, candidates)
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise Busy from None
        return await request.future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._gather([await self._queue.get()])
            rows = [r for r in batch for _ in range(r.candidates)]
            try:
                plain = [r.plain for r in rows]
                grounding = (plain,) if any(plain) else ()
                groups = candidate_groups([r.candidates for r in batch])
                texts = await asyncio.to_thread(self.generate_batch, [r.messages for r in rows], *grounding,
                                                **({"groups": groups} if groups else {}))
            except Exception as e:  # one bad batch must not kill the worker
                log.exception("Generation failed for a batch of %d", len(batch))
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            for r in batch:
                turns, texts = texts[: r.candidates], texts[r.candidates:]
                if not r.future.done():
                    r.future.set_result(turns)

    async def _gather(self, batch: list[_Request]) -> list[_Request]:
        """`batch` and what joins it: whatever is queued, then what arrives while requests keep
        coming (settings.batch_gap, batch_window), up to max_batch rows."""
        assert self._queue is not None
        s, loop = self.settings, asyncio.get_running_loop()
        started = last = loop.time()
        while sum(r.candidates for r in batch) < s.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                last = loop.time()
            elif loop.time() - last < s.batch_gap and loop.time() - started < s.batch_window:
                await asyncio.sleep(min(0.005, s.batch_gap))
            else:
                break
        return batch

    def swap(self, model, tokenizer) -> None:
        """Serve another model from the next batch on; the batch in flight finishes on the old one."""
        self.model, self.tokenizer = model.eval(), tokenizer

    def generate_batch(self, conversations: list[list[dict[str, str]]],
                       plain: list[list[dict[str, str]] | None] | None = None,
                       groups: list[list[int]] | None = None) -> list[Generated]:
        """One batch through the model; message text can never become a template token. `plain`:
        the rows to ground (generate_grounded), by their prompts without recalled items; `groups`:
        the rows that are candidates of one reply."""
        s = self.settings
        model, tokenizer = self.model, self.tokenizer  # one pair for the whole batch, even across a swap
        threads = s.batch_threads if len(conversations) > 1 and s.batch_threads else s.threads
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # process-wide: the recall embedder follows it too
        turns = generate_turns(
            model, tokenizer, conversations, max_new_tokens=self.reply_cap(model), temperature=s.temperature,
            top_p=s.top_p, repetition_penalty=s.repetition_penalty, plain=plain or (), contrast=s.contrast,
            groups=groups or (), enough=s.enough_candidates, read_threads=s.batch_threads,
            padded_read=s.padded_reads)
        return [Generated(text, truncated) for text, truncated in turns]

    def reply_cap(self, model) -> int:
        """max_new_tokens, or the model's natural reply length (load_clone's) when lower."""
        natural = getattr(model, NATURAL_ATTR, None) if self.settings.natural_length else None
        return min(self.settings.max_new_tokens, natural or self.settings.max_new_tokens)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


class AdapterWatcher:
    """Keeps a serving LocalBackend on the active adapter: when `clone retrain` or `clone adapters
    use` moves `adapters/active`, the new adapter is loaded beside the old one (off the event
    loop) and swapped in between batches, so the bot follows without a restart or a lost message.
    Each load is a new model (merged and cast by load_clone): a rollback loads the old adapter's
    folder again, never an object that was merged or cast before.
    An adapter that fails to load is logged once and the current one keeps serving."""

    def __init__(self, backend: LocalBackend, adapters_root: Path, base: str | None = None,
                 interval_s: float = 10.0, persona_id: str | None = None, precision: str = "auto") -> None:
        from training import adapters

        self.backend, self.root, self.base, self.interval_s = backend, adapters_root, base, interval_s
        self.persona_id, self.precision = persona_id, precision
        self.version = adapters.active_version(adapters_root)  # what the backend was loaded with
        self._refused: str | None = None

    async def check(self) -> bool:
        """Swap if the active adapter changed; whether it did."""
        from training import adapters

        active = adapters.active_version(self.root)
        if active is None or active in (self.version, self._refused):
            return False
        try:
            model, tokenizer, _ = await asyncio.to_thread(
                load_clone, self.root, active, self.base, self.persona_id, precision=self.precision)
        except Exception as e:  # a broken or foreign adapter must not take the bot down
            self._refused = active
            log.warning("adapter %s could not be loaded (%s: %s); still serving %s",
                        active, type(e).__name__, e, self.version or "the base model")
            return False
        self.backend.swap(model, tokenizer)
        log.info("now serving adapter %s (was %s)", active, self.version or "the base model")
        self.version, self._refused = active, None
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()
