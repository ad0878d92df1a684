"""Adversarial inputs for `clone import` and `clone prepare`: each must end cleanly.

Builds each input in a temporary folder (in well under a second: bombs are made of repeated
deflate blocks, never by writing gigabytes), runs the command on it in a child process under a
memory limit (RLIMIT_AS) and a time limit, and checks what came out:

- an error: exit status 2 and exactly one line on stderr, naming the file;
- a skip: exit status 0, stderr empty, and the reason counted in the summary;
- never a "Traceback", never the messages' text in an error line;
- nothing left behind: no temporary file, no output file after an error, and a persona's
  dataset byte for byte as it was.

The set: JSON nested 100,000 deep (arrays, objects; Telegram, Discord, a data package's
index.json, a messages-jsonl line), one JSON string, number or message object over its limit,
integers of 5,000 digits (which crashed ijson's C backend), zip bombs (a gigabyte of newlines,
one gigabyte line, a thousand-fold ratio under the size limit, a chat text declared over it, an
encrypted member), over-long lines, messages and CSV cells, fields of the wrong type,
character devices (as input and as --out), named pipes, broken links and link loops, an export
over the size limit (a sparse file), a full disk under `clone import --out` and `clone
prepare`, and `clone prepare` of exports that are a bomb or give no sample.

    python benchmarks/fuzz_inputs.py             # a line per input, then the totals
    python benchmarks/fuzz_inputs.py --json      # the same as JSON
    python benchmarks/fuzz_inputs.py --only zip  # the inputs whose name holds "zip"

tests/test_fuzz_inputs.py runs every input of CASES as one test each. Linux only (RLIMIT_AS,
/dev/full, /proc/self/fd).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the builders use training.persona and training.limits
GiB, MiB = 1 << 30, 1 << 20
IMPORT_MEMORY = 2 * GiB    # `clone import` needs about 0.5 GB of address space
PREPARE_MEMORY = 3 * GiB   # `clone prepare` loads the tokenizer (transformers, torch)
# Written into every message the inputs hold: no output line may ever show it.
SECRET = "s3cr3t-message-text"
DEEP = 100_000
# One line of `clone import --out`, as a messages-jsonl input starts.
NORMALIZED = {"platform": "csv", "chat_id": "c", "chat_name": None, "id": "1", "author_id": "a",
              "author": "a", "timestamp": None, "text": SECRET, "kind": "text", "reply_to": None}


@dataclass
class Setup:
    """One input, built: the command to run on it and what to check afterwards."""

    argv: list[str]               # the clone command line
    names: str                    # the path the error line must name
    keep: Path | None = None      # a folder that must come out byte-identical
    out: Path | None = None       # `--out`: written after a skip, absent after an error
    disk_full: Path | None = None  # writes to files under this folder fail with ENOSPC
    skip: str = ""                # for a skip: the reason the summary must count
    memory: int = IMPORT_MEMORY
    seconds: float = 30.0


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Setup]


@dataclass
class Result:
    name: str
    outcome: str                  # "error", "skip", or what went wrong
    code: int | None
    seconds: float
    peak_rss: int                 # bytes, the child's own peak RSS (VmHWM)
    error_line: str = ""
    problems: list[str] = field(default_factory=list)
    traceback: bool = False
    leftovers: list[str] = field(default_factory=list)


CASES: dict[str, Case] = {}


def case(build: Callable[[Path], Setup]) -> Callable[[Path], Setup]:
    name = build.__name__.replace("_", "-")
    CASES[name] = Case(name, build)
    return build


# ---------------------------------------------------------------- input builders


def _tg_message(n: int, text: bytes, sender: bytes = b'"Dana"') -> bytes:
    return (b'{"id": %d, "type": "message", "date": "2024-05-01T10:00:%02d", '
            b'"date_unixtime": "%d", "from": %s, "from_id": "user42", "text": %s}'
            % (n, n % 60, 1714557600 + n, sender, text))


def telegram_export(path: Path, *texts: bytes) -> Path:
    """A single-chat Telegram export: one good message, then one per `texts` (raw JSON)."""
    messages = [_tg_message(1, json.dumps(f"hi {SECRET}").encode())]
    messages += [_tg_message(n, text) for n, text in enumerate(texts, start=2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'{"name": "Dana", "type": "personal_chat", "id": 42, "messages": ['
                     + b", ".join(messages) + b"]}")
    return path


def dce_export(path: Path, content: bytes, extra: bytes = b"") -> Path:
    """A DiscordChatExporter export: one good message, then one with `content` (raw JSON)."""
    def message(n: int, body: bytes) -> bytes:
        return (b'{"id": "%d", "type": "Default", "timestamp": "2024-05-01T10:00:00+00:00", '
                b'"content": %s, "author": {"id": "7", "name": "dana"}%s}' % (n, body, extra))
    path.write_bytes(b'{"guild": {"id": "1", "name": "G"}, "channel": {"id": "2", "name": "general"}, '
                     b'"messages": [' + message(1, json.dumps(SECRET).encode()) + b", "
                     + message(2, content) + b"]}")
    return path


def deflated_zip(path: Path, member: str, byte: bytes, size: int, flags: int = 0) -> Path:
    """A zip whose one member inflates to `size` copies of `byte`, built in a blink: after a
    full flush, deflate blocks of the same run are alike, so one block is compressed and
    repeated (zipfile would deflate the whole gigabyte)."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = byte * MiB
    block = z.compress(chunk) + z.flush(zlib.Z_FULL_FLUSH)
    data = block * (size // MiB) + z.flush()
    crc = 0
    for _ in range(size // MiB):
        crc = zlib.crc32(chunk, crc)
    return raw_zip(path, member, data, size, crc, flags)


def raw_zip(path: Path, member: str, data: bytes, size: int, crc: int, flags: int = 0) -> Path:
    """A one-member zip around already deflated `data`, declaring `size` bytes inflated."""
    name = member.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, 8, 0, 0x21, crc, len(data), size,
                        len(name), 0) + name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, 8, 0, 0x21, crc, len(data),
                          size, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    return path


def whatsapp_lines(days: int = 12) -> str:
    """A WhatsApp chat in which Alice answers Dana every day: enough for a dataset."""
    return "".join(f"3/{d}/22, 9:0{k} AM - {who}: {text}\n" for d in range(1, days + 1)
                   for k, (who, text) in enumerate([("Dana", f"plans for day {d}?"),
                                                    ("Alice", f"beach!! {SECRET}")]))


def import_setup(tmp: Path, target: Path, skip: str = "") -> Setup:
    out = tmp / "out.jsonl"
    return Setup(["import", str(target), "--out", str(out)], str(target), out=out, skip=skip)


def persona(tmp: Path, export: Path) -> Path:
    """A persona folder as `clone init` makes it, with `export` copied in and a dataset that a
    failed prepare must leave as it is."""
    from training.persona import create_persona

    folder = tmp / "alice"
    create_persona(folder, "Alice", ["Alice"], "", [export])
    (folder / "dataset").mkdir()
    for name in ("train.jsonl", "val.jsonl", "card.json"):
        (folder / "dataset" / name).write_text(f"the old {name}\n")
    return folder


def prepare_setup(folder: Path, names: str, disk_full: bool = False) -> Setup:
    return Setup(["prepare", "--persona", str(folder)], names, keep=folder,
                 disk_full=folder if disk_full else None, memory=PREPARE_MEMORY, seconds=120.0)


# ---------------------------------------------------------------- the set


@case
def telegram_nested_arrays(tmp: Path) -> Setup:
    # The trial's input: 200 KB that ijson turned into 18 GB of prefixes.
    return import_setup(tmp, telegram_export(tmp / "result.json", b"[" * DEEP + b"]" * DEEP))


@case
def telegram_nested_objects(tmp: Path) -> Setup:
    return import_setup(tmp, telegram_export(tmp / "result.json", b'{"a":' * DEEP + b"1" + b"}" * DEEP))


@case
def telegram_huge_string(tmp: Path) -> Setup:
    return import_setup(tmp, telegram_export(tmp / "result.json", b'"' + b"a" * (9 * MiB) + b'"'))


@case
def telegram_huge_number(tmp: Path) -> Setup:
    return import_setup(tmp, telegram_export(tmp / "result.json", b"1" * (9 * MiB)))


@case
def telegram_long_integer(tmp: Path) -> Setup:
    # Past Python's 4,300 digits, ijson's C backend used to crash the process (SIGSEGV).
    return import_setup(tmp, telegram_export(tmp / "result.json", b"1" * 5000))


@case
def telegram_huge_message_object(tmp: Path) -> Setup:
    parts = b", ".join([b'"ab"'] * (2 * MiB))  # 12 MiB of small parts, none long by itself
    return import_setup(tmp, telegram_export(tmp / "result.json", b"[" + parts + b"]"))


@case
def telegram_long_text(tmp: Path) -> Setup:
    return import_setup(tmp, telegram_export(tmp / "result.json", b'"' + b"a" * 200_000 + b'"'),
                        skip="message over")


@case
def telegram_wrong_types(tmp: Path) -> Setup:
    export = telegram_export(tmp / "result.json", b"5", b"{}")
    export.write_bytes(export.read_bytes().replace(b'"from": "Dana", "from_id": "user42", "text": {}',
                                                   b'"from": 5, "from_id": "user42", "text": "x"'))
    return import_setup(tmp, export, skip="malformed message")


@case
def discord_nested(tmp: Path) -> Setup:
    return import_setup(tmp, dce_export(tmp / "channel.json", b"[" * DEEP + b"]" * DEEP))


@case
def discord_long_integer(tmp: Path) -> Setup:
    return import_setup(tmp, dce_export(tmp / "channel.json", b"7" * 5000))


@case
def discord_huge_message_object(tmp: Path) -> Setup:
    embeds = b', "embeds": [' + b", ".join([b"{}"] * (3 * MiB)) + b"]"  # 12 MiB of empty objects
    return import_setup(tmp, dce_export(tmp / "channel.json", b'"hi"', embeds))


@case
def discord_package_nested_index(tmp: Path) -> Setup:
    messages = tmp / "package" / "messages"
    (messages / "c2").mkdir(parents=True)
    (messages / "index.json").write_bytes(b'{"a":' * DEEP + b"1" + b"}" * DEEP)
    (messages / "c2" / "messages.json").write_text(
        json.dumps([{"ID": 1, "Timestamp": "2024-05-01 10:00:00", "Contents": SECRET}]))
    setup = import_setup(tmp, tmp / "package")
    setup.names = str(messages / "index.json")
    return setup


@case
def discord_package_long_integer(tmp: Path) -> Setup:
    messages = tmp / "package" / "messages"
    (messages / "c2").mkdir(parents=True)
    (messages / "index.json").write_text('{"2": "DM"}')
    (messages / "c2" / "messages.json").write_bytes(
        b'[{"ID": ' + b"7" * 5000 + b', "Timestamp": "2024-05-01 10:00:00", "Contents": "hi"}]')
    setup = import_setup(tmp, tmp / "package")
    setup.names = str(messages / "c2" / "messages.json")
    return setup


@case
def jsonl_nested_line(tmp: Path) -> Setup:
    path = tmp / "messages.jsonl"
    path.write_bytes(json.dumps(NORMALIZED).encode() + b"\n" + b"[" * DEEP + b"]" * DEEP + b"\n")
    return import_setup(tmp, path, skip="malformed message")


@case
def jsonl_wrong_types(tmp: Path) -> Setup:
    rows = [NORMALIZED, {**NORMALIZED, "id": "2", "text": 5}, {**NORMALIZED, "id": "3", "author": 5},
            {**NORMALIZED, "id": "4", "chat_id": [1]}, {**NORMALIZED, "id": "5", "kind": "poll"}]
    path = tmp / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return import_setup(tmp, path, skip="malformed message: 4")


@case
def zip_bomb_newlines(tmp: Path) -> Setup:
    # The trial's: 1 MB that inflates to a gigabyte of newlines (it ran for 5 minutes).
    return import_setup(tmp, deflated_zip(tmp / "WhatsApp Chat - Dana.zip", "_chat.txt", b"\n", GiB))


@case
def zip_bomb_one_line(tmp: Path) -> Setup:
    # The trial's: one gigabyte line (4.2 GB of memory, a 1 GB messages.jsonl).
    return import_setup(tmp, deflated_zip(tmp / "WhatsApp Chat - Dana.zip", "_chat.txt", b"a", GiB))


@case
def zip_bomb_under_the_size_limit(tmp: Path) -> Setup:
    # 200 MiB of newlines is under the size limit, but inflates a thousand times its size.
    return import_setup(tmp, deflated_zip(tmp / "WhatsApp Chat - Dana.zip", "_chat.txt", b"\n", 200 * MiB))


@case
def zip_text_over_the_limit(tmp: Path) -> Setup:
    # Declares 300 MiB inflated from 4 MiB: under the ratio limit, over the size limit.
    path = raw_zip(tmp / "WhatsApp Chat - Dana.zip", "_chat.txt", os.urandom(4 * MiB), 300 * MiB, 0)
    return import_setup(tmp, path)


@case
def zip_encrypted(tmp: Path) -> Setup:
    text = whatsapp_lines().encode()
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    path = raw_zip(tmp / "WhatsApp Chat - Dana.zip", "_chat.txt", z.compress(text) + z.flush(),
                   len(text), zlib.crc32(text), flags=1)
    return import_setup(tmp, path)


@case
def whatsapp_long_line(tmp: Path) -> Setup:
    path = tmp / "WhatsApp Chat with Dana.txt"
    path.write_text(whatsapp_lines(2) + "3/3/22, 9:00 AM - Dana: " + "a" * (9 * MiB) + "\n")
    return import_setup(tmp, path)


@case
def whatsapp_message_of_many_lines(tmp: Path) -> Setup:
    path = tmp / "WhatsApp Chat with Dana.txt"
    path.write_text(whatsapp_lines(2) + "3/3/22, 9:00 AM - Dana: start\n" + "\n" * 100_000
                    + "3/3/22, 9:01 AM - Alice: ok\n")
    return import_setup(tmp, path, skip="message over")


@case
def csv_long_cell(tmp: Path) -> Setup:
    path = tmp / "transcript.csv"
    path.write_text(f"author,text\nDana,{SECRET}\nDana,{'a' * 200_000}\nAlice,ok\n")
    return import_setup(tmp, path, skip="message over")


@case
def csv_huge_cell(tmp: Path) -> Setup:
    path = tmp / "transcript.csv"
    path.write_text(f'author,text\nDana,{SECRET}\nDana,"{"a" * (9 * MiB)}"\n')
    return import_setup(tmp, path)


@case
def character_device(tmp: Path) -> Setup:
    return import_setup(tmp, Path("/dev/zero"))


@case
def empty_character_device(tmp: Path) -> Setup:
    return import_setup(tmp, Path("/dev/null"))


@case
def named_pipe(tmp: Path) -> Setup:
    os.mkfifo(tmp / "result.json")
    return import_setup(tmp, tmp / "result.json")


@case
def named_pipe_in_a_folder(tmp: Path) -> Setup:
    telegram_export(tmp / "exports" / "result.json")
    os.mkfifo(tmp / "exports" / "chat.txt")
    return import_setup(tmp, tmp / "exports", skip="not a regular file")


@case
def broken_link_in_a_folder(tmp: Path) -> Setup:
    telegram_export(tmp / "exports" / "result.json")
    (tmp / "exports" / "gone.json").symlink_to(tmp / "nowhere.json")
    return import_setup(tmp, tmp / "exports", skip="broken link")


@case
def link_loop_in_a_folder(tmp: Path) -> Setup:
    telegram_export(tmp / "exports" / "result.json")
    (tmp / "exports" / "again").symlink_to(tmp / "exports")
    (tmp / "exports" / "self.json").symlink_to(tmp / "exports" / "self.json")
    return import_setup(tmp, tmp / "exports", skip="link loop")


@case
def export_over_the_limit(tmp: Path) -> Setup:
    from training.limits import MAX_EXPORT_BYTES

    path = telegram_export(tmp / "result.json")
    with path.open("r+b") as f:
        f.truncate(MAX_EXPORT_BYTES + 1)  # sparse: nothing is written
    return import_setup(tmp, path)


@case
def disk_full_import(tmp: Path) -> Setup:
    export = telegram_export(tmp / "result.json")
    (tmp / "full").mkdir()
    setup = import_setup(tmp / "full", export)
    setup.names, setup.disk_full = str(setup.out), tmp / "full"
    return setup


@case
def output_to_a_device(tmp: Path) -> Setup:
    # Written beside and renamed over, /dev/null would have become a file (as root).
    export = telegram_export(tmp / "result.json")
    return Setup(["import", str(export), "--out", "/dev/null"], "/dev/null")


@case
def disk_full_prepare(tmp: Path) -> Setup:
    export = tmp / "WhatsApp Chat with Dana.txt"
    export.write_text(whatsapp_lines())
    folder = persona(tmp, export)
    return prepare_setup(folder, str(folder / "dataset"), disk_full=True)


@case
def prepare_a_nested_export(tmp: Path) -> Setup:
    folder = persona(tmp, telegram_export(tmp / "tg" / "result.json", b"[" * DEEP + b"]" * DEEP))
    return prepare_setup(folder, str(folder / "exports" / "01" / "result.json"))


@case
def prepare_no_sample(tmp: Path) -> Setup:
    export = tmp / "WhatsApp Chat with Dana.txt"
    # Alice only ever sends photos: she is in the export, but no text of hers is kept.
    export.write_text("".join(f"3/{d}/22, 9:0{k} AM - {who}\n" for d in range(1, 9) for k, who in
                              enumerate([f"Dana: {SECRET} {d}?", "Alice: <Media omitted>"])))
    folder = persona(tmp, export)
    return prepare_setup(folder, str(folder / "dataset"))


# ---------------------------------------------------------------- running one input


def _disk_full_under(folder: str) -> None:
    """In the child: files opened for writing under `folder` are created as usual (so they
    exist and must be cleaned up), then their descriptor points at /dev/full, where every
    write fails with ENOSPC, as on a full disk. os.fdopen and Path.open go through io.open."""
    import builtins
    import io

    real_open = io.open

    def open_full(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        f = real_open(file, mode, *args, **kwargs)
        writing = any(m in mode for m in "wax+")
        if writing and os.readlink(f"/proc/self/fd/{f.fileno()}").startswith(folder):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
        return f

    io.open = builtins.open = open_full


def _own_peak_rss() -> int:
    """This process's peak RSS in bytes, from /proc (VmHWM). Not ru_maxrss: Linux carries the
    parent's peak over fork and exec into it, so a child of a large process would report that."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(argv: list[str]) -> int:
    peak_file = os.environ.get("FUZZ_PEAK_FILE")
    if peak_file:
        atexit.register(lambda: Path(peak_file).write_text(str(_own_peak_rss())))
    if os.environ.get("FUZZ_DISK_FULL"):
        _disk_full_under(os.path.realpath(os.environ["FUZZ_DISK_FULL"]))
    from cli.main import main as clone

    return clone(argv)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed), with a hash of each small file."""
    seen: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            small = path.is_file() and not path.is_symlink() and path.stat().st_size < 16 * MiB
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if small else ""
            seen[str(path.relative_to(folder))] = digest
    return seen


def _spawn(setup: Setup, cwd: Path) -> tuple[int | None, str, str, float, int]:
    """Run the command in a child under the memory and time limits: (exit code or None when
    killed at the time limit, stdout, stderr, seconds, peak RSS in bytes)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (setup.memory, setup.memory))

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLONE_PERSONA")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["FUZZ_DISK_FULL"] = str(setup.disk_full or "")
    peak_file = Path(tempfile.mkdtemp(prefix="fuzz-peak-")) / "peak"
    env["FUZZ_PEAK_FILE"] = str(peak_file)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", *setup.argv], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=limit)
        timer = threading.Timer(setup.seconds, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    killed = code < 0 and seconds >= setup.seconds
    # A child killed before its exit hook ran: ru_maxrss, an upper bound (it includes ours).
    peak = int(peak_file.read_text()) if peak_file.is_file() else usage.ru_maxrss * 1024
    shutil.rmtree(peak_file.parent, ignore_errors=True)
    return (None if killed else code), stdout, stderr, seconds, peak


def run_case(case: Case, tmp: Path) -> Result:
    """Build one input under `tmp`, run it, and say what went wrong (nothing, when clean)."""
    setup = case.build(tmp)
    before = _snapshot(tmp)
    kept = _snapshot(setup.keep) if setup.keep else {}
    code, stdout, stderr, seconds, rss = _spawn(setup, tmp)
    result = Result(case.name, "skip" if setup.skip else "error", code, seconds, rss)
    result.traceback = "Traceback" in stdout + stderr
    after = _snapshot(tmp)
    allowed = {str(setup.out.relative_to(tmp))} if setup.out and setup.skip else set()
    result.leftovers = sorted(set(after) - set(before) - allowed)
    result.problems = _problems(setup, result, stdout, stderr)
    if setup.keep and _snapshot(setup.keep) != kept:
        result.problems.append(f"{setup.keep} changed")
    if result.problems:
        result.outcome = "FAILED"
    return result


def _problems(setup: Setup, result: Result, stdout: str, stderr: str) -> list[str]:
    problems = []
    lines = stderr.strip().splitlines()
    if result.code is None:
        problems.append(f"still running after {setup.seconds:.0f} s")
    if result.traceback:
        problems.append("a traceback")
    if SECRET in stderr or (not setup.skip and SECRET in stdout):
        problems.append("message text in the output")
    if result.leftovers:
        problems.append(f"left behind: {', '.join(result.leftovers)}")
    if setup.skip:
        if result.code != 0 or lines:
            problems.append(f"exit {result.code} and {len(lines)} line(s) on stderr, not a skip")
        skipped = [line for line in stdout.splitlines() if line.startswith("Skipped:")]
        if not skipped or setup.skip not in skipped[0]:
            problems.append(f"no {setup.skip!r} in the skip counts")
    else:
        result.error_line = lines[0] if len(lines) == 1 else ""
        if result.code != 2 or len(lines) != 1:
            problems.append(f"exit {result.code} and {len(lines)} line(s) on stderr, not one error")
        elif not result.error_line.startswith(f"clone {setup.argv[0]}: error: "):
            problems.append(f"not an error line: {result.error_line!r}")
        elif setup.names not in result.error_line:
            problems.append(f"the error line does not name {setup.names}: {result.error_line!r}")
    return problems


# ---------------------------------------------------------------- the totals


def run_all(names: list[str]) -> list[Result]:
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
            results.append(run_case(CASES[name], Path(tmp)))
    return results


def totals(results: list[Result]) -> dict:
    worst = max(results, key=lambda r: r.peak_rss)
    return {
        "inputs": len(results),
        "clean_errors": sum(r.outcome == "error" for r in results),
        "skips": sum(r.outcome == "skip" for r in results),
        "failed": sum(bool(r.problems) for r in results),
        "tracebacks": sum(r.traceback for r in results),
        "leftovers": sum(len(r.leftovers) for r in results),
        "slowest_s": round(max(r.seconds for r in results), 2),
        "peak_rss_worst_mib": round(worst.peak_rss / MiB, 1),
        "peak_rss_worst_input": worst.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--only", metavar="TEXT", help="only the inputs whose name holds TEXT")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child(args.child)

    names = [n for n in CASES if not args.only or args.only in n]
    results = run_all(names)
    summary = totals(results)
    if args.json:
        print(json.dumps({**summary, "results": [r.__dict__ for r in results]}, indent=1))
    else:
        for r in results:
            detail = "; ".join(r.problems) or r.error_line
            print(f"{r.name:<32} {r.outcome:<6} {r.seconds:6.2f} s {r.peak_rss / MiB:7.1f} MiB  {detail}")
        print(", ".join(f"{k}: {v}" for k, v in summary.items()))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
