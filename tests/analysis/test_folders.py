"""The analyses over model folders, streamed tensor by tensor, equal the in-memory functions."""

import pytest
import torch

from mixtune.analysis import cosine, intruder_dimensions, intruder_table, layer_norms, task_vector_table
from mixtune.core import CheckpointError

TARGET = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tuned(tiny_dir, tmp_path_factory):
    """Two 'fine-tunes' of the tiny model: small noise everywhere, and in the first a large rank-1
    update of one matrix in a random direction (random directions are far from every pre-trained
    singular vector in 128 dimensions: an intruder)."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
                if i == 0 and name == TARGET:
                    u, v = torch.randn(p.shape[0], generator=g), torch.randn(p.shape[1], generator=g)
                    p.add_(5.0 * torch.outer(u / u.norm(), v / v.norm()) * p.norm())
        folder = tmp_path_factory.mktemp(f"tuned{i}")
        model.save_pretrained(folder)
        out.append(folder)
    return out


def state(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_intruder_table_finds_the_planted_update_and_matches_the_matrix_function(tiny_dir, tuned):
    rows = intruder_table(tiny_dir, tuned[0], eps=(0.3, 0.5))
    by_name = {r["name"]: r for r in rows}
    assert by_name[TARGET]["intruders"]["0.5"] >= 1 and by_name[TARGET]["layer"] == 1
    assert by_name[TARGET]["module"] == "down_proj"
    assert sum(r["intruders"]["0.5"] for r in rows if r["name"] != TARGET) == 0  # noise adds none
    assert not any("embed" in r["name"] for r in rows)
    base, mine = state(tiny_dir), state(tuned[0])
    assert by_name[TARGET]["intruders"]["0.3"] == intruder_dimensions(base[TARGET], mine[TARGET]).count(0.3)


def test_task_vector_table_equals_the_in_memory_geometry(tiny_dir, tuned):
    got = task_vector_table(tiny_dir, tuned)
    base = state(tiny_dir)
    taus = [{k: v.double() - base[k].double() for k, v in state(f).items()} for f in tuned]
    assert got["cosine"][0][1] == pytest.approx(cosine(taus[0], taus[1]), abs=1e-12)
    assert got["cosine"][0][0] == pytest.approx(1.0) and got["cosine"][1][0] == got["cosine"][0][1]
    for mine, tau in zip(got["layer_norms"], taus):
        assert mine == pytest.approx(layer_norms(tau), rel=1e-12)
    assert got["layer_norms"][0]["1"] > 10 * got["layer_norms"][1]["1"]  # the planted update sits in block 1


def test_folders_that_share_no_tensor_are_refused(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no floating-point tensor of one name and shape"):
        task_vector_table(tiny_dir, [tmp_path])
