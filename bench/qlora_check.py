"""QLoRA check: 2 LoRA steps through mixtune's loop on a 4-bit random Llama (NF4, double quantisation,
bf16 compute), for a GPU session (it runs on a CPU too where bitsandbytes has CPU kernels).

The Llama is built from a transformers config (nothing is downloaded), saved in bf16 with the
built-in tokenizer and loaded with ``load: {quantization: 4bit}``. It prints the share of
parameters that train, the loss before and after on the training batch, the logged loss, the
dtypes of what was saved and peak GPU memory, and exits 1 if a check fails: the projections must
be bitsandbytes 4-bit layers, only the adapter may train, the loss must be finite and fall, the
adapter must be saved and ``merged/`` must be bf16 without a quantisation config.

    .venv/bin/python bench/qlora_check.py [--hidden 1024] [--layers 8] [--rows 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mixtune.builtin import builtin_tokenizer  # noqa: E402
from mixtune.core import validate  # noqa: E402
from mixtune.data.format import Packed  # noqa: E402
from mixtune.models import LoadConfig, load_model  # noqa: E402
from mixtune.train.config import TrainConfig  # noqa: E402
from mixtune.train.loop import StageData, train  # noqa: E402


def random_llama(folder: Path, tokenizer, hidden: int, layers: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 256, 1), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def batch(tokenizer, rows: int, length: int) -> Packed:
    """Random rows, every token trained, one example per row (the same rows both steps)."""
    ids = torch.randint(3, len(tokenizer), (rows, length), generator=torch.Generator().manual_seed(0))
    return Packed(input_ids=ids, labels=ids.clone(), position_ids=torch.arange(length).repeat(rows, 1),
                  source_ids=torch.zeros(rows, length, dtype=torch.long),
                  example_ids=torch.arange(rows).repeat_interleave(length).view(rows, length), dropped=0, truncated=0)


@torch.no_grad()
def loss_on(model, packed: Packed) -> float:
    model.eval()
    out = model(input_ids=packed.input_ids.to(model.device), labels=packed.labels.to(model.device), use_cache=False)
    model.train()
    return float(out.loss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    import bitsandbytes as bnb

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
    failures = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    tok = builtin_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        base, out = Path(tmp) / "base", Path(tmp) / "run"
        random_llama(base, tok, args.hidden, args.layers)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model, tok = load_model(base, load=LoadConfig(quantization="4bit"))
        proj = model.model.layers[0].mlp.up_proj
        check(isinstance(proj, bnb.nn.Linear4bit) and proj.weight.quant_state.quant_type == "nf4",
              f"projections are NF4 Linear4bit on {proj.weight.device}")
        print(f"  quantised model: {model.get_memory_footprint() / 2**20:,.1f} MiB "
              f"(loaded in {time.perf_counter() - t0:.1f} s)")
        packed = batch(tok, args.rows, args.seq_len)
        before = loss_on(model, packed)
        cfg = validate(TrainConfig, {"lr": args.lr, "steps": 2, "batch_size": args.rows,
                                     "micro_batch_size": args.rows, "warmup": 0.0, "gradient_checkpointing": True,
                                     "method": {"name": "lora", "r": 16, "alpha": 32, "merge": True}})
        t0 = time.perf_counter()
        folder = train(model, tok, [StageData("qlora", packed, 2, args.lr, "constant")], cfg, out,
                       source_names=["random"], progress=False)[-1]
        seconds = time.perf_counter() - t0
        after = loss_on(model, packed)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        sizes = next(e for e in log if "trainable_params" in e)
        logged = [e["loss"] for e in log if "loss" in e]
        adapter = load_file(folder / "adapter_model.safetensors")
        merged = load_file(folder / "merged" / "model.safetensors")
        merged_config = json.loads((folder / "merged" / "config.json").read_text())
        print(f"  trained: {sizes['trainable_params']:,} of {sizes['total_params']:,} parameters "
              f"({sizes['trainable_params'] / sizes['total_params']:.2%}; 4-bit weights count packed)")
        print(f"  loss on the batch: {before:.4f} -> {after:.4f}; logged (2-step mean) {logged}; {seconds:.1f} s")
        print(f"  saved: adapter {sorted({str(t.dtype) for t in adapter.values()})}, merged "
              f"{sorted({str(t.dtype) for t in merged.values()})}, merged config dtype {merged_config.get('dtype')}")
        if cuda:
            print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:,.1f} MiB allocated, "
                  f"{torch.cuda.max_memory_reserved() / 2**20:,.1f} MiB reserved")
        check(sizes["trainable_params"] == sum(t.numel() for t in adapter.values()), "only the adapter trains")
        check(all(torch.isfinite(torch.tensor(x)) for x in [before, after, *logged]), "losses are finite")
        check(after < before, "the loss on the training batch falls")
        check({t.dtype for t in merged.values()} == {torch.bfloat16} and merged_config.get("dtype") == "bfloat16"
              and "quantization_config" not in merged_config, "merged/ is bf16, not quantised")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
