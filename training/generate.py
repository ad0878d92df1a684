"""Batch generation of the clone's next turn, shared by serving (bot.generation) and evaluation.

Prompts are encoded by `training.encode.encode`, the injection-safe encoding training used: a
message's text can never become a template token, however it is written.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from training.encode import encode


@torch.no_grad()
def generate_turns(
    model, tokenizer, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 64,
    temperature: float = 0.8, top_p: float = 0.9, repetition_penalty: float = 1.0,
    prefill_threads: int | None = None,
) -> list[tuple[str, bool]]:
    """(raw text, truncated) per conversation: left-padded, one batch. `truncated` is True when
    the token cap stopped the row before the model ended its turn. With `prefill_threads`, the
    prompts are read on that many torch threads (see `prefill`), the reply on the caller's."""
    prompts = [encode(c, tokenizer, add_generation_prompt=True).input_ids for c in conversations]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    sample = temperature > 0
    read = {cache_argument(model): prefill(model, ids, mask, prefill_threads)} if prefill_threads else {}
    out = model.generate(
        **read,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        repetition_penalty=repetition_penalty,
        pad_token_id=pad,
    )
    new = out[:, width:]
    ends = end_token_ids(model, tokenizer)
    texts = tokenizer.batch_decode(new, skip_special_tokens=False)
    return [(text, len(row) >= max_new_tokens and not ends & set(row.tolist()))
            for text, row in zip(texts, new, strict=True)]


def end_token_ids(model, tokenizer) -> set[int]:
    """The token ids that end a turn: the generation config's eos ids and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, threads: int):
    """The keys and values of every prompt token but the last (which `generate` reads to start
    the reply), computed on `threads`. Reading a prompt is a few large matrix products that every
    core speeds up; each reply step reads all the weights for one token, which memory bounds and
    which more threads on busy cores slow down. Positions are generate's own: counted over the
    attention mask, padding at 1."""
    position = mask.long().cumsum(-1) - 1
    position.masked_fill_(mask == 0, 1)
    with torch_threads(threads):
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position[:, :-1],
                    use_cache=True)
    return out["cache"] if "cache" in out else out["past_key_values"]


def cache_argument(model) -> str:
    """What this transformers calls a model's key/value cache: `cache` from 5.2x on (the old name
    still works, with a warning), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
