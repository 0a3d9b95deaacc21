import shutil

import pytest
import torch

from mixtune.core import CheckpointError
from mixtune.models import load_model, load_tokenizer


def test_loads_model_and_tokenizer(tiny_dir):
    model, tok = load_model(tiny_dir)
    assert model.dtype == torch.float32
    assert tok.eos_token == "<|end|>"
    assert load_tokenizer(tiny_dir).get_vocab() == tok.get_vocab()


def pickle_copy(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir)
    out = tmp_path / "pickled"
    shutil.copytree(tiny_dir, out)
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def test_pickle_weights_are_refused_with_reason_and_opt_in(tiny_dir, tmp_path):
    out = pickle_copy(tiny_dir, tmp_path)
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*arbitrary code.*allow-pickle"):
        load_model(out)
    model, _ = load_model(out, allow_pickle=True)
    ref, _ = load_model(tiny_dir)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_missing_folder_file_config_and_weights(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder.*never downloads") as e:
        load_model(tmp_path / "nope")
    # a mistyped path is a typo, not a request for a new model there (it used to suggest `model init`)
    assert "model init" not in str(e.value)
    (tmp_path / "run-dmt").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'run-dtm'}: no such folder; did you mean "
                                              f"{tmp_path / 'run-dmt'}\\?"):
        load_model(tmp_path / "run-dtm")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="expected a model folder"):
        load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    shutil.copy(tiny_dir / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weight files"):
        load_model(tmp_path / "empty")


def test_corrupt_safetensors_is_a_checkpoint_error(tiny_dir, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, out)
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load the model"):
        load_model(out)


def grown_tokenizer(tiny_dir, out):
    """The tiny model's tokenizer with two tokens the model has no embedding rows for, saved in ``out``."""
    tok = load_tokenizer(tiny_dir)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(out)
    return tok


def vocab_message(where, n, rows):
    return (f"{where}: the tokenizer has {n:,} token ids (len(tokenizer) = {n:,}, largest special-token id 2) but the "
            f"model's input embedding has {rows:,} rows, so ids {rows:,}-{n - 1:,} cannot be embedded; use the "
            f"tokenizer saved with this model, or call model.resize_token_embeddings({n}) and save the model with "
            f"the tokenizer")


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tok) <= rows  # the model as built is consistent
    out = tmp_path / "grown"
    shutil.copytree(tiny_dir, out)
    grown = grown_tokenizer(tiny_dir, out)
    assert len(grown) == rows + 2
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    assert str(e.value) == vocab_message(out, rows + 2, rows)


def test_an_adapter_whose_tokenizer_outgrows_its_base_is_refused(tiny_dir, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model

    from mixtune.eval.run import load_for_eval

    model, _ = load_model(tiny_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(tiny_dir)}))
    assert load_for_eval(adapter)[0].get_input_embeddings().weight.shape[0] == rows  # base tokenizer: fine
    grown_tokenizer(tiny_dir, adapter)
    with pytest.raises(CheckpointError) as e:
        load_for_eval(adapter)
    where = f"{adapter} (adapter on base model {tiny_dir}, tokenizer from {adapter})"
    assert str(e.value) == vocab_message(where, rows + 2, rows)
