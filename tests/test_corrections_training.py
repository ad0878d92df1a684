"""The owner's corrections feed training: weighted samples through the prompt contract, preference
pairs for TRL's DPO after supervised training, redacted like everything else that is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import adapters, corrections, dataset, feedback
from training.config import PrepareConfig
from training.encode import IGNORE
from training.persona import Persona
from training.prompt import Recalled, system_prompt
from training.train import load_pairs, load_split, train

from .conftest import chat_messages
from .test_cli import run, whatsapp_export
from .test_train import tiny_config

PERSONA = Persona(name="Sam", me=("u1",))
CONTEXT = [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"},
           {"role": "user", "content": "free tonight?"}]
RECALLED = [{"text": "I work late on Fridays", "asked": None, "speaker": None}]


def correction(n: int, *, text: str | None = None, rating: str | None = None, reply: str = "maybe",
               context: list[dict] | None = None, recalled: list[dict] | None = None) -> dict:
    verdict = {"text": text} if text is not None else {"rating": rating}
    return {"id": f"c{n}", "reply_id": f"r{n}", "context": context or CONTEXT,
            "recalled": RECALLED if recalled is None else recalled, "reply": reply, **verdict}


def fed(items: list[dict], count_tokens, max_tokens: int = 128) -> feedback.Feedback:
    return feedback.from_corrections(items, PERSONA, count_tokens, max_tokens)


def corrected_dataset(folder: Path, items: list[dict], count_tokens) -> Path:
    """The tiny chats with `items` added, as `clone prepare` adds a persona's corrections."""
    cfg = PrepareConfig(me=["u1"], val_fraction=0.2, max_tokens=128, recall_tokens=0)
    prepared = dataset.build(chat_messages(), PERSONA, cfg, count_tokens)
    dataset.add_feedback(prepared, fed(items, count_tokens))
    dataset.write(prepared, folder)
    return folder


def test_a_corrected_reply_becomes_a_sample_of_the_prompt_contract(count_tokens):
    out = fed([correction(1, text="yes!! 8pm?")], count_tokens)
    [sample] = out.samples
    recalled = [Recalled("I work late on Fridays")]
    assert sample["messages"] == [{"role": "system", "content": system_prompt(PERSONA, recalled)}, *CONTEXT,
                                  {"role": "assistant", "content": "yes!! 8pm?"}]
    assert sample["correction"] is True and sample["conversation"] == "correction:c1"
    [pair] = out.pairs
    assert pair["prompt"] == sample["messages"][:-1]
    assert pair["chosen"] == [{"role": "assistant", "content": "yes!! 8pm?"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "maybe"}]
    assert out.card() == {"read": 1, "used": 1, "samples": 1, "pairs": 1, "skipped": {}}


def test_corrections_are_trained_on_correction_weight_times(count_tokens, tokenizer, tmp_path):
    items = [correction(1, text="yes!! 8pm?"), correction(2, text="nope", context=CONTEXT[2:])]
    data = corrected_dataset(tmp_path / "dataset", items, count_tokens)
    card = json.loads((data / "card.json").read_text())
    assert card["corrections"]["samples"] == 2
    once = load_split(data, "train", tokenizer, 640, correction_weight=0)
    weighted = load_split(data, "train", tokenizer, 640, correction_weight=3)
    extra = weighted[len(once):]
    assert len(extra) == 3 * 2
    # Each repeat learns the owner's words (and the end of the turn) after the whole context, and
    # nothing of the context: its assistant turns are the clone's.
    targets = {tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"], strict=True)
                                 if label != IGNORE]) for r in extra}
    assert targets == {"yes!! 8pm?<|im_end|>", "nope<|im_end|>"}


def test_a_reply_rated_good_is_the_target(count_tokens):
    out = fed([correction(1, rating="good", reply="sure, after 8\nwhere?")], count_tokens)
    [sample] = out.samples
    assert sample["messages"][-1] == {"role": "assistant", "content": "sure, after 8\nwhere?"}
    assert sample["messages"][1:-1] == CONTEXT
    assert out.pairs == []  # nothing was rejected


def test_a_bad_rating_is_rejected_only_against_a_better_answer(count_tokens):
    alone = fed([correction(1, rating="bad", reply="whatever")], count_tokens)
    assert alone.samples == [] and alone.pairs == []
    assert alone.card()["skipped"] == {"rated bad with no better answer": 1}
    # The same prompt answered by the owner (another correction): the bad reply is rejected too.
    both = fed([correction(1, rating="bad", reply="whatever"), correction(2, text="yes!!", reply="maybe")],
               count_tokens)
    rejected = {p["rejected"][0]["content"] for p in both.pairs}
    assert rejected == {"whatever", "maybe"} and {p["chosen"][0]["content"] for p in both.pairs} == {"yes!!"}
    assert both.card()["used"] == 2


def test_malformed_and_oversized_corrections_are_skipped(count_tokens):
    long_context = [{"role": "user", "content": "blah " * 400}]
    items = [correction(1, text="ok", context=[{"role": "assistant", "content": "hi"}]),  # answers nobody
             {"id": "c2", "context": CONTEXT, "reply": "x", "text": "a", "rating": "bad"},
             correction(3, text="ok", context=long_context),
             {**correction(5, text="ok"), "context": []}]  # /correct after the window forgot the message
    out = fed(items, count_tokens)
    assert out.samples == [] and out.card()["skipped"] == {
        "malformed": 2, "over the token budget": 1, "without the message it answered": 1}
    # A long conversation loses its oldest turns first, as serving's prompt does.
    kept = fed([correction(4, text="ok", context=[*long_context, *CONTEXT])], count_tokens)
    assert kept.samples[0]["messages"][1:-1] == CONTEXT


def test_phone_numbers_and_emails_in_corrections_are_redacted(count_tokens, tmp_path):
    items = [correction(1, text="call me on +44 20 7946 0958 or mail sam@example.com",
                        context=[{"role": "user", "content": "my mail is dana@example.org, yours?"}],
                        reply="it's 415-555-0132")]
    data = corrected_dataset(tmp_path / "dataset", items, count_tokens)
    written = (data / "train.jsonl").read_text() + (data / dataset.PAIRS_FILE).read_text()
    for private in ("7946", "sam@example.com", "dana@example.org", "555-0132"):
        assert private not in written
    assert "call me on [PHONE] or mail [EMAIL]" in written and "it's [PHONE]" in written
    card = json.loads((data / "card.json").read_text())
    assert card["redactions"]["phone"] >= 2 and card["redactions"]["email"] >= 2


def test_the_dpo_stage_trains_the_adapter_and_saves_it_whole(tiny_base, count_tokens, tokenizer, tmp_path):
    items = [correction(i, text=f"yes!! {i} pm", reply="maybe idk", context=[
        {"role": "user", "content": f"free at {i}?"}]) for i in range(6)]
    data = corrected_dataset(tmp_path / "dataset", items, count_tokens)
    assert len(load_pairs(data, tokenizer, 640)) == 6
    settings = dict(max_steps=2, eval_steps=100, save_steps=100, preference_epochs=1.0, preference_lr=1e-2)
    plain = train(tiny_config(tiny_base, data, tmp_path / "plain", preference="none", **settings))
    out = tmp_path / "adapters"
    result = train(tiny_config(tiny_base, data, out, preference="dpo", **settings))
    stage = result.manifest["metrics"]["preference"]
    assert stage["method"] == "dpo" and stage["pairs"] == 6 and stage["steps"] == 2
    assert plain.manifest["metrics"]["preference"] is None
    # The preference stage moved the adapter: the same supervised run scores otherwise after it.
    assert result.manifest["metrics"]["val_loss"] != plain.manifest["metrics"]["val_loss"]
    assert result.manifest["dataset"]["corrections"]["pairs"] == 6
    # One adapter, TRL's frozen reference copy left out; staged and renamed whole, work removed.
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == result.manifest["base_model"]["id"]
    assert not (result.path / "ref").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".work") == []
    assert not (out / ".work" / result.version).exists()
    model, _, _ = adapters.load(out, base=str(tiny_base))
    assert list(model.peft_config) == ["default"]


def test_weight_zero_leaves_corrections_out(count_tokens, tokenizer, tmp_path):
    data = corrected_dataset(tmp_path / "dataset", [correction(1, text="yes")], count_tokens)
    samples = [json.loads(line) for line in (data / "train.jsonl").open()]
    chats = [s for s in samples if not s.get("correction")]
    assert len(load_split(data, "train", tokenizer, 640, correction_weight=0)) == len(chats)


def test_the_store_and_prepare_agree(tmp_path, count_tokens):
    """What the console stores (training.corrections.add) is what feedback reads."""
    path = corrections.corrections_file(tmp_path)
    corrections.add(path, reply_id="r", context=CONTEXT, reply="maybe", text="yes!!", recalled=RECALLED)
    out = fed(corrections.load(path), count_tokens)
    assert out.card()["used"] == 1 and out.samples[0]["messages"][-1]["content"] == "yes!!"


@pytest.fixture
def personas(tmp_path, monkeypatch) -> Path:
    """A persona_data/ of the test's own, as tests/test_cli.py makes it."""
    root = tmp_path / "persona_data"
    root.mkdir()
    monkeypatch.setenv("CLONE_PERSONAS", str(root))
    for name in ("CLONE_PERSONA", "REDIS_URL", "LLM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return root


def test_retrain_says_how_many_corrections_it_used_and_never_what(personas, tmp_path, tiny_base, capsys):
    export = whatsapp_export(tmp_path / "WhatsApp Chat with Dana.txt", "Alice", "Dana", days=8)
    assert run(["init", "alice", "--me", "Alice", "--exports", export], capsys)[0] == 0
    store = corrections.corrections_file(personas / "alice")
    corrections.add(store, reply_id="r1", context=CONTEXT, reply="maybe", text="yes!! ring 415-555-0132")
    corrections.add(store, reply_id="r2", context=CONTEXT[2:], reply="sure thing", rating="good")
    corrections.add(store, reply_id="r3", context=CONTEXT[:1], reply="whatever", rating="bad")
    code, out, err = run(["retrain", "--persona", "alice", "--base", tiny_base, "--max-steps", "2"], capsys)
    assert code == 0, err
    # Counted as prepare reads them, then as training used them.
    assert ("Corrections: 2 of 3 used (2 samples, 1 preference pairs, rated bad with no better answer: 1)"
            in out)
    assert "Corrections used: 2 of 3 (2 samples x3; 1 preference pair, DPO 1 step)" in out  # one pass
    for private in ("ring", "415", "sure thing", "whatever", "maybe"):
        assert private not in out + err
    [manifest] = adapters.versions(personas / "alice" / "adapters")
    assert manifest["metrics"]["preference"]["pairs"] == 1


def test_dpo_scores_and_trains_a_lora_on_the_output_layer(tiny_base, tokenizer):
    """TRL's fused LM head reads the head's weight and never calls it: without AdaptedHead a LoRA
    on the head (clone train's lora_head) would be missing from DPO's scores and gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from training.base_model import load_model, resolve_base
    from training.encode import collate, encode, token_nlls
    from training.preference import adapted_head_for_trl

    model = get_peft_model(load_model(resolve_base(str(tiny_base))), LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*(_proj|lm_head)", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    add_fused_lm_head(model.get_base_model())
    e = encode([*CONTEXT, {"role": "assistant", "content": "yes, after 8"}], tokenizer)
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels}], tokenizer.pad_token_id)
    with torch.no_grad():
        nll, keep = token_nlls(model, batch)

    def fused_log_probs():
        return model(**batch, fused_lm_head=True).log_probs[keep]

    with torch.no_grad():
        assert not torch.allclose(fused_log_probs(), -nll, atol=1e-3)  # TRL alone: the head's LoRA left out
    with adapted_head_for_trl(model):
        log_probs = fused_log_probs()
        assert torch.allclose(log_probs, -nll, atol=1e-4)
        log_probs.sum().backward()
    head = model.get_base_model().lm_head
    assert head.lora_B["default"].weight.grad.abs().sum() > 0  # the head learns in DPO too
    assert "get_output_embeddings" not in model.get_base_model().__dict__  # the patch was undone
