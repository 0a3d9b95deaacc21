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


def test_sign_conflicts_jaccard_and_layer_cosines_of_the_stream_equal_the_in_memory_functions(tmp_path):
    """One tensor per block, so per-tensor trimming (the stream's) is the whole-model trimming (the
    in-memory functions'); a hand-made pair whose counts are known, then random ones."""
    from safetensors.torch import save_file

    from mixtune.analysis import sign_conflicts, topk_jaccard

    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]

    def write(folder, tensors):
        folder.mkdir()
        save_file(dict(zip(names, tensors)), folder / "model.safetensors")
        return folder

    zero = [torch.zeros(1, 5), torch.zeros(1, 5)]
    base = write(tmp_path / "base", zero)
    # block 0, density 0.4: k = 2 of 5 and TIES keeps k + 1 (at or above the (n - k)-th smallest |x|):
    # a keeps entries 0, 1, 3 (+, +, +), b keeps 1, 2, 4 (-, +, +); shared {1}, whose signs disagree
    a = write(tmp_path / "a", [torch.tensor([[5.0, 4.0, 0.0, 0.1, 0.0]]), torch.tensor([[1.0, 0, 0, 0, 0]])])
    b = write(tmp_path / "b", [torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.1]]), torch.tensor([[0.0, 1.0, 0, 0, 0]])])
    got = task_vector_table(base, [a, b], density=0.4)
    # block 1: the threshold is 0, but only non-zero entries count as kept: a {0}, b {1}, none shared
    assert got["sign_conflicts"][0][1] == pytest.approx(1 / 1)
    assert got["jaccard"][0][1] == pytest.approx(1 / 7)  # 1 shared of 5 (block 0) + 2 (block 1)
    assert got["jaccard"][0][0] == 1.0 and got["sign_conflicts"][1][1] == 0.0
    assert got["layer_cosine"]["0"][0][1] == pytest.approx(-16 / (41.01 ** 0.5 * 25.01 ** 0.5))
    assert got["layer_cosine"]["1"][0][1] == 0.0

    g = torch.Generator().manual_seed(1)
    folders, taus = [], []
    for i in range(3):
        t = torch.randn(1, 200, generator=g)
        folders.append(write(tmp_path / f"r{i}", [t, torch.zeros(1, 5)]))
        taus.append(t.flatten())
    got = task_vector_table(write(tmp_path / "base200", [torch.zeros(1, 200), torch.zeros(1, 5)]), folders,
                            density=0.2)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert got["sign_conflicts"][i][j] == pytest.approx(sign_conflicts([taus[i], taus[j]], density=0.2))
                assert got["jaccard"][i][j] == pytest.approx(topk_jaccard(taus[i], taus[j], density=0.2))


def test_the_trim_threshold_of_a_large_tensor_is_found_chunk_by_chunk_and_exact():
    from mixtune.analysis.folders import CHUNK, _kth_magnitude
    from mixtune.merge.methods import trim_mask

    g = torch.Generator().manual_seed(3)
    base = torch.randn(CHUNK + 12345, generator=g).to(torch.bfloat16)
    model = (base.float() + 0.1 * torch.randn(base.numel(), generator=g)).to(torch.bfloat16)
    tau = model.float() - base.float()
    kth = _kth_magnitude(base, model, 0.2)
    assert torch.equal(tau.abs() >= kth, trim_mask(tau[None], 0.2, "per_tensor")[0])


def test_mitigate_folder_scales_the_planted_intruder_and_leaves_the_rest(tiny_dir, tuned, tmp_path):
    from transformers import AutoModelForCausalLM

    from mixtune.analysis import mitigate_intruders
    from mixtune.analysis.folders import mitigate_folder

    assert mitigate_folder(tiny_dir, tuned[0], tmp_path / "m", lam=0.25) == 1  # only the planted matrix
    base, mine, got = state(tiny_dir), state(tuned[0]), state(tmp_path / "m")
    assert torch.equal(got[TARGET], mitigate_intruders(base[TARGET], mine[TARGET], lam=0.25))
    assert not torch.equal(got[TARGET], mine[TARGET])
    assert all(torch.equal(got[k], mine[k]) for k in mine if k != TARGET) and set(got) == set(mine)
    top = [torch.linalg.svdvals(t[TARGET].float())[0] for t in (mine, got)]
    assert top[1] < 0.5 * top[0]  # the planted direction dominated the matrix; a quarter of it is left
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a loadable model folder
