"""The evaluation report of `clone eval`: eval.json, a Markdown summary and a few PNG plots.

Everything here reads plain data. Every key of the result except "perplexity" and "val_replies"
may be missing (no style comparison, no examples, no training log): the report then just says less.
The texts in it are already redacted; they are escaped so that no reply can break the Markdown
or inject HTML.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from training.atomic import atomic_file
from training.style import BURST_BINS, LENGTH_BINS, RATE_KEYS, SCALAR_KEYS

MAX_EXAMPLES = 5
MAX_CONTEXT_CHARS = 400   # the end of the context is what the reply answers
MAX_TEXT_CHARS = 600

_LABELS = {
    "messages_per_burst": "Messages per burst (mean)",
    "length_mean": "Message length, mean (chars)",
    "length_median": "Message length, median",
    "length_p90": "Message length, 90th percentile",
    "lowercase_rate": "Starts lowercase",
    "end_punctuation_rate": "Ends with . ! or ?",
    "question_rate": "Contains ?",
    "exclamation_rate": "Contains !",
    "uppercase_rate": "ALL CAPS",
    "emoji_per_message": "Emoji per message",
    "emoticons_per_message": "Emoticons per message",
    "vocabulary_size": "Vocabulary (distinct words)",
}
_PERCENT_KEYS = frozenset(RATE_KEYS) - {"emoji_per_message", "emoticons_per_message"}
_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}|~!#$])")


def md_escape(text: str) -> str:
    """`text` safe inside a Markdown table cell: no HTML, no formatting, no pipes; lines as <br>."""
    text = html.escape(text, quote=False)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return "<br>".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: object, digits: int = 2) -> str:
    if not _is_number(value):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: object) -> str:
    return f"{value * 100:.1f} %" if _is_number(value) else "—"


def _fmt_metric(key: str, value: object, signed: bool = False) -> str:
    if not _is_number(value):
        return "—"
    if key in _PERCENT_KEYS:
        return f"{value * 100:+.1f} pp" if signed else _pct(value)
    return f"{value:+.2f}" if signed else _fmt(float(value))


def _perplexity_section(ppl: dict) -> list[str]:
    lines = [
        "## Perplexity on the validation replies",
        "",
        "Lower is better: how surprised each model is by what the person really wrote.",
        "",
        "| Model | Perplexity |",
        "|---|---:|",
    ]
    ordered = ["base", "prompted", "adapter"]
    ordered += [k for k in ppl if k not in ordered]
    lines += [f"| {md_escape(str(k))} | {_fmt(ppl.get(k))} |" for k in ordered]
    adapter, prompted = ppl.get("adapter"), ppl.get("prompted")
    if _is_number(adapter) and _is_number(prompted) and prompted > 0:
        lines += [
            "",
            f"Ratio adapter / prompted: **{adapter / prompted:.3f}** "
            "(below 1: the adapter predicts the person better than the prompt alone).",
        ]
    return [*lines, ""]


def verdict(result: dict) -> str:
    """One plain sentence on how good the clone is, for a person rather than a statistician."""
    parts = []
    known = result.get("knowledge") or {}
    if known.get("asked"):
        parts.append(f"answers {known['right']} of {known['asked']} questions about you correctly")
    ppl = result.get("perplexity") or {}
    adapter, base, prompted = ppl.get("adapter"), ppl.get("base"), ppl.get("prompted")
    if _is_number(adapter) and _is_number(base):
        better = "better" if adapter < base else "no better"
        parts.append(f"reads as you {better} than the base model on held-out chats "
                     f"(perplexity {adapter:.1f} against {base:.1f})")
    if _is_number(adapter) and _is_number(prompted):
        # The fairer bar: a base model shown a few of the person's messages needs no training.
        better = "better" if adapter < prompted else "no better"
        parts.append(f"{better} than the base model shown a few of your messages "
                     f"(perplexity {prompted:.1f})")
    context = result.get("context_gain") or {}
    if _is_number(context.get("adapter")) and _is_number(context.get("base")):
        ours, theirs = round(context["adapter"], 2), round(context["base"], 2)  # as printed
        more = "as much as" if ours == theirs else "more than" if ours > theirs else "less than"
        parts.append(f"follows the conversation {more} the base model does "
                     f"(context gain {context['adapter']:.2f} against {context['base']:.2f})")
    return ("Your clone " + "; ".join(parts) + ".") if parts else "Not enough held-out data to judge."


def _knowledge_section(result: dict) -> list[str]:
    ppl, context, known = result.get("perplexity") or {}, result.get("context_gain"), result.get("knowledge")
    lines = ["## Knowledge and context", ""]
    for name in ("adapter", "base"):
        bare, recalled = ppl.get(f"{name}_no_recall"), ppl.get(name)
        if _is_number(bare) and _is_number(recalled) and recalled > 0:
            lines.append(f"- Retrieval gain, {name}: **{bare / recalled:.3f}** (perplexity without "
                         f"recalled items {bare:.2f} / with {recalled:.2f}; above 1: recall helps)")
    last = result.get("retrieval_gain_last_reply")
    if isinstance(last, dict):
        lines.append(f"- Retrieval gain on the reply the items were recalled for: adapter "
                     f"**{_fmt(last.get('adapter'))}**, base model {_fmt(last.get('base'))} (each "
                     "held-out sample's last reply, without its recalled items / with them)")
    if isinstance(context, dict):
        lines.append(f"- Context gain: adapter **{_fmt(context.get('adapter'))}**, base model "
                     f"{_fmt(context.get('base'))} (perplexity of the real reply after another "
                     "conversation / after its own; about 1: the conversation is ignored)")
    if isinstance(known, dict) and known.get("answers"):
        lines += ["", f"Questions about you ({md_escape(str(known.get('questions')))}): "
                  f"**{known['right']} of {known['asked']}** answered with the fact.", "",
                  "| | Question | Reply |", "|---|---|---|"]
        lines += [f"| {'✓' if a['right'] else '✗'} | {md_escape(a['question'])} | "
                  f"{md_escape(a['reply'].replace(chr(10), ' / '))} |" for a in known["answers"]]
    return [*lines, ""]


def _blind_section(examples: list) -> list[str]:
    """Real and generated replies side by side in an order decided by a hash: can you tell?"""
    rows = [e for e in examples if isinstance(e, dict) and e.get("real") and e.get("generated")]
    if not rows:
        return []
    lines = ["## Which is the real reply?", "",
             "For each conversation, one reply is the person's and one the clone's; the answers "
             "are at the end.", ""]
    key = []
    for n, e in enumerate(rows, 1):
        real_first = hashlib.sha256(e["real"].encode()).digest()[0] % 2 == 0
        a, b = (e["real"], e["generated"]) if real_first else (e["generated"], e["real"])
        lines += [f"{n}. A: {md_escape(a.replace(chr(10), ' / '))}",
                  f"   B: {md_escape(b.replace(chr(10), ' / '))}"]
        key.append(f"{n}: {'A' if real_first else 'B'}")
    return [*lines, "", "Real replies: " + ", ".join(key), ""]


def _style_section(style: dict) -> list[str]:
    gen, real = style.get("generated") or {}, style.get("real") or {}
    diff = style.get("differences") or {}
    lines = [
        "## Style: real vs generated replies",
        "",
        f"{_fmt(real.get('replies'))} real replies ({_fmt(real.get('messages'))} messages) "
        f"against {_fmt(gen.get('replies'))} generated ones ({_fmt(gen.get('messages'))} messages).",
        "",
        "| Metric | Real | Generated | Generated − real |",
        "|---|---:|---:|---:|",
    ]
    for key in SCALAR_KEYS:
        lines.append(
            f"| {_LABELS[key]} | {_fmt_metric(key, real.get(key))} | "
            f"{_fmt_metric(key, gen.get(key))} | {_fmt_metric(key, diff.get(key), signed=True)} |"
        )
    lines.append(
        f"| {_LABELS['vocabulary_size']} | {_fmt(real.get('vocabulary_size'))} | "
        f"{_fmt(gen.get('vocabulary_size'))} | — |"
    )
    if _is_number(real.get("length_sem")) and _is_number(gen.get("length_sem")):
        lines += ["", f"Uncertainty: the mean message length is {real['length_mean']:.1f} ± "
                  f"{real['length_sem']:.1f} characters (real) and {gen['length_mean']:.1f} ± "
                  f"{gen['length_sem']:.1f} (generated), ± one standard error; a gap under about "
                  "twice these is noise. Rates over a few dozen replies move by several points "
                  "from one sample to the next."]
    overlap = style.get("vocabulary_overlap") or {}
    lines += [
        "",
        "| Similarity | Value |",
        "|---|---:|",
        f"| Vocabulary overlap (Jaccard, 1 = same words) | {_fmt(overlap.get('jaccard'), 3)} |",
        "| Generated words the person also uses (by count) | "
        f"{_pct(overlap.get('generated_in_real'))} |",
        "| Message-length distribution distance (0 = same, 1 = disjoint) | "
        f"{_fmt(style.get('length_distance'), 3)} |",
        f"| Burst-size distribution distance | {_fmt(style.get('burst_distance'), 3)} |",
        "",
    ]
    return lines


def _examples_section(examples: Sequence) -> list[str]:
    shown = [ex for ex in examples if isinstance(ex, dict)][:MAX_EXAMPLES]
    if not shown:
        return []
    cols = ["context", "real", "generated"]
    if any(ex.get("base") for ex in shown):
        cols.append("base")
    titles = {"context": "Context", "real": "Real", "generated": "Generated", "base": "Base model"}
    lines = [
        "## Examples",
        "",
        "| # | " + " | ".join(titles[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for i, ex in enumerate(shown, 1):
        cells = []
        for c in cols:
            text = ex.get(c)
            text = "" if text is None else str(text)
            if c == "context":
                text = _clip(text, MAX_CONTEXT_CHARS, keep_end=True)
            else:
                text = _clip(text, MAX_TEXT_CHARS)
            cells.append(md_escape(text) if text.strip() else "—")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _model_section(model: dict) -> list[str]:
    lines = ["## Model", "", "| Setting | Value |", "|---|---|"]
    for key, value in model.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        lines.append(f"| {md_escape(str(key))} | {md_escape(_clip(shown, 200))} |")
    return [*lines, ""]


def _markdown(result: dict, images: list[tuple[str, str]]) -> str:
    version = str(result.get("version") or "unknown")
    lines = [
        f"# Evaluation of adapter {md_escape(version)}",
        "",
        f"**{md_escape(verdict(result))}**",
        "",
        f"Validation replies: **{_fmt(result.get('val_replies'))}**",
        "",
        *_perplexity_section(result.get("perplexity") or {}),
        *_knowledge_section(result),
    ]
    if isinstance(result.get("style"), dict):
        lines += _style_section(result["style"])
    if images:
        lines += ["## Plots", ""]
        for title, name in images:
            lines += [f"![{title}]({name})", ""]
    if isinstance(result.get("examples"), list):
        lines += _examples_section(result["examples"])
        lines += _blind_section(result["examples"])
    if isinstance(result.get("model"), dict) and result["model"]:
        lines += _model_section(result["model"])
    return "\n".join(lines).rstrip("\n") + "\n"


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")


def _points(log_history: Sequence[dict], key: str) -> list[tuple[float, float]]:
    points = [
        (float(e["step"]), float(e[key]))
        for e in log_history
        if isinstance(e, dict) and _is_number(e.get(key)) and _is_number(e.get("step"))
        and math.isfinite(e[key])
    ]
    return sorted(points)


def _plot_loss(log_history: Sequence[dict], path: Path) -> bool:
    train, val = _points(log_history, "loss"), _points(log_history, "eval_loss")
    if not train and not val:
        return False
    from matplotlib.figure import Figure  # slow to import; no pyplot, so no GUI backend or global state

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def _shares(counts: dict, labels: Sequence[str]) -> list[float]:
    total = sum(v for v in counts.values() if _is_number(v))
    return [(counts.get(label, 0) / total) if total else 0.0 for label in labels]


def _grouped_bars(ax, labels: Sequence[str], real: list[float], gen: list[float], horizontal=False):
    width = 0.4
    pos = range(len(labels))
    bar = ax.barh if horizontal else ax.bar
    bar([p - width / 2 for p in pos], real, width, label="real", color="tab:blue")
    bar([p + width / 2 for p in pos], gen, width, label="generated", color="tab:orange")
    if horizontal:
        ax.set_yticks(list(pos), labels)
        ax.invert_yaxis()
    else:
        ax.set_xticks(list(pos), labels)
    ax.legend()


def _plot_lengths(style: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    gen, real = style.get("generated") or {}, style.get("real") or {}
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    length_labels = [label for label, _, _ in LENGTH_BINS]
    _grouped_bars(
        left,
        length_labels,
        _shares(real.get("length_histogram") or {}, length_labels),
        _shares(gen.get("length_histogram") or {}, length_labels),
    )
    left.set_title("Message length")
    left.set_xlabel("characters")
    left.set_ylabel("share of messages")
    _grouped_bars(
        right,
        BURST_BINS,
        _shares(real.get("burst_counts") or {}, BURST_BINS),
        _shares(gen.get("burst_counts") or {}, BURST_BINS),
    )
    right.set_title("Messages per burst")
    right.set_xlabel("messages in one reply")
    right.set_ylabel("share of replies")
    _save(fig, path)


def _plot_rates(style: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    gen, real = style.get("generated") or {}, style.get("real") or {}

    def values(side: dict) -> list[float]:
        return [float(side[k]) if _is_number(side.get(k)) else math.nan for k in RATE_KEYS]

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    _grouped_bars(ax, [_LABELS[k] for k in RATE_KEYS], values(real), values(gen), horizontal=True)
    ax.set_xlabel("share of messages (emoji, emoticons: count per message)")
    ax.set_title("Style rates")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def _has_messages(style: dict) -> bool:
    return any(
        _is_number((style.get(side) or {}).get("messages")) and style[side]["messages"] > 0
        for side in ("generated", "real")
    )


def write_report(result: dict, out_dir: Path, log_history: list[dict] | None = None) -> Path:
    """Write eval.json, report.md and the PNG plots into `out_dir`; return report.md's path.

    loss.png needs a Trainer `log_history` with "loss"/"eval_loss" entries; style_lengths.png and
    style_rates.png need result["style"] (from `compare_style`) with at least one message.
    report.md is written last and links only the plots that exist.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "eval.json") as f:
        f.write(json.dumps(result, ensure_ascii=False, indent=2, default=str) + "\n")

    images: list[tuple[str, str]] = []
    if log_history and _plot_loss(log_history, out_dir / "loss.png"):
        images.append(("Training and validation loss", "loss.png"))
    style = result.get("style")
    if isinstance(style, dict) and _has_messages(style):
        _plot_lengths(style, out_dir / "style_lengths.png")
        _plot_rates(style, out_dir / "style_rates.png")
        images += [
            ("Message length and burst size, real vs generated", "style_lengths.png"),
            ("Style rates, real vs generated", "style_rates.png"),
        ]

    path = out_dir / "report.md"
    with atomic_file(path) as f:
        f.write(_markdown(result, images))
    return path
