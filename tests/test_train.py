"""LoRA training, the adapter registry, evaluation and retraining, on a tiny model and the real one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training import adapters
from training.base_model import BaseModelError, file_sha256, packaged_gguf, resolve_base
from training.encode import IGNORE, encode, load_jsonl
from training.prompt import CONTRACT_VERSION
from training.retrain import retrain
from training.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
MANIFEST_KEYS = {"version", "base_model", "prompt_contract", "dataset", "hyperparameters", "metrics",
                 "libraries", "device"}


def tiny_config(tiny_base: Path, data: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(data=data, out=out, base=str(tiny_base), max_steps=30, learning_rate=3e-2,
                    batch_size=4, eval_steps=10, save_steps=10, logging_steps=2, lora_r=8,
                    lora_alpha=16)
    settings.update(kw)
    return TrainConfig(**settings)


def test_labels_cover_only_the_persons_turns_and_their_end(tokenizer):
    messages = [
        {"role": "system", "content": "You are Sam."},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hey!\nwhat's up"},
        {"role": "user", "content": "not much"},
        {"role": "assistant", "content": "cool"},
    ]
    e = encode(messages, tokenizer)
    runs, current = [], []
    for tok, label in zip(e.input_ids, e.labels, strict=True):
        if label != IGNORE:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == ["hey!\nwhat's up<|im_end|>", "cool<|im_end|>"]


def test_tiny_model_learns_and_the_adapter_is_complete(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "adapters"
    result = train(tiny_config(tiny_base, tiny_dataset, out))
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert set(manifest) >= MANIFEST_KEYS
    assert manifest["prompt_contract"] == CONTRACT_VERSION
    card = json.loads((tiny_dataset / "card.json").read_text())
    assert manifest["dataset"]["fingerprint"] == card["fingerprint"]
    assert manifest["base_model"]["sha256"] == resolve_base(str(tiny_base)).sha256
    assert set(manifest["libraries"]) == {"torch", "transformers", "peft"}
    assert manifest["metrics"]["steps"] == 30 and manifest["metrics"]["train_tokens"] > 0
    # Loss falls: the logged training loss at the end is well under the start.
    history = json.loads((result.path / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    # The validation split is scored once at the end (by mean_nll, not also by the Trainer).
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert [step for step, _ in evals] == [10, 20, 30]
    assert evals[-1][1] == manifest["metrics"]["val_loss"]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
            "chat_template.jinja"} <= {p.name for p in result.path.iterdir()} | {"chat_template.jinja"}
    assert adapters.active_version(out) == result.version
    assert not (out / ".work" / result.version).exists()
    # The output layer has its LoRA, and the file no copy of the (frozen, tied) weights under it.
    from safetensors import safe_open

    with safe_open(result.path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lm_head.lora_A" in k for k in keys) and any("lm_head.lora_B" in k for k in keys)
    assert all("lora_" in k for k in keys)

    # The adapter loads back and scores the validation split exactly as recorded.
    from training.train import mean_nll

    model, tok, _ = adapters.load(out, base=str(tiny_base))
    rows = [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (encode(s["messages"], tok) for s in load_jsonl(tiny_dataset / "val.jsonl"))]
    loss, _ = mean_nll(model, rows, tok.pad_token_id)
    assert loss == pytest.approx(manifest["metrics"]["val_loss"], abs=1e-3)
    with model.disable_adapter():
        base_loss, _ = mean_nll(model, rows, tok.pad_token_id)
    assert loss < base_loss


def test_lora_goes_on_the_top_layers_and_the_output_layer(tiny_base, tmp_path):
    from training.base_model import load_model
    from training.train import lora_targets

    model = load_model(resolve_base(str(tiny_base)))  # two blocks of 7 linear layers each
    top = lora_targets(model, TrainConfig(data=tmp_path, lora_top_layers=0.5))
    assert "lm_head" in top
    assert len(top) == 8 and all(".layers.1." in name for name in top if name != "lm_head")
    every = lora_targets(model, TrainConfig(data=tmp_path, lora_top_layers=1.0, lora_head=False))
    assert "lm_head" not in every and len(every) == 14
    queries = TrainConfig(data=tmp_path, lora_top_layers=1.0, target_modules=["q_proj"])
    assert lora_targets(model, queries) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]


def test_same_seed_same_adapter(tiny_base, tiny_dataset, tmp_path):
    a = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "a", max_steps=6, eval_steps=100))
    b = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "b", max_steps=6, eval_steps=100))
    assert a.manifest["metrics"]["val_loss"] == b.manifest["metrics"]["val_loss"]


def test_the_real_packaged_model_trains_two_steps(tiny_dataset, tmp_path):
    result = train(TrainConfig(data=tiny_dataset, out=tmp_path / "adapters", max_steps=2, batch_size=2,
                               eval_steps=100, save_steps=100))
    m = result.manifest
    assert m["base_model"] == {"id": "SmolLM2-135M-Instruct", "sha256": file_sha256(packaged_gguf()),
                               "source": "packaged"}
    assert m["metrics"]["steps"] == 2
    assert 0 < m["metrics"]["val_loss"] < 20


def test_loraplus_steps_the_b_matrices_at_its_ratio_of_the_learning_rate(tiny_base, tiny_dataset, tmp_path):
    from transformers import TrainerCallback

    rates: list[dict[str, float]] = []

    class Rates(TrainerCallback):  # each step's rate of every trained matrix kind
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            rates.append({("B" if "lora_B" in names[id(p)] else "A"): g["lr"]
                          for g in optimizer.param_groups for p in g["params"]})

    plus = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "plus", max_steps=4, eval_steps=100,
                             loraplus_ratio=8.0), callbacks=[Rates()])
    assert len(rates) == 4 and all(r["B"] == pytest.approx(8 * r["A"]) and r["A"] > 0 for r in rates[:-1])
    assert plus.manifest["hyperparameters"]["loraplus_ratio"] == 8.0
    plain = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "plain", max_steps=4, eval_steps=100))
    assert plus.manifest["metrics"]["val_loss"] != plain.manifest["metrics"]["val_loss"]


def test_a_hub_id_that_is_not_here_names_the_packaged_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(BaseModelError, match="packaged SmolLM2-135M-Instruct"):
        resolve_base("some-org/some-model-that-is-not-cached")


def test_an_adapter_of_another_prompt_contract_is_refused(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "adapters"
    result = train(tiny_config(tiny_base, tiny_dataset, out, max_steps=2, eval_steps=100))
    manifest = json.loads((result.path / "manifest.json").read_text())
    manifest["prompt_contract"] = CONTRACT_VERSION + 1
    (result.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(adapters.AdapterError, match=f"speaks v{CONTRACT_VERSION}"):
        adapters.load(out)


RESUMABLE = dict(max_steps=16, eval_steps=100, save_steps=4)
KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    import training.train as t

    class Slow(TrainerCallback):  # gives the test time to kill the run between checkpoints
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.4)

    original = t.CloneTrainer.__init__
    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(Slow())
    t.CloneTrainer.__init__ = init
    from tests.test_train import RESUMABLE, tiny_config
    base, data, out = sys.argv[1:4]
    t.train(tiny_config(Path(base), Path(data), Path(out), **RESUMABLE))
""")


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "adapters"
    # An adapter already active before the run that gets killed.
    before = train(tiny_config(tiny_base, tiny_dataset, out, max_steps=2, eval_steps=100))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(tiny_base), str(tiny_dataset), str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while not list((out / ".work").glob("*/checkpoint-8/trainer_state.json")):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # Killed mid-run: the active adapter is untouched and no half adapter is listed.
    assert adapters.active_version(out) == before.version
    from safetensors import safe_open

    checkpoint = next((out / ".work").glob("*/checkpoint-8"))
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        saved = list(f.keys())
    assert all("lora_" in k for k in saved)  # the adapted head's frozen weights left out
    assert [v["version"] for v in adapters.versions(out)] == [before.version]

    resumed = train(tiny_config(tiny_base, tiny_dataset, out, resume=True, **RESUMABLE))
    assert resumed.manifest["metrics"]["resumed_from"].startswith("checkpoint-")
    straight = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "straight", **RESUMABLE))
    from safetensors.torch import load_file

    a = load_file(resumed.path / "adapter_model.safetensors")
    b = load_file(straight.path / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    assert resumed.manifest["metrics"]["val_loss"] == pytest.approx(
        straight.manifest["metrics"]["val_loss"], abs=1e-4)


def test_retrain_refuses_a_worse_adapter_unless_forced(tiny_base, tiny_dataset, tmp_path):
    out = tmp_path / "adapters"
    good = train(tiny_config(tiny_base, tiny_dataset, out, max_steps=30))
    worse = tiny_config(tiny_base, tiny_dataset, out, max_steps=1, learning_rate=1e-5, eval_steps=100)
    outcome = retrain(worse)
    assert not outcome.activated
    assert outcome.new_val_loss > outcome.active_val_loss
    assert adapters.active_version(out) == good.version
    assert {v["version"] for v in adapters.versions(out)} == {good.version, outcome.new.version}
    forced = retrain(replace(worse, seed=1), force=True)
    assert forced.activated and adapters.active_version(out) == forced.new.version


def persona_folder(tmp_path, tiny_dataset) -> Path:
    """A persona folder holding the tiny dataset, for the commands that find everything there."""
    import shutil

    folder = tmp_path / "sam"
    folder.mkdir()
    (folder / "persona.toml").write_text('name = "Sam"\nme = ["u1"]\n')
    shutil.copytree(tiny_dataset, folder / "dataset")
    return folder


def test_eval_scores_three_models_and_writes_a_report(tiny_base, tiny_dataset, tmp_path, capsys):
    from cli.main import main

    persona = persona_folder(tmp_path, tiny_dataset)
    train(tiny_config(tiny_base, persona / "dataset", persona / "adapters", persona_id="sam"))
    argv = ["eval", "--persona", str(persona), "--base", str(tiny_base), "--json", "--samples", "4"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    ppl = result["perplexity"]
    assert set(ppl) == {"base", "prompted", "adapter", "base_no_recall", "adapter_no_recall"}
    assert ppl["adapter"] < ppl["base"]
    assert result["val_replies"] > 0
    report = Path(result["report"])
    assert report.is_file() and (report.parent / "loss.png").is_file()
    assert "| adapter |" in report.read_text()
    assert str(tmp_path) not in (report.parent / "eval.json").read_text()  # no paths in what is shared


def test_adapters_list_and_rollback(tiny_base, tiny_dataset, tmp_path, capsys):
    from cli.main import main

    persona = persona_folder(tmp_path, tiny_dataset)
    out = persona / "adapters"
    first = train(tiny_config(tiny_base, persona / "dataset", out, max_steps=2, eval_steps=100))
    second = train(tiny_config(tiny_base, persona / "dataset", out, max_steps=2, eval_steps=100))
    capsys.readouterr()
    assert main(["adapters", "--persona", str(persona)]) == 0
    listing = capsys.readouterr().out
    assert f"* {second.version}" in listing and f"  {first.version}" in listing
    assert "†" not in listing  # both were scored on the current dataset
    assert main(["adapters", "use", first.version, "--persona", str(persona)]) == 0
    assert adapters.active_version(out) == first.version
    assert main(["adapters", "use", "no-such-version", "--persona", str(persona)]) == 2
    assert adapters.active_version(out) == first.version


def test_retrain_command_merges_new_exports_and_keeps_them(tiny_base, tmp_path, capsys):
    import shutil

    from cli.main import main

    from .conftest import FIXTURES

    persona = tmp_path / "alice"
    (persona / "exports").mkdir(parents=True)
    (persona / "persona.toml").write_text('name = "Alice"\nme = ["Alice"]\n')
    shutil.copy(FIXTURES / "whatsapp" / "WhatsApp Chat with Bob Smith.txt", persona / "exports")
    fresh = tmp_path / "WhatsApp Chat with Dana.txt"
    fresh.write_text("".join(
        f"3/{day}/22, 9:0{k} AM - {who}: {text}\n"
        for day in range(1, 11)
        for k, (who, text) in enumerate([("Dana", f"plans for day {day}?"), ("Alice", "beach!!\nyou in?")])
    ))
    common = ["--persona", str(persona), "--base", str(tiny_base), "--max-steps", "2"]
    assert main(["start", *common, "--no-chat"]) == 0
    registry = persona / "adapters"
    first = adapters.active_version(registry)
    capsys.readouterr()

    assert main(["retrain", str(fresh), *common]) == 0
    out = capsys.readouterr().out
    card = json.loads((persona / "dataset" / "card.json").read_text())
    assert sorted(s["file"] for s in card["sources"]) == ["WhatsApp Chat with Bob Smith.txt",
                                                          "WhatsApp Chat with Dana.txt"]
    assert [p.name for p in (persona / "exports").glob("added-*/*/*")] == [fresh.name]
    versions = [v["version"] for v in adapters.versions(registry)]
    assert len(versions) == 2 and first in versions
    active = adapters.active_version(registry)
    assert "Validation loss: new" in out
    if active == first:
        assert "Kept" in out
    else:
        assert f"Active adapter: {active}" in out


def test_a_serving_backend_follows_the_active_adapter(tiny_base, tiny_dataset, tmp_path, caplog):
    """`clone serve` keeps serving while `clone retrain` / `clone adapters use` move `active`:
    the watcher swaps the new adapter in, refuses a broken one once, and follows a rollback."""
    import asyncio
    import logging

    from bot.generation import AdapterWatcher, GenerationSettings, LocalBackend, load_clone

    caplog.set_level(logging.INFO)
    out = tmp_path / "adapters"
    first = train(tiny_config(tiny_base, tiny_dataset, out, max_steps=2, eval_steps=100))
    model, tokenizer, _ = load_clone(out, base=str(tiny_base))
    backend = LocalBackend(model, tokenizer, GenerationSettings(max_new_tokens=4))
    watcher = AdapterWatcher(backend, out, base=str(tiny_base), interval_s=0.05)
    hello = [{"role": "user", "content": "hello"}]

    async def scenario():
        try:
            assert watcher.version == first.version and not await watcher.check()
            second = train(tiny_config(tiny_base, tiny_dataset, out, max_steps=2, eval_steps=100))
            assert await watcher.check() and watcher.version == second.version
            assert backend.model is not model
            assert isinstance((await backend.generate(hello)).text, str)  # answers on the new one

            broken = train(tiny_config(tiny_base, tiny_dataset, out, max_steps=2, eval_steps=100))
            manifest = json.loads((broken.path / "manifest.json").read_text())
            manifest["prompt_contract"] = CONTRACT_VERSION + 1
            (broken.path / "manifest.json").write_text(json.dumps(manifest))
            serving = backend.model
            assert not await watcher.check() and not await watcher.check()
            assert backend.model is serving and watcher.version == second.version

            adapters.activate(out, first.version)  # a rollback: `clone adapters use`
            task = asyncio.create_task(watcher.run())
            await asyncio.sleep(0.1)
            for _ in range(200):
                if watcher.version == first.version:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            assert watcher.version == first.version
        finally:
            await backend.close()

    asyncio.run(scenario())
    refused = [r for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert len(refused) == 1 and "still serving" in refused[0].getMessage()


def test_the_mid_run_curve_scores_a_fixed_spread_of_the_validation_split():
    from training.train import CURVE_ROWS, curve_rows

    rows = [{"input_ids": list(range(n))} for n in range(100, 0, -1)]  # 100 rows, longest first
    picked = curve_rows(rows)
    lengths = [len(r["input_ids"]) for r in picked]
    assert len(picked) == CURVE_ROWS and lengths == sorted(lengths)  # short to long, none twice
    assert lengths[0] == 1 and lengths[-1] > 90  # the whole range of lengths
    assert curve_rows(rows) == picked  # the same points at every evaluation
    assert curve_rows(rows[:5]) == rows[:5]  # a small split is scored whole


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_length_grouped_batches_come_in_a_random_order():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from training.train import ShuffledLengthGroups

    g = torch.Generator().manual_seed(1)
    # 300 chats of 200-500 tokens and 100 short knowledge answers, in no order.
    chats, answers = torch.randint(200, 500, (300,), generator=g), torch.randint(20, 60, (100,), generator=g)
    lengths = torch.cat([chats, answers]).tolist()
    order = list(ShuffledLengthGroups(lengths, 4, seed=0))
    assert sorted(order) == list(range(400))
    # The same batches as transformers' length grouping (as little padding), the longest first.
    grouped = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(0))
    assert sorted(map(sorted, batches_of(order, 4))) == sorted(map(sorted, batches_of(grouped, 4)))
    assert lengths.index(max(lengths)) in order[:4]
    # A run shorter than a mega-batch (100 samples here) meets the short answers as often as the
    # data holds them, not only at its end: a quarter of the first 20 steps' samples, over seeds.
    first = [list(ShuffledLengthGroups(lengths, 4, seed=s))[:80] for s in range(10)]
    assert 0.15 < sum(i >= 300 for run in first for i in run) / 800 < 0.35
    # One order per seed and epoch: a resumed run skips the same batches; the next epoch differs.
    sampler = ShuffledLengthGroups(lengths, 4, seed=0)
    sampler.set_epoch(1)
    assert list(sampler) != order and list(sampler) == list(sampler)


def test_the_trainer_draws_its_batches_from_shuffled_length_groups(tiny_base, tiny_dataset, tokenizer,
                                                                  tmp_path):
    from training.base_model import resolve_base
    from training.train import ShuffledLengthGroups, build_trainer, load_split, training_model

    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "out", seed=3)
    rows = load_split(tiny_dataset, "train", tokenizer, cfg.max_length)
    trainer = build_trainer(cfg, training_model(resolve_base(str(tiny_base)), cfg, "fp32"), tokenizer, rows,
                            [], tmp_path / "work", "fp32")
    expected = batches_of(list(ShuffledLengthGroups([len(r["input_ids"]) for r in rows], 4, seed=3)), 4)
    seen = [sorted(b["attention_mask"].sum(1).tolist()) for b in trainer.get_train_dataloader()]
    assert seen == [sorted(len(rows[i]["input_ids"]) for i in b) for b in expected]


def test_auto_precision_on_a_cpu_follows_its_measured_bf16_speed(monkeypatch):
    from training import train as t

    monkeypatch.setattr(t, "bf16_matmul_speedup", lambda: 2.4)  # an AMD EPYC with AVX-512 BF16
    assert t.pick_precision("auto") == t.BF16_BASE
    monkeypatch.setattr(t, "bf16_matmul_speedup", lambda: 0.5)  # an Intel Xeon with it, no AMX
    assert t.pick_precision("auto") == "fp32"
    assert t.pick_precision("bf16-base") == t.BF16_BASE  # what is asked for is kept


def test_training_on_bf16_base_weights_learns_an_fp32_adapter(tiny_base, tiny_dataset, tmp_path):
    from transformers import TrainerCallback

    from training.train import BF16_BASE, bf16_matmul_speedup, mean_nll

    assert bf16_matmul_speedup() > 0
    seen: dict[str, set] = {}

    class Dtypes(TrainerCallback):  # what the weights are while the steps run
        def on_step_end(self, args, state, control, model=None, **kw):
            for trainable in (True, False):
                seen[str(trainable)] = {p.dtype for p in model.parameters() if p.requires_grad == trainable}

    runs = {p: train(tiny_config(tiny_base, tiny_dataset, tmp_path / p, precision=p, max_steps=20,
                                 eval_steps=100), callbacks=[Dtypes()] if p == BF16_BASE else ())
            for p in ("fp32", BF16_BASE)}
    assert seen == {"True": {torch.float32}, "False": {torch.bfloat16}}
    assert runs[BF16_BASE].manifest["hyperparameters"]["precision"] == BF16_BASE
    from safetensors.torch import load_file

    weights = load_file(runs[BF16_BASE].path / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    # Its recorded score is the fp32 model's, as loaded, and it learns nearly what fp32 learns.
    model, tok, _ = adapters.load(tmp_path / BF16_BASE, base=str(tiny_base))
    rows = [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (encode(s["messages"], tok) for s in load_jsonl(tiny_dataset / "val.jsonl"))]
    loss, _ = mean_nll(model, rows, tok.pad_token_id)
    assert loss == pytest.approx(runs[BF16_BASE].manifest["metrics"]["val_loss"], abs=1e-4)
    with model.disable_adapter():
        untrained, _ = mean_nll(model, rows, tok.pad_token_id)
    learnt = {p: untrained - r.manifest["metrics"]["val_loss"] for p, r in runs.items()}
    assert learnt[BF16_BASE] > 0.9 * learnt["fp32"] > 0
