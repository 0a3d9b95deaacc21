"""Merge speed and memory: mixtune against mergekit on synthetic Llama-shaped checkpoints.

Builds a base and three "fine-tunes" (base + small noise) locally, in bf16, sharded like Hugging
Face checkpoints; then, for each method, writes one mergekit YAML, runs `mergekit-yaml` and `mixtune
merge` on it in fresh processes (wall seconds, peak RSS and peak anonymous RSS polled from /proc),
checks that the two outputs agree (layer count, tensor names and dtypes; every tensor equal, or the
same statistics for the random methods), and measures the I/O floor: reading once the bytes of the
tensors the method reads (slerp two models, a frankenmerge only the layers it takes) plus writing
the output's bytes. Inputs stay in the page cache between runs, so every tool and the floor read
from memory alike. Prints a markdown table for docs/benchmarks.md and writes OUT/results.json.

    python bench/merge_vs_mergekit.py --params 1e9 --out /tmp/merge-bench
    python bench/merge_vs_mergekit.py --params 2e6 --hidden 128 --vocab 1000 --out /tmp/mb-smoke  # a smoke

Methods (``--methods``, mergekit's names; every YAML runs through both tools as it is):

- linear: the three fine-tunes, weight 1 (no base).
- ties, dare_ties: base + three fine-tunes, weight 1, density 0.5 (any other mergekit method of the
  task-arithmetic family, e.g. breadcrumbs or della_linear, gets this config too).
- della: as ties, with epsilon 0.1.
- slerp: mergekit's gradient-slerp example (examples/gradient-slerp.yml) between the base and one
  fine-tune, in one slice of all layers: t from the anchors [0, 0.5, 0.3, 0.7, 1] over the layers for
  self_attn, the reverse for mlp, 0.5 elsewhere.
- model_stock: base + three fine-tunes.
- passthrough: a frankenmerge as examples/orcamini-platy-44layer.yml builds one: layers [0, L - L/4)
  of ft0 then [L/4, L) of ft1, so 2 (L - L/4) output layers (more than one model has), the embedding
  from ft0 and the final norm and head from ft1.
- *_paper (e.g. ties_paper): mixtune's paper-exact methods at their default scope, mixtune only.

mergekit (LGPL) comes from the test extra; mixtune never imports it, and neither does this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

from merge_checkpoints import (Dims, Reads, compare, dims_for, folder_bytes, io_floor, layer_of, n_params,
                               ranges_read, span_bytes, write_checkpoint)

DEFAULT_METHODS = "linear,ties,dare_ties,slerp,della,model_stock,passthrough"
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
TARGETS = {"speed-up": 2.0, "peak RSS": 0.5, "floor": {"linear": 2.0, "ties": 5.0}}
"""Issue #19's targets: >= 2x mergekit's speed and <= 0.5x its peak RSS for each method; within 2x
the I/O floor for linear and 5x for ties."""


class Case(NamedTuple):
    doc: dict
    """The config both tools run (mergekit's form; mixtune's form for the *_paper methods)."""
    reads: Reads
    """The tensors the merge reads, for the I/O floor."""
    layers: int
    """The output's num_hidden_layers."""
    exact: bool | None
    """Tensors equal to mergekit's (True), the same statistics (False: random methods), no mergekit (None)."""
    label: str


def everything(_name: str) -> bool:
    return True


def case(method: str, models: list[Path], d: Dims) -> Case:
    base, fts = models[0], models[1:]
    if method.endswith("_paper"):  # mixtune only: the paper's whole-model scope, no mergekit equivalent
        doc = {"method": method, "base_model": str(base), "models": [{"model": str(m)} for m in fts],
               "parameters": {"density": 0.5}}
        return Case(doc, [(m, everything) for m in models], d.layers, None, f"{method} (mixtune only)")
    if method == "linear":
        doc = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fts]}
        return Case(doc, [(m, everything) for m in fts], d.layers, True, method)
    if method == "slerp":
        doc = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": SLERP_T},
               "slices": [{"sources": [{"model": str(m), "layer_range": [0, d.layers]} for m in (base, fts[0])]}]}
        return Case(doc, [(base, everything), (fts[0], everything)], d.layers, True, "slerp (gradient t)")
    if method == "model_stock":
        doc = {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(m)} for m in fts]}
        return Case(doc, [(m, everything) for m in models], d.layers, True, method)
    if method == "passthrough":
        if d.layers < 2:
            sys.exit("passthrough: the frankenmerge needs at least 2 layers per model (raise --params)")
        cut = max(1, round(d.layers / 4))
        first, second = (0, d.layers - cut), (cut, d.layers)
        doc = {"merge_method": "passthrough",
               "slices": [{"sources": [{"model": str(fts[0]), "layer_range": list(first)}]},
                          {"sources": [{"model": str(fts[1]), "layer_range": list(second)}]}]}

        def from_first(name: str) -> bool:  # the embedding and layers [0, L - cut)
            i = layer_of(name)
            return "embed_tokens" in name if i is None else first[0] <= i < first[1]

        def from_second(name: str) -> bool:  # layers [cut, L), the final norm and the head
            i = layer_of(name)
            return "embed_tokens" not in name if i is None else second[0] <= i < second[1]

        layers = first[1] - first[0] + second[1] - second[0]
        return Case(doc, [(fts[0], from_first), (fts[1], from_second)], layers, True,
                    f"passthrough (frankenmerge, {d.layers} → {layers} layers)")
    # the task-arithmetic family: ties, dare_ties, della, breadcrumbs, ...
    params = {"weight": 1.0, "density": 0.5} | ({"epsilon": 0.1} if method.startswith("della") else {})
    doc = {"merge_method": method, "base_model": str(base), "models": [{"model": str(m), "parameters": params}
                                                                         for m in fts]}
    random = method.startswith(("dare", "della"))
    if random:
        doc["random_seed"] = 0
    return Case(doc, [(m, everything) for m in models], d.layers, not random, method)


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous RSS (GiB) of a command, polled from /proc every
    20 ms. RSS counts the memory-mapped input pages a tool has touched; anonymous RSS is what it
    allocated itself (tensors, buffers), the part a bigger model makes grow."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
    return wall, peak["VmRSS"] / 2**20, peak["RssAnon"] / 2**20


def checkpoints(out: Path, d: Dims, shard_bytes: int) -> list[Path]:
    """The base and three fine-tunes under ``out``, written again when their shape or sharding changed."""
    models = [out / "base", *(out / f"ft{i}" for i in range(3))]
    stamp = {"dims": vars(d), "shard_bytes": shard_bytes}
    stamp_file = out / "checkpoints.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp \
            and all((m / "config.json").exists() for m in models):
        return models
    shutil.rmtree(out, ignore_errors=True)
    print(f"writing 4 checkpoints of {n_params(d) / 1e9:.3f}B parameters ({d.layers} layers, hidden {d.hidden}, "
          f"vocabulary {d.vocab}, bf16) ...", flush=True)
    for i, m in enumerate(models):
        write_checkpoint(m, d, seed=100 + i, base_seed=None if i == 0 else 100, shard_bytes=shard_bytes)
    stamp_file.write_text(json.dumps(stamp))
    return models


def run_method(method: str, models: list[Path], d: Dims, out: Path, shard_bytes: int, bin_dir: Path) -> dict:
    c = case(method, models, d)
    cfg = out / f"{method}.yaml"
    cfg.write_text(json.dumps(c.doc, indent=1))  # JSON is YAML
    row = {"method": method, "label": c.label, "config": c.doc, "layers_out": c.layers, "exact": c.exact}
    mk_out, mx_out = out / f"mk-{method}", out / f"mx-{method}"
    tools = [("mixtune", [str(bin_dir / "mixtune"), "merge", str(cfg), "-o", str(mx_out),
                          f"max_shard_size={shard_bytes}"])]
    if c.exact is not None:
        tools.insert(0, ("mergekit", [str(bin_dir / "mergekit-yaml"), str(cfg), str(mk_out),
                                      "--out-shard-size", str(shard_bytes)]))
    else:
        row |= {"mergekit_s": math.nan, "mergekit_rss_gib": math.nan, "mergekit_anon_gib": math.nan}
    for folder in (mk_out, mx_out):
        shutil.rmtree(folder, ignore_errors=True)
    for tool, cmd in tools:
        row[f"{tool}_s"], row[f"{tool}_rss_gib"], row[f"{tool}_anon_gib"] = timed(cmd)
        print(f"{method:12s} {tool:9s} {row[f'{tool}_s']:7.1f} s  peak RSS {row[f'{tool}_rss_gib']:.2f} GiB "
              f"(anonymous {row[f'{tool}_anon_gib']:.2f})", flush=True)
    ranges = ranges_read(c.reads)
    row["read_bytes"], row["written_bytes"] = span_bytes(ranges), folder_bytes(mx_out)
    row["io_floor_s"] = io_floor(ranges, row["written_bytes"], out / "scratch.bin")
    if c.exact is None:
        row["same_as_mergekit"], row["check"] = None, "no mergekit equivalent"
    else:
        row["same_as_mergekit"], row["check"] = compare(mk_out, mx_out, models[0], c.layers, c.exact)
        print(f"{method:12s} {'same' if row['same_as_mergekit'] else 'DIFFERENT'}: {row['check']}", flush=True)
    for folder in (mk_out, mx_out):
        shutil.rmtree(folder, ignore_errors=True)
    return row


def table(results: list[dict]) -> list[str]:
    """The markdown rows for docs/benchmarks.md."""
    lines = ["| method | mergekit s | mixtune s | speed-up | peak RSS GiB (mergekit / mixtune) | "
             "anonymous GiB (mergekit / mixtune) | read / written GB | I/O floor s | mixtune / floor | tensors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        io = f"{r['read_bytes'] / 1e9:.3g} / {r['written_bytes'] / 1e9:.3g}"
        tail = f"{io} | {r['io_floor_s']:.3g} | {r['mixtune_s'] / r['io_floor_s']:.1f}x"
        if r["same_as_mergekit"] is None:
            lines.append(f"| {r['label']} | – | {r['mixtune_s']:.1f} | – | – / {r['mixtune_rss_gib']:.2f} | "
                         f"– / {r['mixtune_anon_gib']:.2f} | {tail} | – |")
            continue
        same = ("equal" if r["exact"] else "same statistics") if r["same_as_mergekit"] else "**DIFFERENT**"
        lines.append(f"| {r['label']} | {r['mergekit_s']:.1f} | {r['mixtune_s']:.1f} | "
                     f"{r['mergekit_s'] / r['mixtune_s']:.2f}x | {r['mergekit_rss_gib']:.2f} / "
                     f"{r['mixtune_rss_gib']:.2f} ({r['mixtune_rss_gib'] / r['mergekit_rss_gib']:.2f}x) | "
                     f"{r['mergekit_anon_gib']:.2f} / {r['mixtune_anon_gib']:.2f} | {tail} | {same} |")
    return lines


def verdicts(results: list[dict]) -> list[str]:
    """One line per method against issue #19's targets (TARGETS)."""
    lines = []
    for r in results:
        if r["same_as_mergekit"] is None:
            continue
        speed, rss = r["mergekit_s"] / r["mixtune_s"], r["mixtune_rss_gib"] / r["mergekit_rss_gib"]
        parts = [f"speed {speed:.2f}x ({'met' if speed >= TARGETS['speed-up'] else 'NOT met'})",
                 f"peak RSS {rss:.2f}x ({'met' if rss <= TARGETS['peak RSS'] else 'NOT met'})"]
        if r["method"] in TARGETS["floor"]:
            floor, limit = r["mixtune_s"] / r["io_floor_s"], TARGETS["floor"][r["method"]]
            parts.append(f"{floor:.1f}x the floor (target {limit:g}x: {'met' if floor <= limit else 'NOT met'})")
        lines.append(f"- {r['method']}: " + ", ".join(parts))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="Approximate parameters per checkpoint.")
    ap.add_argument("--out", type=Path, default=Path("/tmp/merge-bench"),
                    help="Working folder: checkpoints (kept for the next run), configs, results.json.")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="mergekit methods (see the module docstring), and *_paper methods (mixtune only, "
                         "whole-model scope).")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="Input and output shard size.")
    ap.add_argument("--hidden", type=int, default=2048, help="Hidden size (TinyLlama's; smaller for a smoke).")
    ap.add_argument("--vocab", type=int, default=32000, help="Vocabulary size (TinyLlama's; smaller for a smoke).")
    a = ap.parse_args()
    d = dims_for(a.params, a.hidden, a.vocab)
    shard_bytes = max(1, int(a.shard_gb * 1e9))
    a.out.mkdir(parents=True, exist_ok=True)
    models = checkpoints(a.out, d, shard_bytes)
    bin_dir = Path(sys.executable).parent
    results = []
    for method in a.methods.split(","):
        results.append(run_method(method.strip(), models, d, a.out, shard_bytes, bin_dir))
    setup = {"params": n_params(d), "dims": vars(d), "shard_bytes": shard_bytes, "cpus": os.cpu_count(),
             "torch": version("torch"), "mergekit": version("mergekit"), "date": date.today().isoformat(),
             "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).parent).stdout.strip()}
    print(f"\n{n_params(d) / 1e9:.3f}B parameters per checkpoint ({d.layers} layers, hidden {d.hidden}, vocabulary "
          f"{d.vocab}), 3 fine-tunes + base, bf16, {shard_bytes / 1e9:g} GB shards; {os.cpu_count()} CPUs, torch "
          f"{setup['torch']}, mergekit {setup['mergekit']}, commit {setup['commit']}, {setup['date']}\n")
    print("\n".join(table(results)))
    print("\nAgainst issue #19's targets (>= 2x mergekit's speed, <= 0.5x its peak RSS; linear within 2x the I/O "
          "floor, ties within 5x):\n")
    print("\n".join(verdicts(results)))
    (a.out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2, default=str))
    print(f"\nwrote {a.out / 'results.json'}")
    if any(r["same_as_mergekit"] is False for r in results):
        sys.exit("mixtune's output differs from mergekit's (see the tensors column)")


if __name__ == "__main__":
    main()
