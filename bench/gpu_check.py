"""The prepared GPU check (issue #20): one JSON of figures from one GPU, in at most 8 minutes.

Parts, each in its own process with its own time budget (an error or a timeout is written into the
JSON and the other parts still run):

- ``train_*``: training tokens/s and MFU of a ~0.5B Llama-shaped model (random init from a local
  ``LlamaConfig``: hidden 1024, 24 layers, MLP 4096, vocabulary 32,000; nothing downloaded) on
  synthetic packed data, in bf16 autocast (fp32 weights, AdamW), through **mixtune's loop**
  (:func:`mixtune.train.loop.train`), **HF Trainer** on the very same packed rows (position ids
  restarting per example, no attention mask, so the same block-diagonal attention), and **TRL's
  SFTTrainer** (``packing=True``) on the same examples, which it packs itself. Same steps, same
  rows per step (micro-batch and accumulation), same sequence length, same attention kernel; timed
  over steps ``warmup..steps`` from inside each loop, after a CUDA synchronise. The figure is real
  (non-padding) tokens per second. MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s, the peak
  taken from the GPU's name (spec-sheet dense figures, :data:`PEAK_BF16`) or ``GPU_CHECK_PEAK_FLOPS``;
  the JSON says which.
- ``generate``: batched greedy generation (:func:`mixtune.models.generate.generate`) with the same
  0.5B model in bf16: generated tokens per second.
- ``merge``: ``mixtune merge`` (linear and TIES) of synthetic 1B bf16 checkpoints written by
  ``bench/merge_checkpoints.py``: seconds and GB/s (bytes read + written over the seconds).
- ``smoke_*``: ``accelerate launch --config_file`` each shipped FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3
  config with one process, ``mixtune train`` on a small recipe: seconds, final loss, export written.

``--dry`` (or ``GPU_CHECK_DRY=1``) runs every part on CPU at a tiny size in well under a minute and
writes the same keys with ``"dry": true`` (tests/test_gpu_check.py runs it in CI). DeepSpeed needs
CUDA, so its smoke runs are recorded as not available there.

    bash bench/gpu_check.sh [OUT.json]          # installs what is missing, then runs this
    python bench/gpu_check.py [--dry] [--out OUT.json] [--parts train_mixtune,merge,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # merge_checkpoints

TOTAL_BUDGET_S = 480
"""The whole check, installs included (gpu_check.sh passes its start time in GPU_CHECK_T0)."""

# Dense bf16 tensor-core peaks from NVIDIA's spec sheets (FLOP/s, no sparsity), matched in this
# order against torch.cuda.get_device_name(); first match wins.
PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12),
]


@dataclass(frozen=True)
class Size:
    """Everything the parts' sizes depend on, for the GPU run and the dry run."""

    hidden: int
    layers: int
    heads: int
    inter: int
    vocab: int
    seq_len: int
    batch: int
    """Packed rows per optimizer step."""
    micro: int
    """Rows per forward pass (accumulation = batch / micro)."""
    steps: int
    warmup: int
    """Steps before timing starts."""
    min_len: int
    max_len: int
    """Synthetic example lengths, uniform in [min_len, max_len]."""
    gen_prompts: int
    gen_prompt_len: int
    gen_new: int
    gen_batch: int
    merge_params: float
    merge_hidden: int
    merge_vocab: int
    smoke_model: str
    smoke_steps: int


GPU = Size(hidden=1024, layers=24, heads=16, inter=4096, vocab=32000, seq_len=2048, batch=16, micro=8, steps=30,
           warmup=5, min_len=64, max_len=1024, gen_prompts=256, gen_prompt_len=128, gen_new=128, gen_batch=128,
           merge_params=1e9, merge_hidden=2048, merge_vocab=32000, smoke_model="builtin:small", smoke_steps=8)
DRY = Size(hidden=64, layers=2, heads=4, inter=128, vocab=512, seq_len=128, batch=4, micro=2, steps=4, warmup=1,
           min_len=16, max_len=64, gen_prompts=8, gen_prompt_len=8, gen_new=8, gen_batch=4,
           merge_params=3e5, merge_hidden=64, merge_vocab=512, smoke_model="builtin:tiny", smoke_steps=2)

# part -> seconds it may take on the GPU (the sum stays under TOTAL_BUDGET_S with the installs)
BUDGETS = {"train_mixtune": 60, "train_mixtune_liger": 45, "train_hf_trainer": 60, "train_trl": 70, "generate": 35,
           "merge": 90, "smoke_fsdp2": 40, "smoke_zero2": 40, "smoke_zero3": 40}
ATTN = os.environ.get("GPU_CHECK_ATTN", "sdpa")
"""The attention kernel every trainer uses (``sdpa``; ``flash_attention_2`` where it is installed)."""


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- data


def tokenizer(vocab: int):
    """A word-level tokenizer of exactly ``vocab`` ids ("w4" ... ), built here: ids decode and encode
    back one to one, so generated tokens can be counted from the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mixtune.models.tiny import CHAT_TEMPLATE

    special = ["<|bos|>", "<|end|>", "<|pad|>", "<unk>"]
    words = {t: i for i, t in enumerate(special)} | {f"w{i}": i for i in range(len(special), vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE,
                                   padding_side="left")


def examples(s: Size, n_tokens: int):
    """Synthetic SFT examples (seeded): random ids, the first quarter a prompt (labels -100), about
    ``n_tokens`` tokens in all."""
    import numpy as np

    from mixtune.data.format import Example

    rng = np.random.default_rng(0)
    out, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(s.min_len, s.max_len + 1))
        ids = rng.integers(4, s.vocab, size=n).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * (n // 4) + ids[n // 4:]))
        total += n
    return out


def packed_data(s: Size, tok):
    """Exactly ``steps x batch`` packed rows (one epoch: each row once) and the examples in them."""
    import dataclasses

    from mixtune.data.format import pack

    rows = s.steps * s.batch
    exs = examples(s, int(rows * s.seq_len * 1.03))
    packed = pack(exs, s.seq_len, pad_id=tok.pad_token_id)
    if packed.input_ids.shape[0] < rows:
        raise RuntimeError(f"{packed.input_ids.shape[0]} packed rows, fewer than steps x batch = {rows}")
    fields = ("input_ids", "labels", "position_ids", "source_ids", "example_ids")
    packed = dataclasses.replace(packed, **{f: getattr(packed, f)[:rows] for f in fields})
    kept = sorted(set(packed.example_ids.unique().tolist()) - {-1})  # an example lies in one row, never split
    return [exs[i] for i in kept], packed


def model(s: Size, tok, dtype=None):
    """A randomly initialised Llama-shaped causal LM of ``s``, made on the GPU when there is one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.heads, intermediate_size=s.inter, vocab_size=s.vocab,
                      max_position_embeddings=max(4096, s.seq_len), tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      attn_implementation=ATTN)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu() else "cpu"):
        m = LlamaForCausalLM(cfg)
    return m.to(dtype) if dtype is not None else m


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ training


def precision() -> str:
    return "bf16" if on_gpu() else "fp32"  # CPU bf16 is emulated on many CPUs; the dry run checks code, not speed


def figures(per_step: float, seconds: float, params: int, s: Size) -> dict:
    """Figures of ``steps - warmup`` timed steps of ``per_step`` real tokens each, in ``seconds``."""
    tokens = per_step * (s.steps - s.warmup)
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": per_step, "timed_steps": s.steps - s.warmup,
            "timed_seconds": seconds, "params": params, "mfu": 6 * params * tokens / seconds / peak_flops()[0]}


def part_train_mixtune(s: Size, tmp: Path, **overrides) -> dict:
    from mixtune.core import validate
    from mixtune.train.config import RunOptions, TrainConfig
    from mixtune.train.loop import StageData, make_accelerator, train

    tok = tokenizer(s.vocab)
    _, packed = packed_data(s, tok)
    m = model(s, tok)
    cfg = validate(TrainConfig, {"lr": 1e-4, "steps": s.steps, "batch_size": s.batch, "micro_batch_size": s.micro,
                                 "precision": precision(), "warmup": 0.0, "schedule": "constant"} | overrides)
    marks: dict[int, float] = {}

    def mark(step: int) -> None:
        if step in (s.warmup, s.steps):
            sync()
            marks[step] = time.perf_counter()

    train(m, tok, [StageData("bench", packed, s.steps, 1e-4, "constant")], cfg, tmp / "out", source_names=["all"],
          options=RunOptions(log_every=10**6), accelerator=make_accelerator(cfg.precision), progress=False,
          resume=False, on_step=mark)
    per_step = packed.n_tokens / packed.input_ids.shape[0] * s.batch  # every row is used once
    return figures(per_step, marks[s.steps] - marks[s.warmup], n_params(m), s) | {"rows": packed.input_ids.shape[0]}


def part_train_mixtune_liger(s: Size, tmp: Path) -> dict:
    """mixtune with ``train.fused_loss: liger`` (Liger's fused linear cross-entropy): the same run otherwise."""
    return part_train_mixtune(s, tmp, fused_loss="liger")


def clock(s: Size):
    """A Trainer callback keeping the time at the ends of steps ``warmup`` and ``steps``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        marks: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (s.warmup, s.steps):
                sync()
                self.marks[state.global_step] = time.perf_counter()

    return Clock()


def common_args(s: Size, tmp: Path) -> dict:
    gpu = on_gpu()
    return dict(output_dir=str(tmp / "out"), per_device_train_batch_size=s.micro,
                gradient_accumulation_steps=s.batch // s.micro, max_steps=s.steps, learning_rate=1e-4,
                lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, report_to=[],
                logging_steps=10**6, save_strategy="no", use_cpu=not gpu, bf16=gpu, disable_tqdm=True,
                dataloader_num_workers=0, remove_unused_columns=False, seed=0,
                gradient_checkpointing=False)  # TRL's SFTConfig turns it on by default; mixtune's loop has it off


def part_train_hf_trainer(s: Size, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    tok = tokenizer(s.vocab)
    _, packed = packed_data(s, tok)
    rows = [{"input_ids": packed.input_ids[i], "labels": packed.labels[i], "position_ids": packed.position_ids[i],
             "real": int((packed.example_ids[i] >= 0).sum())} for i in range(packed.input_ids.shape[0])]
    ds = Dataset.from_list([{k: (v.tolist() if k != "real" else v) for k, v in r.items()} for r in rows])
    counted: list[int] = []

    def collate(batch):  # the packed rows as they are; no attention mask, so attention stays within examples
        counted.append(sum(b.pop("real") for b in batch))
        return default_data_collator(batch)

    m = model(s, tok)
    c = clock(s)
    Trainer(model=m, args=TrainingArguments(**common_args(s, tmp)), train_dataset=ds, data_collator=collate,
            callbacks=[c]).train()
    per_row = sum(counted) / (len(counted) * s.micro)  # the rows of steps warmup..steps: the mean of all of them
    return figures(per_row * s.batch, c.marks[s.steps] - c.marks[s.warmup], n_params(m), s) | {"rows": len(ds)}


def part_train_trl(s: Size, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer(s.vocab)
    exs, _ = packed_data(s, tok)  # the same examples; TRL packs them itself (best fit decreasing)
    ds = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]}
                            for e in exs])
    m = model(s, tok)
    c = clock(s)
    cfg = SFTConfig(**common_args(s, tmp), packing=True, max_length=s.seq_len, completion_only_loss=True)
    trainer = SFTTrainer(model=m, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[c])
    lens = [len(r) for r in trainer.train_dataset["input_ids"]]
    trainer.train()
    return figures(sum(lens) / len(lens) * s.batch, c.marks[s.steps] - c.marks[s.warmup], n_params(m), s) \
        | {"rows": len(lens)}


# ----------------------------------------------------------------------------------------- generation


def part_generate(s: Size, tmp: Path) -> dict:
    import numpy as np
    import torch

    from mixtune.models.generate import generate

    tok = tokenizer(s.vocab)
    m = model(s, tok, dtype=torch.bfloat16 if on_gpu() else torch.float32)
    rng = np.random.default_rng(1)
    prompts = ["<|bos|> " + " ".join(f"w{i}" for i in rng.integers(4, s.vocab, size=s.gen_prompt_len))
               for _ in range(s.gen_prompts)]
    generate(m, tok, prompts[:s.gen_batch], max_new_tokens=4, batch_size=s.gen_batch)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = generate(m, tok, prompts, max_new_tokens=s.gen_new, batch_size=s.gen_batch)
    sync()
    seconds = time.perf_counter() - t0
    made = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in out)
    return {"tokens_per_s": made / seconds, "generated_tokens": made, "seconds": seconds, "prompts": len(prompts),
            "prompt_tokens": s.gen_prompt_len + 1, "max_new_tokens": s.gen_new, "batch_size": s.gen_batch,
            "dtype": str(next(m.parameters()).dtype).removeprefix("torch."), "params": n_params(m)}


# --------------------------------------------------------------------------------------------- merge


def part_merge(s: Size, tmp: Path) -> dict:
    import yaml

    from merge_checkpoints import dims_for, folder_bytes, n_params as ckpt_params, write_checkpoint

    d = dims_for(s.merge_params, s.merge_hidden, s.merge_vocab)
    t0 = time.perf_counter()
    models = [tmp / "base", tmp / "ft0", tmp / "ft1"]
    for i, f in enumerate(models):
        write_checkpoint(f, d, seed=100 + i, base_seed=None if i == 0 else 100, shard_bytes=2 * 10**9)
    out = {"params": ckpt_params(d), "layers": d.layers, "hidden": d.hidden, "inputs": len(models),
           "write_inputs_s": time.perf_counter() - t0}
    docs = {"linear": {"merge_method": "linear",
                       "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in models[1:]]},
            "ties": {"merge_method": "ties", "base_model": str(models[0]),
                     "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in models[1:]]}}
    for method, doc in docs.items():
        cfg, dest = tmp / f"{method}.yaml", tmp / f"merged-{method}"
        cfg.write_text(yaml.safe_dump(doc))
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "mixtune.cli", "merge", str(cfg), "-o", str(dest)],
                             capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if run.returncode != 0:
            raise RuntimeError(f"mixtune merge ({method}) failed: {tail(run.stderr)}")
        read = sum(folder_bytes(f) for f in (models if "base_model" in doc else models[1:]))
        written = folder_bytes(dest)
        out[method] = {"seconds": seconds, "read_gb": read / 1e9, "written_gb": written / 1e9,
                       "gb_per_s": (read + written) / 1e9 / seconds}
        shutil.rmtree(dest)
    return out


# ---------------------------------------------------------------------------------------- smoke runs

SMOKE_RECIPE = """\
model: {model}
sources:
  math: {{builtin: math, n: 200}}
  code: {{builtin: code, n: 200}}
format: {{seq_len: 256}}
mixture: {{sources: {{math: {{}}, code: {{}}}}}}
train: {{lr: 1.0e-3, steps: {steps}, batch_size: 8, micro_batch_size: 4, precision: {precision}}}
run: {{log_every: 1}}
"""


def smoke(config: str, s: Size, tmp: Path) -> dict:
    """``accelerate launch --config_file CONFIG --num_processes 1 -m mixtune.cli train`` on a small recipe."""
    configs = REPO / "src" / "mixtune" / "recipes" / "accelerate"
    path = configs / f"{config}.yaml"
    if not path.exists() or not (REPO / "src" / "mixtune" / "train" / "sharding.py").exists():
        return {"available": False, "reason": f"not available: {path.relative_to(REPO)} is not in this checkout"}
    if config.startswith("zero"):
        import importlib.util

        if not on_gpu():
            return {"available": False, "reason": "not available: DeepSpeed needs CUDA (CPU run)"}
        if importlib.util.find_spec("deepspeed") is None:
            return {"available": False, "reason": "not available: deepspeed is not installed"}
    recipe = tmp / "smoke.yaml"
    recipe.write_text(SMOKE_RECIPE.format(model=s.smoke_model, steps=s.smoke_steps, precision=precision()))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--num_processes", "1",
           "--num_machines", "1", "-m", "mixtune.cli", "train", str(recipe), "--out", str(tmp / "run")]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"accelerate launch --config_file {path.name} ... failed (rc {run.returncode}): "
                           f"{tail(run.stderr + run.stdout)}")
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    export = tmp / "run" / "stages" / "mixture"
    if not (export / "config.json").exists():
        raise RuntimeError(f"no exported model in {export}")
    stage_line = next((ln.strip() for ln in (run.stderr + run.stdout).splitlines() if "process(es)" in ln), "")
    return {"available": True, "seconds": seconds, "steps": len(losses), "first_loss": losses[0],
            "final_loss": losses[-1], "export_bytes": sum(f.stat().st_size for f in export.glob("*.safetensors")),
            "stage_line": stage_line, "config": str(path.relative_to(REPO))}


def part_smoke_fsdp2(s: Size, tmp: Path) -> dict:
    return smoke("fsdp2", s, tmp)


def part_smoke_zero2(s: Size, tmp: Path) -> dict:
    return smoke("zero2", s, tmp)


def part_smoke_zero3(s: Size, tmp: Path) -> dict:
    return smoke("zero3", s, tmp)


PARTS = {name: globals()[f"part_{name}"] for name in BUDGETS}

# ------------------------------------------------------------------------------------------ machinery


def tail(text: str, n: int = 600) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-6:])[-n:] if lines else "(no output)"


def peak_for(name: str) -> tuple[float, str]:
    """The spec-sheet dense bf16 peak of the GPU called ``name`` (first match in :data:`PEAK_BF16`)."""
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"spec sheet, dense bf16, matched {key!r} in {name!r}"
    raise RuntimeError(f"no peak bf16 FLOP/s known for {name!r}: set GPU_CHECK_PEAK_FLOPS")


def peak_flops() -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it came from: ``GPU_CHECK_PEAK_FLOPS``, the spec table by GPU name,
    or (no GPU: the dry run) a plain fp32 matmul measured here."""
    env = os.environ.get("GPU_CHECK_PEAK_FLOPS")
    if env:
        return float(env), "env GPU_CHECK_PEAK_FLOPS"
    import torch

    if torch.cuda.is_available():
        return peak_for(torch.cuda.get_device_name(0))
    global _CPU_PEAK
    if _CPU_PEAK is None:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        _CPU_PEAK = 2 * 512**3 * 10 / (time.perf_counter() - t)
    return _CPU_PEAK, "measured fp32 matmul 512^3 on CPU (dry run: not a GPU figure)"


_CPU_PEAK: float | None = None


def machine() -> dict:
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    gpu = torch.cuda.is_available()
    out = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "gpu_count": torch.cuda.device_count(),
           "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else None,
           "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "attention": ATTN}
    out |= {pkg: version(pkg) for pkg in ("torch", "transformers", "accelerate", "trl", "deepspeed", "mixtune")}
    try:
        out["peak_flops"], out["peak_flops_source"] = peak_flops()
    except RuntimeError as e:
        out["peak_flops"], out["peak_flops_source"] = None, str(e)
    out["measured_bf16_matmul_flops"] = matmul_flops() if gpu else None  # what this GPU reaches (MFU uses the peak)
    return out


def matmul_flops(n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a plain bf16 n^3 matmul on the GPU, as a reference beside the spec-sheet peak."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * n**3 * reps / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return flops


def run_here(name: str, s: Size) -> dict:
    """One part in this process; an exception becomes ``{"error": ...}``."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    try:
        result = PARTS[name](s, tmp)
    except Exception as e:  # noqa: BLE001 - the check records every failure and goes on
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:1500]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result | {"wall_s": time.perf_counter() - t0}


def run_isolated(name: str, dry: bool, budget: float) -> dict:
    """One part in a fresh process (accelerate's state and GPU memory are per process), killed after ``budget`` s."""
    import signal

    with tempfile.TemporaryDirectory() as d:
        result_file, log = Path(d) / "result.json", Path(d) / "stderr.txt"
        cmd = [sys.executable, __file__, "--part", name, "--result", str(result_file)] + (["--dry"] if dry else [])
        t0 = time.perf_counter()
        with log.open("w") as err:
            # a session of its own, so that a timeout also ends what the part started (merge, accelerate launch)
            proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"error": f"timed out after its budget of {budget:.0f} s: {tail(log.read_text())}",
                        "wall_s": time.perf_counter() - t0}
        if rc != 0 or not result_file.exists():
            return {"error": f"part process failed (rc {rc}): {tail(log.read_text())}",
                    "wall_s": time.perf_counter() - t0}
        return json.loads(result_file.read_text())


def summary(report: dict) -> dict:
    """Ratios and the issue's targets (on an H200: MFU >= 40% for the 0.5B model, >= 1.3x TRL's tokens/s)."""
    parts = report["parts"]
    mx, trl, hf = (parts.get(k, {}) for k in ("train_mixtune", "train_trl", "train_hf_trainer"))
    out: dict = {}
    if "tokens_per_s" in mx and "tokens_per_s" in trl:
        out["mixtune_vs_trl"] = mx["tokens_per_s"] / trl["tokens_per_s"]
    liger = parts.get("train_mixtune_liger", {})
    if "tokens_per_s" in liger and "tokens_per_s" in trl:
        out["mixtune_liger_vs_trl"] = liger["tokens_per_s"] / trl["tokens_per_s"]
    if "tokens_per_s" in mx and "tokens_per_s" in hf:
        out["mixtune_vs_hf_trainer"] = mx["tokens_per_s"] / hf["tokens_per_s"]
    real = not report["dry"]  # the targets are an H200's; a dry run's CPU figures say nothing about them
    out["target_mfu_0p4_met"] = mx["mfu"] >= 0.40 if real and "mfu" in mx else None
    out["target_vs_trl_1p3_met"] = out["mixtune_vs_trl"] >= 1.3 if real and "mixtune_vs_trl" in out else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                    help="tiny sizes on CPU, in-process, under a minute (also GPU_CHECK_DRY=1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON to write (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    s = DRY if args.dry else GPU
    if args.part:  # a child process: one part, its result to --result
        args.result.write_text(json.dumps(run_here(args.part, s)))
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"gpu_check: --parts {','.join(unknown)}: unknown (parts: {', '.join(PARTS)})")
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json"))
    t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
    report = {"dry": args.dry, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
              "machine": machine(), "size": asdict(s), "parts": {}}
    if not args.dry and not on_gpu():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); the figures are CPU ones. "
              "Use --dry for the quick CPU run.", file=sys.stderr)
    for name in parts:
        left = TOTAL_BUDGET_S - (time.time() - t0) - 5
        if args.dry:
            result = run_here(name, s)
        elif left < 10:
            result = {"error": f"skipped: the check's {TOTAL_BUDGET_S} s were spent"}
        else:
            result = run_isolated(name, False, min(BUDGETS[name], left))
        report["parts"][name] = result
        shown = {k: v for k, v in result.items() if not isinstance(v, dict)}
        print(f"gpu_check {name}: {json.dumps(shown)[:400]}", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report | {"summary": summary(report)}, indent=2))  # what is done so far
    report["summary"] = summary(report)
    report["seconds"] = time.time() - t0
    out.write_text(json.dumps(report, indent=2))
    print(f"gpu_check: wrote {out} ({report['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
