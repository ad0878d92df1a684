"""Batch generation of the clone's next turn, shared by serving (bot.generation) and evaluation.

Prompts are encoded by `training.encode.encode`, the injection-safe encoding training used: a
message's text can never become a template token, however it is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from training.encode import encode

# How a model takes and returns its key/value cache: `cache` in transformers 5.25, before that
# `past_key_values`.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TOP_K = 50  # what generate samples from unless told otherwise, kept by Nucleus


@torch.no_grad()
def generate_turns(
    model, tokenizer, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 64,
    temperature: float = 0.8, top_p: float = 0.9, repetition_penalty: float = 1.0,
    plain: Sequence[list[dict[str, str]] | None] = (), contrast: float = 1.0,
    groups: Sequence[Sequence[int]] = (), enough: int = 2, read_threads: int | None = None,
    padded_read: bool = False,
) -> list[tuple[str, bool]]:
    """(raw text, truncated) per conversation: left-padded, one batch. `truncated` is True when
    the row stopped before the model ended its turn. `plain`: per conversation, the same prompt
    without its recalled items, for the rows to decode by RecallContrast (None, or left out: an
    ordinary row). `groups`: rows that are candidates of one reply; once `enough` of a group's
    rows have ended, its other rows stop there (truncated). `read_threads`: torch threads while
    the prompts are read (None: those set), the steps after keep those set before.
    `padded_read`: the distinct prompts read as one left-padded batch instead of each at its own
    length (faster where arithmetic is cheap, see GenerationSettings.padded_reads)."""
    prompts = [encode(c, tokenizer, add_generation_prompt=True).input_ids for c in conversations]
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(prompts, pad)
    device = next(model.parameters()).device
    contrasted = {i: encode(p, tokenizer, add_generation_prompt=True).input_ids
                  for i, p in enumerate(plain) if p is not None}
    sample = temperature > 0
    processors = LogitsProcessorList(
        ([RecallContrast(model, list(contrasted), list(contrasted.values()), pad, contrast)]
         if contrasted and contrast else [])
        + ([NucleusDraw(temperature, top_p)] if sample else []))
    ends = end_token_ids(model, tokenizer)
    enough_ended = EnoughEnded(groups, enough, ends, ids.shape[1])
    stop = StoppingCriteriaList([enough_ended] if groups else [])
    ids, mask = ids.to(device), mask.to(device)
    with torch_threads(read_threads):  # each distinct prompt read once
        shared = {_CACHE: read_once(model, ids[:, :-1], mask[:, :-1], padded_read)[0]}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **shared,
        logits_processor=processors,
        stopping_criteria=stop,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # NucleusDraw samples (after the repetition penalty); generate takes its token
        repetition_penalty=repetition_penalty,
        pad_token_id=pad,
    )
    new = out[:, ids.shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=False)
    return [(text, i in enough_ended.cut or (len(row) >= max_new_tokens and not ends & set(row.tolist())))
            for i, (text, row) in enumerate(zip(texts, new, strict=True))]


class Nucleus(LogitsProcessor):
    """Temperature, top-k, then top-p: the scores transformers' own warpers give (generate's
    defaults: top-k 50 before top-p), without sorting the whole vocabulary at every step. The
    top-k scores are picked with `topk`, and top-p is applied among them; transformers' top-p
    sorts all 49,152 scores of each row, which took longer than the model's own step for a batch of
    8 rows on 2 cores (benchmarks/README.md, chat_speed.py)."""

    def __init__(self, temperature: float, top_p: float, top_k: int = TOP_K) -> None:
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def kept(self, scores: torch.FloatTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the top-k scores after temperature, -inf where top-p drops them; their token ids)."""
        top, where = (scores / self.temperature).topk(min(self.top_k, scores.shape[-1]), dim=-1)
        probs = top.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # the mass of the kept tokens more likely than each
        return top.masked_fill(above >= self.top_p, -float("inf")), where

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        kept, where = self.kept(scores)
        return torch.full_like(scores, -float("inf")).scatter_(1, where, kept)


class NucleusDraw(Nucleus):
    """Nucleus, with the next token drawn here among the kept ones: only it is left finite, and
    generate, run greedy, takes it. generate's own draw (a multinomial over all 49,152
    probabilities of each row) took 8.4 ms a step for 8 rows and 1.5 ms for one on 2 cores,
    against 0.02 ms among 50."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        kept, where = self.kept(scores)
        drawn = where.gather(1, torch.multinomial(kept.softmax(dim=-1), 1))
        return torch.full_like(scores, -float("inf")).scatter_(1, drawn, 0.0)


class EnoughEnded(StoppingCriteria):
    """Stops a group of candidate rows once `enough` of them have ended their turn: a batch runs
    until its longest row ends, and one long candidate would keep the reply waiting for nothing."""

    def __init__(self, groups: Sequence[Sequence[int]], enough: int, ends: set[int], start: int) -> None:
        self.groups, self.enough, self.start = [list(g) for g in groups], max(1, enough), start
        self.ends = torch.tensor(sorted(ends))
        self.cut: set[int] = set()  # rows stopped before they ended

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        ended = torch.isin(input_ids[:, self.start:], self.ends.to(input_ids.device)).any(dim=1)
        done = torch.zeros_like(ended)
        for group in self.groups:
            if int(ended[group].sum()) >= min(self.enough, len(group)):
                done[group] = True
                self.cut.update(i for i in group if not ended[i])
        return done


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's threads set to `threads` for a while (None: left as they are)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads and before != threads:
            torch.set_num_threads(before)


def read_once(model, ids: torch.Tensor, mask: torch.Tensor, padded: bool = False):
    """(key/value cache, last logits) of a left-padded batch, each distinct row read by the model
    once, and at its own length where every layer caches every position (then left-padded into
    the batch's cache), unless `padded` asks for one padded batch of the distinct rows. Reading
    the prompts is most of a short reply's time on a CPU: a grounded reply's candidates share
    their prompt, and padding 8 channels' prompts of 130-500 tokens to the longest made a third
    of what a batch read, with attention growing as its square."""
    rows = [tuple(r) for r in torch.cat([ids, mask], dim=1).tolist()]
    distinct = list(dict.fromkeys(rows))
    first = [rows.index(r) for r in distinct]
    where = torch.tensor([distinct.index(r) for r in rows], device=ids.device)
    if padded or not caches_every_position(model):
        cache, logits = read_padded(model, ids[first], mask[first])
        cache.reorder_cache(where)
        return cache, logits[where]
    width = ids.shape[1]
    reads = [model(input_ids=ids[i:i + 1, width - int(mask[i].sum()):], use_cache=True, logits_to_keep=1)
             for i in first]
    cache = getattr(reads[0], _CACHE)
    for layer, *others in zip(cache.layers, *(getattr(r, _CACHE).layers for r in reads[1:]), strict=True):
        layer.keys = torch.cat([_left_pad(p.keys, width) for p in (layer, *others)])[where]
        layer.values = torch.cat([_left_pad(p.values, width) for p in (layer, *others)])[where]
    return cache, torch.cat([r.logits for r in reads])[where]


def caches_every_position(model) -> bool:
    """Whether each layer's key/value cache holds every position (no sliding window): a row read
    alone can then be left-padded into a batch's cache."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def read_padded(model, ids: torch.Tensor, mask: torch.Tensor):
    """(key/value cache, last logits) of a left-padded batch read whole."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return getattr(out, _CACHE), out.logits


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """Key or value states (1, heads, length, dim) with zeros before them up to `width` positions
    (masked out, like a left-padded batch's)."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[2], 0))


def end_token_ids(model, tokenizer) -> set[int]:
    """The token ids that end a turn: the generation config's eos ids and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch, and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class RecallContrast(LogitsProcessor):
    """Context-aware decoding (Shi et al., 2023, "Trusting Your Evidence"): each step's
    log-probabilities are pushed away from what the model would say without the recalled items,
    (1 + w) log p(y | prompt) - w log p(y | prompt without them). A 135M clone that ignores a
    recalled fact mostly does so because its chat habits outweigh it; the contrast takes out the
    habits the two prompts share. It runs the plain prompts of `rows` beside the batch, with their
    own cache. Sampling's temperature and top-p apply after it; repetition penalty before."""

    def __init__(self, model, rows: list[int], plain: list[list[int]], pad: int, weight: float = 1.0) -> None:
        device = next(model.parameters()).device
        self.model, self.weight = model, weight
        self.rows = torch.tensor(rows, device=device)
        self.ids, self.mask = (t.to(device) for t in left_padded(plain, pad))
        self.cache = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cache is None:  # the first step reads the plain prompts whole, each distinct one once
            self.cache, logits = read_once(self.model, self.ids, self.mask)
        else:  # then each step the token the batch just took
            ids = input_ids[self.rows, -1:]
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
            positions = (self.mask.cumsum(1) - 1).clamp(min=0)[:, -1:]
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{_CACHE: self.cache})
            self.cache, logits = getattr(out, _CACHE), out.logits
        told = torch.log_softmax(scores[self.rows].float(), dim=-1)
        untold = torch.log_softmax(logits[:, -1].float(), dim=-1)
        scores = scores.clone()
        scores[self.rows] = (told + self.weight * (told - untold)).to(scores.dtype)
        return scores
