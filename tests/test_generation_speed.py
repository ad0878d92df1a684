"""What the faster serving path (issue 13) must keep: the same replies, the adapter swap and
rollback, and a reply cap taken from the person's own replies. Behaviour only: the speed is
measured by benchmarks/serve_speed.py."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from bot.generation import (
    MIN_REPLY_TOKENS,
    NATURAL_ATTR,
    AdapterWatcher,
    GenerationSettings,
    LocalBackend,
    cpu_has_fast_bf16,
    load_clone,
    natural_reply_tokens,
    prepare_for_serving,
    serving_dtype,
)
from training import adapters
from training.base_model import folder_sha256, load_model, resolve_base
from training.generate import generate_turns
from training.prompt import CONTRACT_VERSION

HELLO = [[{"role": "system", "content": "You are Sam."}, {"role": "user", "content": "hello there"}],
         [{"role": "user", "content": "what do you think about pizza?"}]]


def noisy_lora(tiny_base: Path, seed: int, head: bool = False):
    """The tiny base with a LoRA whose B weights are noise: it changes the outputs, as a trained
    adapter does (a fresh one, B = 0, would merge into the base unchanged). With `head`, the
    output layer (tied to the embeddings) gets LoRA too, as `clone train`'s lora_head gives it."""
    from peft import LoraConfig, get_peft_model

    model = load_model(resolve_base(str(tiny_base)))
    targets = r".*(_proj|lm_head)" if head else "all-linear"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def save_adapter(root: Path, version: str, tiny_base: Path, tokenizer, seed: int) -> Path:
    """An adapter registry entry as `clone train` leaves it: weights, tokenizer, manifest last."""
    folder = root / version
    noisy_lora(tiny_base, seed).save_pretrained(folder, save_embedding_layers=False)
    tokenizer.save_pretrained(folder)
    manifest = {"version": version, "persona": {"id": "sam"}, "prompt_contract": CONTRACT_VERSION,
                "base_model": {"id": tiny_base.name, "sha256": folder_sha256(tiny_base), "source": "folder"},
                "dataset": {"train_samples": 0}}
    (folder / adapters.MANIFEST).write_text(json.dumps(manifest))
    return folder


def hashes(*folders: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in f.iterdir()}


def greedy(model, tokenizer) -> list[str]:
    return [text for text, _ in generate_turns(model, tokenizer, HELLO, max_new_tokens=12, temperature=0)]


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("head", [False, True], ids=["body", "with-head"])
def test_the_merged_copy_answers_as_the_attached_adapter(tiny_base, tokenizer, head):
    attached = noisy_lora(tiny_base, seed=1, head=head)
    merged = prepare_for_serving(copy.deepcopy(attached), precision="fp32")
    base = load_model(resolve_base(str(tiny_base)))
    assert not hasattr(merged, "peft_config") and merged.dtype == torch.float32
    assert not torch.allclose(logits(attached, tokenizer), logits(base, tokenizer), atol=1e-2)  # it matters
    assert torch.allclose(logits(merged, tokenizer), logits(attached, tokenizer), atol=1e-4)
    assert greedy(merged, tokenizer) == greedy(attached, tokenizer)
    assert hasattr(attached, "peft_config")  # the attached model was copied, not merged
    # Merging the head's LoRA left the tied embeddings (how the model reads) as they were.
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_swap_and_rollback_serve_the_new_merged_adapter(tiny_base, tokenizer, tmp_path):
    root = tmp_path / "adapters"
    first = save_adapter(root, "v1", tiny_base, tokenizer, seed=1)
    second = save_adapter(root, "v2", tiny_base, tokenizer, seed=2)
    files = hashes(first, second)
    adapters.activate(root, "v1")
    model, _, what = load_clone(root, base=str(tiny_base), precision="fp32")
    assert what == "adapter v1" and not hasattr(model, "peft_config")
    backend = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=4))
    watcher = AdapterWatcher(backend, root, base=str(tiny_base), precision="fp32")
    expected = {v: logits(load_clone(root, v, base=str(tiny_base), precision="fp32")[0], tokenizer)
                for v in ("v1", "v2")}

    async def scenario():
        try:
            adapters.activate(root, "v2")
            assert await watcher.check() and watcher.version == "v2" and backend.model is not model
            assert isinstance((await backend.generate(HELLO[0])).text, str)
            assert torch.allclose(logits(backend.model, tokenizer), expected["v2"], atol=1e-3)
            adapters.activate(root, "v1")  # a rollback
            assert await watcher.check() and watcher.version == "v1"
            assert torch.allclose(logits(backend.model, tokenizer), expected["v1"], atol=1e-3)
        finally:
            await backend.close()

    asyncio.run(scenario())
    assert not torch.allclose(expected["v1"], expected["v2"], atol=1e-2)
    # Merging never touched the adapter folders: they stay the source of truth.
    assert files == hashes(first, second)


def test_the_reply_cap_comes_from_the_persons_replies(tiny_base, tiny_dataset, tokenizer, tmp_path):
    replies = [m["content"] for line in (tiny_dataset / "train.jsonl").read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    lengths = sorted(len(tokenizer(r, add_special_tokens=False).input_ids) + 1 for r in replies)
    expected = max(MIN_REPLY_TOKENS, lengths[int(0.95 * len(lengths) + 0.999) - 1])
    assert natural_reply_tokens(tiny_dataset, tokenizer) == expected
    assert natural_reply_tokens(tmp_path / "nowhere", tokenizer) is None

    persona = tmp_path / "sam"  # the dataset beside the adapters, as in a persona folder
    save_adapter(persona / "adapters", "v1", tiny_base, tokenizer, seed=1)
    shutil.copytree(tiny_dataset, persona / "dataset")
    model, _, _ = load_clone(persona / "adapters", "v1", base=str(tiny_base), precision="fp32")
    assert getattr(model, NATURAL_ATTR) == expected
    bare, _, _ = load_clone(persona / "adapters", "v1", base=str(tiny_base), precision="fp32",
                            dataset=tmp_path / "nowhere")
    assert getattr(bare, NATURAL_ATTR) is None

    backend = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=expected + 10))
    assert backend.reply_cap(model) == expected
    assert LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=3)).reply_cap(model) == 3
    assert backend.reply_cap(bare) == expected + 10
    fixed = LocalBackend(model, tokenizer,
                         GenerationSettings(max_new_tokens=expected + 10, natural_length=False))
    assert fixed.reply_cap(model) == expected + 10


def test_a_batch_is_generated_with_the_natural_cap(tiny_base, tokenizer, monkeypatch):
    import bot.generation

    caps: list[int] = []

    def spy(model, tokenizer, conversations, **kw):
        caps.append(kw["max_new_tokens"])
        return [("hi", False)] * len(conversations)

    monkeypatch.setattr(bot.generation, "generate_turns", spy)
    model = load_model(resolve_base(str(tiny_base)))
    setattr(model, NATURAL_ATTR, 20)
    LocalBackend(model, tokenizer).generate_batch(HELLO)
    assert caps == [20]


def test_bf16_where_the_cpu_runs_it_fast_and_fp32_elsewhere(tiny_base, tokenizer, tmp_path, monkeypatch):
    import bot.generation

    assert serving_dtype("fp32") == torch.float32 and serving_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        serving_dtype("fp8")
    assert serving_dtype() == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    monkeypatch.setattr(bot.generation, "cpu_has_fast_bf16", lambda: False)
    assert serving_dtype() == torch.float32
    monkeypatch.setattr(bot.generation, "cpu_has_fast_bf16", lambda: True)
    save_adapter(tmp_path / "adapters", "v1", tiny_base, tokenizer, seed=1)
    model, _, _ = load_clone(tmp_path / "adapters", "v1", base=str(tiny_base))
    assert model.dtype == torch.bfloat16
    backend = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=6))
    generated = backend.generate_batch(HELLO)
    assert len(generated) == 2 and all(isinstance(g.text, str) and g.text for g in generated)


def test_one_reply_on_half_the_cores_a_batch_on_all(tiny_base, tokenizer):
    import os

    from bot.generation import serving_threads

    assert (serving_threads(1), serving_threads(2), serving_threads(16)) == (1, 1, 8)
    assert GenerationSettings().threads == serving_threads()
    assert GenerationSettings().batch_threads == os.cpu_count()
    model = load_model(resolve_base(str(tiny_base)))
    before = torch.get_num_threads()
    try:
        for threads in (1, None):
            torch.set_num_threads(2)
            settings = GenerationSettings(max_new_tokens=2, threads=threads, batch_threads=None)
            LocalBackend(model, tokenizer, settings).generate_batch(HELLO)
            assert torch.get_num_threads() == (threads or 2)  # None: torch's own choice, untouched
        split = GenerationSettings(max_new_tokens=2, threads=1, batch_threads=3)
        backend = LocalBackend(model, tokenizer, split)
        backend.generate_batch(HELLO[:1])
        assert torch.get_num_threads() == 1  # one channel
        backend.generate_batch(HELLO)
        assert torch.get_num_threads() == 3  # several at once
    finally:
        torch.set_num_threads(before)


def test_fp16_weights_answer_as_fp32_where_fbgemm_runs_them(tiny_base, tokenizer, tmp_path, monkeypatch):
    import bot.generation
    from bot.generation import HalfWeightLinear, half_weights_work, served_precision, serving_precision

    # This CI runs on x86: fbgemm is there, and the check must find it.
    assert half_weights_work() == ("fbgemm" in torch.backends.quantized.supported_engines)
    assert serving_precision("fp16") == "fp16" and serving_dtype("fp16") == torch.float32
    monkeypatch.setattr(bot.generation, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(bot.generation, "cpu_multiplies_bf16", lambda: False)  # the fp16 weights alone
    assert serving_precision() == ("fp16" if half_weights_work() else "fp32")

    attached = noisy_lora(tiny_base, seed=1)
    full = prepare_for_serving(copy.deepcopy(attached), precision="fp32")
    half = prepare_for_serving(copy.deepcopy(attached), precision="fp16")
    linears = [m for m in half.modules() if isinstance(m, HalfWeightLinear)]
    assert len(linears) == sum(type(m) is torch.nn.Linear for m in full.modules()) > 0
    assert served_precision(half) == "fp16 weights" and served_precision(full) == "float32"
    # The output layer shares the embeddings' weight: it stays there for their lookup.
    assert half.get_output_embeddings().weight is half.get_input_embeddings().weight
    got, want = logits(half, tokenizer), logits(full, tokenizer)
    assert (got - want).abs().max() <= 0.01 * want.abs().max()  # fp16 rounding: ~1e-3 relative
    base = load_model(resolve_base(str(tiny_base)))
    assert not torch.allclose(got, logits(base, tokenizer), atol=1e-2)  # the adapter is in them
    assert greedy(half, tokenizer) == greedy(full, tokenizer)

    save_adapter(tmp_path / "adapters", "v1", tiny_base, tokenizer, seed=1)
    model, _, _ = load_clone(tmp_path / "adapters", "v1", base=str(tiny_base))
    assert served_precision(model) == ("fp16 weights" if half_weights_work() else "float32")
    generated = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=6)).generate_batch(HELLO)
    assert len(generated) == 2 and all(isinstance(g.text, str) and g.text for g in generated)




def test_a_bf16_copy_reads_wide_inputs_and_fp16_weights_take_a_replys_steps(monkeypatch):
    """Where the CPU multiplies bf16 natively, a prompt's rows (WIDE_ROWS or more) go through the
    layer's bf16 copy and a reply's step (a few rows) through its fp16 weights; both near fp32."""
    import bot.generation
    from bot.generation import WIDE_ROWS, HalfWeightLinear, half_weights_work, packing_works, served_precision

    assert half_weights_work()  # x86 CI: fbgemm is there
    # oneDNN packs bf16 only with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU
    # packing_works() is False, and what is checked there is that serving does without the copy.
    if packing_works():
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, 48)
        layer = HalfWeightLinear(linear, wide=True)
        narrow = torch.ops.quantized.linear_dynamic_fp16
        for rows in (1, WIDE_ROWS - 1, WIDE_ROWS, 300):
            x = torch.randn(1, rows, 64)
            with torch.no_grad():
                got, want, fp16 = layer(x), linear(x), narrow(x, layer.packed)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got - want).abs().max() <= 0.02 * want.abs().max()  # bf16 rounding: ~0.5 %
            assert torch.equal(got, fp16) == (rows < WIDE_ROWS)  # which copy multiplied
    # prepare_for_serving keeps the copy only on a CPU with native bf16 whose torch can pack it.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    for native in (True, False):
        monkeypatch.setattr(bot.generation, "cpu_multiplies_bf16", lambda native=native: native)
        served = prepare_for_serving(copy.deepcopy(model), precision="fp16")
        kept = native and packing_works()
        assert (served[0].wide is not None) == kept
        assert served_precision(served) == "fp16 weights" + (", bf16 for prompts" if kept else "")


# -- several channels at once ------------------------------------------------------------------

def test_requests_arriving_a_few_milliseconds_apart_share_a_batch(tiny_base, tokenizer):
    """Channels that send at once reach the queue one after another (each after its recall): the
    first waits for the others rather than running alone."""
    model = load_model(resolve_base(str(tiny_base))).eval()
    batches: list[int] = []

    def run(gap: float) -> list[int]:
        backend = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=2, batch_gap=gap))
        inner = backend.generate_batch
        backend.generate_batch = lambda conversations, *a, **k: (batches.append(len(conversations)),
                                                                 inner(conversations, *a, **k))[1]

        async def staggered() -> None:
            async def send(i: int):
                await asyncio.sleep(0.01 * i)
                return await backend.generate(HELLO[i % 2])
            try:
                await asyncio.gather(*(send(i) for i in range(3)))
            finally:
                await backend.close()

        batches.clear()
        asyncio.run(staggered())
        return list(batches)

    assert run(gap=0.05) == [3]  # one batch
    assert run(gap=0.0)[0] == 1  # without the gap the first runs alone


# -- sampling without sorting the vocabulary (Nucleus) -------------------------------------------

def test_nucleus_gives_the_scores_of_transformers_own_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from training.generate import TOP_K, Nucleus

    torch.manual_seed(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    for spread in (4.0, 1.0, 0.01):  # nuclei of a few tokens, of dozens, all of the top-k
        scores = torch.randn(5, 5000) * spread
        for temperature, top_p in ((0.8, 0.9), (1.3, 0.5), (0.5, 0.99), (0.8, 1.0)):
            want = scores.clone()
            warpers = TemperatureLogitsWarper(temperature), TopKLogitsWarper(TOP_K), TopPLogitsWarper(top_p)
            for warper in warpers:
                want = warper(ids, want)
            got = Nucleus(temperature, top_p)(ids, scores.clone())
            assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens kept
            assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])
    kept = (~torch.isinf(Nucleus(0.8, 0.9)(ids, torch.randn(5, 5000)))).sum(dim=1)
    assert kept.min() >= 1 and kept.max() <= TOP_K


def test_a_drawn_token_is_one_nucleus_keeps_as_often_as_its_probability():
    from training.generate import Nucleus, NucleusDraw

    torch.manual_seed(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = torch.randn(1, 5000) * 4.0  # a nucleus of a few tokens
    kept = Nucleus(0.8, 0.9)(ids, scores.clone())
    want = kept.softmax(dim=-1)[0]
    draw = NucleusDraw(0.8, 0.9)
    counts = torch.zeros(5000)
    for _ in range(4000):
        out = draw(ids, scores.clone())[0]
        assert int(torch.isfinite(out).sum()) == 1  # one token left for generate to take
        counts[out.argmax()] += 1
    assert (counts[want == 0] == 0).all()  # never one that Nucleus drops
    assert torch.allclose(counts / 4000, want, atol=0.03)


def test_sampled_turns_follow_the_seed(tiny_base, tokenizer):
    model = load_model(resolve_base(str(tiny_base))).eval()

    def sampled(seed: int) -> str:
        torch.manual_seed(seed)
        [(turn, _)] = generate_turns(model, tokenizer, HELLO[:1], max_new_tokens=12, temperature=0.8,
                                     top_p=0.9, repetition_penalty=1.1)
        return turn

    first = [sampled(seed) for seed in range(3)]
    assert [sampled(seed) for seed in range(3)] == first  # the same seed, the same replies
    assert len(set(first)) > 1  # sampled, not greedy


def test_prompts_are_read_on_the_read_threads_and_steps_run_on_those_set(tiny_base, tokenizer):
    model = load_model(resolve_base(str(tiny_base))).eval()
    seen: list[tuple[int, int]] = []  # (tokens per row read, torch threads then)
    handle = model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((kwargs["input_ids"].shape[1], torch.get_num_threads())),
        with_kwargs=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_turns(model, tokenizer, HELLO[:1], max_new_tokens=4, temperature=0, read_threads=2)
        after = torch.get_num_threads()
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert seen[0][0] > 1 and seen[0][1] == 2  # the prompt, on 2 threads
    assert all(n == 1 and threads == 1 for n, threads in seen[1:])  # each step, on the one set
    assert after == 1
