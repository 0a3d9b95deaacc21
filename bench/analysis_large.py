"""Time and peak memory of analysing a 0.5B-parameter model's full checkpoint, streamed per tensor.

Builds, in a child process, a randomly initialised model of Qwen2.5-0.5B's shape (24 blocks, hidden
896, FFN 4864, 14 heads with 2 key-value heads, vocabulary 151,936, tied embeddings: 494M
parameters) and writes it in bf16 as the base; then a "fine-tune" of it: small noise on every
tensor and a rank-8 update of every block's q_proj and v_proj (as a LoRA of rank 8 would make),
also bf16. Then each analysis runs in a child process of its own, which reports its time and its
own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` at its end: the imports, torch included, count):

- ``intruders``: :func:`mixtune.analysis.intruder_table` (k 10, eps 0.3, 0.5, 0.7, 0.9) over
  every 2-D block matrix (168), two SVDs each;
- ``task_vectors``: :func:`mixtune.analysis.task_vector_table` of the fine-tune (and of two
  fine-tunes with ``--models 2``): cosines, norms per block, sign conflicts and mask overlap,
  over every tensor, the 136M-entry embedding included.

    python bench/analysis_large.py [--dir /tmp] [--models 1] [--keep]
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

CONFIG = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True)


def make(folder: Path, models: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**CONFIG), torch_dtype=torch.bfloat16)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M", flush=True)
    model.save_pretrained(folder / "base")
    for i in range(models):
        g = torch.Generator().manual_seed(1 + i)
        tuned = AutoModelForCausalLM.from_pretrained(folder / "base", torch_dtype=torch.bfloat16)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                p.add_((1e-3 * p.float().std() * torch.randn(p.shape, generator=g)).to(p.dtype))
                if name.endswith(("q_proj.weight", "v_proj.weight")):
                    b = torch.randn(p.shape[0], 8, generator=g)
                    a = torch.randn(8, p.shape[1], generator=g)
                    p.add_((0.5 * p.float().norm() * (b @ a) / (b @ a).norm()).to(p.dtype))
        tuned.save_pretrained(folder / f"tuned{i}")
        del tuned


def run(what: str, folder: Path, models: int) -> None:
    from mixtune.analysis import intruder_table, task_vector_table

    t0 = time.perf_counter()
    tuned = [folder / f"tuned{i}" for i in range(models)]
    if what == "intruders":
        rows = intruder_table(folder / "base", tuned[0], k=10, eps=(0.3, 0.5, 0.7, 0.9))
        found = {e: sum(r["intruders"][e] for r in rows) for e in ("0.3", "0.5", "0.7", "0.9")}
        summary = {"matrices": len(rows), "intruders": found,
                   "q_v_at_0.5": sum(r["intruders"]["0.5"] for r in rows if r["module"] in ("q_proj", "v_proj"))}
    else:
        table = task_vector_table(folder / "base", tuned)
        summary = {"norm": table["norm"], "blocks": len(table["layer_norms"][0]),
                   "cosine": table["cosine"], "sign_conflicts": table["sign_conflicts"]}
    print(json.dumps({"what": what, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **summary}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--models", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, folder = args.child
        make(Path(folder), args.models) if what == "make" else run(what, Path(folder), args.models)
        return
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="mixtune-analysis-bench-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; torch threads "
          f"default; folder {folder}")
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--models", str(args.models), "--child", "make", str(folder)],
                       check=True)
        size = sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors"))
        print(f"wrote base and {args.models} fine-tune(s) in {time.perf_counter() - t0:.0f} s; "
              f"each checkpoint {size / 2**30:.2f} GiB (bf16)")
        for what in ("task_vectors", "intruders"):
            subprocess.run([sys.executable, __file__, "--models", str(args.models), "--child", what, str(folder)],
                           check=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
