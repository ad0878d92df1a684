"""How fast, and in how little memory, the Telegram importer reads a big export.

Writes a synthetic Telegram Desktop export of at least --size-gb into a temporary folder
(streamed to disk, never held in memory), then reads it twice, each time in a fresh Python
process so that each peak memory figure belongs to one reader alone:

    ours      training.importers.telegram.read_telegram, iterating every message
    baseline  json.load of the whole file, then iterating every message dict

and prints messages per second, peak resident memory (the child's own VmHWM) and the ratios.

    python benchmarks/import_throughput.py                   # 1 GB
    python benchmarks/import_throughput.py --size-gb 0.05    # quick check
    python benchmarks/import_throughput.py --json            # figures as JSON

The export mixes what real ones hold: plain text, text lists with entities (links, bold,
mentions), replies, edits, forwards, photos, stickers, voice messages, files, service messages
(calls, pins, joins), across personal chats, groups and Saved Messages.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_READER = "training.importers.telegram:read_telegram"
OWNER_ID = 100200300
MESSAGES_PER_CHAT = 20_000  # so even a small export holds several kinds of chat
START_EPOCH = 1_600_000_000  # 2020-09-13
LOCAL_OFFSET = 3 * 3600  # the exporting computer's zone, for the naive `date` field

_VOCABULARY = (
    "hey hi ok okay yeah yes no lol haha sure thanks the a to and of in is it you that for on "
    "was with he she they we are be have this at but not what all were when your can said there "
    "use an each which do how their if will up other about out many then them these so some "
    "her would make like him into time has look two more write go see number way could people "
    "my than first water been call who oil its now find long down day did get come made may "
    "part tomorrow tonight dinner meeting later maybe sounds good great idea coffee train late "
    "завтра привет спасибо hola gracias mañana café naïve 😂 ❤️ 👍 🙏 🎉"
)
WORDS = _VOCABULARY.split()
NAMES = ("Alice Moreau", "Bogdan Petrov", "Chen Wei", "Dana Cohen", "Émile Roux", "Fatima Zahra")
NOT_INCLUDED = "(File not included. Change data exporting settings to download.)"
CHAT_TYPES = ("personal_chat", "private_supergroup", "personal_chat", "private_group",
              "saved_messages", "personal_chat", "public_supergroup")


# ---------------------------------------------------------------- the synthetic export


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(1, 18)))


def _message(rng: random.Random, msg_id: int, epoch: int, members: list[tuple[int, str]]) -> dict:
    """One message, keys in Telegram Desktop's order."""
    user_id, name = rng.choice(members)
    head = {
        "id": msg_id,
        "type": "message",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch + LOCAL_OFFSET)),
        "date_unixtime": str(epoch),
    }
    roll = rng.random()
    if roll < 0.03:  # service: a call, a pin, a join
        action = rng.choice(("phone_call", "pin_message", "invite_members", "joined_telegram"))
        head["type"] = "service"
        head.update({"actor": name, "actor_id": f"user{user_id}", "action": action})
        if action == "phone_call":
            head.update({"duration_seconds": rng.randint(5, 3600), "discard_reason": "hangup"})
        elif action == "pin_message":
            head["message_id"] = max(1, msg_id - rng.randint(1, 50))
        elif action == "invite_members":
            head["members"] = [rng.choice(NAMES)]
        head.update({"text": "", "text_entities": []})
        return head

    if rng.random() < 0.04:
        head.update({"edited": head["date"], "edited_unixtime": str(epoch + 60)})
    # A deleted account keeps its id but loses its name.
    deleted = len(members) > 2 and rng.random() < 0.005
    head.update({"from": None if deleted else name, "from_id": f"user{user_id}"})
    if rng.random() < 0.02:
        head["forwarded_from"] = rng.choice(NAMES)
    if msg_id > 1 and rng.random() < 0.10:
        head["reply_to_message_id"] = max(1, msg_id - rng.randint(1, 30))

    if roll < 0.09:  # media, with or without a caption
        kind = rng.choice(("photo", "sticker", "voice", "file"))
        if kind == "photo":
            head.update({"photo": f"photos/photo_{msg_id}@01-01-2021_12-00-00.jpg",
                         "width": 1280, "height": 960})
        elif kind == "sticker":
            head.update({"file": NOT_INCLUDED, "thumbnail": NOT_INCLUDED,
                         "media_type": "sticker", "sticker_emoji": "😂",
                         "width": 512, "height": 512})
        elif kind == "voice":
            head.update({"file": f"voice_messages/audio_{msg_id}@01-01-2021_12-00-00.ogg",
                         "media_type": "voice_message", "mime_type": "audio/ogg",
                         "duration_seconds": rng.randint(1, 90)})
        else:
            head.update({"file": f"files/report_{msg_id}.pdf", "mime_type": "application/pdf"})
        caption = _sentence(rng) if kind in ("photo", "file") and rng.random() < 0.5 else ""
        head["text"] = caption
        head["text_entities"] = [{"type": "plain", "text": caption}] if caption else []
        return head

    if roll < 0.19:  # formatted text: a list of strings and entity objects
        link = f"https://example.com/{rng.randint(1, 10**6)}"
        parts: list = [
            _sentence(rng) + " ",
            {"type": "link", "text": link},
            " " + _sentence(rng) + " ",
            {"type": "bold", "text": _sentence(rng)},
        ]
        if rng.random() < 0.3:
            parts += [" ", {"type": "mention", "text": "@someone"}]
        head["text"] = parts
        head["text_entities"] = [
            p if isinstance(p, dict) else {"type": "plain", "text": p} for p in parts
        ]
        return head

    text = _sentence(rng)
    head["text"] = text
    head["text_entities"] = [{"type": "plain", "text": text}]
    return head


def _indented(obj: object, depth: int) -> str:
    """json.dumps with indent=1, shifted right to sit `depth` levels deep, as Telegram writes."""
    return json.dumps(obj, indent=1, ensure_ascii=False).replace("\n", "\n" + " " * depth)


def generate_export(path: Path, size_bytes: int, shape: str = "full", seed: int = 0) -> int:
    """Write an export of at least `size_bytes` to `path`, streaming; return its message count."""
    rng = random.Random(seed)
    written = 0
    count = 0

    with open(path, "wb") as f:

        def put(text: str) -> None:
            nonlocal written
            data = text.encode("utf-8")
            f.write(data)
            written += len(data)

        if shape == "full":
            put("{\n" + ' "about": "Here is the data you requested.",\n')
            put(' "personal_information": ' + _indented({
                "user_id": OWNER_ID, "first_name": "Bench", "last_name": "Mark",
                "phone_number": "+1 555 0100", "username": "@bench", "bio": "",
            }, 1) + ",\n")
            put(' "contacts": {\n  "about": "",\n  "list": []\n },\n')
            put(' "chats": {\n  "about": "This page lists all chats from this export.",\n')
            put('  "list": [')
            depth = 3  # a chat object's opening brace
        else:
            depth = 0

        epoch = START_EPOCH
        msg_id = 0
        for index in itertools.count():
            chat_type = CHAT_TYPES[index % len(CHAT_TYPES)] if shape == "full" else "personal_chat"
            owner = (OWNER_ID, "Bench Mark")
            if chat_type == "saved_messages":
                members = [owner]
            elif chat_type == "personal_chat":
                members = [owner, (500 + index, NAMES[index % len(NAMES)])]
            else:
                members = [owner] + [(600 + i, n) for i, n in enumerate(NAMES)]
            pad = " " * depth
            head = ("\n" + pad if shape == "full" else "") + "{\n"
            if chat_type != "saved_messages":
                name = members[1][1] if chat_type == "personal_chat" else f"Group {index}"
                head += f'{pad} "name": {json.dumps(name, ensure_ascii=False)},\n'
            head += f'{pad} "type": "{chat_type}",\n{pad} "id": {900_000 + index},\n'
            head += f'{pad} "messages": ['
            put(("," if index else "") + head)
            # A single-chat export is one chat however big it gets.
            per_chat = MESSAGES_PER_CHAT if shape == "full" else sys.maxsize
            for n in range(per_chat):
                msg_id += 1
                epoch += rng.randint(1, 900)
                message = _message(rng, msg_id, epoch, members)
                put(("," if n else "") + "\n" + pad + "  " + _indented(message, depth + 2))
                count += 1
                if written >= size_bytes:
                    break
            put(f"\n{pad} ]\n{pad}}}")
            if written >= size_bytes or shape == "single":
                break

        if shape == "full":
            put("\n  ]\n },\n")
            put(' "left_chats": {\n  "about": "",\n  "list": []\n }\n}')
        put("\n")
    return count


# ---------------------------------------------------------------- the measured readers


def _peak_rss_bytes() -> int:
    # Linux: VmHWM, this process's own peak. ru_maxrss would carry the parent's peak over the
    # fork and exec that started this child.
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _child(which: str, path: Path, reader_spec: str) -> dict:
    """Runs inside the child process: read the whole export once and report."""
    if which == "ours":
        module_name, func_name = reader_spec.split(":")
        read = getattr(importlib.import_module(module_name), func_name)
        from training.message import ImportReport

        startup = _peak_rss_bytes()
        report = ImportReport()
        start = time.perf_counter()
        yielded = sum(1 for _ in read(path, report))
        seconds = time.perf_counter() - start
        # Every message in the file was read, whether yielded or skipped (forwards, deleted...).
        count = yielded + report.skipped.total()
        extra = {"yielded": yielded, "skipped": dict(report.skipped)}
    else:
        startup = _peak_rss_bytes()
        start = time.perf_counter()
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if "messages" in data:
            chats = [data]
        else:
            chats = data["chats"]["list"] + data.get("left_chats", {}).get("list", [])
        count = sum(1 for chat in chats for _ in chat["messages"])
        seconds = time.perf_counter() - start
        extra = {}
    return {"messages": count, "seconds": seconds, "peak_rss": _peak_rss_bytes(),
            "startup_rss": startup, **extra}


def measure(which: str, path: Path, reader_spec: str) -> dict:
    """Run one reader in a fresh interpreter, so its peak memory is its own."""
    env = dict(os.environ)
    # The child runs this file as a script: make the project importable as `training`.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", which, str(path), "--reader", reader_spec],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the {which} reader failed:\n{proc.stderr.strip()}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["messages_per_s"] = result["messages"] / result["seconds"]
    return result


def _table(size: int, ours: dict, base: dict) -> str:
    mb = 1024 * 1024
    rows = [
        ("", "ours (streaming)", "json.load"),
        ("messages read", f"{ours['messages']:,}", f"{base['messages']:,}"),
        ("seconds", f"{ours['seconds']:.2f}", f"{base['seconds']:.2f}"),
        ("messages/s", f"{ours['messages_per_s']:,.0f}", f"{base['messages_per_s']:,.0f}"),
        ("MB/s", f"{size / mb / ours['seconds']:.1f}", f"{size / mb / base['seconds']:.1f}"),
        ("peak RSS (MiB)", f"{ours['peak_rss'] / mb:,.0f}", f"{base['peak_rss'] / mb:,.0f}"),
        ("RSS before reading", f"{ours['startup_rss'] / mb:,.0f}",
         f"{base['startup_rss'] / mb:,.0f}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="export size (default 1.0)")
    parser.add_argument("--shape", choices=("full", "single"), default="full",
                        help="full-account export (default) or a single-chat export")
    parser.add_argument("--export", type=Path, help="measure this export instead of generating")
    parser.add_argument("--keep", action="store_true", help="keep the generated export")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--reader", default=DEFAULT_READER, metavar="MODULE:FUNCTION",
                        help="the streaming reader to measure (default %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args.child[0], Path(args.child[1]), args.reader)))
        return 0

    workdir = None
    if args.export:
        path = args.export
    else:
        workdir = Path(tempfile.mkdtemp(prefix="telegram-bench-"))
        path = workdir / "result.json"
        start = time.perf_counter()
        generate_export(path, int(args.size_gb * 1e9), args.shape)
        if not args.json:
            print(f"generated {path.stat().st_size / 1e9:.2f} GB "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        size = path.stat().st_size
        ours = measure("ours", path, args.reader)
        base = measure("baseline", path, args.reader)
    finally:
        if workdir and not args.keep:
            shutil.rmtree(workdir)

    ratios = {
        "peak_memory_baseline_over_ours": base["peak_rss"] / ours["peak_rss"],
        "throughput_ours_over_baseline": ours["messages_per_s"] / base["messages_per_s"],
    }
    if args.json:
        print(json.dumps({"file_bytes": size, "reader": args.reader, "ours": ours,
                          "baseline": base, **ratios}, indent=1))
    else:
        print(f"export: {size / 1e9:.3f} GB, {args.shape if not args.export else path}")
        print(_table(size, ours, base))
        print(f"peak memory, baseline / ours: {ratios['peak_memory_baseline_over_ours']:.1f}x")
        print(f"throughput, ours / baseline:  {ratios['throughput_ours_over_baseline']:.2f}x")
        if ours["skipped"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(ours["skipped"].items()))
            print(f"ours yielded {ours['yielded']:,} messages and skipped: {reasons}")
        if ours["messages"] != base["messages"]:
            print(f"WARNING: ours saw {ours['messages']:,} messages, json.load "
                  f"{base['messages']:,}")
    if workdir and args.keep:
        print(f"kept {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
