"""`max_minutes` plans the run: the whole learning-rate schedule fits in the time budget."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from transformers import TrainerCallback, get_cosine_schedule_with_warmup

from tests.test_train import tiny_config
from training.train import train, warmup_cosine

STEP_S = 0.25  # each step made this much slower, so that speed, and so the plan, is predictable


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(STEP_S)


def learning_rates(result) -> list[float]:
    history = json.loads((result.path / "log_history.json").read_text())
    return [h["learning_rate"] for h in history if "learning_rate" in h]


def bar_totals(stderr: str) -> tuple[int, int]:
    """Steps done and total of the training bar as last drawn (the bar with tokens/s)."""
    done, total = re.findall(r"(\d+)/(\d+) \[[^\]]*tok/s", stderr)[-1]
    return int(done), int(total)


@pytest.mark.parametrize("total", [1, 2, 7, 30, 213])
def test_the_schedule_is_transformers_cosine_with_warmup(total):
    """Without a time budget the learning rate is exactly what it was with transformers' own."""
    warmup = math.ceil(total * 0.05)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    theirs = [reference.lr_lambdas[0](step) for step in range(total + 1)]
    assert [warmup_cosine(step, total, warmup) for step in range(total + 1)] == pytest.approx(theirs)


def test_a_time_budget_fits_the_whole_schedule(tiny_base, tiny_dataset, tmp_path, capsys):
    budget_s = 12.0
    cfg = tiny_config(tiny_base, tiny_dataset, tmp_path / "adapters", max_steps=10_000,
                      max_minutes=budget_s / 60, logging_steps=1, eval_steps=10, save_steps=10)
    started = time.monotonic()
    result = train(cfg, callbacks=[Slow()])
    elapsed = time.monotonic() - started

    metrics = result.manifest["metrics"]
    steps = metrics["steps"]
    assert metrics["time_limited"] and metrics["planned_steps"] == steps < cfg.max_steps
    # Within the budget, and not by stopping early: most of it was used. (The slack after it is
    # the final save and score on a busy machine; without the plan, 10,000 steps would run.)
    assert 0.7 * budget_s < elapsed < budget_s + 3.0
    assert steps * STEP_S > 0.3 * budget_s

    rates = learning_rates(result)
    assert len(rates) == steps
    assert rates[0] < 0.5 * cfg.learning_rate                      # it warmed up ...
    assert max(rates) == pytest.approx(cfg.learning_rate, rel=0.02)  # ... to the peak
    assert rates.index(max(rates)) < steps // 4
    assert max(rates[-(steps // 4):]) < 0.5 * cfg.learning_rate     # and decayed ...
    assert rates[-1] < 0.05 * cfg.learning_rate                    # ... to the end

    assert bar_totals(capsys.readouterr().err) == (steps, steps)  # the bar's ETA was the plan's


def test_a_generous_budget_changes_nothing(tiny_base, tiny_dataset, tmp_path, capsys):
    """Never more steps than max_steps, and the same schedule as a run without a budget."""
    plain = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "a", max_steps=8, logging_steps=1,
                              eval_steps=100))
    assert bar_totals(capsys.readouterr().err) == (8, 8)
    budgeted = train(tiny_config(tiny_base, tiny_dataset, tmp_path / "b", max_steps=8, logging_steps=1,
                                 eval_steps=100, max_minutes=10))
    for result in (plain, budgeted):
        metrics = result.manifest["metrics"]
        assert (metrics["steps"], metrics["planned_steps"], metrics["time_limited"]) == (8, 8, False)
    assert learning_rates(budgeted) == pytest.approx(learning_rates(plain))
    assert budgeted.manifest["metrics"]["val_loss"] == pytest.approx(plain.manifest["metrics"]["val_loss"])
    assert bar_totals(capsys.readouterr().err) == (8, 8)
