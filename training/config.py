"""The settings of `clone prepare` and `clone train`, in one place that imports nothing heavy.

Plain dataclasses, TRL / HfArgumentParser style: every field carries `metadata["help"]`, the
one sentence a command line generated from these classes shows under `--help`. Reading them
costs no torch or transformers import, so `clone --help` stays instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PrepareConfig:
    me: Sequence[str] = field(metadata={
        "help": "Author names or ids that are you in the exports (case-insensitive)."})
    gap_minutes: float = field(default=120.0, metadata={
        "help": "Minutes of silence that end a conversation."})
    near_dup_minutes: float = field(default=60.0, metadata={
        "help": "The same text again within this many minutes is a near duplicate, dropped."})
    max_tokens: int = field(default=512, metadata={
        "help": "Token budget of one training sample, system prompt included."})
    max_chars: int = field(default=2000, metadata={
        "help": "Messages longer than this many characters are pastes, not texting: dropped."})
    val_fraction: float = field(default=0.1, metadata={
        "help": "Share of the conversations held out for validation."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the train/validation split."})
    # training.prompt.RECALL_TOKENS; a literal here keeps this module free of imports.
    recall_tokens: int = field(default=128, metadata={
        "help": "Tokens of each sample kept for recalled knowledge and past exchanges."})


@dataclass
class TrainConfig:
    data: Path = field(metadata={
        "help": "Dataset folder with train.jsonl, val.jsonl and card.json."})
    out: Path = field(default=Path("adapters"), metadata={
        "help": "The adapter registry: each run adds a version folder to it."})
    base: str | None = field(default=None, metadata={
        "help": "Base model, a local folder or a cached hub id (default: the packaged SmolLM2)."})
    persona_id: str | None = field(default=None, metadata={
        "help": "Id of the persona the adapter belongs to."})
    persona_name: str | None = field(default=None, metadata={
        "help": "Display name of the persona the adapter belongs to."})
    epochs: float = field(default=3.0, metadata={
        "help": "Passes over the training samples."})
    max_steps: int = field(default=-1, metadata={
        "help": "Optimizer steps; above 0 it overrides the epochs."})
    max_minutes: float | None = field(default=None, metadata={
        "help": "Time budget: steps are planned so that schedule, evaluation and saving fit in it."})
    # LoRA wants far more than full fine-tuning's 2e-5, and a run of a few dozen steps more than
    # the usual 2e-4: in clone start's 4 minutes 2e-3 gave 9-12 % lower held-out perplexity than
    # 3e-4 and taught the model to use its recalled facts (benchmarks/README.md, "The learning rate").
    learning_rate: float = field(default=2e-3, metadata={
        "help": "Peak learning rate, reached at the end of the warm-up."})
    # x 640 tokens at most: activations stay under ~5 GB.
    batch_size: int = field(default=4, metadata={
        "help": "Samples in one batch."})
    grad_accum: int = field(default=1, metadata={
        "help": "Batches whose gradients add up to one optimizer step."})
    lora_r: int = field(default=16, metadata={
        "help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={
        "help": "LoRA scale numerator: updates are scaled by alpha / r."})
    # Dropout copies every LoRA input: measured 29% slower when on.
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA inputs."})
    # Measured off: on 15 minutes it fit the training chats faster and held-out ones worse (0.542x
    # the prompted base against plain LoRA's 0.517x, benchmarks/README.md fidelity.py).
    loraplus_ratio: float = field(default=1.0, metadata={
        "help": "LoRA+ (Hayou et al. 2024): the B matrices' learning rate / the A ones' (1: plain LoRA)."})
    target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "Modules that get LoRA: 'all-linear' or a list of module names."})
    # Backward then stops at the lowest adapted layer, and the layers below run forward without
    # keeping activations. The top three quarters train fewer tokens a second than the top half
    # (about 0.8x) but learn more a minute: 1.6-2.9 % lower held-out perplexity in the same
    # budget (4 and 15 minutes); all the layers were no better (benchmarks/README.md).
    lora_top_layers: float = field(default=0.75, metadata={
        "help": "Share of the layers, from the top, that get LoRA (1: all of them)."})
    # The output layer maps the last hidden state to the 49,152 words: LoRA there learns which words
    # the person uses, at no measurable cost in speed (the head runs only where there are labels).
    lora_head: bool = field(default=True, metadata={
        "help": "Put LoRA on the output layer (the LM head) too."})
    # 0.15: with the batches in random order, 0.25 cost the chats' validation perplexity 1 % more and
    # answered fewer quiz questions, three training seeds each (benchmarks/README.md).
    knowledge_share: float = field(default=0.15, metadata={
        "help": "Share of the training samples that are knowledge-base answers (repeated to reach it)."})
    # Knowledge answers get repeated to a share; corrections are few and each is the owner saying
    # exactly what they want, so a plain repeat count, as a weight.
    correction_weight: int = field(default=3, metadata={
        "help": "Times each of the owner's corrections is trained on per epoch (0: not at all)."})
    preference: str = field(default="dpo", metadata={
        "help": "After supervised training, learn the owner's preferences (their text over the clone's "
                "reply) with TRL's DPO, or not: dpo or none.", "choices": ("dpo", "none")})
    # A DPO step costs about three supervised ones on a CPU (measured 3.06): one pass is the default.
    preference_epochs: float = field(default=1.0, metadata={
        "help": "Passes of the preference stage over the preference pairs."})
    # DPO's usual 5e-7..1e-6 is for full fine-tuning, and LoRA's 5e-6..5e-5 for hundreds of steps;
    # a few dozen corrections give a dozen steps.
    preference_lr: float = field(default=1e-4, metadata={
        "help": "Peak learning rate of the preference stage."})
    preference_beta: float = field(default=0.1, metadata={
        "help": "DPO's beta: how far the preference stage may move from the supervised adapter."})
    # The dataset's budget is 512.
    max_length: int = field(default=640, metadata={
        "help": "Longest sample in tokens; longer ones are cut."})
    warmup_ratio: float = field(default=0.05, metadata={
        "help": "Share of the steps that warm the learning rate up."})
    eval_steps: int = field(default=50, metadata={
        "help": "Evaluate on the validation split every this many steps."})
    save_steps: int = field(default=25, metadata={
        "help": "Checkpoint every this many steps (what a resumed run restarts from)."})
    logging_steps: int = field(default=5, metadata={
        "help": "Log the loss and learning rate every this many steps."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the LoRA initialisation and the batch order."})
    resume: bool = field(default=False, metadata={
        "help": "Continue the newest unfinished run on the same dataset."})
    activate: bool = field(default=True, metadata={
        "help": "Make the new adapter the active one when the run ends."})
    precision: str = field(default="auto", metadata={
        "help": "auto, fp32, bf16 (autocast, for a GPU), fp16 (a GPU without bf16) or bf16-base (the "
                "frozen base model's weights in bf16, the adapter in fp32; auto picks it on a CPU that "
                "multiplies bf16 faster than fp32).",
        "choices": ("auto", "fp32", "bf16", "fp16", "bf16-base")})
