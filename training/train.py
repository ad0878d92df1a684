"""LoRA fine-tuning of the base model on a prepared dataset, into a new `adapters/<version>/`.

Read top to bottom:
  1. settings     TrainConfig, like TRL's config dataclasses
  2. speed        glibc allocator tuning, bf16 where the hardware multiplies it fast, no LoRA dropout
  3. data         samples encoded once; labels only on the person's turns
  4. model        base model + LoRA on every linear layer (peft)
  5. loop         transformers' Trainer: length-grouped batches, the LM head run only where the
                  loss needs it, checkpoints, evaluation, progress bar with ETA and tokens/s
  6. output       adapter + tokenizer + manifest (last) staged, then renamed into place
  7. activation   `adapters/active` swapped only after the run finished and was evaluated

Why not TRL's SFTTrainer: its assistant-only loss needs `{% generation %}` markers that
SmolLM2's template lacks, and the speed-up that matters most on a CPU (the LM head only where
there are labels) needs our own loss anyway. What is left of SFTTrainer for us is a collator.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from training import adapters
from training.atomic import staged_dir
from training.base_model import BaseModel, load_model, load_tokenizer, resolve_base
from training.encode import IGNORE, collate, encode, load_jsonl, token_nll
from training.prompt import CONTRACT_VERSION

log = logging.getLogger(__name__)


# -- 1. settings ---------------------------------------------------------------------------


@dataclass
class TrainConfig:
    data: Path                          # a folder with train.jsonl, val.jsonl, card.json
    out: Path = Path("adapters")        # the adapter registry
    base: str | None = None             # None: the packaged SmolLM2-135M-Instruct
    epochs: float = 3.0
    max_steps: int = -1                 # > 0 overrides epochs
    max_minutes: float | None = None    # stop (and still finish properly) after this long
    learning_rate: float = 3e-4         # LoRA wants far more than full fine-tuning's 2e-5
    batch_size: int = 4                 # x 640 tokens at most: activations stay under ~5 GB
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0           # dropout copies every LoRA input: 29% slower when on
    target_modules: list[str] | str = "all-linear"
    # LoRA on the top layers only: backward then stops at the lowest adapted layer, and the
    # layers below run forward without keeping activations (top half: measured 1.4x, less memory).
    lora_top_layers: float = 0.5
    max_length: int = 640               # tokens; the dataset's budget is 512
    warmup_ratio: float = 0.05
    eval_steps: int = 50
    save_steps: int = 25
    logging_steps: int = 5
    seed: int = 0
    resume: bool = False
    activate: bool = True
    precision: str = "auto"             # auto | fp32 | bf16


@dataclass
class TrainResult:
    version: str
    path: Path
    manifest: dict = field(default_factory=dict)


# -- 2. speed --------------------------------------------------------------------------------


def tune_allocator() -> None:
    """Keep freed memory in the process instead of returning it to the kernel.

    With glibc's defaults, every step unmaps and re-faults its large activation buffers; on a
    CPU that was measured to cost more than the bf16 speed-up. Same as
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=..., but set at run time.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_trim_threshold, 1 << 36)
    libc.mallopt(m_mmap_max, 0)


def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def pick_precision(setting: str) -> str:
    """bf16 where the hardware has fast bf16 matmuls, fp32 otherwise.

    A CPU with AVX-512 BF16 but no AMX multiplies bf16 at about half its fp32 rate (measured
    here: 163 against 314 GFLOP/s), so autocast would only add casts.
    """
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_amx() else "fp32"


# -- 3. data ---------------------------------------------------------------------------------


def load_split(data: Path, name: str, tokenizer, max_length: int) -> list[dict]:
    rows = []
    for sample in load_jsonl(data / f"{name}.jsonl"):
        e = encode(sample["messages"], tokenizer, max_length)
        if any(label != IGNORE for label in e.labels[1:]):
            rows.append({"input_ids": e.input_ids, "labels": e.labels})
    return rows


def read_card(data: Path) -> dict:
    try:
        card = json.loads((data / "card.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{data}: no dataset here (card.json missing): run `clone prepare`") from None
    if card.get("contract_version") != CONTRACT_VERSION:
        raise ValueError(
            f"{data} was prepared with prompt contract v{card.get('contract_version')}, "
            f"this version trains v{CONTRACT_VERSION}: run `clone prepare` again"
        )
    return card


# -- 4. model --------------------------------------------------------------------------------


def with_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets: list[str] | str = cfg.target_modules
    layers = None
    n = getattr(model.config, "num_hidden_layers", 0)
    if cfg.lora_top_layers < 1 and n:
        if targets == "all-linear":  # peft takes a layer range only with named modules
            targets = sorted({
                name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and "lm_head" not in name
            })
        layers = list(range(n - max(1, round(n * cfg.lora_top_layers)), n))
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern="layers" if layers else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# -- 5. loop ---------------------------------------------------------------------------------


class CloneTrainer(Trainer):
    """Trainer whose loss runs the LM head only on labelled positions, and counts real tokens."""

    tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        nll, n = token_nll(model, inputs)
        loss = nll / max(n, 1)
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return (loss, {}) if return_outputs else loss


class TokenProgress(ProgressCallback):
    """The Trainer's progress bar (steps and ETA), with tokens/s and the latest loss added."""

    def __init__(self, trainer: CloneTrainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.started = time.monotonic()
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.started, self.tokens_at_start = time.monotonic(), self.trainer.tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            rate = (self.trainer.tokens_seen - self.tokens_at_start) / (time.monotonic() - self.started)
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            postfix = {"tok/s": f"{rate:.0f}"} | ({"loss": f"{loss:.3f}"} if loss is not None else {})
            self.training_bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass  # the bar's postfix shows the numbers; printing every log line would bury it


class TimeBudget(TrainerCallback):
    """End training after `minutes`, the normal way (final save and evaluation still happen)."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.monotonic() + minutes * 60

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True


def latest_run(work_root: Path, fingerprint: str) -> tuple[str, Path] | None:
    """The newest unfinished run on the same data that left a checkpoint behind."""
    for run in sorted(work_root.glob("*"), reverse=True):
        meta = adapters.read_manifest(run) or {}
        checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if meta.get("dataset", {}).get("fingerprint") == fingerprint and checkpoints:
            return run.name, checkpoints[-1]
    return None


def training_args(cfg: TrainConfig, work: Path, precision: str, has_val: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=0.0,
        train_sampling_strategy="group_by_length",  # near-zero padding without flattening rows
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        report_to="none",
    )


def build_trainer(
    cfg: TrainConfig, model, tokenizer, train_rows: list[dict], val_rows: list[dict], work: Path,
    precision: str, trainer_class: type[CloneTrainer] = CloneTrainer,
) -> CloneTrainer:
    trainer = trainer_class(
        model=model,
        args=training_args(cfg, work, precision, bool(val_rows)),
        train_dataset=train_rows,
        eval_dataset=val_rows or None,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)  # replaced by the same bar with tokens/s added
    trainer.add_callback(TokenProgress(trainer))
    if cfg.max_minutes:
        trainer.add_callback(TimeBudget(cfg.max_minutes))
    return trainer


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "peft")}


@torch.no_grad()
def mean_nll(
    model, rows: list[dict], pad_id: int, batch_size: int = 8, desc: str = "Scoring"
) -> tuple[float, int]:
    """Token-weighted mean negative log-likelihood of the labelled tokens of `rows`."""
    from tqdm import tqdm

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    starts = range(0, len(order), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None, leave=False):
        batch = collate([rows[j] for j in order[i : i + batch_size]], pad_id)
        nll, n = token_nll(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(nll), count + n
    return (total / count if count else float("nan")), count


def train(cfg: TrainConfig) -> TrainResult:
    """Train one adapter; returns its version. `adapters/active` moves only if cfg.activate."""
    from transformers import set_seed

    tune_allocator()
    card = read_card(cfg.data)
    base: BaseModel = resolve_base(cfg.base)
    tokenizer = load_tokenizer(base)
    train_rows = load_split(cfg.data, "train", tokenizer, cfg.max_length)
    val_rows = load_split(cfg.data, "val", tokenizer, cfg.max_length)
    if not train_rows:
        raise ValueError(f"{cfg.data}/train.jsonl has no sample with a reply of the person to learn")

    work_root = cfg.out / ".work"
    resumed = latest_run(work_root, card["fingerprint"]) if cfg.resume else None
    version, checkpoint = resumed if resumed else (adapters.new_version(cfg.out), None)
    if cfg.resume and not resumed:
        log.warning("Nothing to resume for this dataset: starting a new run")
    work = work_root / version
    work.mkdir(parents=True, exist_ok=True)

    precision = pick_precision(cfg.precision)
    hyper = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    hyper["precision"] = precision
    manifest = {
        "version": version,
        "base_model": {"id": base.id, "sha256": base.sha256},
        "prompt_contract": CONTRACT_VERSION,
        "dataset": {
            "fingerprint": card["fingerprint"],
            "path": str(cfg.data),
            "persona": card.get("persona"),
            "train_samples": len(train_rows),
            "val_samples": len(val_rows),
        },
        "hyperparameters": hyper,
        "libraries": library_versions(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    # The run folder carries what --resume needs to recognise it.
    (work / adapters.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    set_seed(cfg.seed)
    model = with_lora(load_model(base), cfg)
    trainer = build_trainer(cfg, model, tokenizer, train_rows, val_rows, work, precision)
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.monotonic() - started

    val_nll, val_tokens = mean_nll(model, val_rows, tokenizer.pad_token_id) if val_rows else (None, 0)
    manifest["metrics"] = {
        "train_loss": round(output.training_loss, 4),
        "val_loss": None if val_nll is None else round(val_nll, 4),
        "val_perplexity": None if val_nll is None else round(math.exp(val_nll), 3),
        "val_tokens": val_tokens,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "train_tokens": trainer.tokens_seen,
        "tokens_per_second": round(trainer.tokens_seen / runtime, 1),
        "runtime_s": round(runtime, 1),
        "resumed_from": checkpoint.name if checkpoint else None,
    }
    folder = cfg.out / version
    with staged_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        (tmp / adapters.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last
    shutil.rmtree(work, ignore_errors=True)
    if cfg.activate:
        adapters.activate(cfg.out, version)
    return TrainResult(version, folder, manifest)
