"""The preference stage: TRL's DPO on the owner's preference pairs, on top of the supervised LoRA.

After supervised training the adapter already writes like the person; the pairs (the owner's text
preferred over what the clone said: training.feedback) then push it away from the replies the
owner corrected. Read top to bottom:
  1. data       each pair encoded by training.encode, the injection-safe encoding supervised
                training and serving use, so a user who typed `<|im_start|>` never opens a role,
                and the chosen and rejected answers are exactly the tokens the loss sees in SFT
                (the answer and its end-of-turn token)
  2. trainer    TRL's DPOTrainer and DPOConfig on the PeftModel itself: TRL copies the trained
                adapter as a frozen "ref" adapter, so the reference is the supervised state
                (not the bare base model) and no second model is loaded
  3. clean-up   the "ref" copy removed, so the saved adapter is the trained one alone

CPU-friendly: no gradient checkpointing (TRL's default), the precision `clone train` picked, the
LM head run only on the answers' positions (see `labelled_positions_only`), no checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from training.adapters import tied_head_accepted
from training.config import TrainConfig
from training.encode import IGNORE, encode

REF_ADAPTER = "ref"  # the name TRL gives its frozen copy of the adapter
# One DPO step against one supervised step of the same batch size: chosen and rejected both run
# forward and backward, and the reference forward again without gradients (about 2 + 2/3; measured
# 3.06 with the packaged model on the sample persona, 30.4 s against 9.9 s on 2 cores).
STEP_COST = 3.0


# -- 1. data ---------------------------------------------------------------------------------------


def _answer_ids(prompt: list[dict], answer: list[dict], tokenizer, prompt_ids: list[int]) -> list[int]:
    """The answer's tokens after the prompt, up to its last labelled token (the end of turn)."""
    e = encode([*prompt, *answer], tokenizer)
    if e.input_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently once an answer follows it")
    last = max(i for i, label in enumerate(e.labels) if label != IGNORE)
    return e.input_ids[len(prompt_ids) : last + 1]


def encode_pair(pair: dict, tokenizer, max_length: int) -> dict | None:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` as TRL's preference collator takes them; None
    when the pair does not fit `max_length` (truncation would cut the answers being compared)."""
    prompt_ids = encode(pair["prompt"], tokenizer, add_generation_prompt=True).input_ids
    chosen = _answer_ids(pair["prompt"], pair["chosen"], tokenizer, prompt_ids)
    rejected = _answer_ids(pair["prompt"], pair["rejected"], tokenizer, prompt_ids)
    if len(prompt_ids) + max(len(chosen), len(rejected)) > max_length:
        return None
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}


def encode_pairs(pairs: list[dict], tokenizer, max_length: int) -> list[dict]:
    return [row for row in (encode_pair(p, tokenizer, max_length) for p in pairs) if row is not None]


def planned_steps(pairs: int, cfg: TrainConfig) -> int:
    """Optimizer steps the stage takes over `pairs` pairs (what a time budget keeps free for it)."""
    if not pairs or cfg.preference == "none":
        return 0
    per_epoch = math.ceil(pairs / (cfg.batch_size * cfg.grad_accum))
    return math.ceil(per_epoch * cfg.preference_epochs)


# -- 2. trainer ------------------------------------------------------------------------------------


def dpo_config(cfg: TrainConfig, work, precision: str):
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.preference_epochs,
        learning_rate=cfg.preference_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        beta=cfg.preference_beta,
        max_length=cfg.max_length,
        activation_checkpointing=False,  # TRL turns it on: slower on a CPU, and memory is not short here
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",  # a few minutes at most: a crash reruns it, no checkpoint to resume
        eval_strategy="no",
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        report_to="none",
    )


def _trainer_class():
    from trl import DPOTrainer

    class EncodedDPOTrainer(DPOTrainer):
        """DPOTrainer over pairs already tokenized by training.encode: TRL's own tokenization
        renders the chat template over the raw text, where typed template markers become real
        ones, and its prompt/answer split can differ from the one supervised training learns."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return EncodedDPOTrainer


class Quiet(ProgressCallback):
    """The Trainer's step bar (the console follows it), without a printed dict per log line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class Deadline(TrainerCallback):
    """Stops the stage at `deadline` (time.monotonic()), should it run past its share of a budget."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() >= self.deadline:
            control.should_training_stop = True


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """TRL's fused LM head scores only the labelled positions (the answers) where Triton runs, and
    every position elsewhere, because a varying count would recompile on Neuron. On a CPU that is
    the full vocabulary over the whole prompt, forward and backward: a tiny model's DPO step took
    28 s, nearly all of it there. Its compact path is exact on any device (the same log-probabilities,
    as training.encode.token_nll computes them), so it is taken on a CPU too, while the stage runs."""
    from trl.trainer import utils

    triton = getattr(utils, "_use_triton", None)
    if triton is None:  # another TRL: its own choice stands
        yield
        return
    utils._use_triton = lambda device: device.type == "cpu" or triton(device)
    try:
        yield
    finally:
        utils._use_triton = triton


class AdaptedHead:
    """The output layer as TRL's fused LM head reads it. TRL takes the head's `weight` and `bias`
    and never calls the module, so a LoRA on the head (TrainConfig.lora_head) would be left out of
    both the scores and the gradients. Here `weight` is the base weight plus the active adapters'
    update (the reference adapter's too, when TRL switches to it), differentiable, so DPO scores
    and trains the head as the model runs it. TRL asks for a new one at every forward and reads its
    weight three times there (twice for its device), so it is built once per forward."""

    def __init__(self, layer) -> None:
        self.layer = layer  # peft's LoRA Linear around the head

    @functools.cached_property
    def weight(self):
        layer = self.layer
        base = layer.base_layer.weight
        if layer.disable_adapters or layer.merged:
            return base
        delta = sum(layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]
                    for name in layer.active_adapters if name in layer.lora_A)
        return (base.float() + delta).to(base.dtype)

    @property
    def bias(self):
        return self.layer.base_layer.bias


@contextlib.contextmanager
def adapted_head_for_trl(model) -> Iterator[None]:
    """While the stage runs, the base model's output layer is an AdaptedHead where it has a LoRA."""
    lm = model.get_base_model()
    head = lm.get_output_embeddings()
    if not hasattr(head, "lora_A"):
        yield
        return
    lm.get_output_embeddings = lambda: AdaptedHead(head)  # the instance's, over the class's
    try:
        yield
    finally:
        del lm.get_output_embeddings


def train_preferences(model, tokenizer, rows: list[dict], cfg: TrainConfig, work, precision: str,
                      deadline: float | None = None) -> dict:
    """DPO on `rows` (encode_pairs), training the PeftModel's adapter in place; its metrics."""
    from datasets import Dataset

    started = time.monotonic()
    # From the trainer's construction on: TRL refuses a LoRA'd head it would read without its LoRA.
    # And TRL adds the reference adapter through peft, which warns of the tied head as training does.
    with labelled_positions_only(), adapted_head_for_trl(model), tied_head_accepted():
        trainer = _trainer_class()(model=model, args=dpo_config(cfg, work, precision),
                                   train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Quiet())
        if deadline is not None:
            trainer.add_callback(Deadline(deadline))
        try:
            output = trainer.train()
        finally:
            drop_reference(model)
    return stage_metrics(trainer, output, len(rows), time.monotonic() - started)


# -- 3. clean-up -----------------------------------------------------------------------------------


def drop_reference(model) -> None:
    """Remove TRL's frozen copy, so that saving writes the trained adapter alone."""
    if REF_ADAPTER in model.peft_config:
        model.set_adapter("default")
        model.delete_adapter(REF_ADAPTER)


def stage_metrics(trainer, output, pairs: int, runtime: float) -> dict:
    logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    last = logs[-1] if logs else {}
    return {
        "method": "dpo",
        "pairs": pairs,
        "steps": trainer.state.global_step,
        "train_loss": round(output.training_loss, 4),
        "reward_accuracy": last.get("rewards/accuracies"),
        "reward_margin": last.get("rewards/margins"),
        "runtime_s": round(runtime, 1),
    }
