"""Training throughput: mixtune's packed loop vs Hugging Face Trainer (and TRL's SFTTrainer if installed).

Same model, same data (the built-in suite's variable-length chat examples), same optimizer
(AdamW, lr 1e-3, clip 1.0), fp32, one process. Each trainer runs the same number of steps at about
the same number of real tokens per step; the figure is **real (non-padding) tokens per second**
over steps WARMUP..STEPS, timed from inside each loop. The plain-matmul peak is measured in the
same run, and each trainer's achieved model FLOP/s is quoted against it (6 x parameters per token,
plus attention).

    .venv/bin/python bench/train_throughput.py [--size tiny|small] [--steps 40] [--repeats 3]
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
from mixtune.core import validate  # noqa: E402
from mixtune.data.abilities import ABILITIES  # noqa: E402
from mixtune.data.format import pack, tokenize_records  # noqa: E402
from mixtune.models import load_model  # noqa: E402
from mixtune.train.config import RunOptions, TrainConfig  # noqa: E402
from mixtune.train.loop import StageData, make_accelerator, train  # noqa: E402

WARMUP = 5
SEQ_LEN = 256  # a few times the longest example (159 tokens); attention cost grows with the row length
ROWS = 16  # packed rows per step for mixtune: 4,096 token slots
TRL_STEPS = 12  # TRL's packed steps are ~10 s each here; it is timed over steps WARMUP..TRL_STEPS


def examples(tokenizer, n=3000):
    recs = [r for name in ABILITIES for r in ABILITIES.get(name).generate(n // 3, seed=1, difficulty=2)]
    return tokenize_records(recs, tokenizer)


def run_mixtune(base: Path, exs, steps: int, tmp: Path) -> float:
    model, tok = load_model(base)
    packed = pack(exs, SEQ_LEN, pad_id=tok.pad_token_id)
    cfg = validate(TrainConfig, {"lr": 1e-3, "steps": steps, "batch_size": ROWS, "micro_batch_size": ROWS,
                                 "precision": "fp32", "warmup": 0.0})
    marks = {}
    train(model, tok, [StageData("bench", packed, steps, 1e-3, "constant")], cfg, tmp, source_names=["all"],
          options=RunOptions(log_every=10**6), accelerator=make_accelerator("fp32"), progress=False, resume=False,
          on_step=lambda s: marks.setdefault(s, time.perf_counter()))
    tokens_per_step = packed.n_tokens / packed.input_ids.shape[0] * ROWS
    return tokens_per_step * (steps - WARMUP) / (marks[steps] - marks[WARMUP])


def run_trainer(base: Path, exs, steps: int, tmp: Path, *, flatten: bool) -> float:
    from datasets import Dataset
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback,
                              TrainingArguments)

    model, tok = load_model(base)
    ds = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in exs])
    mean_len = sum(len(e.input_ids) for e in exs) / len(exs)
    per_step = max(1, round(ROWS * SEQ_LEN / mean_len))  # examples per step ~ the same real tokens
    inner = DataCollatorWithFlattening() if flatten else DataCollatorForSeq2Seq(tok, padding="longest")
    counted: list[int] = []

    def collate(batch):
        counted.append(sum(len(b["input_ids"]) for b in batch))
        return inner(batch)

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.setdefault(state.global_step, time.perf_counter())

    args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=per_step, max_steps=steps,
                             learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[],
                             logging_steps=10**6, save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
    return sum(counted[WARMUP:steps]) / (marks[steps] - marks[WARMUP])


def run_trl(base: Path, exs, steps: int, tmp: Path) -> float | None:
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None
    from datasets import Dataset
    from transformers import TrainerCallback

    model, tok = load_model(base)
    ds = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]}
                            for e in exs])
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.setdefault(state.global_step, time.perf_counter())

    cfg = SFTConfig(output_dir=str(tmp), per_device_train_batch_size=ROWS, max_steps=steps, learning_rate=1e-3,
                    lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[], logging_steps=10**6,
                    save_strategy="no", use_cpu=True, disable_tqdm=True, packing=True, max_length=SEQ_LEN,
                    completion_only_loss=True, dataset_kwargs={"skip_prepare_dataset": False}, seed=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    real = sum(len(r) for r in trainer.train_dataset["input_ids"]) / len(trainer.train_dataset)
    trainer.train()
    return real * ROWS * (steps - WARMUP) / (marks[steps] - marks[WARMUP])


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def measure(runner: str, size: str, steps: int) -> float | None:
    """One measurement, in this (fresh) process: accelerate's state is process-wide, and Trainer
    would otherwise change it under the next runner."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp())
    base = init_builtin(tmp / "base", size=size)
    exs = examples(load_model(base)[1])
    if runner == "mixtune":
        return run_mixtune(base, exs, steps, tmp / "out")
    if runner == "trl":
        return run_trl(base, exs, min(steps, TRL_STEPS), tmp / "out")
    return run_trainer(base, exs, steps, tmp / "out", flatten=runner == "trainer_flatten")


RUNNERS = {
    "trainer": "HF Trainer (pad to longest)",
    "mixtune": "mixtune (packed, block-diagonal)",
    "trainer_flatten": "HF Trainer + DataCollatorWithFlattening",
    "trl": "TRL SFTTrainer (packing=True)",
}


def main() -> None:
    import json
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", choices=list(RUNNERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.steps)))
        return
    from transformers import AutoConfig

    tmp = Path(tempfile.mkdtemp())
    base = init_builtin(tmp / "base", size=args.size)
    model, tok = load_model(base)
    n_params, cfg = sum(p.numel() for p in model.parameters()), AutoConfig.from_pretrained(base)
    lens = [len(e.input_ids) for e in examples(tok)]
    print(f"model {args.size}: {n_params:,} parameters; {len(lens)} examples, {min(lens)}-{max(lens)} tokens "
          f"(mean {statistics.mean(lens):.0f}); {args.steps} steps, timed from step {WARMUP}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    results: dict[str, list[float]] = {k: [] for k in RUNNERS}
    peaks = []
    for i in range(args.repeats):  # interleaved, so background load hits every runner alike
        peaks.append(matmul_peak())
        for key in RUNNERS:
            out = subprocess.run([sys.executable, __file__, "--one", key, "--size", args.size, "--steps",
                                  str(args.steps)], capture_output=True, text=True)
            value = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
            if out.returncode != 0:
                print(f"  {key} failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
            if value is not None:
                results[key].append(value)
                print(f"  repeat {i}: {RUNNERS[key]}: {value:,.0f} tokens/s", flush=True)
    peak = statistics.median(peaks)
    # training FLOPs per token: 6 N for the weights plus 6 L T d for attention at mean context T/2
    flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * statistics.mean(lens) / 2 * cfg.hidden_size
    base_tps = statistics.median(results["trainer"])
    print(f"\nplain fp32 matmul peak (1024^3): {peak / 1e9:.1f} GFLOP/s (median of {len(peaks)})")
    print(f"| trainer | real tokens/s (median) | vs Trainer | of matmul peak | runs |")
    print("|---|---:|---:|---:|---|")
    for key, vals in results.items():
        if not vals:
            print(f"| {RUNNERS[key]} | not installed / failed | | | |")
            continue
        med = statistics.median(vals)
        print(f"| {RUNNERS[key]} | {med:,.0f} | {med / base_tps:.2f}x | {med * flops_per_token / peak:.1%} | "
              + ", ".join(f"{v:,.0f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
