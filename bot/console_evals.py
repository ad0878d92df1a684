"""How good the clone is, for the owner's console: the `clone eval` reports of the persona's
adapters (`<adapters>/<version>/eval/eval.json` and its PNG plots, training.report), read into
the few figures the page and GET /api/evals show, and a small line chart of them across versions.

Only figures leave here: an eval.json also holds real and generated replies (the person's words),
which the report's Markdown shows and the console does not. A missing eval.json means "not
evaluated"; one that cannot be read is skipped, so a half-written or hand-edited report never
breaks the page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from training import adapters

EVAL_DIR, EVAL_FILE = "eval", "eval.json"
# What training.report may draw, with what each shows.
PLOTS = {"loss.png": "Training and validation loss",
         "style_lengths.png": "Message length and burst size, real vs generated",
         "style_rates.png": "Style rates, real vs generated"}
# The chart's frame, in SVG user units: the page scales it to the panel's width.
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 360, 150, 44, 40, 10, 22


def number(value: object) -> float | None:
    """A finite number, else None: eval.json may hold Infinity, which JSON clients refuse."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def read_eval(folder: Path) -> dict | None:
    """The eval.json under an adapter folder; None when it is missing, unreadable or not a report."""
    try:
        found = json.loads((folder / EVAL_DIR / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("perplexity"), dict) else None


def _version(manifest: dict, active: str | None) -> dict:
    created = manifest.get("created")
    return {"version": manifest["version"], "created": created if isinstance(created, str) else None,
            "active": manifest["version"] == active}


def summary(manifest: dict, found: dict, active: str | None) -> dict:
    """One version's figures (no text of the person's)."""
    folder = Path(manifest["path"]) / EVAL_DIR
    ppl = found["perplexity"]
    context = found.get("context_gain") if isinstance(found.get("context_gain"), dict) else {}
    knowledge = found.get("knowledge") if isinstance(found.get("knowledge"), dict) else {}
    model = found.get("model") if isinstance(found.get("model"), dict) else {}
    steps = model.get("train_steps") or (manifest.get("metrics") or {}).get("steps")
    return {
        **_version(manifest, active), "steps": steps if isinstance(steps, int) else None,
        "perplexity": {k: number(ppl.get(k)) for k in ("adapter", "base", "prompted")},
        "context_gain": {k: number(context.get(k)) for k in ("adapter", "base")},
        "knowledge_accuracy": number(knowledge.get("accuracy")),
        "verdict": found["verdict"] if isinstance(found.get("verdict"), str) else None,
        "plots": [name for name in PLOTS if _plot(folder, name) is not None],
    }


def history(root: Path) -> list[dict]:
    """Every adapter, newest first: its figures, or {"version", "created", "active", "evaluated":
    False} when it has no eval.json. An unreadable eval.json leaves its version out."""
    active, rows = adapters.active_version(root), []
    for manifest in adapters.versions(root)[::-1]:
        if not (Path(manifest["path"]) / EVAL_DIR / EVAL_FILE).exists():
            rows.append({**_version(manifest, active), "evaluated": False})
        elif (found := read_eval(Path(manifest["path"]))) is not None:
            rows.append({**summary(manifest, found, active), "evaluated": True})
    return rows


def shown(rows: list[dict]) -> dict | None:
    """The report the page shows: the active adapter's, else the newest one evaluated."""
    evaluated = [r for r in rows if r["evaluated"]]
    return next((r for r in evaluated if r["active"]), evaluated[0] if evaluated else None)


def plot_file(root: Path, version: str, name: str) -> Path | None:
    """The plot `name` of `version`'s report; None unless it is one of the report's own PNGs, in
    a known adapter's eval folder (the names are matched, never joined blindly: no traversal)."""
    if name not in PLOTS or version not in {m["version"] for m in adapters.versions(root)}:
        return None
    return _plot(root / version / EVAL_DIR, name)


def _plot(folder: Path, name: str) -> Path | None:
    """A plot file in `folder` itself: a link out of it is not served (only the report's own files are)."""
    path = folder / name
    return path if path.resolve().is_relative_to(folder.resolve()) and path.is_file() else None


def _xs(n: int) -> list[float]:
    """Where n versions sit across the chart, evenly; one alone in the middle."""
    inner = WIDTH - LEFT - RIGHT
    return [round(LEFT + (i * inner / (n - 1) if n > 1 else inner / 2), 1) for i in range(n)]


def _series(xs: list[float], values: list[float | None], low: float, high: float, shown: str,
            versions: list[str]) -> dict:
    """A polyline's points and a dot per version with its tooltip; a version without the figure is
    skipped. SVG's y grows downwards: `high` is at the top."""
    span, inner = (high - low) or 1.0, HEIGHT - TOP - BOTTOM
    dots = [{"x": x, "y": round(TOP + (high - v) / span * inner, 1), "title": f"{version}: {shown.format(v)}"}
            for x, v, version in zip(xs, values, versions, strict=True) if v is not None]
    return {"line": " ".join(f"{d['x']},{d['y']}" for d in dots), "dots": dots}


def chart(rows: list[dict]) -> dict | None:
    """Adapter perplexity (left axis) and knowledge accuracy (right axis, 0-100 %) across the
    evaluated versions, oldest left, as coordinates for the page's inline SVG."""
    evaluated = [r for r in rows if r["evaluated"]][::-1]
    ppl = [r["perplexity"]["adapter"] for r in evaluated]
    acc = [r["knowledge_accuracy"] for r in evaluated]
    if all(v is None for v in ppl + acc):
        return None
    versions, xs = [r["version"] for r in evaluated], _xs(len(evaluated))
    known = [v for v in ppl if v is not None] or [0.0, 1.0]
    low, high = min(known), max(known)
    return {
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP,
        "bottom": HEIGHT - BOTTOM, "low": low, "high": high, "first": versions[0], "last": versions[-1],
        "perplexity": _series(xs, ppl, low, high, "perplexity {:.2f}", versions),
        "knowledge": _series(xs, acc, 0.0, 1.0, "knowledge {:.0%}", versions)
        if any(a is not None for a in acc) else None,
    }
