"""Batch generation of the clone's next turn, shared by serving (bot.generation) and evaluation.

Prompts are encoded by `training.encode.encode`, the injection-safe encoding training used: a
message's text can never become a template token, however it is written.
"""

from __future__ import annotations

import torch

from training.encode import encode


@torch.no_grad()
def generate_turns(
    model, tokenizer, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 64,
    temperature: float = 0.8, top_p: float = 0.9, repetition_penalty: float = 1.0,
) -> list[tuple[str, bool]]:
    """(raw text, truncated) per conversation: left-padded, one batch. `truncated` is True when
    the token cap stopped the row before the model ended its turn."""
    prompts = [encode(c, tokenizer, add_generation_prompt=True).input_ids for c in conversations]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    sample = temperature > 0
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
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
