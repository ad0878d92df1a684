"""Fidelity on real data: how much better the clone predicts a real person than prompting does.

A persona is built from a prolific speaker of the `chitchat-dataset` package (not the sample
persona's speaker), exported as a real Telegram export, then run through the product's own
pipeline: import -> prepare -> `clone train` under a fixed CPU budget -> `clone eval`. It
reports the held-out perplexity of the person's real replies under the base model, the base
model prompted with a handful of the person's own messages, and the adapter.

Target: adapter perplexity at most 0.6 x the prompted base model's.

    python benchmarks/fidelity.py                    # 200 conversations, 15-minute budget
    python benchmarks/fidelity.py --minutes 3 --conversations 60   # quick check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SPEAKER = "31267496-e50f-4f91-a197-c5b1bfde803b"  # 25k messages in 777 conversations


def make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "persona_data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speaker", default=SPEAKER)
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget (wall clock)")
    ap.add_argument("--epochs", type=float, default=1.5)  # about 13 of the 15 minutes here
    ap.add_argument("--lr", type=float, help="peak learning rate (clone train's)")
    ap.add_argument("--lora-top-layers", type=float, help="share of layers with LoRA (clone train's)")
    ap.add_argument("--batch-size", type=int, help="samples in one batch (clone train's)")
    ap.add_argument("--loraplus-ratio", type=float, help="LoRA+'s B/A learning-rate ratio (clone train's)")
    ap.add_argument("--lora-dropout", type=float, help="dropout on the LoRA inputs (clone train's: 0)")
    ap.add_argument("--lora-head", action=argparse.BooleanOptionalAction,
                    help="LoRA on the output layer too (clone train's: on)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from training.base_model import load_tokenizer, token_counter
    from training.evaluate import evaluate
    from training.persona import Persona
    from training.prepare import prepare_persona
    from training.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "persona"
        make_sample_module().write_sample(root, args.speaker, args.conversations)
        persona = Persona.load(root)
        prepared = prepare_persona(persona, token_counter(load_tokenizer())).prepared

        started = time.monotonic()
        given = {"lora_top_layers": args.lora_top_layers, "learning_rate": args.lr,
                 "batch_size": args.batch_size, "loraplus_ratio": args.loraplus_ratio,
                 "lora_dropout": args.lora_dropout, "lora_head": args.lora_head}
        chosen = {k: v for k, v in given.items() if v is not None}  # the rest: clone train's defaults
        result = train(TrainConfig(data=root / "dataset", out=root / "adapters", epochs=args.epochs,
                                   max_minutes=args.minutes, eval_steps=100, **chosen))
        train_minutes = (time.monotonic() - started) / 60
        scores = evaluate(root / "adapters", root / "dataset", samples=16)

    ppl = scores["perplexity"]
    summary = {
        "speaker": args.speaker,
        "conversations": args.conversations,
        "train_samples": prepared.card.samples["train"],
        "val_replies": scores["val_replies"],
        "val_tokens": scores["val_tokens"],
        "train_minutes": round(train_minutes, 1),
        "steps": result.manifest["metrics"]["steps"],
        "epochs": result.manifest["metrics"]["epochs"],
        "tokens_per_second": result.manifest["metrics"]["tokens_per_second"],
        "lora_top_layers": result.manifest["hyperparameters"]["lora_top_layers"],
        "learning_rate": result.manifest["hyperparameters"]["learning_rate"],
        "batch_size": result.manifest["hyperparameters"]["batch_size"],
        "loraplus_ratio": result.manifest["hyperparameters"]["loraplus_ratio"],
        "lora_dropout": result.manifest["hyperparameters"]["lora_dropout"],
        "lora_head": result.manifest["hyperparameters"]["lora_head"],
        "perplexity": ppl,
        "adapter_over_prompted": round(ppl["adapter"] / ppl["prompted"], 3),
        "target": 0.6,
        "style_distances": {k: scores["style"][k] for k in ("length_distance", "burst_distance")},
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"persona: chitchat speaker {args.speaker[:8]}, {args.conversations} conversations, "
          f"{summary['train_samples']} train samples, {summary['val_replies']} held-out replies "
          f"({summary['val_tokens']:,} tokens)")
    print(f"training: {summary['steps']} steps ({summary['epochs']} epochs) in "
          f"{summary['train_minutes']} min, {summary['tokens_per_second']} tok/s")
    for name in ("base", "prompted", "adapter"):
        print(f"  perplexity {name:<9}{ppl[name]:>9.2f}")
    print(f"adapter / prompted: {summary['adapter_over_prompted']} (target <= 0.6)")


if __name__ == "__main__":
    main()
