"""`clone start`: the whole path for one persona on a fresh machine (the sample by default):
prepare its dataset, train an adapter within a time budget when it has none, then chat."""

from __future__ import annotations

import argparse

from cli.common import open_session, using
from cli.data import add_prepare_options, run_prepare
from cli.model import add_train_options, print_trained, train_config
from cli.options import HelpFormatter, add_persona_option
from cli.talk import run_chat
from training import adapters


def cmd_start(args: argparse.Namespace) -> None:
    from training.train import train

    session = open_session(args)
    persona = session.persona
    active = adapters.active_version(persona.adapters)
    using(persona, dataset=True, adapter=f"adapter {active}" if active else "no adapter yet")
    run_prepare(session, args)
    if active is None:
        print(f"No adapter yet: training one for {args.max_minutes:g} minutes (bounded)")
        result = train(train_config(session, args))
        print_trained(result)
    else:
        print(f"Active adapter: {active} (`clone retrain` makes a new one)")
    if not args.no_chat:
        run_chat(session, args)


def register(sub: argparse._SubParsersAction) -> None:
    from training.importers import FORMATS

    p = sub.add_parser("start", help="the main job: prepare, train (once, time-bounded) and chat",
                       formatter_class=HelpFormatter)
    add_persona_option(p)
    p.add_argument("--no-chat", action="store_true", help="stop after training, without the chat")
    p.add_argument("--version", help=argparse.SUPPRESS)  # the chat answers with the active adapter
    add_prepare_options(p, FORMATS)
    add_train_options(p, max_minutes=4.0)
    p.set_defaults(func=cmd_start)
