"""``load``: the dtype a model is loaded in (the checkpoint's own by default), the attention kernel,
and quantised loading through bitsandbytes, on a tiny random Llama saved in bf16."""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import ConfigError, validate
from mixtune.models import LoadConfig, load_model
from mixtune.models.quantize import is_quantized

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")


def tiny_llama(folder, tokenizer, dtype):
    """A random Llama (hidden 64, 2 blocks) with the built-in tokenizer, saved in ``dtype``. Hidden 64, not
    less: bitsandbytes 0.50's CPU NF4 kernels on AVX512 machines round rows shorter than the 64-weight
    block wrongly (a 32 x 32 matrix comes back 0.87 x absmax off; 64 wide and up, 0.151: measured)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer):
    return tiny_llama(tmp_path_factory.mktemp("bf16"), tokenizer, torch.bfloat16)


def dtypes(model) -> set:
    return {p.dtype for p in model.parameters()}


def with_config(src, dest, **changes):
    """A copy of model folder ``src`` whose config.json has ``changes`` (a value None deletes the key)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    for k, v in changes.items():
        config.pop(k, None)
        if v is not None:
            config[k] = v
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_auto_is_the_dtype_the_checkpoint_names(bf16_dir, tiny_dir, tmp_path):
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(bf16_dir)
    assert dtypes(model) == {torch.bfloat16} and model.config.dtype == torch.bfloat16
    saved = load_file(bf16_dir / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])  # as stored, not cast
    assert dtypes(load_model(tiny_dir)[0]) == {torch.float32}  # the built-in model is saved fp32 and stays so
    # transformers 4.x wrote torch_dtype
    old = with_config(bf16_dir, tmp_path / "old", dtype=None, torch_dtype="float16")
    assert dtypes(load_model(old)[0]) == {torch.float16}
    # a config that names no dtype loads fp32 (transformers' own "auto" would take the weights' bf16)
    silent = with_config(bf16_dir, tmp_path / "silent", dtype=None)
    assert dtypes(load_model(silent)[0]) == {torch.float32}


def test_a_given_dtype_overrides_the_checkpoint(bf16_dir, tiny_dir):
    saved = load_file(bf16_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    up = load_model(bf16_dir, load=LoadConfig(dtype="fp32"))[0]
    assert dtypes(up) == {torch.float32}
    assert torch.equal(up.model.layers[0].mlp.up_proj.weight, saved.float())  # bf16 -> fp32 is exact
    down = load_model(tiny_dir, load=LoadConfig(dtype="bf16"))[0]
    assert dtypes(down) == {torch.bfloat16}
    fp32 = load_model(tiny_dir)[0].model.layers[0].mlp.up_proj.weight
    assert torch.equal(down.model.layers[0].mlp.up_proj.weight, fp32.to(torch.bfloat16))
    assert dtypes(load_model(tiny_dir, load=LoadConfig(dtype="fp16"))[0]) == {torch.float16}


def test_a_config_dtype_that_is_not_a_float_is_refused(bf16_dir, tmp_path):
    from mixtune.core import CheckpointError

    odd = with_config(bf16_dir, tmp_path / "odd", dtype="int8")
    with pytest.raises(CheckpointError, match=r"config.json: dtype = 'int8' is not a float dtype; set load.dtype"):
        load_model(odd)
    assert dtypes(load_model(odd, load=LoadConfig(dtype="bf16"))[0]) == {torch.bfloat16}  # the way out works


def test_attn_implementation_reaches_the_model(bf16_dir):
    for kernel in ("eager", "sdpa"):
        model, _ = load_model(bf16_dir, load=LoadConfig(attn_implementation=kernel))
        assert model.config._attn_implementation == kernel
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        eager = load_model(bf16_dir, load=LoadConfig(attn_implementation="eager", dtype="fp32"))[0](ids).logits
        sdpa = load_model(bf16_dir, load=LoadConfig(attn_implementation="sdpa", dtype="fp32"))[0](ids).logits
    assert torch.allclose(eager, sdpa, atol=1e-5)  # two kernels, one function


def test_an_unknown_attn_implementation_is_a_one_line_error(bf16_dir):
    with pytest.raises(ConfigError) as e:
        load_model(bf16_dir, load=LoadConfig(attn_implementation="fast"))
    msg = str(e.value)
    assert msg.startswith(f"load.attn_implementation = 'fast': transformers cannot use it for {bf16_dir} (")
    assert "sdpa" in msg and "\n" not in msg  # transformers' list of the ones it knows, on one line


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_a_kernel_that_is_not_installed_is_a_config_error(bf16_dir):
    with pytest.raises(ConfigError, match=r"load.attn_implementation = 'flash_attention_2': transformers cannot use "
                                          r"it .*not.*installed"):
        load_model(bf16_dir, load=LoadConfig(attn_implementation="flash_attention_2"))


def test_load_fields_are_checked():
    with pytest.raises(ConfigError, match="dtype"):
        validate(LoadConfig, {"dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="quantization"):
        validate(LoadConfig, {"quantization": "3bit"})
    with pytest.raises(ConfigError, match="quantisation"):  # unknown keys fail (Strict)
        validate(LoadConfig, {"quantisation": "4bit"})
    assert LoadConfig() == LoadConfig(dtype="auto", attn_implementation=None, quantization=None)


def test_quantization_without_bitsandbytes_says_what_to_install(bf16_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^load.quantization = '4bit' needs bitsandbytes, which is not installed: "
                                          r"pip install -U 'bitsandbytes>=0.46.1', or remove load.quantization$"):
        load_model(bf16_dir, load=LoadConfig(quantization="4bit"))


@needs_bnb
def test_an_old_bitsandbytes_says_which_version_is_needed(bf16_dir, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.42.0" if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"^load.quantization = '8bit': bitsandbytes 0.42.0 is older than "
                                          r"transformers accepts \(0.46.1\): pip install -U 'bitsandbytes>=0.46.1'$"):
        load_model(bf16_dir, load=LoadConfig(quantization="8bit"))


@needs_bnb
def test_quantization_without_a_backend_for_the_device_says_so(bf16_dir, monkeypatch):
    import bitsandbytes.functional as bnbf

    def no_kernel(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with pytest.raises(ConfigError, match=rf"load.quantization = '4bit': bitsandbytes has no working 4bit backend on "
                                          rf"{device} \(RuntimeError: no kernel image .*\); pip install"):
        load_model(bf16_dir, load=LoadConfig(quantization="4bit"))


@needs_bnb
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU placement")
def test_4bit_loading_is_nf4_with_the_compute_dtype(bf16_dir):
    import bitsandbytes as bnb

    model, _ = load_model(bf16_dir, load=LoadConfig(quantization="4bit"))
    assert is_quantized(model) == "4bit" and is_quantized(load_model(bf16_dir)[0]) is None
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    state = q.weight.quant_state
    assert state.quant_type == "nf4" and state.nested and state.dtype == torch.bfloat16  # double quant, bf16 compute
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # what is not quantised keeps the dtype
    # NF4 rounds each weight to one of 16 levels times its 64-block's absmax; the widest gap between levels
    # is -1 to -0.6962 (QLoRA's NF4 table), so a weight moves by at most 0.152 x absmax, plus a little for
    # the 8-bit absmax of double quantisation and the bf16 output (measured: 0.152 here)
    w = load_file(bf16_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    back = bnb.functional.dequantize_4bit(q.weight.data, state).float()
    err = (back - w).abs().view(-1, 64).max(-1).values / w.abs().view(-1, 64).max(-1).values
    assert 0 < err.max() <= 0.16
    assert model.config.dtype == torch.bfloat16


@needs_bnb
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU placement")
def test_8bit_loading(bf16_dir):
    import bitsandbytes as bnb

    model, _ = load_model(bf16_dir, load=LoadConfig(quantization="8bit"))
    assert is_quantized(model) == "8bit"
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_without_a_kernel_named_flash_attention_is_taken_where_it_runs(bf16_dir, monkeypatch):
    """None asks for flash_attention_2 on a CUDA GPU with flash_attn installed (varlen attention for packed
    rows), else transformers' default; a chosen kernel the load refuses falls back to the default, a named one
    stays an error."""
    import importlib.util

    import mixtune.models.load as load_module

    assert load_module.default_attention() is (None if not torch.cuda.is_available()
                                               or importlib.util.find_spec("flash_attn") is None else "flash_attention_2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find(name, *a))
    assert load_module.default_attention() == "flash_attention_2"
    monkeypatch.undo()
    if importlib.util.find_spec("flash_attn") is None:  # here: transformers refuses it, so the default is taken
        monkeypatch.setattr(load_module, "default_attention", lambda: "flash_attention_2")
        model, _ = load_model(bf16_dir)
        assert model.config._attn_implementation == "sdpa"
        with pytest.raises(ConfigError, match="load.attn_implementation = 'flash_attention_2'"):
            load_model(bf16_dir, load=LoadConfig(attn_implementation="flash_attention_2"))
