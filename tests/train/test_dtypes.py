"""A model trains in the dtype it was loaded in and every export keeps it (bf16 in, bf16 out), and
QLoRA: LoRA on a 4-bit base through bitsandbytes, on the CPU where its CPU kernels are installed
and on a GPU where there is one; full fine-tuning of a quantised model is refused."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import ConfigError, validate
from mixtune.data.format import Packed
from mixtune.eval import load_for_eval
from mixtune.models import LoadConfig, load_model
from mixtune.models.quantize import is_quantized
from mixtune.train.config import TrainConfig
from mixtune.train.loop import StageData, train

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 2, "merge": True},
    "hft": {"name": "hft"},
    "lift": {"name": "lift", "rank": 2, "filter_rank": 2},
    "moe_lora": {"name": "moe_lora", "experts": 2, "top_k": 1, "r": 2, "merge": True},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer):
    """A random Llama (hidden 64, 2 blocks) with the built-in tokenizer, saved in bf16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stage(tokenizer):
    """One stage of 2 steps over 4 random rows of 32 tokens, every token trained, one example per row."""
    rows, length = 4, 32
    ids = torch.randint(3, len(tokenizer), (rows, length), generator=torch.Generator().manual_seed(0))
    packed = Packed(input_ids=ids, labels=ids.clone(), position_ids=torch.arange(length).repeat(rows, 1),
                    source_ids=torch.zeros(rows, length, dtype=torch.long),
                    example_ids=torch.arange(rows).repeat_interleave(length).view(rows, length), dropped=0,
                    truncated=0)
    return StageData("only", packed, 2, 1e-2, "constant")


def run(model, tok, stage, out, method, **train_cfg):
    cfg = validate(TrainConfig, {"lr": 1e-2, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32",
                                 "method": method} | train_cfg)
    return train(model, tok, [stage], cfg, out, source_names=["only"], progress=False)[-1]


def saved_dtypes(folder) -> dict:
    """File (relative to ``folder``) -> the dtypes of its tensors, for every safetensors file inside."""
    return {str(f.relative_to(folder)): {v.dtype for v in load_file(f).values()}
            for f in sorted(folder.rglob("*.safetensors"))}


def config_dtype(folder) -> str:
    return json.loads((folder / "config.json").read_text())["dtype"]


def losses(out) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; start and leave clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_fine_tuning_keeps_bf16(bf16_dir, stage, tmp_path, precision, fresh_accelerator_state):
    # precision fp32 is accelerate's "no": the bf16 weights train as they are, as transformers' Trainer
    # trains a model loaded in bf16; bf16 adds autocast (emulated on CPUs without AVX512-BF16). Neither
    # changes a stored dtype.
    model, tok = load_model(bf16_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = run(model, tok, stage, tmp_path, METHODS["full"], precision=precision)
    assert saved_dtypes(out) == {"model.safetensors": {torch.bfloat16}}
    assert config_dtype(out) == "bfloat16"
    after, before = load_file(out / "model.safetensors"), load_file(bf16_dir / "model.safetensors")
    assert torch.equal(after["model.norm.weight"], model.model.norm.weight.detach())  # saved as trained, no cast
    # lr 1e-2 moves every matrix by ~1e-2 per step (Adam), far more than bf16's spacing at these magnitudes
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(tmp_path))


@pytest.mark.parametrize("method", ["hft", "lift", "moe_lora"])
def test_every_method_exports_bf16_models(bf16_dir, stage, tmp_path, method):
    model, tok = load_model(bf16_dir)
    out = run(model, tok, stage, tmp_path, METHODS[method])
    files = saved_dtypes(out)
    models = [f for f in files if f.endswith("model.safetensors")]  # the experts (moe_lora.safetensors) are fp32
    assert models and all(files[f] == {torch.bfloat16} for f in models), files
    assert all(config_dtype(out / f.replace("model.safetensors", "")) == "bfloat16" for f in models)
    if method == "moe_lora":
        assert files["moe_lora.safetensors"] == {torch.float32}  # trained in fp32, like peft's adapters


def test_lora_adapter_is_fp32_and_its_merged_model_bf16(bf16_dir, stage, tmp_path):
    model, tok = load_model(bf16_dir)
    out = run(model, tok, stage, tmp_path, METHODS["lora"])
    # peft trains adapters of a bf16 base in fp32 (autocast_adapter_dtype) and saves them so; the merged
    # model is the base's dtype
    assert saved_dtypes(out) == {"adapter_model.safetensors": {torch.float32},
                                 "merged/model.safetensors": {torch.bfloat16}}
    assert config_dtype(out / "merged") == "bfloat16"
    ids = tok("Question: what is 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = load_model(out / "merged")[0].eval()(ids).logits.float()
        onto_base = load_for_eval(out)[0].eval()(ids).logits.float()
        base = load_model(bf16_dir)[0].eval()(ids).logits.float()
    assert torch.equal(merged, onto_base)  # the same merge of the same weights in the same dtype
    assert (merged - base).abs().max() > 0.05  # and the adapter trained


def test_an_fp32_load_trains_and_exports_fp32(bf16_dir, stage, tmp_path):
    model, tok = load_model(bf16_dir, load=LoadConfig(dtype="fp32"))
    out = run(model, tok, stage, tmp_path, METHODS["full"])
    assert saved_dtypes(out) == {"model.safetensors": {torch.float32}}
    assert config_dtype(out) == "float32"  # the dtype it was loaded in, not the checkpoint's


def test_lift_keeps_its_indices_and_moments_through_a_bf16_state_round_trip():
    from mixtune.train.methods.lift import SparseAdamW

    # torch's load_state_dict casts state tensors to the parameter's dtype: in bf16, index 2047 would become
    # 2048 (bf16 holds integers exactly only up to 256) and the moments would lose their fp32
    p = torch.nn.Parameter(torch.zeros(32, 64, dtype=torch.bfloat16))
    opt = SparseAdamW([p], select=lambda w: torch.arange(1, 2048, 2), lr=1e-2)
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    opt.load_state_dict(opt.state_dict())
    st = opt.state[p]
    assert st["idx"].dtype == torch.long and torch.equal(st["idx"], before["idx"]) and st["idx"][-1] == 2047
    assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], before["exp_avg"])


def test_fp16_weights_cannot_train_under_fp16_mixed_precision():
    from mixtune.train.methods.base import check_dtypes

    model = torch.nn.Linear(4, 4).half()
    with pytest.raises(ConfigError, match=r"train.precision fp16 .* fp16 weights that train \(weight, ...\).*"
                                          r"load.dtype: fp32"):
        check_dtypes(model, "fp16")
    check_dtypes(model, "no")  # pure fp16 training is the user's choice
    model.weight.requires_grad_(False)
    model.bias.requires_grad_(False)
    check_dtypes(model, "fp16")  # frozen fp16 weights (a LoRA base) are fine


@pytest.mark.parametrize("method", ["full", "hft", "lift", "moe_lora"])
def test_methods_that_change_the_base_refuse_a_quantised_model(method):
    from mixtune.train.methods.base import refuse_quantized

    with pytest.raises(ConfigError, match=rf"^train.method = {method} on a model loaded quantised \(4bit: "
                                          r"load.quantization, or a quantised checkpoint\): .* take no gradient; "
                                          r"train an adapter on the quantised base \(train.method.name: lora or peft"):
        refuse_quantized("4bit", method)
    refuse_quantized(None, method)
    refuse_quantized("4bit", "lora")
    refuse_quantized("8bit", "peft")


def qlora(bf16_dir, stage, out, device_check: str):
    """2 LoRA steps on the 4-bit base (gradient checkpointing on); returns (trained model, export, tokenizer)."""
    import bitsandbytes as bnb

    model, tok = load_model(bf16_dir, load=LoadConfig(quantization="4bit"))
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].mlp.up_proj.weight.device.type == device_check
    exported = run(model, tok, stage, out, METHODS["lora"], gradient_checkpointing=True)
    return model, exported, tok


def check_qlora(model, out, tok, log_dir, stage):
    log = [json.loads(line) for line in (log_dir / "log.jsonl").read_text().splitlines()]
    sizes = next(e for e in log if "trainable_params" in e)
    adapter = load_file(out / "adapter_model.safetensors")
    # r (in + out) per adapted matrix: per block q 2(64+64), k and v 2(64+32), o 2(64+64), gate and up
    # 2(64+128), down 2(128+64); 2 blocks -> 2 x (256 + 192 + 192 + 256 + 384 + 384 + 384) = 4,096
    assert sizes["trainable_params"] == sum(t.numel() for t in adapter.values()) == 4096
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(log_dir))
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in adapter.items())  # B = 0 at start
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    # merge: the original base (bf16, unquantised) plus the adapter, not the 4-bit weights
    assert saved_dtypes(out / "merged") == {"model.safetensors": {torch.bfloat16}}
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert merged_config["dtype"] == "bfloat16" and "quantization_config" not in merged_config
    ids = tok("Question: what is 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = load_model(out / "merged")[0].eval()(ids).logits.float()
        onto_base = load_for_eval(out)[0].eval()(ids).logits.float()
        quantized, _ = load_for_eval(out, load=LoadConfig(quantization="4bit"))  # the adapter on the 4-bit base
        assert is_quantized(quantized) == "4bit" and hasattr(quantized, "peft_config")  # left unmerged
        trained = quantized.eval()(ids.to(quantized.device)).logits.float().cpu()
        model.eval()
        in_memory = model(ids.to(model.device)).logits.float().cpu()
    assert torch.equal(merged, onto_base)
    assert torch.allclose(trained, in_memory, atol=1e-2)  # reloaded, it is the model that trained
    with pytest.raises(ConfigError, match=r"an adapter left unmerged on a 4bit quantised base; a new adapter cannot"):
        run(quantized, tok, stage, log_dir / "next", METHODS["lora"])  # a study's next stage would start so
    # the 4-bit base is not the bf16 one: the merged model differs from what trained by NF4's rounding
    assert (merged - trained).abs().max() > 1e-3


@needs_bnb
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below covers a machine with a GPU")
def test_qlora_on_cpu_trains_the_adapter_of_a_4bit_base(bf16_dir, stage, tmp_path):
    model, out, tok = qlora(bf16_dir, stage, tmp_path, "cpu")
    check_qlora(model, out, tok, tmp_path, stage)


@needs_bnb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_gpu_trains_the_adapter_of_a_4bit_base(bf16_dir, stage, tmp_path):
    model, out, tok = qlora(bf16_dir, stage, tmp_path, "cuda")
    check_qlora(model, out, tok, tmp_path, stage)


@needs_bnb
def test_full_fine_tuning_of_a_4bit_model_is_refused(bf16_dir, stage, tmp_path):
    model, tok = load_model(bf16_dir, load=LoadConfig(quantization="4bit"))
    with pytest.raises(ConfigError, match=r"^train.method = full on a model loaded quantised \(4bit"):
        run(model, tok, stage, tmp_path, METHODS["full"])
    assert not (tmp_path / "stages").exists()  # refused before anything is written
