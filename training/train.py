"""LoRA fine-tuning of the base model on a prepared dataset, into a new `adapters/<version>/`.

Read top to bottom:
  1. settings     TrainConfig (training/config.py, torch-free, like TRL's config dataclasses)
  2. speed        glibc allocator tuning, bf16 where the hardware multiplies it fast (on a CPU:
                  the frozen base's weights), no LoRA dropout
  3. data         samples encoded once; labels only on the person's turns; the owner's
                  corrections repeated (correction_weight), like knowledge answers
  4. model        base model + LoRA on the top layers' linear modules and the output layer
                  (peft)
  5. loop         transformers' Trainer: length-grouped batches in random order, the LM head
                  run only where the loss needs it, checkpoints, evaluation, progress bar with
                  ETA and tokens/s; with a time budget, the number of steps (and so the whole
                  warm-up + cosine schedule) is planned from the measured speed and re-planned
                  after every step
  5b. preference  TRL's DPO on the owner's preference pairs (training.preference), the supervised
                  adapter as its reference, inside the same time budget (the loop keeps it room)
  6. output       adapter + tokenizer + manifest (last) staged, then renamed into place; nothing
                  in it names a path of this machine, since adapters are moved and shared
  7. activation   `adapters/active` swapped only after the run finished and was evaluated

Why not TRL's SFTTrainer: its assistant-only loss needs `{% generation %}` markers that
SmolLM2's template lacks, and the speed-up that matters most on a CPU (the LM head only where
there are labels) needs our own loss anyway. What is left of SFTTrainer for us is a collator.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from training import adapters, preference
from training.atomic import staged_dir
from training.base_model import (
    PACKAGED_MODEL_ID,
    BaseModel,
    load_model,
    load_tokenizer,
    no_loading_bar,
    resolve_base,
)
from training.config import TrainConfig  # re-exported: its home was here
from training.encode import IGNORE, Encoded, collate, encode, load_jsonl, token_nll, token_nlls
from training.prompt import CONTRACT_VERSION

log = logging.getLogger(__name__)


# -- 1. settings ---------------------------------------------------------------------------


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


# On a CPU, bf16 pays where a training-sized matmul runs this many times faster in bf16 than in
# fp32: 6-9x on an Intel Xeon with AMX, 2.4-3.7x on an AMD EPYC with AVX-512 BF16 alone, 0.5x on an
# Intel Xeon with AVX-512 BF16 but no AMX.
BF16_MIN_SPEEDUP = 1.3
BF16_BASE = "bf16-base"  # the frozen base model held in bf16, the adapter and optimizer in fp32


def pick_precision(setting: str) -> str:
    """The precision `setting` trains in here; "auto": bf16 autocast on a GPU (fp16 without
    bf16), bf16 base weights on a CPU whose bf16 matmuls are measured faster, fp32 otherwise.

    On a CPU the base stays frozen, so its weights are cast once instead of by autocast at every
    step. On a Xeon with AMX the loop ran 1.57x autocast's tokens/s and 1.66x fp32's, validation
    perplexity within 0.1 % of fp32's (benchmarks/README.md, train_throughput.py --also bf16).
    """
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return BF16_BASE if bf16_matmul_speedup() >= BF16_MIN_SPEEDUP else "fp32"


def bf16_matmul_speedup(rows: int = 2048, repeats: int = 3) -> float:
    """How many times faster this CPU runs a linear layer of SmolLM2's MLP shape on a batch's
    rows in bf16 than in fp32 (the best of `repeats` each; about a fifth of a second)."""

    def best(x: torch.Tensor, w: torch.Tensor) -> float:
        torch.nn.functional.linear(x, w)  # the first call sets up kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - start)
        return min(times)

    x, w = torch.randn(rows, 576), torch.randn(1536, 576)
    return best(x, w) / best(x.bfloat16(), w.bfloat16())


def training_model(base: BaseModel, cfg: TrainConfig, precision: str):
    """The base model with a fresh LoRA, its weights in the dtype `precision` keeps them in
    (peft keeps the adapter itself in fp32 either way)."""
    return with_lora(load_model(base, dtype=torch.bfloat16 if precision == BF16_BASE else None), cfg)


# -- 3. data ---------------------------------------------------------------------------------


def load_split(data: Path, name: str, tokenizer, max_length: int, knowledge_share: float = 0.0,
               correction_weight: int = 1) -> list[dict]:
    """The split's encoded samples: chats once, knowledge answers repeated to `knowledge_share`
    of them, the owner's corrections `correction_weight` times each."""
    rows: list[dict] = []
    knowledge: list[dict] = []
    corrected: list[dict] = []
    for sample in load_jsonl(data / f"{name}.jsonl"):
        e = encode_sample(sample, tokenizer, max_length)
        if any(label != IGNORE for label in e.labels[1:]):
            bucket = corrected if sample.get("correction") else knowledge if sample.get("knowledge") else rows
            bucket.append({"input_ids": e.input_ids, "labels": e.labels})
    repeats = knowledge_repeats(len(rows), len(knowledge), knowledge_share)
    return rows + knowledge * repeats + corrected * max(0, correction_weight)


def encode_sample(sample: dict, tokenizer, max_length: int) -> Encoded:
    """A sample's tokens and labels. A correction learns its last turn alone: the assistant turns
    before it are what the clone said in that chat, not the person's words."""
    e = encode(sample["messages"], tokenizer, max_length)
    if sample.get("correction"):
        prefix = len(encode(sample["messages"][:-1], tokenizer, add_generation_prompt=True).input_ids)
        e.labels[:prefix] = [IGNORE] * min(prefix, len(e.labels))
    return e


def load_pairs(data: Path, tokenizer, max_length: int) -> list[dict]:
    """The dataset's preference pairs, encoded for the preference stage (none without corrections)."""
    from training.dataset import PAIRS_FILE
    from training.preference import encode_pairs

    path = data / PAIRS_FILE
    return encode_pairs(load_jsonl(path), tokenizer, max_length) if path.is_file() else []


def knowledge_repeats(chats: int, knowledge: int, share: float) -> int:
    """How often each knowledge-base sample is repeated so that about `share` of the samples
    are knowledge: a few dozen answers among hundreds of chats would be seen once in a short
    run, too rarely to learn to use what is recalled. At least once each."""
    if not knowledge or share <= 0 or share >= 1:
        return 1
    return max(1, round(share * chats / ((1 - share) * knowledge)))


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


def lora_targets(model, cfg: TrainConfig) -> list[str]:
    """The full names of the linear modules that get LoRA: cfg.target_modules ("all-linear": every
    linear layer of the blocks) in the top cfg.lora_top_layers of the blocks, plus the output
    layer with cfg.lora_head."""
    n = getattr(model.config, "num_hidden_layers", 0)
    first = n - max(1, round(n * cfg.lora_top_layers)) if n else 0
    head = model.get_output_embeddings()
    wanted = cfg.target_modules
    wanted = None if wanted == "all-linear" else {wanted} if isinstance(wanted, str) else set(wanted)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            if cfg.lora_head:
                names.append(name)
            continue
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
            continue
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer is None or int(layer.group(1)) >= first:
            names.append(name)
    return names


def with_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model, cfg),
        task_type="CAUSAL_LM",
    )
    with adapters.tied_head_accepted():
        return get_peft_model(model, lora)


def fp32_twin(model, base: BaseModel, cfg: TrainConfig):
    """The trained adapter on the base model's own fp32 weights, the model `clone eval`, retrain's
    comparison and `adapters.load` score. Scored on its bf16 base instead, a small persona's
    validation perplexity read 3.8 % off (17.625 against 16.979), the sample's 0.3 %."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    with no_loading_bar():  # the run's last bar stays the trainer's (the console reads it)
        twin = with_lora(load_model(base), cfg)
    # The LoRA weights alone: "auto" would also copy an adapted head's bf16 base weights over fp32 ones.
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model, save_embedding_layers=False))
    return twin


# -- 5. loop ---------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step` of `total`: linear warm-up, then cosine decay to 0.

    The same numbers as transformers' "cosine" schedule, except that a step past the end stays
    at 0 instead of rising again (the end can move: see TimeBudget).
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class ShuffledLengthGroups(Sampler[int]):
    """Batches of near-equal length (transformers' length grouping: next to no padding), in a
    random order. transformers' own sampler orders each mega-batch longest first, so a run
    shorter than a mega-batch (clone start's 4 minutes on a CPU that trains in fp32: 31 steps of
    the sample's 30-step mega-batches) met the long chats at the peak learning rate and the short
    knowledge answers only as the cosine decayed to nothing: 2.7 of 34 quiz questions answered by
    the adapter alone, against 27-33 on a CPU that reached 45 steps.

    The batch that holds the longest sample still comes first (too big for memory fails at once).
    Its order depends only on the seed and the epoch, so a resumed run skips the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at each epoch's start
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=g)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        first, *rest = batches or [[]]
        picked = [first] + [rest[j] for j in torch.randperm(len(rest), generator=g).tolist()]
        return iter([i for batch in picked for i in batch])


class CloneTrainer(Trainer):
    """Trainer whose loss runs the LM head only on labelled positions, and counts real tokens.

    Its learning-rate schedule ends at `planned_steps`, which may change during the run.
    """

    tokens_seen = 0
    planned_steps = 0
    loraplus_ratio = 1.0  # LoRA+: the B matrices learn this many times faster than A (1: plain LoRA)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":  # a benchmark's naive baseline
            return super()._get_train_sampler(train_dataset)
        rows = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        step_rows = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return ShuffledLengthGroups([len(r["input_ids"]) for r in rows], step_rows, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        nll, n = token_nll(model, inputs)
        loss = nll / max(n, 1)
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return (loss, {}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # A checkpoint of an adapted output layer would also hold its frozen weights (peft's
        # "auto", with a warning each time): 56 MB in bf16 that resuming never reads.
        save = self.model.save_pretrained
        self.model.save_pretrained = functools.partial(save, save_embedding_layers=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del self.model.save_pretrained

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.loraplus_ratio != 1.0:
            from peft.optimizers import create_loraplus_optimizer

            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            kwargs.pop("lr", None)
            self.optimizer = create_loraplus_optimizer(model or self.model, cls, lr=self.args.learning_rate,
                                                       loraplus_lr_ratio=self.loraplus_ratio, **kwargs)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.planned_steps = num_training_steps

            def factor(step: int) -> float:  # a plain function: LambdaLR leaves it out of checkpoints
                return warmup_cosine(step, self.planned_steps, self.args.get_warmup_steps(self.planned_steps))

            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True  # as the base class does: a new train() makes a new one
        return self.lr_scheduler

    def plan_steps(self, steps: int) -> None:
        """End the schedule (and the run) at `steps`, starting with the next step's rate."""
        if steps == self.planned_steps:
            return
        self.planned_steps = steps
        # The scheduler already set the next step's rate from the old plan: set it again.
        self.lr_scheduler.last_epoch -= 1
        self.lr_scheduler.step()


class TokenProgress(ProgressCallback):
    """The Trainer's progress bar (steps and ETA), with tokens/s and the latest loss added.

    Its total follows `state.max_steps`, which a time budget re-plans, so the ETA is the plan's.
    """

    def __init__(self, trainer: CloneTrainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.started = time.monotonic()
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.started, self.tokens_at_start = time.monotonic(), self.trainer.tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None and self.training_bar.total != state.max_steps:
            self.training_bar.total = state.max_steps
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            rate = (self.trainer.tokens_seen - self.tokens_at_start) / (time.monotonic() - self.started)
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            postfix = {"tok/s": f"{rate:.0f}"} | ({"loss": f"{loss:.3f}"} if loss is not None else {})
            self.training_bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass  # the bar's postfix shows the numbers; printing every log line would bury it


# What follows the last step, in the time a budget keeps free for it: an evaluation batch runs
# forward only, about a third of a training step (half is counted, for margin), plus saving.
FORWARD_SHARE = 0.5
SAVE_SECONDS = 1.0
SCORE_BATCH = 8  # mean_nll's batch size
# The validation curve's points during a run are scored on this many validation samples; the whole
# split is scored once, at the end (mean_nll). Scoring the whole split took 46 s of a 331-second,
# 60-step run here, and again at the end (benchmarks/train_throughput.py --command).
CURVE_ROWS = 16


def curve_rows(val_rows: list[dict]) -> list[dict]:
    """A fixed spread of the validation split, short to long, for the mid-run evaluations."""
    if len(val_rows) <= CURVE_ROWS:
        return val_rows
    order = sorted(range(len(val_rows)), key=lambda i: len(val_rows[i]["input_ids"]))
    return [val_rows[order[k * len(order) // CURVE_ROWS]] for k in range(CURVE_ROWS)]


class TimeBudget(TrainerCallback):
    """Plan the number of steps so that the whole run ends by `deadline` (time.monotonic()).

    After every step: seconds per step so far (wall clock, so evaluations and checkpoints are
    included; the first step, which carries the start-up, only until there is a second), then
    as many steps as fit before the deadline less the time the final evaluation and saving
    take, never more than epochs/max_steps allow. The plan becomes `state.max_steps` (so the
    Trainer's own end-of-run handling stops, evaluates and saves there, and the progress bar
    shows it) and the end of the learning-rate schedule, which therefore always completes.
    Must run before DefaultFlowCallback, which compares the step with `state.max_steps`.
    """

    def __init__(self, trainer: CloneTrainer, deadline: float, final_batches: int,
                 reserve_steps: float = 0.0) -> None:
        self.trainer, self.deadline, self.final_batches = trainer, deadline, final_batches
        self.reserve_steps = reserve_steps  # step-equivalents of work after the run (the preference stage)
        self.limit = 0            # the steps epochs/max_steps allow
        self.began = 0.0          # when training began
        self.mark: tuple[float, int] | None = None  # (time, step) at the end of the first step
        self.limited = False      # whether the budget, not epochs/max_steps, ended the run

    def on_train_begin(self, args, state, control, **kwargs):
        self.limit, self.began = state.max_steps, time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if self.mark is None:
            per_step = now - self.began
            self.mark = (now, state.global_step)
        else:
            per_step = (now - self.mark[0]) / max(1, state.global_step - self.mark[1])
        after = (self.final_batches * FORWARD_SHARE + self.reserve_steps) * per_step + SAVE_SECONDS
        left = self.deadline - now - after
        planned = min(self.limit, state.global_step + max(0, math.floor(left / per_step)))
        self.limited = planned < self.limit
        state.max_steps = planned
        self.trainer.plan_steps(planned)
        if now >= self.deadline:  # a safety: the plan should have ended the run before
            control.should_training_stop = True


class NoFinalEvaluation(TrainerCallback):
    """At the last step the Trainer would evaluate and checkpoint once more, and `train()` then
    scores the validation split again with `mean_nll` and saves the adapter: the same work twice,
    measured at about a quarter of a 4-minute budget. The Trainer's copies are skipped; the score
    is added to the log history by `train()`."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = control.should_save = False


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
        lr_scheduler_type="cosine",  # the shape CloneTrainer.create_scheduler gives, end movable
        warmup_steps=cfg.warmup_ratio,
        weight_decay=0.0,
        train_sampling_strategy="group_by_length",  # CloneTrainer's own: ShuffledLengthGroups
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
    precision: str, trainer_class: type[CloneTrainer] = CloneTrainer, started: float | None = None,
    reserve_steps: float = 0.0,
) -> CloneTrainer:
    """The Trainer for one run; `started` (time.monotonic()) is when cfg.max_minutes began, and
    a time budget keeps `reserve_steps` steps' time free for what follows (the preference stage)."""
    trainer = trainer_class(
        model=model,
        args=training_args(cfg, work, precision, bool(val_rows)),
        train_dataset=train_rows,
        eval_dataset=curve_rows(val_rows) or None,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.loraplus_ratio = cfg.loraplus_ratio
    trainer.remove_callback(ProgressCallback)  # replaced by the same bar with tokens/s added
    trainer.add_callback(TokenProgress(trainer))
    trainer.add_callback(NoFinalEvaluation())  # after DefaultFlowCallback, which asks for them
    if cfg.max_minutes:
        deadline = (time.monotonic() if started is None else started) + cfg.max_minutes * 60
        # After the last step: mean_nll's scoring in train(), in fp32 (fp32_twin) after a bf16 base,
        # which took about twice a bf16 forward here (44 s against 20 on the sample).
        final_batches = math.ceil(len(val_rows) / SCORE_BATCH) * (2 if precision == BF16_BASE else 1)
        # First in line: DefaultFlowCallback must see the new plan in the same step.
        budget = TimeBudget(trainer, deadline, final_batches, reserve_steps)
        trainer.callback_handler.callbacks.insert(0, budget)
    return trainer


def time_budget(trainer: CloneTrainer) -> TimeBudget | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TimeBudget)), None)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "peft")}


@torch.no_grad()
def mean_nll(
    model, rows: list[dict], pad_id: int, batch_size: int = SCORE_BATCH, desc: str = "Scoring"
) -> tuple[float, int]:
    """Token-weighted mean negative log-likelihood of the labelled tokens of `rows`."""
    sums = nll_sums(model, rows, pad_id, batch_size, desc)
    return sums.mean, sums.count


class NllSums(NamedTuple):
    """Summed negative log-likelihood of labelled tokens and their count; then the same for the
    tokens of the rows' last replies (from each row's `last` position on, where it has one)."""

    total: float
    count: int
    last_total: float
    last_count: int

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def last_mean(self) -> float:
        return self.last_total / self.last_count if self.last_count else float("nan")


@torch.no_grad()
def nll_sums(
    model, rows: list[dict], pad_id: int, batch_size: int = SCORE_BATCH, desc: str = "Scoring"
) -> NllSums:
    """NllSums of `rows`: one pass scores a sample's every reply and its last one."""
    from tqdm import tqdm

    model.eval()
    sums = NllSums(0.0, 0, 0.0, 0)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    starts = range(0, len(order), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None, leave=False):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        batch = collate(chunk, pad_id)
        nll, keep = token_nlls(model, {k: v.to(device) for k, v in batch.items()})
        last = torch.tensor([r.get("last", batch["input_ids"].shape[1]) for r in chunk], device=device)
        at = torch.arange(1, keep.shape[1] + 1, device=device)  # the token each position predicts
        tail = (at >= last[:, None])[keep]
        sums = NllSums(sums.total + float(nll.sum()), sums.count + int(keep.sum()),
                       sums.last_total + float(nll[tail].sum()), sums.last_count + int(tail.sum()))
    return sums


# -- 6. output -------------------------------------------------------------------------------


def base_reference(name_or_path: str | None, base: BaseModel) -> dict:
    """How an adapter names its base model: what it is, never where it lies on this machine.

    Decided in resolve_base's order: the packaged model by its name, a local folder by the
    folder's name, a cached hub model by its hub id.
    """
    if not name_or_path or name_or_path == PACKAGED_MODEL_ID:
        source, name = "packaged", PACKAGED_MODEL_ID
    elif Path(name_or_path).expanduser().is_dir():
        source, name = "folder", base.path.resolve().name
    else:
        source, name = "hub", name_or_path
    return {"id": name, "sha256": base.sha256, "source": source}


# Settings that say where things are on this machine, or who the run is for (top level).
NOT_HYPERPARAMETERS = ("data", "out", "persona_id", "persona_name")


def new_manifest(
    cfg: TrainConfig, version: str, base: dict, card: dict, precision: str, samples: tuple[int, int]
) -> dict:
    hyper = {k: v for k, v in asdict(cfg).items() if k not in NOT_HYPERPARAMETERS}
    hyper["base"] = base["id"]
    hyper["precision"] = precision
    return {
        "version": version,
        "persona": {"id": cfg.persona_id, "name": cfg.persona_name},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": base,
        "prompt_contract": CONTRACT_VERSION,
        "index": card.get("index"),  # embedding model, item counts, fingerprint (None: no index)
        "dataset": {
            "fingerprint": card["fingerprint"],
            "persona": card.get("persona"),
            "train_samples": samples[0],
            "val_samples": samples[1],
            "corrections": card.get("corrections"),  # counts of the owner's corrections trained on
        },
        "hyperparameters": hyper,
        "libraries": library_versions(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def run_metrics(
    trainer: CloneTrainer, output, runtime: float, val: tuple[float | None, int], resumed_from: str | None
) -> dict:
    val_nll, val_tokens = val
    budget = time_budget(trainer)
    return {
        "train_loss": round(output.training_loss, 4),
        "val_loss": None if val_nll is None else round(val_nll, 4),
        "val_perplexity": None if val_nll is None else round(math.exp(val_nll), 3),
        "val_tokens": val_tokens,
        "steps": trainer.state.global_step,
        "planned_steps": trainer.state.max_steps,
        "time_limited": bool(budget and budget.limited),
        "epochs": round(trainer.state.epoch or 0, 3),
        "train_tokens": trainer.tokens_seen,
        "tokens_per_second": round(trainer.tokens_seen / runtime, 1),
        "runtime_s": round(runtime, 1),
        "resumed_from": resumed_from,
    }


def save_adapter(folder: Path, model, tokenizer, trainer: CloneTrainer, manifest: dict,
                 index: Path | None = None) -> None:
    """Adapter, tokenizer, log, the dataset's persona index (it is the adapter's from now on:
    rollback brings back the index the adapter was trained with) and manifest (last), staged
    and renamed into place whole."""
    base_id = manifest["base_model"]["id"]
    # peft writes where the base model was loaded from into adapter_config.json and README.md:
    # the base's id instead, as in the manifest.
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_id
    lm = model.get_base_model()
    lm.name_or_path = lm.config.name_or_path = base_id
    with staged_dir(folder) as tmp:
        # The vocabulary never changes here; peft's "auto" would look the id up on the Hub.
        model.save_pretrained(tmp, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        if index is not None and index.is_dir():
            shutil.copytree(index, tmp / "index")
        (tmp / adapters.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last


# -- the whole run ---------------------------------------------------------------------------


def open_run(cfg: TrainConfig, fingerprint: str) -> tuple[str, Path | None, Path]:
    """The run's version, the checkpoint it resumes from (if any), and its work folder."""
    work_root = cfg.out / ".work"
    resumed = latest_run(work_root, fingerprint) if cfg.resume else None
    version, checkpoint = resumed if resumed else (adapters.new_version(cfg.out), None)
    if cfg.resume and not resumed:
        log.warning("Nothing to resume for this dataset: starting a new run")
    work = work_root / version
    work.mkdir(parents=True, exist_ok=True)
    return version, checkpoint, work


def preference_stage(cfg: TrainConfig, model, tokenizer, pair_rows: list[dict], work: Path, precision: str,
                     started: float) -> dict | None:
    """DPO on the preference pairs after supervised training (training.preference); its metrics,
    None when there is nothing to prefer or it is switched off. Inside cfg.max_minutes, counted
    from `started`."""
    if cfg.preference != "dpo" or not pair_rows:
        return None
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else None
    return preference.train_preferences(model, tokenizer, pair_rows, cfg, work / "preference", precision,
                                        deadline)


def train(cfg: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Train one adapter; returns its version. `adapters/active` moves only if cfg.activate.

    `callbacks` are added to the Trainer's own (to watch or steer a run). cfg.max_minutes
    counts from this call.
    """
    from transformers import set_seed

    started = time.monotonic()
    if not 0 < cfg.lora_top_layers <= 1:  # a layer count typed for a share would train them all
        raise ValueError(f"lora_top_layers is a share of the layers, above 0 and at most 1, "
                         f"not {cfg.lora_top_layers:g}")
    tune_allocator()
    card = read_card(cfg.data)
    base: BaseModel = resolve_base(cfg.base)
    tokenizer = load_tokenizer(base)
    train_rows = load_split(cfg.data, "train", tokenizer, cfg.max_length, cfg.knowledge_share,
                            cfg.correction_weight)
    val_rows = load_split(cfg.data, "val", tokenizer, cfg.max_length)
    pair_rows = load_pairs(cfg.data, tokenizer, cfg.max_length) if cfg.preference == "dpo" else []
    if not train_rows:
        raise ValueError(f"{cfg.data}/train.jsonl has no sample with a reply of the person to learn")

    version, checkpoint, work = open_run(cfg, card["fingerprint"])
    precision = pick_precision(cfg.precision)
    manifest = new_manifest(cfg, version, base_reference(cfg.base, base), card, precision,
                            (len(train_rows), len(val_rows)))
    # The run folder carries what --resume needs to recognise it.
    (work / adapters.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    set_seed(cfg.seed)
    model = training_model(base, cfg, precision)
    reserve = preference.STEP_COST * preference.planned_steps(len(pair_rows), cfg)
    trainer = build_trainer(cfg, model, tokenizer, train_rows, val_rows, work, precision, started=started,
                            reserve_steps=reserve)
    for callback in callbacks:
        trainer.add_callback(callback)
    run_started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.monotonic() - run_started
    preferred = preference_stage(cfg, model, tokenizer, pair_rows, work, precision, started)

    scorer = fp32_twin(model, base, cfg) if precision == BF16_BASE else model
    val = mean_nll(scorer, val_rows, tokenizer.pad_token_id) if val_rows else (None, 0)
    if val[0] is not None:  # the final point of the validation curve
        trainer.state.log_history.append(
            {"eval_loss": round(val[0], 4), "step": trainer.state.global_step, "epoch": trainer.state.epoch})
    manifest["metrics"] = run_metrics(trainer, output, runtime, val, checkpoint.name if checkpoint else None)
    manifest["metrics"]["preference"] = preferred
    folder = cfg.out / version
    save_adapter(folder, model, tokenizer, trainer, manifest, cfg.data / "index")
    shutil.rmtree(work, ignore_errors=True)
    if cfg.activate:
        adapters.activate(cfg.out, version)
    return TrainResult(version, folder, manifest)
