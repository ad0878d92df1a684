"""Chat samples to token ids with a loss mask, and the loss computed only where that mask is set.

The chat template renders a sample exactly as serving will; the person's turns (and the
end-of-turn token that closes each, so the clone learns when to stop) are the only labels.
Finding those spans in the rendered text (each message's text stood in for by a placeholder, so
no text a user types can move them) keeps this template-agnostic, where TRL's
`assistant_only_loss` needs `{% generation %}` markers that SmolLM2's template lacks.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


_REWRITES = (
    "this model's chat template rewrites message text (e.g. trims it), so the person's turns "
    "cannot be located for the loss mask; use a template that keeps it"
)


def encode(
    messages: list[dict[str, str]], tokenizer, max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Token ids of the rendered chat, labels set on the assistant turns only.

    The template's own text is tokenized with its special tokens; every message's text is
    tokenized with special tokens split into plain pieces, so a user who types
    `<|im_start|>system` gets those characters, never a new role.
    """
    ids: list[int] = []
    labels: list[int] = []
    closes_turn = False  # the next template token ends the person's turn: learn to stop, too

    def add(segment: str, is_content: bool, learn: bool) -> None:
        nonlocal closes_turn
        piece: list[int] = []
        if segment:
            piece = tokenizer(segment, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))
        if piece and closes_turn and not is_content:
            labels[len(labels) - len(piece)] = piece[0]
        if piece or is_content:  # an empty turn of the person's still learns its end
            closes_turn = learn

    layout, tail = _layout(messages, tokenizer, add_generation_prompt)
    for before, i in layout:
        add(before, is_content=False, learn=False)
        add(messages[i]["content"], is_content=True, learn=messages[i]["role"] == "assistant")
    add(tail, is_content=False, learn=False)
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels)


def _layout(
    messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool,
) -> tuple[list[tuple[str, int]], str]:
    """The rendered chat cut around each message's text: (the template's text before it, the
    message's index) in rendered order, and the template's text after the last.

    The template is rendered with a placeholder no message contains in place of each text, so
    the cut never depends on what a message says: searching for the text itself would match the
    template's own markers when a user types them. Rendering the real chat too checks that the
    template keeps each text as it is.
    """
    def render(chat: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    nonce = secrets.token_hex(16)
    while any(nonce in m["content"] for m in messages):
        nonce = secrets.token_hex(16)
    holders = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
    text = render([{**m, "content": h} for m, h in zip(messages, holders, strict=True)])
    if any(text.count(h) != 1 for h in holders):
        raise ValueError(_REWRITES)
    layout, cursor = [], 0
    for i in sorted(range(len(messages)), key=lambda i: text.index(holders[i])):
        start = text.index(holders[i])
        layout.append((text[cursor:start], i))
        cursor = start + len(holders[i])
    tail = text[cursor:]
    if "".join(before + messages[i]["content"] for before, i in layout) + tail != render(messages):
        raise ValueError(_REWRITES)
    return layout, tail


def load_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def collate(batch: list[Encoded | dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest member; padding is masked out of attention and loss."""
    rows = [b if isinstance(b, dict) else {"input_ids": b.input_ids, "labels": b.labels} for b in batch]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_nlls(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative log-likelihood of each labelled token, and where they are: a mask over the
    batch's positions from the second on (position j of the mask is token j + 1).

    The language-model head (576 x 49,152 for SmolLM2) runs only at positions that have a
    label: most of a chat is context, so this skips most of the largest matmul and never holds
    full-vocabulary logits for the whole batch.
    """
    lm = causal_lm(model)
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="none"), keep


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the labelled tokens, and how many there were."""
    nll, keep = token_nlls(model, batch)
    return nll.sum(), int(keep.sum())
