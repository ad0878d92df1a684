"""`clone chat`, `clone serve`, `clone serve-model`: talking to a persona's clone."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from typing import TYPE_CHECKING

from cli.common import CliError, Session, open_session, using
from cli.options import HelpFormatter, add_model_options, add_persona_option
from training import adapters

if TYPE_CHECKING:  # the bot is imported inside the commands: `clone --help` stays instant
    from bot.engine import Engine


def model_choice(session: Session, args: argparse.Namespace):
    from bot.runtime import ModelChoice, Remote

    s = session.settings
    remote = Remote(s.llm_base_url, s.llm_model, s.secret("llm_api_key")) if s.llm_base_url else None
    return ModelChoice(getattr(args, "version", None), getattr(args, "base", None), remote)


def open_runtime(session: Session, args: argparse.Namespace, rules=None):
    """The engine and its parts; an adapter of another persona is a one-line error."""
    from bot.recall import FactAnswers, RecallAnswers
    from bot.runtime import RecallChoice, build_runtime

    s = session.settings
    answers = FactAnswers(s.clone_fact_answer_min) if s.clone_fact_answer_min is not None else None
    told = RecallAnswers(s.clone_recall_answer_min) if s.clone_recall_answer_min is not None else None
    recall = RecallChoice(s.clone_recall, s.clone_longterm_days, s.clone_longterm_items, fact_answers=answers,
                          recall_answers=told, grounded_min=s.clone_grounded_min,
                          grounded_candidates=s.clone_grounded_candidates)
    try:
        return build_runtime(session.persona, model_choice(session, args), redis_url=s.secret("redis_url"),
                             memory_file=s.clone_memory_file, rules=rules, recall=recall)
    except adapters.AdapterError as e:
        raise CliError(str(e)) from None


def say_using(session: Session, args: argparse.Namespace) -> None:
    root = session.persona.adapters
    version = getattr(args, "version", None) or adapters.active_version(root)
    using(session.persona, adapter=f"adapter {version}" if version else "no adapter yet (base model)")


# -- clone chat ---------------------------------------------------------------------------------


async def run_command(engine: Engine, text: str) -> str:
    """The line that answers /reset or /forget; one that could not be carried out says so."""
    from bot.memory import MemoryUnavailable

    try:
        if text == "/reset":
            await engine.reset("terminal", "local")
            return "(conversation forgotten)"
        removed = await engine.forget("terminal-user")
        return f"(deleted {removed} of your messages from memory)"
    except MemoryUnavailable:
        what = "forget this conversation" if text == "/reset" else "delete your messages"
        return f"(I couldn't {what} right now: memory unavailable; try again in a minute)"


async def chat_loop(session: Session, args: argparse.Namespace) -> None:
    from bot.engine import Delivery, Incoming

    persona = session.persona
    runtime = open_runtime(session, args)
    engine = runtime.engine
    interactive = sys.stdin.isatty()
    delivery = Delivery(enabled=interactive and session.settings.clone_typing_delay)
    print(f"Chatting with {persona.name} ({runtime.what}). /reset forgets this chat, /forget deletes "
          f"what you said, /quit leaves.", flush=True)
    try:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() == "/quit":
                break
            text = line.strip()
            if text in ("/reset", "/forget"):
                print(await run_command(engine, text), flush=True)
            elif text:
                incoming = Incoming("terminal", "local", "terminal-user", "you", text, is_dm=True)
                for reply in await engine.handle(incoming):
                    await asyncio.sleep(delivery.delay(reply))
                    print(f"{persona.name}: {reply}", flush=True)
    finally:
        await runtime.close()


def run_chat(session: Session, args: argparse.Namespace) -> None:
    if not args.verbose:  # the chat's own lines only: the engine's INFO lines would interleave
        logging.getLogger().setLevel(logging.WARNING)
    say_using(session, args)
    asyncio.run(chat_loop(session, args))


def cmd_chat(args: argparse.Namespace) -> None:
    run_chat(open_session(args), args)


# -- clone serve --------------------------------------------------------------------------------


async def serve_all(session: Session, args: argparse.Namespace, platforms, rules) -> None:
    from bot.generation import AdapterWatcher, LocalBackend
    from bot.serve import serve

    runtime = open_runtime(session, args, rules)
    watcher = None
    if isinstance(runtime.backend, LocalBackend) and not args.version:  # follow `clone retrain`
        watcher = asyncio.create_task(AdapterWatcher(
            runtime.backend, session.persona.adapters, args.base, session.settings.clone_adapter_check_s,
            session.persona.id).run())
    print(f"Serving {session.persona.name} ({runtime.what})", flush=True)
    try:
        await serve(runtime.engine, platforms, args.platform, runtime.gate)
    finally:
        if watcher is not None:
            watcher.cancel()
        await runtime.close()


def cmd_serve(args: argparse.Namespace) -> None:
    from bot.gate import GateSettingsError, Rules
    from bot.serve import check_credentials

    session = open_session(args)
    platforms = session.settings.platforms()
    platforms.check(args.platform)
    try:
        rules = Rules.from_persona(session.persona)  # before the model loads: a typo fails in a second
    except GateSettingsError as e:
        raise CliError(str(e)) from None
    asyncio.run(check_credentials(platforms, args.platform))  # a bad token, too, before the model loads
    say_using(session, args)
    asyncio.run(serve_all(session, args, platforms, rules))


def cmd_serve_model(args: argparse.Namespace) -> None:
    from bot.generation import load_clone
    from bot.serve_model import ServingBackend, serve

    session = open_session(args)
    api_key = args.api_key or session.settings.secret("clone_api_key")
    say_using(session, args)
    persona = session.persona
    try:
        model, tokenizer, what = load_clone(persona.adapters, args.version, args.base, persona.id)
    except adapters.AdapterError as e:
        raise CliError(str(e)) from None
    logging.getLogger(__name__).info("Loaded %s", what)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop a server
        asyncio.run(serve(ServingBackend(model, tokenizer), args.host, args.port, args.model_name, api_key))


# -- the parsers --------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with the clone in the terminal (piped input works too)",
                       formatter_class=HelpFormatter)
    add_persona_option(p)
    add_model_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the clone on Telegram and Discord (their tokens) in one process",
                       formatter_class=HelpFormatter)
    p.add_argument("--platform", choices=["telegram", "discord"], help="serve this platform alone")
    add_persona_option(p)
    add_model_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-model", help="serve the clone over the OpenAI chat-completions API",
                       formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--model-name", default="clone", help="the model name clients ask for")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1 "
                   "(default: CLONE_API_KEY; the setting keeps the key out of the process list)")
    add_persona_option(p)
    add_model_options(p)
    p.set_defaults(func=cmd_serve_model)
