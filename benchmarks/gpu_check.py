"""The GPU training path, end to end, on a machine with CUDA but no network and no base model.

Two halves:

    python benchmarks/gpu_check.py prepare     # here (network, the packaged base model)
    python3 benchmarks/gpu_check.py device     # there, after installing .gpu_check/wheels

`prepare` fills `.gpu_check/` (ignored by git, small enough to travel with the working tree):
the base model's config and tokenizer without its weights, the sample persona's prepared dataset,
and wheels of this checkout's transformers and peft (the device's image has older ones).

`device` builds a randomly initialised model of the base model's architecture (SmolLM2-135M:
same shapes, so the same FLOPs and memory traffic as the real weights; the real weights, 98 MB
even as GGUF, do not fit the 64 MiB that travels) and puts it where `resolve_base()` finds the
packaged model (CLONE_CACHE). Then it runs `training.train.train` on the sample dataset (bf16,
fp16, and bf16 under a 30-second budget; with evaluations, checkpoints and the saved adapter)
and benchmarks/train_throughput.py at batch sizes 4, 16, 32 and 64; `--only` picks some.
Losses are those of random weights: they show that the path runs, not what it learns. Figures
go to stdout and $OUT/gpu_check.json; no message text is printed.

The device command (from the repository root, carrying `.gpu_check`):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_check/wheels/*.whl \
      && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py device

GPU_CHECK_DIR names another folder than `.gpu_check`: benchmarks/README.md's GPU section ran
from a snapshot of the repository inside it, away from a working tree others were editing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# What `prepare` fills; GPU_CHECK_DIR points elsewhere (e.g. when this runs from a snapshot of the
# repository inside it, away from a working tree that others are editing).
HERE = Path(os.environ.get("GPU_CHECK_DIR") or REPO / ".gpu_check").resolve()
WHEELS = ("transformers", "peft", "regex")  # regex: transformers checks its version on import
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]


def prepare() -> None:
    from train_throughput import prepare_sample

    from training.base_model import resolve_base

    for old in ("base", "dataset", "wheels"):
        shutil.rmtree(HERE / old, ignore_errors=True)
    base = resolve_base()
    (HERE / "base").mkdir(parents=True)
    for f in base.path.iterdir():
        if f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy2(f, HERE / "base" / f.name)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(prepare_sample(Path(tmp)), HERE / "dataset")
    pins = [f"{name}=={md.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM,
                    "-d", str(HERE / "wheels"), *pins], check=True)
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"{HERE}: {size / 2**20:.1f} MiB ({', '.join(pins)})")


def random_base(cache: Path) -> None:
    """The base model's architecture with random weights, where packaged_base() looks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.base_model import PACKAGED_MODEL_ID

    folder = cache / PACKAGED_MODEL_ID
    shutil.copytree(HERE / "base", folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)
    source = {"id": PACKAGED_MODEL_ID, "gguf": "none: random weights of the same architecture",
              "sha256": "random-init"}
    (folder / "source.json").write_text(json.dumps(source) + "\n")


def environment() -> dict:
    import peft
    import torch
    import transformers

    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    smi = shutil.which(query[0]) and subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return {"gpu": smi, "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            "transformers": transformers.__version__, "peft": peft.__version__}


def throughput(steps: int, batch_size: int) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--json", "--steps", str(steps),
           "--batch-size", str(batch_size), "--data", str(HERE / "dataset")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        return {"command": " ".join(cmd[1:]), "error": done.stderr[-3000:]}
    return {"command": " ".join(cmd[1:]), **json.loads(done.stdout.strip().splitlines()[-1])}


def short_train(precision: str, out: Path, steps: int = -1, minutes: float | None = None) -> dict:
    """`clone train`'s own function, with evaluations and checkpoints every 10 steps."""
    from training.train import TrainConfig, train

    cfg = TrainConfig(data=HERE / "dataset", out=out, max_steps=steps, max_minutes=minutes, eval_steps=10,
                      save_steps=10, logging_steps=5, precision=precision)
    started = time.monotonic()
    try:
        result = train(cfg)
    except Exception as e:  # reported, so that the other checks still run
        import traceback

        return {"precision": precision, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:]}
    files = sorted(p.name for p in result.path.iterdir())
    history = json.loads((result.path / "log_history.json").read_text())
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"precision": result.manifest["hyperparameters"]["precision"], "device": result.manifest["device"],
            "metrics": result.manifest["metrics"], "eval_losses": evals, "files": files,
            "wall_s": round(time.monotonic() - started, 1)}


def checks(adapters: Path) -> dict:
    """The device's checks by name, in the order `device` runs them: most important first."""
    return {
        "train-bf16": lambda: short_train("auto", adapters / "bf16", steps=30),
        "throughput-4": lambda: throughput(24, 4),
        "throughput-64": lambda: throughput(24, 64),
        "train-fp16": lambda: short_train("fp16", adapters / "fp16", steps=10),
        "train-budget": lambda: short_train("auto", adapters / "budget", minutes=0.5),
        "throughput-16": lambda: throughput(24, 16),
        "throughput-32": lambda: throughput(24, 32),
    }


def device(out: Path, only: list[str]) -> None:
    """Each check in turn; the report is written after each one, so a run stopped at its time
    limit still leaves what it measured."""
    cache = Path(tempfile.mkdtemp(prefix="clone-cache-"))
    os.environ["CLONE_CACHE"] = str(cache)  # the benchmark's children inherit it
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "checks": {}}
    print(json.dumps(report["environment"]), flush=True)
    started = time.monotonic()
    random_base(cache)
    report["random_base_s"] = round(time.monotonic() - started, 1)
    for name, check in checks(Path(tempfile.mkdtemp(prefix="adapters-"))).items():
        if only and name not in only:
            continue
        report["checks"][name] = check()
        print(json.dumps({name: report["checks"][name]}), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["prepare", "device"])
    ap.add_argument("--only", nargs="*", default=[], metavar="CHECK",
                    help=f"device: only these checks ({', '.join(checks(Path()))})")
    args = ap.parse_args()
    if args.step == "prepare":
        sys.path.insert(0, str(REPO / "benchmarks"))
        prepare()
    else:
        device(Path(os.environ.get("OUT", HERE / "out")), args.only)


if __name__ == "__main__":
    main()
