"""Generation throughput: batched greedy generation vs one prompt at a time, same model and prompts.

Reports generated tokens per second and checks the two give identical outputs.

    .venv/bin/python bench/eval_throughput.py [--n 96] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mixtune.builtin import init_builtin  # noqa: E402
from mixtune.data.abilities import ABILITIES  # noqa: E402
from mixtune.data.format import prompt_text  # noqa: E402
from mixtune.eval import generate  # noqa: E402
from mixtune.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="prompts (a third each of math, code, general)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model, tok = load_model(init_builtin(Path(tempfile.mkdtemp()) / "m"))
    with torch.no_grad():  # sharper weights: long, varied greedy outputs rather than instant EOS
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    recs = [r for a in ("math", "code", "general") for r in ABILITIES.get(a).generate(args.n // 3, split="test")]
    prompts = [prompt_text(r["messages"], tok) for r in recs]
    rates: dict[str, list[float]] = {"one at a time": [], f"batched ({args.batch_size})": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, bs in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
            t = time.perf_counter()
            out = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs)
            seconds = time.perf_counter() - t
            tokens = sum(len(tok(o, add_special_tokens=False).input_ids) + 1 for o in out)  # + the stop token
            rates[name].append(tokens / seconds)
            outputs[name] = out
    same = outputs["one at a time"] == outputs[f"batched ({args.batch_size})"]
    print(f"{len(prompts)} prompts, up to {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}; "
          f"identical outputs: {same}")
    print("| generation | generated tokens/s (median) | runs |\n|---|---:|---|")
    base = statistics.median(rates["one at a time"])
    for name, vals in rates.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:,.0f} ({med / base:.1f}x) | " + ", ".join(f"{v:,.0f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
