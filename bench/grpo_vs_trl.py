"""GRPO throughput: mixtune's grpo stage vs TRL's GRPOTrainer, in policy-update steps per second.

Same model, same prompts (the built-in maths problems, difficulty 1, rendered by the same chat
template), same reward (the maths ability's exact scorer), same group size G, prompts per step P,
completion budget T, temperature 1.0, KL coefficient beta, lr (constant, AdamW, clip 1.0), fp32,
one process, the same torch threads. One optimizer step on either side is one fresh generation of
P x G completions, one policy forward and backward on them (plus a reference forward when
beta > 0) and one update: mixtune's ``objective: {name: grpo}`` stage with train.batch_size =
micro_batch_size = P x G; TRL with per_device_train_batch_size = P x G, gradient accumulation 1,
so steps_per_generation = 1 and generation_batch_size = P x G, num_iterations = 1, loss_type
"grpo" (mixtune's "sequence" aggregation) and the plain k3 KL (use_bias_correction_kl=False).
Each side runs in its own process, one after the other; each step is timed from the loop's own
step hook (mixtune's on_step, TRL's on_step_end), the first WARMUP steps left out. Completion
lengths are sampled, so they differ between the sides; the table gives each side's mean, and
time per step grows with it.

    .venv/bin/python bench/grpo_vs_trl.py [--steps 12] [--group 8] [--prompts 8] [--max-new-tokens 64]
        [--beta 0.04] [--lr 1e-5] [--model PATH] [--only mixtune|trl] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mixtune.builtin import init_builtin  # noqa: E402
from mixtune.data.abilities import ABILITIES  # noqa: E402

WARMUP = 1  # steps left out of the timing (first generation, allocator and kernel warm-up)
SIDES = {"mixtune": "mixtune grpo stage", "trl": "TRL GRPOTrainer"}


def problems(n: int) -> list[dict]:
    return ABILITIES.get("math").generate(n, seed=0, split="train", difficulty=1)


def per_step(stamps: dict[int, float], steps: int) -> list[float]:
    """Seconds of each step after the warm-up, from the stamps taken after each optimizer step."""
    return [stamps[s] - stamps[s - 1] for s in range(WARMUP + 1, steps + 1)]


def run_mixtune(model: Path, a, n_prompts: int, tmp: Path) -> dict:
    from mixtune.core import validate
    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    rows = a.prompts * a.group
    objective = {"name": "grpo", "group": a.group, "prompts": a.prompts, "beta": a.beta,
                 "sampling": {"max_new_tokens": a.max_new_tokens, "temperature": 1.0, "batch_size": rows}}
    recipe = validate(Recipe, {
        "model": str(model), "load": {"dtype": "fp32"},
        "sources": {"math": {"builtin": "math", "n": n_prompts, "seed": 0, "split": "train", "difficulty": 1}},
        "stages": [{"name": "grpo", "mixture": {"sources": {"math": None}}, "steps": a.steps, "objective": objective}],
        "train": {"lr": a.lr, "schedule": "constant", "warmup": 0.0, "batch_size": rows, "micro_batch_size": rows,
                  "precision": "fp32", "max_grad_norm": 1.0, "weight_decay": 0.0},
        "run": {"log_every": 1, "save_every": 0},  # one log line a step: its mean completion length and reward
    })
    stamps: dict[int, float] = {}
    run_training(recipe, tmp, tmp / "out", resume=False, progress=False,
                 on_step=lambda s: stamps.setdefault(s, time.perf_counter()))
    log = [json.loads(line) for line in (tmp / "out" / "log.jsonl").read_text().splitlines()]
    timed = [e for e in log if e.get("stage") == "grpo" and e.get("stage_step", 0) > WARMUP]
    return {"step_s": per_step(stamps, a.steps), "completion_tokens": [e["completion_tokens"] for e in timed],
            "reward": [e["reward"] for e in timed]}


def run_trl(model: Path, a, n_prompts: int, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mixtune.models import LoadConfig, load_model

    policy, tok = load_model(model, load=LoadConfig(dtype="fp32"))
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "answer": r["answer"]} for r in problems(n_prompts)])
    math = ABILITIES.get("math")
    lengths: list[float] = []
    rewards: list[float] = []  # per generation (= per step here), the mean over its completions

    def reward(prompts, completions, completion_ids, answer, **kw):
        out = [math.score(c[0]["content"], {"answer": g}) for c, g in zip(completions, answer)]
        lengths.append(statistics.mean(len(ids) for ids in completion_ids))
        rewards.append(statistics.mean(out))
        return out

    stamps: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.setdefault(state.global_step, time.perf_counter())

    rows = a.prompts * a.group
    cfg = GRPOConfig(output_dir=str(tmp / "out"), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                     num_generations=a.group, num_iterations=1, max_completion_length=a.max_new_tokens,
                     temperature=1.0, top_p=1.0, top_k=0, beta=a.beta, loss_type="grpo", epsilon=0.2,
                     scale_rewards="group", use_bias_correction_kl=False, mask_truncated_completions=False,
                     learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     weight_decay=0.0, optim="adamw_torch", max_steps=a.steps, logging_strategy="no",
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, use_vllm=False,
                     log_completions=False, disable_tqdm=True, dataloader_num_workers=0,
                     remove_unused_columns=False, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    assert cfg.steps_per_generation == 1 and cfg.generation_batch_size == rows  # one generation per step
    trainer.train()
    return {"step_s": per_step(stamps, a.steps), "completion_tokens": lengths[WARMUP:a.steps],
            "reward": rewards[WARMUP:a.steps]}


def measure(side: str, a) -> dict:
    """One side, in this (fresh) process: accelerate's state is process-wide, and Trainer would
    otherwise change it under the next side."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    model = Path(a.model) if a.model else init_builtin(tmp / "base", size="tiny", seed=0)
    n_prompts = max(a.prompts * a.steps, 64)  # a step's prompts are fresh ones on both sides
    got = (run_mixtune if side == "mixtune" else run_trl)(model, a, n_prompts, tmp)
    med = statistics.median(got["step_s"])
    return {"side": side, "median_s": med, "steps_per_s": 1 / med, "threads": torch.get_num_threads(),
            "completion_tokens_mean": statistics.mean(got["completion_tokens"]),
            "reward_mean": statistics.mean(got["reward"])} | got


def main() -> None:
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help=f"optimizer steps per side (the first {WARMUP} untimed)")
    ap.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--prompts", type=int, default=8, help="P, prompts per optimizer step")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="T, completion budget")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference model)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--model", help="a local Hugging Face Llama folder (default: the built-in tiny model)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    ap.add_argument("--only", choices=list(SIDES), help="run one side")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--one", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= WARMUP:
        ap.error(f"--steps must be more than the {WARMUP} warm-up step(s)")
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    print(f"model {args.model or 'built-in tiny'}; P={args.prompts} prompts x G={args.group} completions a step, "
          f"T={args.max_new_tokens}, beta {args.beta}, lr {args.lr}; {args.steps} steps a side, timed from step "
          f"{WARMUP + 1}; torch threads {args.threads}", flush=True)
    passed = [f"--steps={args.steps}", f"--group={args.group}", f"--prompts={args.prompts}",
              f"--max-new-tokens={args.max_new_tokens}", f"--beta={args.beta}", f"--lr={args.lr}",
              f"--threads={args.threads}", *([f"--model={args.model}"] if args.model else [])]
    results: dict[str, dict] = {}
    for side in [args.only] if args.only else list(SIDES):  # one after the other, never together
        out = subprocess.run([sys.executable, __file__, *passed, "--one", side],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {side} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[side]
        print(f"  {SIDES[side]}: " + ", ".join(f"{s:.2f}" for s in r["step_s"]) + " s/step", flush=True)
    print("\n| side | s/step (median) | steps/s | mean completion tokens | mean reward | timed steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, r in results.items():
        print(f"| {SIDES[side]} | {r['median_s']:.3f} | {r['steps_per_s']:.3f} | {r['completion_tokens_mean']:.1f} | "
              f"{r['reward_mean']:.3f} | {len(r['step_s'])} |")
    if len(results) == 2:
        ratio = results["mixtune"]["steps_per_s"] / results["trl"]["steps_per_s"]
        print(f"\nmixtune / TRL steps per second: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items() if k != "one"},
                                        "warmup": WARMUP, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
