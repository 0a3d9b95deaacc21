"""Training overhead: mixtune's loop vs a plain PyTorch (+ peft) loop on the same packed rows.

A ~100M-parameter Llama (random init from a transformers config, the built-in tokenizer), the
built-in suite's chat examples packed by mixtune into rows of SEQ_LEN tokens, ROWS rows per
optimizer step, fp32, AdamW (lr 1e-4, clip 1.0), one process. The plain loop takes the same rows
(each step's rows from a seeded permutation), passes the same ``position_ids`` (so attention is
the same block-diagonal computation), computes the token-mean cross-entropy of the shifted labels,
and steps AdamW. LoRA: peft's ``LoraConfig`` with mixtune's defaults (r 8, alpha 16, all linear
layers). Figures are **seconds per optimizer step** over steps WARMUP..STEPS, timed from inside
each loop; each contender runs in a fresh process, the contenders alternate, and the ratio is
mixtune's median over the plain loop's median.

    .venv/bin/python bench/train_overhead.py [--steps 10] [--repeats 3] [--methods full,lora]
    .venv/bin/python bench/train_overhead.py --profile full   # where mixtune's step time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

WARMUP = 2
SEQ_LEN = 128
ROWS = 4
LR = 1e-4
CONFIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
              num_key_value_heads=12, max_position_embeddings=1024, tie_word_embeddings=False)


def build(folder: Path) -> None:
    """The ~100M model, saved once (fp32) with the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixtune.builtin import builtin_tokenizer

    if (folder / "config.json").exists():
        return
    tok = builtin_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **CONFIG)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def packed_rows(tok):
    from mixtune.data.abilities import ABILITIES
    from mixtune.data.format import pack, tokenize_records

    recs = [r for name in ABILITIES for r in ABILITIES.get(name).generate(300, seed=1, difficulty=2)]
    return pack(tokenize_records(recs, tok), SEQ_LEN, pad_id=tok.pad_token_id, long_examples="drop")


def run_mixtune(base: Path, method: str, steps: int, tmp: Path, on_step=None) -> list[float]:
    from mixtune.core import validate
    from mixtune.models import load_model
    from mixtune.train.config import RunOptions, TrainConfig
    from mixtune.train.loop import StageData, make_accelerator, train

    model, tok = load_model(base)
    packed = packed_rows(tok)
    cfg = validate(TrainConfig, {"lr": LR, "steps": steps, "batch_size": ROWS, "micro_batch_size": ROWS,
                                 "precision": "fp32", "warmup": 0.0, "method": {"name": method}})
    marks: dict[int, float] = {}

    def mark(step: int) -> None:
        marks.setdefault(step, time.perf_counter())
        if on_step is not None:
            on_step(step)

    train(model, tok, [StageData("bench", packed, steps, LR, "constant")], cfg, tmp, source_names=["all"],
          options=RunOptions(), accelerator=make_accelerator("fp32"), progress=False, resume=False, on_step=mark)
    return [marks[s + 1] - marks[s] for s in range(WARMUP, steps)]


def run_plain(base: Path, method: str, steps: int, tmp: Path) -> list[float]:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    packed = packed_rows(tok)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    n = packed.input_ids.shape[0]
    order = torch.randperm(n, generator=gen)
    stamps = []
    for step in range(steps):
        lo = (step * ROWS) % n
        if lo + ROWS > n:
            order, lo = torch.randperm(n, generator=gen), 0
        rows = order[lo:lo + ROWS]
        ids, labels, pos = packed.input_ids[rows], packed.labels[rows], packed.position_ids[rows]
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[WARMUP - 1:], stamps[WARMUP:])]


def one(runner: str, method: str, steps: int, base: Path) -> list[float]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_mixtune if runner == "mixtune" else run_plain
        return fn(base, method, steps, Path(tmp))


def profile(method: str, steps: int, base: Path) -> None:
    """cProfile of mixtune's steps after warm-up: the top functions by own time, and the share of the
    step time spent outside the model's forward and backward."""
    import cProfile
    import pstats

    prof = cProfile.Profile()

    def on_step(step: int) -> None:
        if step == WARMUP:
            prof.enable()

    with tempfile.TemporaryDirectory() as tmp:
        run_mixtune(base, method, steps, Path(tmp), on_step=on_step)
    prof.disable()
    stats = pstats.Stats(prof).sort_stats("tottime")
    stats.print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--base", type=Path, default=Path(tempfile.gettempdir()) / "mixtune-bench-100m")
    ap.add_argument("--profile", choices=["full", "lora"], help="profile mixtune's loop for one method and stop")
    ap.add_argument("--one", nargs=2, metavar=("RUNNER", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    build(args.base)
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.base)))
        return
    if args.profile:
        profile(args.profile, args.steps, args.base)
        return
    n_params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        args.base / "model.safetensors").values())
    print(f"model: {n_params / 1e6:.1f}M parameters; {ROWS} rows x {SEQ_LEN} tokens per step; torch threads "
          f"{torch.get_num_threads()}; steps {WARMUP}..{args.steps}")
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for method in args.methods.split(","):
            for runner in ("plain", "mixtune") if r % 2 == 0 else ("mixtune", "plain"):
                out = subprocess.run([sys.executable, __file__, "--one", runner, method, "--steps", str(args.steps),
                                      "--base", str(args.base)], capture_output=True, text=True, check=True)
                per_step = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((method, runner), []).append(statistics.median(per_step))
                print(f"repeat {r + 1} {method:5s} {runner:8s} {statistics.median(per_step):.3f} s/step "
                      f"(steps: {', '.join(f'{x:.2f}' for x in per_step)})", flush=True)
    print("\n| method | plain loop s/step (median) | mixtune s/step (median) | mixtune / plain | repeats (plain; mixtune) |")
    print("|---|---:|---:|---:|---|")
    for method in args.methods.split(","):
        p, m = results[(method, "plain")], results[(method, "mixtune")]
        print(f"| {method} | {statistics.median(p):.3f} | {statistics.median(m):.3f} | "
              f"{statistics.median(m) / statistics.median(p):.3f}x | {', '.join(f'{x:.2f}' for x in p)}; "
              f"{', '.join(f'{x:.2f}' for x in m)} |")


if __name__ == "__main__":
    main()
