"""Merge speed and memory: mixtune against mergekit on synthetic Llama-shaped checkpoints.

Builds a base and three "fine-tunes" (base + small noise) locally, in bf16, sharded like Hugging
Face checkpoints; then, for each method, runs `mergekit-yaml` and `mixtune merge` on the same
mergekit YAML in fresh processes under /usr/bin/time (wall seconds, peak RSS), and measures the
I/O floor: reading every input byte once plus writing the output's bytes. Inputs stay in the page
cache between runs (24 GiB machine), so every tool and the floor read from memory alike.

    python bench/merge_vs_mergekit.py --params 1e9 --out /tmp/merge-bench

mergekit (LGPL) comes from the test extra; mixtune never imports it.
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
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, HEADS = 2048, 5632, 32000, 16


def shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER)), (p + "input_layernorm.weight", (HIDDEN,)),
                (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_checkpoint(folder: Path, layers: int, seed: int, base_seed: int | None, shard_bytes: int) -> None:
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    g_base = torch.Generator().manual_seed(base_seed if base_seed is not None else seed)
    g_ft = torch.Generator().manual_seed(seed)
    shard, size, shards = {}, 0, []
    for name, shape in shapes(layers):
        t = torch.randn(shape, generator=g_base) * 0.02
        if base_seed is not None:  # a fine-tune: the base plus a small delta
            t += torch.randn(shape, generator=g_ft) * 0.002
        t = t.to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
    shards.append(shard)
    weight_map = {}
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in s})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


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


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read every input byte once and write ``out_bytes``."""
    t0 = time.perf_counter()
    buf = bytearray(64 * 2**20)
    for folder in inputs:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
    seconds = time.perf_counter() - t0
    scratch.unlink()
    return seconds


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="Approximate parameters per checkpoint.")
    ap.add_argument("--out", type=Path, default=Path("/tmp/merge-bench"))
    ap.add_argument("--methods", default="linear,ties,dare_ties",
                    help="mergekit methods, and *_paper methods (mixtune only, whole-model scope).")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="Input and output shard size.")
    a = ap.parse_args()
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    layers = max(1, round((a.params - 2 * VOCAB * HIDDEN - HIDDEN) / per_layer))
    n_params = sum(math.prod(s) for _, s in shapes(layers))
    shard_bytes = int(a.shard_gb * 1e9)
    models = [a.out / "base", *(a.out / f"ft{i}" for i in range(3))]
    if not all((m / "config.json").exists() for m in models):
        shutil.rmtree(a.out, ignore_errors=True)
        print(f"writing 4 checkpoints of {n_params / 1e9:.2f}B parameters ({layers} layers, bf16) ...", flush=True)
        for i, m in enumerate(models):
            write_checkpoint(m, layers, seed=100 + i, base_seed=None if i == 0 else 100, shard_bytes=shard_bytes)
    bin_dir = Path(sys.executable).parent
    results = []
    for method in a.methods.split(","):
        doc = {"merge_method": method, "base_model": str(models[0]),
               "models": [{"model": str(m), "parameters": {"weight": 1.0} | ({"density": 0.5} if method != "linear"
                                                                           else {})} for m in models[1:]]}
        if method == "linear":
            doc = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                        for m in models[1:]]}
        if method == "dare_ties":
            doc["random_seed"] = 0
        paper = method.endswith("_paper")  # mixtune only: the paper's whole-model scope, no mergekit equivalent
        if paper:
            doc = {"method": method, "base_model": str(models[0]), "models": [{"model": str(m)} for m in models[1:]],
                   "parameters": {"density": 0.5}}
        cfg = a.out / f"{method}.yaml"
        cfg.write_text(json.dumps(doc))  # JSON is YAML
        row = {"method": method}
        tools = [("mergekit", [str(bin_dir / "mergekit-yaml"), str(cfg), str(a.out / f"mk-{method}"),
                               "--out-shard-size", str(shard_bytes)]),
                 ("mixtune", [str(bin_dir / "mixtune"), "merge", str(cfg), "-o", str(a.out / f"mx-{method}"),
                              f"max_shard_size={shard_bytes}"])]
        if paper:
            row |= {"mergekit_s": math.nan, "mergekit_rss_gib": math.nan, "mergekit_anon_gib": math.nan}
            tools = tools[1:]
        for tool, cmd in tools:
            shutil.rmtree(Path(cmd[-2] if tool == "mixtune" else cmd[3]), ignore_errors=True)
            row[f"{tool}_s"], row[f"{tool}_rss_gib"], row[f"{tool}_anon_gib"] = timed(cmd)
            print(f"{method:10s} {tool:9s} {row[f'{tool}_s']:7.1f} s  peak RSS {row[f'{tool}_rss_gib']:.2f} GiB "
                  f"(anonymous {row[f'{tool}_anon_gib']:.2f})", flush=True)
        inputs = models if method != "linear" else models[1:]
        row["io_floor_s"] = io_floor(inputs, folder_bytes(a.out / f"mx-{method}"), a.out / "scratch.bin")
        for prefix in ("mk", "mx"):
            shutil.rmtree(a.out / f"{prefix}-{method}", ignore_errors=True)
        results.append(row)
    print(f"\n{n_params / 1e9:.2f}B parameters per checkpoint, 3 fine-tunes + base, bf16, {os.cpu_count()} CPUs\n")
    print("| method | mergekit s | mixtune s | speed-up | peak RSS GiB (mergekit / mixtune) | "
          "anonymous GiB (mergekit / mixtune) | I/O floor s | mixtune / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['mergekit_s']:.1f} | {r['mixtune_s']:.1f} | {r['mergekit_s'] / r['mixtune_s']:.2f}x "
              f"| {r['mergekit_rss_gib']:.2f} / {r['mixtune_rss_gib']:.2f} | "
              f"{r['mergekit_anon_gib']:.2f} / {r['mixtune_anon_gib']:.2f} | {r['io_floor_s']:.1f} | "
              f"{r['mixtune_s'] / r['io_floor_s']:.1f}x |")
    (a.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
