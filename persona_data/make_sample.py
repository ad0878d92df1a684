"""Build the sample persona: real conversations dressed as a Telegram Desktop full-account export.

The conversations come from the `chitchat-dataset` PyPI package (BYU PCC lab, MIT licence):
two-person chats between students, with timestamps, sender ids and messages grouped into
bursts. This script picks one prolific speaker, takes a deterministic subset of their
two-person conversations, and writes them the way Telegram Desktop writes "Export Telegram
data" (JSON, full account) so the sample goes through exactly the code path a real user's
export does:

    <out>/exports/result.json   the export
    <out>/persona.toml          who the persona is (their Telegram id goes in `me`)
    <out>/CREDITS.md            where the text comes from

Usage:
    python persona_data/make_sample.py [--speaker UUID] [--max-conversations N] [--out DIR]

The output is a pure function of the arguments and the dataset file: running it again gives
byte-identical files (tests/test_sample_persona.py checks this).

Choices, and why:
- Only conversations where both people speak: a chat where the partner never answered is no
  use as question/answer material and has no partner to name.
- One Telegram chat per conversation. A real account has one chat per person, but the same
  pair often held several conversations at the same time; merging them would interleave two
  unrelated threads. The partner keeps one name and one user id across all their chats.
- The dataset's timestamps end in "Z" but are local Utah time (MDT, UTC-6): each
  conversation's "start" field, which is real UTC, is six hours later. So `date` is written
  as given (Telegram's `date` is the exporting computer's local time) and `date_unixtime` as
  the true epoch, six hours later, which is the same gap a real export from Utah would show.
- Every utterance of a burst is its own Telegram message: that is how people text.
  Telegram trims surrounding whitespace and cannot send an empty message, so empty
  utterances are dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

DEFAULT_SPEAKER = "720840be-e522-47ba-9e9f-143f66372673"
# 100 conversations make a ~3 MB export; 200 would be ~7 MB, too much to commit.
DEFAULT_MAX_CONVERSATIONS = 100
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"
# Never the persona: the benchmarks measure how well a clone imitates these two. (They may
# still appear here as someone the persona talks to.)
RESERVED_SPEAKERS = (
    "31267496-e50f-4f91-a197-c5b1bfde803b",
    "549cc1d1-270e-4a53-b561-133a8d0086b4",
)

# The persona's made-up identity.
OWNER_FIRST, OWNER_LAST = "Sam", "Rivera"
OWNER_ID = 5550100042
OWNER_USERNAME = "@samrivera"
OWNER_PHONE = "+1 555 0100"  # 555-01xx numbers are reserved for fiction
OWNER_BIO = "student. probably texting from class"
DESCRIPTION = "A friendly college student who texts casually"

# Partners get a name from these lists (every first with every last), chosen by a hash of
# their uuid.
FIRST_NAMES = (
    "Alex", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Avery", "Quinn", "Drew",
    "Parker", "Reese", "Cameron", "Hayden", "Logan", "Emerson", "Rowan", "Skyler", "Dakota",
    "Finley", "Harper", "Kendall", "Peyton", "Sawyer",
)
LAST_NAMES = (
    "Bennett", "Carter", "Dalton", "Ellis", "Foster", "Garcia", "Hughes", "Iverson", "Jensen",
    "Keller", "Lawson", "Mendoza", "Nolan", "Ortega", "Porter", "Reyes", "Sutton", "Turner",
    "Vance", "Whitaker",
)

# Conversation timestamps are Utah local time (MDT) labelled "Z"; see the module docstring.
SOURCE_UTC_OFFSET = timedelta(hours=-6)

ABOUT = (
    "Here is the data you requested. Remember: Telegram is ad free, it doesn't use your data "
    "for ad targeting and doesn't sell it to others. Telegram only keeps the information it "
    "needs to function as a secure and feature-rich cloud service.\n\nCheck out Settings > "
    "Privacy & Security on Telegram's mobile apps for the relevant settings."
)
CONTACTS_ABOUT = (
    "If you allow access, contacts are continuously synced with Telegram. Telegram uses "
    "contacts to connect you with your friends and show their names on your devices."
)
CHATS_ABOUT = "This page lists all chats from this export."
LEFT_CHATS_ABOUT = (
    "Below are the supergroups and channels from this export that you've left or where you "
    "were banned.\n\nNote that when you leave a channel or supergroup you've created, you "
    "have the option to either delete it, or simply leave (in case you want to rejoin later, "
    "or keep the community alive despite not being a member)."
)


def dataset_path() -> Path:
    import chitchat_dataset  # dev dependency; imported late so --help works without it

    return Path(chitchat_dataset.__file__).resolve().parent / "dataset.json"


def _digest(text: str) -> int:
    # sha256, not hash(): Python's string hash changes from run to run.
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def partner_identities(dataset: dict, speaker: str) -> dict[str, tuple[int, str]]:
    """Every partner's Telegram user id and display name, both fixed by their uuid.

    Names are distinct: a partner whose hashed name is taken gets the next free one, going
    through all of the speaker's partners in uuid order, so a partner's name does not depend
    on how many conversations are taken.
    """
    partners: set[str] = set()
    for conv in dataset.values():
        senders = {u["sender"] for burst in conv["messages"] for u in burst}
        if speaker in senders:
            partners |= senders - {speaker}
    names = [f"{first} {last}" for last in LAST_NAMES for first in FIRST_NAMES]
    taken: set[int] = set()
    identities = {}
    for uuid in sorted(partners):
        h = _digest(uuid)
        slot = h % len(names)
        while slot in taken:
            slot = (slot + 1) % len(names)
        taken.add(slot)
        identities[uuid] = (6_000_000_000 + h % 1_000_000_000, names[slot])
    return identities


def chat_id(conv_id: str) -> int:
    return 7_000_000_000 + _digest(conv_id) % 1_000_000_000


def select_conversations(dataset: dict, speaker: str, limit: int) -> list[tuple[str, dict]]:
    """The speaker's first `limit` two-person conversations, by first timestamp then id."""
    chosen = []
    for conv_id, conv in dataset.items():
        senders = {u["sender"] for burst in conv["messages"] for u in burst}
        if speaker in senders and len(senders) == 2:
            chosen.append((conv["messages"][0][0]["timestamp"], conv_id, conv))
    chosen.sort(key=lambda item: (item[0], item[1]))
    return [(conv_id, conv) for _, conv_id, conv in chosen[:limit]]


def telegram_message(msg_id: int, utterance: dict, author_id: int, author: str) -> dict:
    local = datetime.strptime(utterance["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    epoch = int((local - SOURCE_UTC_OFFSET).replace(tzinfo=UTC).timestamp())
    text = utterance["text"].strip()
    return {
        "id": msg_id,
        "type": "message",
        "date": local.isoformat(),
        "date_unixtime": str(epoch),
        "from": author,
        "from_id": f"user{author_id}",
        "text": text,
        "text_entities": [{"type": "plain", "text": text}],
    }


def build_export(
    conversations: list[tuple[str, dict]], speaker: str, partners: dict[str, tuple[int, str]]
) -> dict:
    owner_name = f"{OWNER_FIRST} {OWNER_LAST}"
    chats = []
    # Telegram numbers private-chat messages with one counter per account, so ids are unique
    # across the whole export and increase within each chat.
    next_id = 1
    for conv_id, conv in conversations:
        utterances = [u for burst in conv["messages"] for u in burst]
        partner = next(u["sender"] for u in utterances if u["sender"] != speaker)
        partner_id, partner_name = partners[partner]
        messages = []
        for u in utterances:
            if not u["text"].strip():
                continue
            if u["sender"] == speaker:
                messages.append(telegram_message(next_id, u, OWNER_ID, owner_name))
            else:
                messages.append(telegram_message(next_id, u, partner_id, partner_name))
            next_id += 1
        chats.append(
            {"name": partner_name, "type": "personal_chat", "id": chat_id(conv_id),
             "messages": messages}
        )
    # Telegram lists dialogs most recent first.
    chats.sort(key=lambda c: int(c["messages"][-1]["date_unixtime"]), reverse=True)
    return {
        "about": ABOUT,
        "personal_information": {
            "user_id": OWNER_ID,
            "first_name": OWNER_FIRST,
            "last_name": OWNER_LAST,
            "phone_number": OWNER_PHONE,
            "username": OWNER_USERNAME,
            "bio": OWNER_BIO,
        },
        "contacts": {"about": CONTACTS_ABOUT, "list": []},
        "chats": {"about": CHATS_ABOUT, "list": chats},
        "left_chats": {"about": LEFT_CHATS_ABOUT, "list": []},
    }


def persona_toml() -> str:
    return (
        f'name = "{OWNER_FIRST} {OWNER_LAST}"\n'
        f'me = ["user{OWNER_ID}"]\n'
        f'description = "{DESCRIPTION}"\n'
        "blocklist = []\n"
    )


def credits_md(
    speaker: str, limit: int, n_conversations: int, n_messages: int, n_owner: int
) -> str:
    command = "python persona_data/make_sample.py"
    if speaker != DEFAULT_SPEAKER:
        command += f" --speaker {speaker}"
    if limit != DEFAULT_MAX_CONVERSATIONS:
        command += f" --max-conversations {limit}"
    return f"""# Credits

The conversations in `exports/result.json` are real, taken from the **Chit-Chat Challenge
dataset** of the BYU Perception, Control & Cognition (PCC) lab, distributed as the PyPI
package [`chitchat-dataset`](https://pypi.org/project/chitchat-dataset/) (version 0.9.0,
<https://github.com/BYU-PCCL/chitchat-dataset>), MIT License,
Copyright (c) 2019 Perception, Control and Cognition Lab.

If you use it, cite: Myers, Etchart and Fulda, *Conversational Scaffolding: An Analogy-Based
Approach to Response Prioritization in Open-Domain Dialogs* (2020).

What was used: the speaker `{speaker}`
(shown here as "{OWNER_FIRST} {OWNER_LAST}"), their first {n_conversations} two-person
conversations by first timestamp, one Telegram chat each: {n_messages} messages, {n_owner} of
them the persona's.
Names, user ids, the phone number and the username are made up; the message text is
unchanged apart from trimmed whitespace.

Regenerate (from the repository root, with the dev extras installed):

    {command}
"""


def write_sample(out: Path, speaker: str, limit: int, source: Path | None = None) -> Path:
    """Write the export, persona.toml and CREDITS.md under `out`; return the export's path."""
    with open(source or dataset_path(), encoding="utf-8") as f:
        dataset = json.load(f)
    conversations = select_conversations(dataset, speaker, limit)
    if not conversations:
        raise SystemExit(f"speaker {speaker} has no two-person conversations in the dataset")
    export = build_export(conversations, speaker, partner_identities(dataset, speaker))

    export_path = out / "exports" / "result.json"
    export_path.parent.mkdir(parents=True, exist_ok=True)
    # indent=1 and raw UTF-8, as Telegram Desktop writes it; newline="\n" keeps the bytes
    # the same on Windows.
    with open(export_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(export, f, indent=1, ensure_ascii=False)
    (out / "persona.toml").write_text(persona_toml(), encoding="utf-8", newline="\n")
    messages = [m for chat in export["chats"]["list"] for m in chat["messages"]]
    n_owner = sum(m["from_id"] == f"user{OWNER_ID}" for m in messages)
    (out / "CREDITS.md").write_text(
        credits_md(speaker, limit, len(conversations), len(messages), n_owner),
        encoding="utf-8", newline="\n"
    )
    return export_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speaker", default=DEFAULT_SPEAKER, help="chitchat sender uuid")
    parser.add_argument(
        "--max-conversations", type=int, default=DEFAULT_MAX_CONVERSATIONS, metavar="N",
        help="take the speaker's first N two-person conversations (default %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help="persona directory to write (default persona_data/sample)",
    )
    parser.add_argument("--dataset", type=Path, help="dataset.json (default: the installed one)")
    args = parser.parse_args(argv)
    if args.speaker in RESERVED_SPEAKERS:
        parser.error(f"{args.speaker} is reserved for the benchmarks; pick another speaker")
    if args.max_conversations < 1:
        parser.error("--max-conversations must be at least 1")
    path = write_sample(args.out, args.speaker, args.max_conversations, args.dataset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
