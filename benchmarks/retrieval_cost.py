"""What retrieval costs: the persona index's build time and size, and the time it adds to a reply.

The target: retrieval adds at most 50 ms p95 per reply on 2 cores with 100,000 indexed items;
the index's build time and size reported. One run measures:

  build    the real embedding model (training.embed.Embedder) embeds `--embed` real texts through
           training.index.build: its rate, and the build time of `--items` texts extrapolated from
           it (labelled as such: embedding 100,000 texts takes many minutes on 2 cores). The
           rest of a build at full size (dedup, stacking) is measured, with the vectors the
           model did not embed filled in by random unit vectors.
  reply    what serving does per incoming message (bot.recall): embed the message, then
           PersonaIndex.search(vector, RECALL_ITEMS, MIN_SCORE). p50/p95 over `--queries` real
           messages, at `--items` items and, in the same loop (alternating which goes first), on
           a baseline index of `--baseline-items` items. Search cost does not depend on the
           vectors' values, so the random rows time the same as real ones would.
  files    PersonaIndex.save (float16 vectors, items.jsonl, index.json): time and size on disk;
           PersonaIndex.load: time.

Texts are the sample persona's Telegram messages (persona_data/sample/exports/result.json),
cycled and paired with one another to reach `--items` distinct exchanges.

    python benchmarks/retrieval_cost.py            # 100,000 items, 2,000 embedded (a few minutes)
    python benchmarks/retrieval_cost.py --quick    # 5,000 items, 200 embedded (under a minute)
    python benchmarks/retrieval_cost.py --json
    OPENBLAS_NUM_THREADS=1 python benchmarks/retrieval_cost.py   # search on one BLAS thread
    python benchmarks/retrieval_cost.py --threads 1              # the model on one torch thread

The load average is printed: on a machine whose cores are busy with other work, a
multi-threaded BLAS product waits for its threads and the embedding model for its own, so the
figures are upper bounds there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.index import MIN_SCORE, PersonaIndex, answer_views, build  # noqa: E402
from training.knowledge import Item  # noqa: E402
from training.prompt import RECALL_ITEMS  # noqa: E402

EXPORT = REPO / "persona_data" / "sample" / "exports" / "result.json"
TARGET_MS = 50.0


def sample_texts() -> list[str]:
    data = json.loads(EXPORT.read_text(encoding="utf-8"))
    return [m["text"].strip() for chat in data["chats"]["list"] for m in chat["messages"]
            if isinstance(m.get("text"), str) and m["text"].strip()]


def make_items(texts: Sequence[str], n: int) -> list[Item]:
    """`n` exchanges: message i answered by message i+1; past the export, each message joined to
    another (a different one each round) so every embedded text is new."""
    m = len(texts)
    items = []
    for i in range(n):
        rnd, j = divmod(i, m)
        asked = texts[j] if rnd == 0 else f"{texts[j]} {texts[(j * 7 + rnd * 104_729) % m]}"
        kind = "fact" if i % 100 == 0 else "exchange"  # a few facts: the knowledge bonus applies
        items.append(Item(kind, texts[(j + 1) % m], asked, f"chat{i % 500}"))
    return items


def embedded_texts(items: Sequence[Item]) -> set[str]:
    """Every text building an index of `items` embeds: each item's, and each fact's with its answer."""
    return {i.embedded_text() for i in items} | set(answer_views(items))


class RandomEmbedder:
    """Stands in for the model where a real embedding would take too long: random unit rows."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name, self.rng, self.seconds = name, np.random.default_rng(seed), 0.0

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        v = self.rng.standard_normal((len(texts), 384), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        self.seconds += time.perf_counter() - t0
        return v


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def run(args: argparse.Namespace) -> dict:
    import torch

    from training.embed import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"items": args.items, "embedded_real": args.embed, "queries": args.queries,
                    "baseline_items": args.baseline_items, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get(
                        "OMP_NUM_THREADS") or "default",
                    "load_before": [round(x, 2) for x in os.getloadavg()]}
    texts = sample_texts()
    items = make_items(texts, args.items)
    result["unique_texts"] = unique = len(embedded_texts(items))

    t0 = time.perf_counter()
    embedder = Embedder()
    result["model_load_s"] = round(time.perf_counter() - t0, 2)

    # Build: the real model over the first `embed` items, then the whole index reusing them.
    t0 = time.perf_counter()
    real = build(items[: args.embed], embedder)
    real_s = time.perf_counter() - t0
    real_unique = len(embedded_texts(items[: args.embed]))
    rate = real_unique / real_s
    fill = RandomEmbedder(embedder.name)
    t0 = time.perf_counter()
    index = build(items, fill, reuse=real)
    overhead_s = time.perf_counter() - t0 - fill.seconds
    result["build"] = {
        "measured_items": args.embed, "measured_s": round(real_s, 2),
        "texts_per_s": round(rate, 1),
        "overhead_at_full_size_s": round(overhead_s, 2),
        "extrapolated_full_s": round(unique / rate + overhead_s, 1),
        "random_rows": len(items) - args.embed,
    }

    # Per reply: embed one message, search. The baseline index is the first items of the same.
    head = items[: args.baseline_items]
    facts = len(answer_views(head))  # answer rows follow the items' order
    baseline = PersonaIndex(head, index.vectors[: args.baseline_items], index.model,
                            None if index.answers is None else index.answers[:facts])
    rng = np.random.default_rng(1)
    questions = [t for t in texts if t.endswith("?")] or texts
    queries = [questions[i] for i in rng.choice(len(questions), args.queries, replace=False)] \
        if len(questions) >= args.queries else [questions[i % len(questions)] for i in range(args.queries)]
    for q in queries[:5]:  # warm-up: first calls allocate
        v = embedder.embed([q])[0]
        index.search(v, RECALL_ITEMS, MIN_SCORE)
        baseline.search(v, RECALL_ITEMS, MIN_SCORE)
    times: dict[str, list[float]] = {"embed": [], "search_base": [], "search_full": [],
                                     "search_full_excluding": []}
    found = 0
    for n, q in enumerate(queries):
        t0 = time.perf_counter()
        v = embedder.embed([q])[0]
        times["embed"].append(time.perf_counter() - t0)
        order = [("search_base", baseline), ("search_full", index)]
        for name, idx in order if n % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            hits = idx.search(v, RECALL_ITEMS, MIN_SCORE)
            times[name].append(time.perf_counter() - t0)
            if idx is index:
                found += len(hits)
        # Training's search (a sample never sees its own conversation): not per reply.
        t0 = time.perf_counter()
        index.search(v, RECALL_ITEMS, MIN_SCORE, exclude_source=f"chat{n % 500}")
        times["search_full_excluding"].append(time.perf_counter() - t0)
    times["reply_base"] = [e + s for e, s in zip(times["embed"], times["search_base"], strict=True)]
    times["reply_full"] = [e + s for e, s in zip(times["embed"], times["search_full"], strict=True)]
    result["ms"] = {name: {"p50": round(pct(v, 50) * 1000, 3), "p95": round(pct(v, 95) * 1000, 3),
                           "mean": round(statistics.fmean(v) * 1000, 3)} for name, v in times.items()}
    result["mean_hits_full"] = round(found / len(queries), 2)
    ms = result["ms"]
    result["ratio_reply_p95"] = round(ms["reply_full"]["p95"] / ms["reply_base"]["p95"], 2)
    result["ratio_search_p95"] = round(ms["search_full"]["p95"] / ms["search_base"]["p95"], 2)

    # Files.
    with tempfile.TemporaryDirectory(prefix="retrieval-cost-") as tmp:
        folder = Path(tmp) / "index"
        t0 = time.perf_counter()
        index.save(folder)
        save_s = time.perf_counter() - t0
        sizes = folder_bytes(folder)
        t0 = time.perf_counter()
        loaded = PersonaIndex.load(folder, index.model)
        load_s = time.perf_counter() - t0
        assert len(loaded) == len(index)
    result["files"] = {"save_s": round(save_s, 2), "load_s": round(load_s, 2), "bytes": sizes,
                       "total_bytes": sum(sizes.values()),
                       "memory_vectors_bytes": int(index.vectors.nbytes)}
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["verdict"] = "PASS" if ms["reply_full"]["p95"] <= TARGET_MS else "FAIL"
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def report(r: dict) -> None:
    b, f, ms = r["build"], r["files"], r["ms"]
    print(f"{r['items']:,} items ({r['unique_texts']:,} distinct texts), {r['cpus']} CPUs, "
          f"torch threads {r['torch_threads']}, BLAS threads {r['blas_threads_env']}; model loaded in "
          f"{r['model_load_s']} s")
    busy = max(r["load_before"][0], r["load_after"][0]) >= 0.5
    print(f"load average (1, 5, 15 min) before {r['load_before']}, after {r['load_after']}"
          + (": other processes share the cores, so every time here is an upper bound" if busy else ""))
    print(f"\nbuild: {b['measured_items']:,} real texts embedded in {b['measured_s']} s "
          f"({b['texts_per_s']:,.0f} texts/s); the rest of a {r['items']:,}-item build "
          f"(dedup, stacking) {b['overhead_at_full_size_s']} s")
    print(f"       EXTRAPOLATED full build: {b['extrapolated_full_s']:,.0f} s "
          f"({b['extrapolated_full_s'] / 60:.1f} min); {b['random_rows']:,} of the index's rows "
          f"are random unit vectors (search timing does not depend on them)")
    print(f"\nper reply over {r['queries']} messages (ms)   {r['baseline_items']:>9,} items"
          f" {r['items']:>11,} items   ratio")
    for label, base, full in (("embed the message", "embed", "embed"),
                              (f"search (k={RECALL_ITEMS}, min {MIN_SCORE})",
                               "search_base", "search_full"),
                              ("retrieval per reply", "reply_base", "reply_full")):
        for q in ("p50", "p95"):
            a, c = ms[base][q], ms[full][q]
            print(f"  {label:28} {q}  {a:14.2f} {c:17.2f} {c / a:8.2f}x")
    print(f"  (training's search, excluding a conversation: p50 {ms['search_full_excluding']['p50']:.2f}"
          f", p95 {ms['search_full_excluding']['p95']:.2f} ms; mean hits at min score "
          f"{r['mean_hits_full']})")
    sizes = ", ".join(f"{k} {mib(v)}" for k, v in f["bytes"].items())
    print(f"\nfiles: {mib(f['total_bytes'])} on disk ({sizes}); saved in {f['save_s']} s, "
          f"loaded in {f['load_s']} s; {mib(f['memory_vectors_bytes'])} of float32 vectors in memory")
    print(f"\nverdict: retrieval p95 {ms['reply_full']['p95']:.2f} ms per reply at "
          f"{r['items']:,} items vs the {TARGET_MS:.0f} ms target: {r['verdict']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--embed", type=int, default=2_000, help="texts the real model embeds")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--baseline-items", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the embedding model (default: torch's, as serving)")
    parser.add_argument("--quick", action="store_true", help="5,000 items, 200 embedded, 50 queries")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.items, args.embed, args.queries = 5_000, 200, 50
    args.embed = min(args.embed, args.items)
    args.baseline_items = min(args.baseline_items, args.items)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    sys.exit(0 if result["verdict"] == "PASS" else 1)


if __name__ == "__main__":
    main()
