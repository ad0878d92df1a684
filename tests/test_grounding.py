"""Grounded decoding (training.generate.RecallContrast): a reply weighed against the same prompt
without its recalled items. On the tiny random model, meaning cannot be tested; what can be is
that the contrast machinery is exact (against an identical prompt it changes nothing, whatever
the padding of the batch), that it pushes the way the recalled items point, only on the rows
asked, and that the serving backend's queue carries it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bot.generation import GenerationSettings, LocalBackend
from training.base_model import load_model, resolve_base
from training.encode import encode
from training.generate import generate_turns
from training.prompt import RECALL_HEADER, Recalled, recall_block

SYSTEM = "You are Sam. Reply the way Sam texts."
FACT = recall_block([Recalled("A golden retriever named Copper", asked="Do you have any pets?")])
CHATS = [
    [{"role": "system", "content": SYSTEM + FACT}, {"role": "user", "content": "got a dog?"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "a much longer message than the other one, so that rows are padded"}],
]
PLAIN = [{"role": "system", "content": SYSTEM}, CHATS[0][1]]


@pytest.fixture(scope="module")
def model(tiny_base):
    return load_model(resolve_base(str(tiny_base))).eval()


def greedy(model, tokenizer, plain=(), contrast=1.0, tokens=8) -> list[str]:
    turns = generate_turns(model, tokenizer, CHATS, max_new_tokens=tokens, temperature=0, plain=plain,
                           contrast=contrast)
    return [text for text, _ in turns]


def test_against_the_same_prompt_the_contrast_changes_nothing(model, tokenizer):
    # A weight this large turns any error in the side run's positions, mask or cache into other tokens.
    ordinary = greedy(model, tokenizer)
    assert greedy(model, tokenizer, plain=[CHATS[0], None], contrast=50.0) == ordinary
    assert greedy(model, tokenizer, plain=[None, CHATS[1]], contrast=50.0) == ordinary
    assert greedy(model, tokenizer, plain=CHATS, contrast=50.0) == ordinary


def first_logprobs(model, tokenizer, messages) -> torch.Tensor:
    ids = encode(messages, tokenizer, add_generation_prompt=True).input_ids
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_it_pushes_toward_what_the_recalled_items_add_and_only_on_its_rows(model, tokenizer):
    told, untold = first_logprobs(model, tokenizer, CHATS[0]), first_logprobs(model, tokenizer, PLAIN)
    added = int(torch.argmax(told - untold))  # the token the recalled fact makes likelier the most
    assert int(torch.argmax(told)) != added  # else the test could not tell
    first = generate_turns(model, tokenizer, CHATS, max_new_tokens=1, temperature=0, plain=[PLAIN, None],
                           contrast=50.0)
    assert tokenizer.encode(first[0][0], add_special_tokens=False) == [added]
    assert first[1][0] == greedy(model, tokenizer, tokens=1)[1]  # the other row decodes as ever
    assert greedy(model, tokenizer, plain=[PLAIN, None], contrast=0.0) == greedy(model, tokenizer)


def test_the_serving_queue_carries_grounded_requests(model, tokenizer):
    backend = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=4, temperature=0))
    seen: list = []
    real = backend.generate_batch

    def spy(conversations, plain=None, groups=None):
        seen.append((plain, groups))
        return real(conversations, plain, groups)

    backend.generate_batch = spy

    async def both():
        try:
            return await asyncio.gather(backend.generate_grounded(CHATS[0], PLAIN, candidates=3),
                                        backend.generate(CHATS[1]))
        finally:
            await backend.close()

    grounded, ordinary = asyncio.run(both())
    assert len(grounded) == 3 and all(g.text for g in grounded) and ordinary.text is not None
    assert [p for plain, _ in seen for p in (plain or [None])].count(PLAIN) == 3  # a row per candidate
    assert [g for _, groups in seen for g in (groups or [])] in ([[0, 1, 2]], [[1, 2, 3]])
    assert RECALL_HEADER not in PLAIN[0]["content"]


def test_candidates_stop_once_enough_have_ended():
    from training.generate import EnoughEnded

    end, start = 7, 2
    stop = EnoughEnded([[0, 1, 2], [3, 4]], enough=2, ends={end}, start=start)
    prompt = [end, 1]  # an end token in the prompt does not count; row 5 is no candidate
    assert not stop(torch.tensor([[*prompt, 3]] * 6), None).any()
    one_ended = torch.tensor([[*prompt, t] for t in [end, 3, 3, 3, 3, 3]])
    assert not stop(one_ended, None).any()  # one of three: the group goes on
    two_ended = torch.tensor([[*prompt, t] for t in [end, 3, end, end, 3, 3]])
    assert stop(two_ended, None).tolist() == [True, True, True, False, False, False]
    assert stop.cut == {1}  # stopped before its end: truncated
    never_zero = EnoughEnded([[0, 1]], enough=0, ends={end}, start=start)
    assert not never_zero(torch.tensor([[*prompt, 3]] * 2), None).any()  # at least one must end


def reads(model) -> tuple[list[int], object]:
    """The batch size of each forward pass that reads more than one token per row (a prompt)."""
    sizes: list[int] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            sizes.append(ids.shape[0])

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_candidates_of_one_prompt_read_it_once_and_decode_as_if_read_apart(model, tokenizer):
    apart = generate_turns(model, tokenizer, [CHATS[0], CHATS[1]], max_new_tokens=8, temperature=0,
                           plain=[PLAIN, None])
    sizes, handle = reads(model)
    try:
        together = generate_turns(model, tokenizer, [CHATS[0], CHATS[0], CHATS[1], CHATS[0]],
                                  max_new_tokens=8, temperature=0, plain=[PLAIN, PLAIN, None, PLAIN])
    finally:
        handle.remove()
    assert sizes == [1, 1, 1]  # the two prompts once each, then the one plain prompt once
    assert together == [apart[0], apart[0], apart[1], apart[0]]


def lengths_read(model) -> tuple[list[int], object]:
    """The lengths of the prompts the model reads (forward passes of more than one token)."""
    read: list[int] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            read.extend([ids.shape[1]] * ids.shape[0])

    return read, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_batch_reads_each_prompt_at_its_own_length_and_replies_as_if_alone(model, tokenizer):
    lengths = [len(encode(c, tokenizer, add_generation_prompt=True).input_ids) for c in CHATS]
    assert lengths[0] != lengths[1]  # one of them is padded in the batch
    alone = [generate_turns(model, tokenizer, [c], max_new_tokens=8, temperature=0)[0] for c in CHATS]
    read, handle = lengths_read(model)
    try:
        together = generate_turns(model, tokenizer, CHATS, max_new_tokens=8, temperature=0)
    finally:
        handle.remove()
    assert read == [n - 1 for n in lengths]  # no padding read; generate takes each last token
    assert together == alone


@pytest.mark.parametrize("why", ["the cache keeps a window", "padded reads asked for"])
def test_a_batch_read_padded_replies_the_same(model, tokenizer, monkeypatch, why):
    from training import generate

    alone = [generate_turns(model, tokenizer, [c], max_new_tokens=8, temperature=0)[0] for c in CHATS]
    if why == "the cache keeps a window":
        monkeypatch.setattr(generate, "caches_every_position", lambda _model: False)
    read, handle = lengths_read(model)
    try:
        together = generate_turns(model, tokenizer, CHATS, max_new_tokens=8, temperature=0,
                                  padded_read=why == "padded reads asked for")
    finally:
        handle.remove()
    assert len(set(read)) == 1 and len(read) == 2  # one padded batch
    assert together == alone


@pytest.mark.parametrize("amx", [True, False])
def test_the_backend_reads_a_batch_padded_where_the_cpu_has_amx(model, tokenizer, monkeypatch, amx):
    from bot import generation

    monkeypatch.setattr(generation, "cpu_has_fast_bf16", lambda: amx)
    settings = GenerationSettings(max_new_tokens=4, temperature=0)
    assert settings.padded_reads is amx
    lengths = [len(encode(c, tokenizer, add_generation_prompt=True).input_ids) for c in CHATS]
    read, handle = lengths_read(model)
    try:
        LocalBackend(model, tokenizer, settings).generate_batch(CHATS)
    finally:
        handle.remove()
    assert read == ([max(lengths) - 1] * 2 if amx else [n - 1 for n in lengths])
