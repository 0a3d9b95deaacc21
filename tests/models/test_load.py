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
    with pytest.raises(CheckpointError, match="no such folder.*never downloads.*mixtune model init"):
        load_model(tmp_path / "nope")
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
