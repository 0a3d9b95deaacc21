"""Peak memory of packing a JSONL source larger than memory with ``stream: true``.

Writes a JSONL file of about ``--gb`` GB to a temporary folder (half of its bytes conversations
from the built-in generators, half raw-text documents of 1 to 8 paragraphs, many longer than a row,
each record made distinct by its number), then prepares it in a child process as ``mixtune train``
would: one stage taking the whole source, packed into rows of ``--seq-len`` with the built-in
tokenizer. The child reports each phase (index, tokens, rows) with the time and its peak RSS so far;
the parent reports the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``). A second child
prepares the same recipe again, which should find every cache. With ``--compare-mb`` the first MB
of the file are also prepared with and without ``stream``, each in its own child, for the in-memory
path's RSS at that size. Everything is deleted afterwards unless ``--keep``.

    python bench/pack_large.py [--gb 2] [--seq-len 512] [--compare-mb 100] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(path: Path, size: int) -> int:
    """Write about ``size`` bytes of records to ``path``; returns the number of records."""
    from mixtune.data.abilities import ABILITIES

    chats = [r["messages"] for name in ABILITIES for level in (1, 2, 3)
             for r in ABILITIES.get(name).generate(400, seed=1, split="train", difficulty=level)]
    sentences = [m["content"].replace("\n", " ") for msgs in chats for m in msgs]
    n, written = 0, 0
    with path.open("w") as f:
        while written < size:
            if n % 2:  # a conversation of one to three exchanges
                turns = [m for k in range(1 + n % 3) for m in chats[(n * 7 + k * 13) % len(chats)]]
                turns[0] = turns[0] | {"content": f"Record {n}. " + turns[0]["content"]}
                line = json.dumps({"messages": turns})
            else:  # a document of 1..8 paragraphs of 2..12 sentences
                paras = [" ".join(sentences[(n * 31 + p * 17 + s * 5) % len(sentences)] for s in range(2 + (n + p) % 11))
                         for p in range(1 + n % 8)]
                line = json.dumps({"text": f"Document {n}.\n\n" + "\n\n".join(paras)})
            f.write(line + "\n")
            written += len(line) + 1
            n += 1
    return n


def child(jsonl: Path, seq_len: int, stream: bool) -> None:
    """Prepare the recipe of one streamed source, phase by phase; print one JSON line."""
    t0 = time.perf_counter()
    from mixtune.builtin import builtin_tokenizer
    from mixtune.core import validate
    from mixtune.pipeline import prepare_data
    from mixtune.recipe import Recipe

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    phases = {}
    tokenizer = builtin_tokenizer()
    phases["start (imports, tokenizer)"] = (time.perf_counter() - t0, rss_mb())
    recipe = validate(Recipe, {"model": "builtin:tiny", "format": {"seq_len": seq_len, "long_examples": "drop"},
                               "sources": {"big": {"path": str(jsonl), "stream": stream}}})
    if stream:  # the same calls prepare_data makes, one at a time, to time each phase
        from mixtune.data.stream import open_streamed
        from mixtune.data.tokens import source_tokens

        t = time.perf_counter()
        source = open_streamed("big", recipe.sources["big"])
        phases["index (one pass, every record checked)"] = (time.perf_counter() - t, rss_mb())
        t = time.perf_counter()
        source_tokens(source, tokenizer)
        phases["tokens (chunks into the token cache)"] = (time.perf_counter() - t, rss_mb())
    t = time.perf_counter()
    data = prepare_data(recipe, jsonl.parent, tokenizer)
    phases["mix + pack (rows into files)" if stream else "load + tokenize + pack in memory"] = (
        time.perf_counter() - t, rss_mb())
    packed = data.stages[0].packed
    if stream:  # count from the file with plain reads: Packed.n_tokens would map every page of it into RSS
        import numpy as np

        [ids] = (Path(os.environ["XDG_CACHE_HOME"]) / "mixtune" / "data" / "packed").glob("*/example_ids.i64")
        with ids.open("rb") as f:
            tokens = sum(int((np.frombuffer(b, dtype=np.int64) >= 0).sum()) for b in iter(lambda: f.read(1 << 24), b""))
    else:
        tokens = packed.n_tokens
    print(json.dumps({"phases": phases, "records": len(data.stages[0].mixture.picks), "rows": packed.input_ids.shape[0],
                      "tokens": tokens, "dropped": packed.dropped, "efficiency": tokens / max(1, packed.input_ids.numel())}))


def run_child(jsonl: Path, seq_len: int, stream: bool, cache: Path) -> dict:
    """One child run: its report, wall time and peak RSS. ``RUSAGE_CHILDREN`` gives the largest peak of
    the children waited for so far, so it is this child's only when higher than before; the child's own
    figure at its end (the last phase's) is the same counter, read from inside."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", str(jsonl), "--seq-len", str(seq_len)]
                         + ([] if stream else ["--in-memory"]), env=os.environ | {"XDG_CACHE_HOME": str(cache)},
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    own = max(rss for _, rss in report["phases"].values())
    return report | {"wall": wall, "peak_rss_mb": peak if peak > before / 1024 else own, "own_peak_mb": own}


def show(title: str, r: dict) -> None:
    print(f"{title}: {r['records']:,} records -> {r['rows']:,} rows, {r['tokens']:,} tokens "
          f"({r['efficiency']:.1%} real, {r['dropped']} dropped); wall {r['wall']:.0f} s, peak RSS {r['peak_rss_mb']:,.0f} MB "
          f"(child's own: {r['own_peak_mb']:,.0f} MB)")
    for phase, (secs, rss) in r["phases"].items():
        print(f"    {phase:<42} {secs:8.1f} s   peak RSS so far {rss:7,.0f} MB")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--compare-mb", type=int, default=0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--in-memory", action="store_true")
    a = ap.parse_args()
    if a.child:
        return child(Path(a.child), a.seq_len, not a.in_memory)
    size = int(a.gb * 1e9)
    free = shutil.disk_usage(a.dir).free
    if free < 25 * size:  # rows take ~16x the JSONL here (40 bytes a token), tokens ~3x
        sys.exit(f"{a.dir} has {free / 1e9:.0f} GB free; this needs about {25 * size / 1e9:.0f} GB")
    work = Path(tempfile.mkdtemp(prefix="mixtune-pack-large-", dir=a.dir))
    try:
        print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, in {work}")
        t = time.perf_counter()
        jsonl = work / "big.jsonl"
        n = generate(jsonl, size)
        print(f"wrote {jsonl.stat().st_size / 1e9:.2f} GB, {n:,} records, in {time.perf_counter() - t:.0f} s")
        show("first run (builds the caches)", first := run_child(jsonl, a.seq_len, True, work / "cache"))
        caches = {k.name: du(k) for k in (work / "cache" / "mixtune" / "data").iterdir()}
        print("    cache on disk: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(caches.items())))
        show("second run (finds every cache)", again := run_child(jsonl, a.seq_len, True, work / "cache"))
        assert (again["rows"], again["tokens"]) == (first["rows"], first["tokens"])
        if a.compare_mb:
            part = work / "part.jsonl"
            with jsonl.open("rb") as src, part.open("wb") as dst:
                for line in src:
                    dst.write(line)
                    if dst.tell() >= a.compare_mb * 1e6:
                        break
            show(f"{a.compare_mb} MB, in memory", run_child(part, a.seq_len, False, work / "cache-part"))
            show(f"{a.compare_mb} MB, streamed", run_child(part, a.seq_len, True, work / "cache-part"))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
