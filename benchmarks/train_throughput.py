"""Training throughput: `clone train`'s configuration against a naive baseline, in one run.

Both train the same LoRA (r=16, every linear layer) on the same base model and the same
prepared chats (the sample persona), for the same number of optimizer steps, each in a fresh
process so that peak memory is its own:

  baseline  transformers/TRL defaults: random batches padded to their longest member, the
            model's own loss (full-vocabulary logits at every position), LoRA dropout 0.05,
            glibc's default allocator, LoRA on every block
  ours      exactly what `clone train` runs: length-grouped batches, the LM head only where
            there are labels, LoRA on the top three quarters of the blocks without dropout, the
            allocator kept from trimming, precision picked for the hardware

  command   `clone train` whole (`--command`): training.train.train with clone train's own
            settings (knowledge share, evaluation every 50 steps, checkpoints every 25, the final
            validation score and the adapter's save) in a fresh interpreter, timed from its start
            to its return; tokens/s is the trained tokens over all of that, and the time is
            split into phases (start-up, steps, evaluations, checkpoints, the end)

Reported: real (non-padding) tokens per second, peak RSS, and the achieved FLOP/s (the
matmul work each set-up really needs per token: ours skips the LM head where there are no
labels and the backward pass below the lowest adapted layer) as a share of a plain fp32
matmul's FLOP/s measured in the same run.

    python benchmarks/train_throughput.py               # 24 steps each (a few minutes)
    python benchmarks/train_throughput.py --steps 8     # quick check
    python benchmarks/train_throughput.py --command 60  # also the whole command, 60 steps

On a CUDA machine the Trainer runs both on the GPU (ours in bf16, or fp16 on a GPU without bf16),
peak GPU memory is reported beside the RSS, and the reference matmul runs on the GPU in ours'
precision. `--batch-size` trades the CPU default (4) for a GPU-sized batch; `--data` takes an
already prepared dataset instead of preparing the sample persona (which needs the packaged base
model's tokenizer, and the exports).
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


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(mode: str, data: Path, steps: int, work: Path, batch_size: int) -> dict:
    import torch

    from training import train as t
    from training.base_model import load_tokenizer, resolve_base

    naive = mode == "baseline"
    forced = "fp32" if naive else mode.removeprefix("ours-") if mode.startswith("ours-") else None
    if not naive:
        t.tune_allocator()
    cfg = t.TrainConfig(data=data, out=work, max_steps=steps, eval_steps=10**6, save_steps=10**6,
                        batch_size=batch_size)
    if naive:  # LoRA as commonly configured: every linear layer of every block, with dropout
        cfg.lora_dropout, cfg.lora_top_layers, cfg.lora_head = 0.05, 1.0, False
    base = resolve_base()
    tokenizer = load_tokenizer(base)
    rows = t.load_split(data, "train", tokenizer, cfg.max_length)
    precision = forced or t.pick_precision("auto")
    model = t.training_model(base, cfg, precision)

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
                sync()
                self.start, self.tokens, self.labelled = time.perf_counter(), trainer.tokens_seen, labelled[0]

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    sync()
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
    cuda = torch.cuda.is_available()
    return {
        "mode": mode,
        "precision": precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch_size": batch_size,
        "lora_layers": f"top {adapted:.0%}",
        "steps": steps - 1,
        "tokens": tokens,
        "labelled_tokens": labels,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "flops_per_second": flops / seconds,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "threads": torch.get_num_threads(),
    }


def command_child(data: Path, steps: int, work: Path, batch_size: int, spawned: float) -> dict:
    """`clone train` whole: its own settings, timed from the interpreter's start (`spawned`, the
    parent's clock) and split into phases by a callback."""
    from training import train as t

    class Phases(t.TrainerCallback):
        def __init__(self) -> None:
            self.mark = 0.0
            self.spent = dict.fromkeys(("start-up", "steps", "evaluations", "checkpoints"), 0.0)

        def lap(self, phase: str) -> None:
            now = time.time()
            self.spent[phase] += now - self.mark
            self.mark = now

        def on_train_begin(self, args, state, control, **kw):
            self.mark = spawned
            self.lap("start-up")  # interpreter, imports, tokenizing, the model and the Trainer

        def on_step_end(self, args, state, control, **kw):
            self.lap("steps")

        def on_evaluate(self, args, state, control, **kw):
            self.lap("evaluations")

        def on_save(self, args, state, control, **kw):
            self.lap("checkpoints")

    phases = Phases()
    # Everything but the steps and the batch size as `clone train` has it.
    cfg = t.TrainConfig(data=data, out=work, max_steps=steps, batch_size=batch_size)
    result = t.train(cfg, callbacks=[phases])
    end = time.time()
    phases.spent["the end"] = end - phases.mark  # final validation score, save, activation
    metrics = result.manifest["metrics"]
    wall = end - spawned
    return {"mode": "command", "steps": metrics["steps"], "tokens": metrics["train_tokens"],
            "seconds": round(wall, 2), "tokens_per_second": round(metrics["train_tokens"] / wall, 1),
            "trainer_tokens_per_second": metrics["tokens_per_second"],
            "phases_s": {k: round(v, 1) for k, v in phases.spent.items()},
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def matmul_flops(precision: str) -> float:
    """FLOP/s of a plain matmul shaped like the model's MLP, in this process, in `precision`
    (bf16 on a CPU that trains in it: its share is of the rate that set-up could reach)."""
    import torch

    cuda = torch.cuda.is_available()
    halves = {"bf16": torch.bfloat16, "bf16-base": torch.bfloat16, "fp16": torch.float16}
    dtype = halves.get(precision, torch.float32)
    a = torch.randn(2048, 576, device="cuda" if cuda else "cpu", dtype=dtype)
    b = torch.randn(576, 1536, device=a.device, dtype=dtype)
    for _ in range(5):
        a @ b
    n = 500 if cuda else 50
    sync()
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    sync()
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start)


def run_child(mode: str, data: Path, steps: int, batch_size: int) -> dict:
    """One set-up in its own process; a failure (a GPU out of memory, say) is recorded as the
    error's line, its stderr passed on, so that the other set-up is still measured."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--data", str(data), "--steps", str(steps),
         "--batch-size", str(batch_size), "--spawned", repr(time.time())],
        capture_output=True, text=True, cwd=REPO,
    )
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        error = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1])
        return {"mode": mode, "error": error.strip()}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)  # kept should a later part fail
    return result


def ratio(runs: dict, key: str, of: str = "ours", over: str = "baseline") -> float | None:
    ours, base = runs.get(of, {}).get(key), runs.get(over, {}).get(key)
    return round(ours / base, 2) if ours and base else None


def summarise(runs: dict) -> dict:
    ours = runs["ours"]
    peaks = {r["precision"]: matmul_flops(r["precision"]) for r in runs.values() if "precision" in r}
    peak = peaks[ours["precision"]]
    for r in runs.values():  # each of a plain matmul in its own precision
        if "flops_per_second" in r:
            r["matmul_fraction"] = round(r["flops_per_second"] / peaks[r["precision"]], 3)
    return {
        "runs": runs,
        "matmul_gflops": round(peak / 1e9, 1),
        "matmul_precision": ours["precision"],
        "also_over_ours": {name: ratio(runs, "tokens_per_second", name, "ours")
                           for name in runs if name.startswith("ours-")},
        "speedup": ratio(runs, "tokens_per_second"),
        "command_speedup": ratio(runs, "tokens_per_second", "command"),
        "peak_memory_ratio": ratio(runs, "peak_rss_gb"),
        "peak_gpu_memory_ratio": ratio(runs, "peak_gpu_gb"),
    }


def print_table(summary: dict) -> None:
    print(f"{'':10}{'tok/s':>8}{'peak RSS':>10}{'GFLOP/s':>9}{'of matmul':>11}  precision")
    for name, r in summary["runs"].items():
        if name == "command":
            continue
        if "error" in r:
            print(f"{name:10}failed: {r['error']}")
            continue
        gpu = f"  peak GPU {r['peak_gpu_gb']} GB on {r['device']}" if r["peak_gpu_gb"] is not None else ""
        print(f"{name:10}{r['tokens_per_second']:>8.0f}{r['peak_rss_gb']:>8.1f}GB"
              f"{r['flops_per_second'] / 1e9:>9.1f}{r['matmul_fraction']:>10.1%}  {r['precision']}{gpu}")
    print(f"plain {summary['matmul_precision']} matmul: {summary['matmul_gflops']} GFLOP/s "
          f"(each row's share is of a matmul in its own precision)")
    command = summary["runs"].get("command")
    if command and "error" not in command:
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in command["phases_s"].items())
        print(f"clone train whole, {command['steps']} steps: {command['tokens_per_second']:.0f} tok/s over "
              f"{command['seconds']:.0f} s ({summary['command_speedup']}x the baseline); {phases}")
    for name, r in summary["also_over_ours"].items():
        print(f"{name} / ours: {r}x")
    if summary["speedup"]:
        print(f"speed-up ours/baseline: {summary['speedup']}x; peak memory ours/baseline: "
              f"{summary['peak_memory_ratio']}" + (f" (GPU: {summary['peak_gpu_memory_ratio']})"
                                                   if summary["peak_gpu_memory_ratio"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4, help="samples in one batch (clone train's: 4)")
    ap.add_argument("--data", type=Path, help="a prepared dataset folder (default: the sample persona's)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--command", type=int, metavar="STEPS",
                    help="also time `clone train` whole for this many steps (its evaluations, checkpoints)")
    ap.add_argument("--also", action="append", default=[], choices=["fp32", "bf16", "bf16-base"],
                    help="also run ours in this precision (bf16: autocast), in the same run; repeatable")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as work:
            if args.child == "command":
                result = command_child(args.data, args.steps, Path(work), args.batch_size, args.spawned)
            else:
                result = child(args.child, args.data, args.steps, Path(work), args.batch_size)
            print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepare_sample(Path(tmp))
        modes = ("baseline", "ours", *(f"ours-{p}" for p in args.also))
        runs = {mode: run_child(mode, data, args.steps, args.batch_size) for mode in modes}
        if args.command:
            runs["command"] = run_child("command", data, args.command, args.batch_size)
    if "error" in runs["ours"]:
        sys.exit(f"ours failed: {runs['ours']['error']}")
    summary = summarise(runs)
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
