"""Training throughput: `clone train`'s configuration against a naive baseline, in one run.

Both train the same LoRA (r=16, every linear layer) on the same base model and the same
prepared chats (the sample persona), for the same number of optimizer steps, each in a fresh
process so that peak memory is its own:

  baseline  transformers/TRL defaults: random batches padded to their longest member, the
            model's own loss (full-vocabulary logits at every position), LoRA dropout 0.05,
            glibc's default allocator, LoRA on every block
  ours      exactly what `clone train` runs: length-grouped batches, the LM head only where
            there are labels, LoRA on the top half of the blocks without dropout, the
            allocator kept from trimming, precision picked for the hardware

Reported: real (non-padding) tokens per second, peak RSS, and the achieved FLOP/s (the
matmul work each set-up really needs per token: ours skips the LM head where there are no
labels and the backward pass below the lowest adapted layer) as a share of a plain fp32
matmul's FLOP/s measured in the same run.

    python benchmarks/train_throughput.py               # 24 steps each (a few minutes)
    python benchmarks/train_throughput.py --steps 8     # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prepare_sample(folder: Path) -> Path:
    """The sample persona's dataset, built the way `clone prepare` builds it, in a copy of the
    sample persona under `folder` (the checkout's sample folder stays untouched)."""
    from training.base_model import load_tokenizer, token_counter
    from training.persona import Persona
    from training.prepare import prepare_persona

    sample = REPO / "persona_data" / "sample"
    copy = folder / "sample"
    copy.mkdir(parents=True)
    (copy / "persona.toml").write_bytes((sample / "persona.toml").read_bytes())
    (copy / "exports").symlink_to(sample / "exports")
    prepare_persona(Persona.load(copy), token_counter(load_tokenizer()))
    return copy / "dataset"


def child(mode: str, data: Path, steps: int, work: Path) -> dict:
    import torch

    from training import train as t
    from training.base_model import load_model, load_tokenizer, resolve_base

    naive = mode == "baseline"
    if not naive:
        t.tune_allocator()
    cfg = t.TrainConfig(data=data, out=work, max_steps=steps, eval_steps=10**6, save_steps=10**6)
    if naive:  # LoRA as commonly configured: every linear layer of every block, with dropout
        cfg.lora_dropout, cfg.lora_top_layers = 0.05, 1.0
    base = resolve_base()
    tokenizer = load_tokenizer(base)
    rows = t.load_split(data, "train", tokenizer, cfg.max_length)
    model = t.with_lora(load_model(base), cfg)
    precision = "fp32" if naive else t.pick_precision("auto")

    labelled = [0]

    class Ours(t.CloneTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labelled[0] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Baseline(t.CloneTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens_seen += int(inputs["attention_mask"].sum())
            labelled[0] += int((inputs["labels"][:, 1:] != -100).sum())
            out = model(**inputs)  # the model's own loss: logits for every position
            return (out.loss, out) if return_outputs else out.loss

    trainer = t.build_trainer(cfg, model, tokenizer, rows, [], work, precision,
                              Baseline if naive else Ours)
    if naive:
        trainer.args.train_sampling_strategy = "random"

    class Clock(t.TrainerCallback):  # time from the end of step 1: the first step warms up
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                self.start, self.tokens, self.labelled = time.perf_counter(), trainer.tokens_seen, labelled[0]

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    seconds = time.perf_counter() - clock.start
    tokens = trainer.tokens_seen - clock.tokens
    labels = labelled[0] - clock.labelled
    lm = model.get_base_model()
    d, vocab, n_layers = lm.config.hidden_size, lm.config.vocab_size, lm.config.num_hidden_layers
    body = sum(p.numel() for n, p in lm.named_parameters() if "layers." in n)
    adapted = max(1, round(n_layers * cfg.lora_top_layers)) / n_layers
    head_positions = tokens if naive else labels  # ours runs the LM head only where there are labels
    # FLOPs actually needed: forward 2 per weight per token; backward 2 more, but only for
    # activation gradients (the base is frozen) and only down to the lowest adapted layer.
    flops = (2 + 2 * adapted) * body * tokens + 4 * d * vocab * head_positions
    return {
        "mode": mode,
        "precision": precision,
        "lora_layers": f"top {adapted:.0%}",
        "steps": steps - 1,
        "tokens": tokens,
        "labelled_tokens": labels,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "flops_per_second": flops / seconds,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
    }


def matmul_flops() -> float:
    """FLOP/s of a plain fp32 matmul shaped like the model's MLP, in this process."""
    import torch

    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    for _ in range(5):
        a @ b
    n, start = 50, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(child(args.child, args.data, args.steps, Path(work))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_sample(Path(tmp))
        runs = {}
        for mode in ("baseline", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--data", str(data), "--steps", str(args.steps)],
                check=True, capture_output=True, text=True, cwd=REPO,
            ).stdout
            runs[mode] = json.loads(out.strip().splitlines()[-1])
    peak = matmul_flops()
    for r in runs.values():
        r["matmul_fraction"] = round(r["flops_per_second"] / peak, 3)
    base, ours = runs["baseline"], runs["ours"]
    summary = {
        "runs": runs,
        "matmul_gflops": round(peak / 1e9, 1),
        "speedup": round(ours["tokens_per_second"] / base["tokens_per_second"], 2),
        "peak_memory_ratio": round(ours["peak_rss_gb"] / base["peak_rss_gb"], 2),
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'':10}{'tok/s':>8}{'peak RSS':>10}{'GFLOP/s':>9}{'of matmul':>11}  precision")
    for name, r in runs.items():
        print(f"{name:10}{r['tokens_per_second']:>8.0f}{r['peak_rss_gb']:>8.1f}GB"
              f"{r['flops_per_second'] / 1e9:>9.1f}{r['matmul_fraction']:>10.1%}  {r['precision']}")
    print(f"plain fp32 matmul: {summary['matmul_gflops']} GFLOP/s")
    print(f"speed-up ours/baseline: {summary['speedup']}x; peak memory ours/baseline: "
          f"{summary['peak_memory_ratio']}")


if __name__ == "__main__":
    main()
