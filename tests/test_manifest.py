"""What an adapter carries: the manifest schema, and no path of the machine that trained it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.test_train import tiny_config
from training.base_model import PACKAGED_MODEL_ID, cache_dir, resolve_base
from training.config import PrepareConfig, TrainConfig
from training.train import TrainResult, train

HUB_ID = "some-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, model: Path) -> None:
    """`model` laid out as huggingface_hub caches a download of HUB_ID (no network involved)."""
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@dataclass
class Trained:
    source: str           # what kind of base model
    cfg: TrainConfig
    result: TrainResult
    base_sha256: str
    root: Path            # the run's own temporary folder


@pytest.fixture(scope="module", params=["folder", "hub", "packaged"])
def trained(request, tiny_base, tiny_dataset, tmp_path_factory) -> Trained:
    """One short run per kind of base model, for the persona "sam"."""
    root = tmp_path_factory.mktemp(f"manifest-{request.param}")
    out = root / "adapters"
    who = {"persona_id": "sam", "persona_name": "Sam"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        if request.param == "packaged":
            cfg = TrainConfig(data=tiny_dataset, out=out, max_steps=2, batch_size=2, eval_steps=100,
                              save_steps=100, **who)
        else:
            base = str(tiny_base)
            if request.param == "hub":
                import huggingface_hub.constants

                fake_hub_cache(root / "hub", tiny_base)
                monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
                base = HUB_ID
            cfg = tiny_config(tiny_base, tiny_dataset, out, base=base, max_steps=2, eval_steps=100, **who)
        return Trained(request.param, cfg, train(cfg), resolve_base(cfg.base).sha256, root)


def test_an_adapter_names_no_path_of_the_machine_that_trained_it(trained, tiny_base, tiny_dataset):
    places = {str(trained.root), str(tiny_base), str(tiny_dataset), str(cache_dir()), str(Path.home())}
    files = [p for p in trained.result.path.rglob("*") if p.is_file()]
    assert {"manifest.json", "adapter_config.json", "log_history.json", "tokenizer_config.json"} <= {
        p.name for p in files}
    for p in files:
        text = p.read_bytes().decode("utf-8", "replace")
        leaked = [place for place in places if place in text]
        assert not leaked, f"{p.name} names {leaked}"


def test_the_manifest_schema(trained, tiny_base, tiny_dataset):
    source, cfg, result = trained.source, trained.cfg, trained.result
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["persona"] == {"id": "sam", "name": "Sam"}
    created = datetime.fromisoformat(manifest["created"])
    assert created.microsecond == 0 and abs(datetime.now(UTC) - created) < timedelta(minutes=10)

    expected_id = {"folder": tiny_base.name, "hub": HUB_ID, "packaged": PACKAGED_MODEL_ID}[source]
    assert manifest["base_model"] == {"id": expected_id, "sha256": trained.base_sha256, "source": source}
    adapter_config = json.loads((result.path / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == expected_id

    card = json.loads((tiny_dataset / "card.json").read_text())
    assert manifest["dataset"] == {"fingerprint": card["fingerprint"], "persona": card["persona"],
                                   "train_samples": card["samples"]["train"],
                                   "val_samples": card["samples"]["val"],
                                   "corrections": card.get("corrections")}
    hyper = manifest["hyperparameters"]
    kept = {f.name for f in fields(TrainConfig)} - {"data", "out", "persona_id", "persona_name"}
    assert set(hyper) == kept | {"precision"}
    assert hyper["base"] == expected_id
    assert hyper["max_steps"] == 2 and hyper["lora_r"] == cfg.lora_r


def test_every_setting_has_help_for_the_command_line():
    for cls in (TrainConfig, PrepareConfig):
        for f in fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"


def test_the_settings_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, training.config; "
            "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
