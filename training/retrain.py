"""One command from fresh exports to a new active adapter, never to a worse one.

import + prepare (the new exports merged with everything the persona already had; duplicates
drop out) -> train (not yet active) -> score the new and the active adapter on the same new
validation split -> swap `active` only if the new one is not worse, or when forced. Any failure
on the way leaves the active adapter as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from training import adapters
from training.encode import encode, load_jsonl
from training.train import TrainConfig, TrainResult, mean_nll, train

log = logging.getLogger(__name__)


@dataclass
class RetrainOutcome:
    new: TrainResult
    new_val_loss: float
    active_version: str | None
    active_val_loss: float | None
    activated: bool


def active_val_loss(cfg: TrainConfig) -> tuple[str | None, float | None]:
    """The active adapter's loss on the validation split of `cfg.data` (None when there is no
    active one, or it cannot be loaded here)."""
    root, data = cfg.out, cfg.data
    version = adapters.active_version(root)
    if version is None:
        return None, None
    try:
        model, tokenizer, _ = adapters.load(root, version, cfg.persona_id, cfg.base)
    except adapters.AdapterError as e:
        log.warning("The active adapter cannot be compared (%s): the new one replaces it", e)
        return version, None
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in (encode(s["messages"], tokenizer) for s in load_jsonl(data / "val.jsonl"))
    ]
    loss, _ = mean_nll(model, rows, tokenizer.pad_token_id)
    return version, loss


def retrain(cfg: TrainConfig, force: bool = False) -> RetrainOutcome:
    """Train on `cfg.data` and activate the result only if it beats (or ties) the active adapter."""
    result = train(replace(cfg, activate=False))
    new_loss = result.manifest["metrics"]["val_loss"]
    old_version, old_loss = active_val_loss(cfg)
    better = old_loss is None or (new_loss is not None and new_loss <= old_loss)
    if better or force:
        adapters.activate(cfg.out, result.version)
    return RetrainOutcome(result, new_loss, old_version, old_loss, better or force)
