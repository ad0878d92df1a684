"""`clone train`, `clone adapters`, `clone eval`, `clone retrain`: a persona's adapters."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cli.common import CliError, Session, open_session, refuse_sample, shown, using
from cli.data import add_prepare_options, run_prepare
from cli.options import HelpFormatter, add_config_options, add_persona_option, config_values
from training import adapters
from training.config import TrainConfig
from training.persona import add_exports

TRAIN_FIELDS = ["epochs", "max_steps", "max_minutes", "learning_rate", "batch_size", "lora_r",
                "lora_top_layers", "lora_head", "loraplus_ratio", "seed", "precision", "knowledge_share",
                "correction_weight", "preference"]


def train_config(session: Session, args: argparse.Namespace) -> TrainConfig:
    """The persona's dataset into the persona's adapter registry, with the flags' settings."""
    persona = session.persona
    assert persona.dataset is not None and persona.adapters is not None
    values = config_values(args, TrainConfig)
    return TrainConfig(**values | dict(
        data=persona.dataset, out=persona.adapters, base=args.base, persona_id=persona.id,
        persona_name=persona.name, lora_alpha=2 * values["lora_r"],
        resume=getattr(args, "resume", False)))


def require_dataset(session: Session) -> None:
    dataset = session.persona.dataset
    if dataset is None or not (dataset / "card.json").is_file():
        raise CliError(f"no dataset in {shown(dataset)} yet: run `clone prepare --persona "
                       f"{session.persona.id}` first")


def print_trained(result) -> None:
    m = result.manifest["metrics"]
    print(
        f"Adapter {result.version}: {m['steps']} steps, {m['train_tokens']:,} tokens in "
        f"{m['runtime_s']:.0f} s ({m['tokens_per_second']:.0f} tok/s); "
        f"validation perplexity {m['val_perplexity']}"
    )


def print_corrections(result, always: bool = False) -> None:
    """How many of the owner's corrections the adapter learnt from: counts, never their text."""
    used = result.manifest["dataset"].get("corrections")
    if not used:
        if always:
            print("Corrections used: 0 (none stored yet: the console's Good/Bad and your own words add them)")
        return
    weight = result.manifest["hyperparameters"].get("correction_weight")
    dpo = result.manifest["metrics"].get("preference")
    stage = (f", DPO {dpo['steps']} step{'' if dpo['steps'] == 1 else 's'}" if dpo
             else ", not trained on (--preference none)")
    pairs = f"{used['pairs']} preference pair{'' if used['pairs'] == 1 else 's'}"
    print(f"Corrections used: {used['used']} of {used['read']} ({used['samples']} samples x{weight}; "
          f"{pairs}{stage if used['pairs'] else ''})")


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import train

    session = open_session(args)
    require_dataset(session)
    using(session.persona, dataset=True, adapter=f"new adapter in {shown(session.persona.adapters)}")
    result = train(train_config(session, args))
    print_trained(result)
    print_corrections(result)
    print(f"Active adapter: {result.version}")


# -- clone adapters -----------------------------------------------------------------------------


def current_fingerprint(session: Session) -> str | None:
    try:
        card = json.loads((session.persona.dataset / "card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    return card.get("fingerprint")


def adapter_row(a: dict, active: str | None, current: str | None) -> str:
    m = a.get("metrics", {})
    created = str(a.get("created") or a["version"])[:16].replace("T", " ")
    fingerprint = a.get("dataset", {}).get("fingerprint") or ""
    mark = "" if fingerprint == current else " †"
    persona = (a.get("persona") or {}).get("id") or a.get("dataset", {}).get("persona") or "?"
    ppl = f"{m.get('val_perplexity') or '-'}{mark}"
    return (f"{'* ' if a['version'] == active else '  '}{a['version']:<20}{created:<18}{persona[:14]:<15}"
            f"{fingerprint.removeprefix('sha256:')[:10]:<12}{m.get('steps', '?'):>6}{ppl:>10}"
            f"{m.get('tokens_per_second') or '-':>8}  {a['base_model']['id']}")


def cmd_adapters(args: argparse.Namespace) -> None:
    session = open_session(args)
    root = session.persona.adapters
    assert root is not None
    if args.action == "use":
        if not args.version:
            raise CliError("which version? `clone adapters use VERSION` (`clone adapters` lists them)")
        try:
            adapters.resolve(root, args.version, session.persona.id)
        except adapters.AdapterError as e:
            raise CliError(str(e)) from None
        adapters.activate(root, args.version)
        print(f"Active adapter: {args.version}")
        return
    using(session.persona, dataset=True)
    found = adapters.versions(root)
    if not found:
        print(f"No adapters in {shown(root)} yet: run `clone train`")
        return
    current, active = current_fingerprint(session), adapters.active_version(root)
    print(f"  {'version':<20}{'created (UTC)':<18}{'persona':<15}{'dataset':<12}{'steps':>6}"
          f"{'val ppl':>10}{'tok/s':>8}  base model")
    for a in found:
        print(adapter_row(a, active, current))
    if any((a.get("dataset") or {}).get("fingerprint") != current for a in found):
        print("† trained and scored on another dataset than the current one: its validation perplexity "
              "is not comparable (`clone eval VERSION` scores it on the current dataset)")


# -- clone eval ---------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> None:
    from bot.quiz import ask_persona
    from training.evaluate import evaluate

    session = open_session(args)
    require_dataset(session)
    persona = session.persona
    version = args.version or adapters.active_version(persona.adapters)
    if not args.json:
        using(persona, dataset=True, adapter=f"adapter {version or '-'}")
    try:
        result = evaluate(persona.adapters, persona.dataset, version, samples=args.samples,
                          persona_id=persona.id, base=args.base,
                          quiz=lambda model, tok, folder: ask_persona(persona, model, tok, folder / "index"))
    except adapters.AdapterError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, ensure_ascii=False))
        return
    print_eval(result)


def print_eval(result: dict) -> None:
    ppl, known, context = result["perplexity"], result.get("knowledge"), result.get("context_gain")
    print(result["verdict"])
    print(f"Adapter {result['version']} on {result['val_replies']} held-out replies:")
    for name in ("base", "prompted", "adapter"):
        print(f"  perplexity {name:<9}{ppl[name]:>10.2f}")
    print(f"  adapter / prompted {ppl['adapter'] / ppl['prompted']:>8.3f}")
    print(f"  retrieval gain     {ppl['adapter_no_recall'] / ppl['adapter']:>8.3f}  (perplexity without "
          f"recalled items / with; base model {ppl['base_no_recall'] / ppl['base']:.3f})")
    if context:
        print(f"  context gain       {context['adapter']:>8.3f}  (wrong conversation / true; "
              f"base model {context['base']:.3f})")
    if known:
        print(f"  knowledge          {known['right']:>4} of {known['asked']} questions answered right")
    print(f"Report: {shown(Path(result['report']))}")


# -- clone retrain ------------------------------------------------------------------------------


def cmd_retrain(args: argparse.Namespace) -> None:
    from training.retrain import retrain

    session = open_session(args)
    if args.paths:
        refuse_sample(session.persona, "`clone retrain PATH`")
    added = add_exports(session.persona, args.paths)
    active = adapters.active_version(session.persona.adapters)
    using(session.persona, dataset=True, adapter=f"active adapter {active or '-'}")
    try:
        run_prepare(session, args)
    except BaseException:
        if added is not None:  # the exports of a failed retrain do not stay behind
            shutil.rmtree(added, ignore_errors=True)
        raise
    outcome = retrain(train_config(session, args), force=args.force)
    print_trained(outcome.new)
    print_corrections(outcome.new, always=True)
    if outcome.active_val_loss is not None:
        print(f"Validation loss: new {outcome.new_val_loss:.4f}, "
              f"active {outcome.active_version} {outcome.active_val_loss:.4f}")
    if outcome.activated:
        print(f"Active adapter: {outcome.new.version}")
    else:
        print(f"Kept {outcome.active_version} active: the new adapter is worse on the same validation "
              f"data. It stays available: `clone adapters use {outcome.new.version}` (or retrain --force)")


# -- the parsers --------------------------------------------------------------------------------


def add_train_options(p: argparse.ArgumentParser, **defaults) -> None:
    p.add_argument("--base", help="base model: a local folder or a cached hub id "
                                  "(default: the packaged SmolLM2-135M-Instruct)")
    add_config_options(p, TrainConfig, TRAIN_FIELDS, aliases={"learning_rate": ["--lr"]}, **defaults)


def register(sub: argparse._SubParsersAction) -> None:
    from training.importers import FORMATS

    p = sub.add_parser("train", help="fine-tune a LoRA adapter on the persona's dataset",
                       formatter_class=HelpFormatter)
    add_persona_option(p)
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("adapters", help="list the persona's adapters; `adapters use VERSION` switches",
                       formatter_class=HelpFormatter)
    p.add_argument("action", nargs="?", choices=["list", "use"], default="list",
                   help="list the adapters, or use one (make it active: a rollback or roll-forward)")
    p.add_argument("version", nargs="?", help="with `use`: the version to make active")
    add_persona_option(p)
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("eval", help="perplexity and style of an adapter against the base model",
                       formatter_class=HelpFormatter)
    p.add_argument("version", nargs="?", help="adapter version (default: the active one)")
    add_persona_option(p)
    p.add_argument("--base", help="base model folder, when the adapter was trained on a local folder")
    p.add_argument("--samples", type=int, default=48,
                   help="replies to generate for the style check (fewer: faster, noisier)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("retrain", help="new exports to a new active adapter, never a worse one",
                       formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="new exports, copied into exports/")
    add_persona_option(p)
    p.add_argument("--force", action="store_true", help="activate the new adapter even if it is worse")
    add_prepare_options(p, FORMATS)
    add_train_options(p)
    p.set_defaults(func=cmd_retrain)
