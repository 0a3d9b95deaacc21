"""Merging real checkpoint folders: streaming I/O, sharding, side files, input checks, the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mixtune.cli import app
from mixtune.core import CheckpointError, MixtuneError
from mixtune.merge import MergeConfig, merge
from mixtune.merge.io import CheckpointReader, StreamingWriter


def write_model(folder, tensors, config=None):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "architectures": ["X"]}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def three(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 6, generator=g), "b.bias": torch.randn(6, generator=g),
            "steps": torch.tensor([3, 4])}
    out = [write_model(tmp_path / "base", {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                          for k, v in base.items()})]
    for i in (1, 2):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
              for k, v in base.items()}
        out.append(write_model(tmp_path / f"ft{i}", {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                     for k, v in ft.items()}))
    return out


def test_sharded_write_and_read_round_trip(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = StreamingWriter(tmp_path, plan, max_shard_bytes=900)  # two 400-byte tensors per shard
    for k, v in tensors.items():
        w.add(k, v)
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 2000
    r = CheckpointReader(tmp_path)
    assert sorted(r.keys()) == sorted(tensors) and all(torch.equal(r.get(k), v) for k, v in tensors.items())
    # one file: safetensors' own loader reads what the streaming writer wrote, every dtype included
    mixed = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.tensor(2.5),
             "d": torch.randn(4, 4, dtype=torch.float16), "e": torch.tensor([True, False])}
    one = tmp_path / "one"
    one.mkdir()
    w = StreamingWriter(one, [(k, tuple(v.shape), v.dtype) for k, v in mixed.items()])
    for k, v in mixed.items():
        w.add(k, v)
    w.finish()
    got = load_file(str(one / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in mixed.items())
    with pytest.raises(CheckpointError, match="expected a"):
        StreamingWriter(one, [("a", (3, 5), torch.bfloat16)]).add("b", torch.arange(7))


def test_merge_streams_casts_and_copies_side_files(three, tmp_path):
    base, ft1, ft2 = three
    cfg = MergeConfig(method="task_arithmetic", base_model=base, models=[{"model": ft1}, {"model": ft2}],
                      parameters={"lambda": 0.5})
    out = merge(cfg, tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    b, m1, m2 = (load_file(str(p / "model.safetensors")) for p in three)
    # mergekit's task_arithmetic computes in the inputs' bf16: sum of the deltas, x lambda, + base
    b16, d1, d2 = b["a.weight"], m1["a.weight"] - b["a.weight"], m2["a.weight"] - b["a.weight"]
    assert got["a.weight"].dtype == torch.bfloat16
    assert torch.equal(got["a.weight"], b16 + torch.stack([d1, d2]).sum(0) * 0.5)
    assert torch.equal(got["steps"], torch.tensor([3, 4]))  # integer buffers are copied
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists() and (out / "merge.yaml").exists()
    # dtype float32: computed in float32; out_dtype bfloat16 writes that rounded once
    want = b["a.weight"].float() + 0.5 * ((m1["a.weight"].float() - b["a.weight"].float())
                                          + (m2["a.weight"].float() - b["a.weight"].float()))
    f32 = merge(cfg.model_copy(update={"dtype": "float32"}), tmp_path / "out32")
    assert torch.equal(load_file(str(f32 / "model.safetensors"))["a.weight"], want)
    cast = merge(cfg.model_copy(update={"dtype": "float32", "out_dtype": "bfloat16"}), tmp_path / "cast")
    assert torch.equal(load_file(str(cast / "model.safetensors"))["a.weight"], want.to(torch.bfloat16))
    # a paper method computes in float32 whatever the inputs, and writes the base's dtype
    lines = merge(MergeConfig(method="lines", base_model=base, models=[{"model": ft1}, {"model": ft2}],
                              parameters={"alpha": 0.5, "beta": 0.0}), tmp_path / "lines")
    assert torch.equal(load_file(str(lines / "model.safetensors"))["a.weight"], want.to(torch.bfloat16))
    # seeded methods are deterministic across runs
    dare = MergeConfig(method="dare_paper", base_model=base, models=[{"model": ft1}, {"model": ft2}],
                       parameters={"drop": 0.5}, seed=3)
    x, y = merge(dare, tmp_path / "d1"), merge(dare, tmp_path / "d2")
    assert torch.equal(load_file(str(x / "model.safetensors"))["a.weight"],
                       load_file(str(y / "model.safetensors"))["a.weight"])


def test_merged_tiny_model_loads_and_runs(tiny_dir, tmp_path):
    from mixtune.models import load_model

    cfg = MergeConfig(method="linear", models=[{"model": tiny_dir}, {"model": tiny_dir, "weight": 3}])
    out = merge(cfg, tmp_path / "soup")
    model, tok = load_model(out)
    ref, _ = load_model(tiny_dir)
    ids = tok("Answer: 3", return_tensors="pt")["input_ids"]
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)  # a soup of one model is that model


@pytest.mark.parametrize("case,match", [
    ("missing", "lacks tensor b.bias"), ("shape", r"tensor a.weight has shape \[8, 7\]"),
    ("nan", "tensor a.weight holds NaN or Inf"), ("corrupt", "not a valid safetensors file"),
    ("arch", "architecture"), ("empty", "no model.safetensors"),
])
def test_bad_inputs_fail_with_one_line_naming_model_and_tensor(three, tmp_path, case, match):
    base, ft1, _ = three
    bad = tmp_path / "bad"
    t = load_file(str(ft1 / "model.safetensors"))
    if case == "missing":
        write_model(bad, {k: v for k, v in t.items() if k != "b.bias"})
    elif case == "shape":
        write_model(bad, t | {"a.weight": torch.zeros(8, 7)})
    elif case == "nan":
        write_model(bad, t | {"a.weight": torch.full((8, 6), float("nan"))})
    elif case == "corrupt":
        write_model(bad, t)
        (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif case == "arch":
        write_model(bad, t, config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    else:
        bad.mkdir()
    cfg = MergeConfig(method="task_arithmetic", base_model=base, models=[{"model": ft1}, {"model": bad}])
    with pytest.raises(CheckpointError, match=match) as e:
        merge(cfg, tmp_path / "out")
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_merge_list_dry_run_and_errors(three, tmp_path):
    base, ft1, ft2 = three
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"method: ties_paper\nbase_model: {base.name}\nmodels:\n  - model: {ft1.name}\n"
                      f"  - model: {ft2.name}\nparameters: {{density: 0.5}}\n")
    runner = CliRunner()
    listed = runner.invoke(app, ["merge", "--list"])
    assert listed.exit_code == 0 and "ties_paper" in listed.output and "arXiv:2306.01708" in listed.output
    dry = runner.invoke(app, ["merge", str(recipe), "--dry-run"])
    assert dry.exit_code == 0 and "3 tensors, 2 model(s)" in dry.output and not (tmp_path / "out").exists()
    done = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--dtype", "float16"])
    assert done.exit_code == 0, done.output
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["a.weight"].dtype == torch.float16
    # user errors reach `main` as MixtuneError, which prints one line and exits 2
    again = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert isinstance(again.exception, MixtuneError) and "already exists" in str(again.exception)
    recipe.write_text(f"method: ties_papr\nbase_model: {base.name}\nmodels:\n  - model: {ft1.name}\n")
    unknown = runner.invoke(app, ["merge", str(recipe), "--dry-run"])
    assert isinstance(unknown.exception, MixtuneError) and "ties_paper" in str(unknown.exception)  # close match
    recipe.write_text(f"method: ties_paper\nbase_model: {base.name}\nmodels:\n  - model: {ft1.name}\n"
                      "parameters: {densty: 0.5}\n")
    typo = runner.invoke(app, ["merge", str(recipe), "--dry-run"])
    assert isinstance(typo.exception, MixtuneError) and "densty" in str(typo.exception)


def test_vocabulary_mismatch_errors_unless_padding_or_truncation_is_asked_for(tmp_path):
    g = torch.Generator().manual_seed(0)
    base_t = {"model.embed_tokens.weight": torch.randn(8, 6, generator=g), "norm.weight": torch.ones(6)}
    big_t = {"model.embed_tokens.weight": torch.randn(10, 6, generator=g), "norm.weight": torch.ones(6)}
    base = write_model(tmp_path / "base", base_t, {"model_type": "llama", "vocab_size": 8})
    big = write_model(tmp_path / "big", big_t, {"model_type": "llama", "vocab_size": 10})
    cfg = MergeConfig(method="task_arithmetic", base_model=base, models=[{"model": big}])
    with pytest.raises(CheckpointError, match="vocab: pad"):
        merge(cfg, tmp_path / "out")
    padded = merge(cfg.model_copy(update={"vocab": "pad"}), tmp_path / "pad")
    emb = load_file(str(padded / "model.safetensors"))["model.embed_tokens.weight"]
    # the base is padded with zero rows, so the new rows are the model's own: 0 + (row - 0)
    assert emb.shape == (10, 6) and torch.allclose(emb, big_t["model.embed_tokens.weight"], atol=1e-6)
    assert torch.equal(emb[8:], big_t["model.embed_tokens.weight"][8:])
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 10
    cut = merge(cfg.model_copy(update={"vocab": "truncate"}), tmp_path / "cut")
    emb = load_file(str(cut / "model.safetensors"))["model.embed_tokens.weight"]
    assert emb.shape == (8, 6) and torch.allclose(emb, big_t["model.embed_tokens.weight"][:8], atol=1e-6)
    assert json.loads((cut / "config.json").read_text())["vocab_size"] == 8


def test_transfer_takes_config_and_tokenizer_from_the_fine_tune(three, tmp_path):
    base, ft1, ft2 = three
    (ft1 / "tokenizer.json").write_text('{"from": "ft1"}')
    cfg = MergeConfig(method="transfer", base_model=base, models=[{"model": ft1}, {"model": ft2}])
    out = merge(cfg, tmp_path / "out")
    assert (out / "tokenizer.json").read_text() == '{"from": "ft1"}'
    b, m1, m2 = (load_file(str(p / "model.safetensors")) for p in three)
    want = m2["a.weight"].float() + (m1["a.weight"].float() - b["a.weight"].float())
    assert torch.equal(load_file(str(out / "model.safetensors"))["a.weight"], want.to(torch.bfloat16))
    # files_from overrides the method's choice
    out2 = merge(cfg.model_copy(update={"files_from": ft2}), tmp_path / "out2")
    assert (out2 / "tokenizer.json").read_text() == "{}"


@pytest.fixture(scope="module")
def lora(tiny_dir, tmp_path_factory):
    """A random (non-zero) LoRA adapter on the built-in model, and the model peft merges from it."""
    from peft import LoraConfig, get_peft_model

    from mixtune.models import load_model

    root = tmp_path_factory.mktemp("lora")
    model, _ = load_model(tiny_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return root / "adapter", merged


def test_a_lora_adapter_is_read_as_its_base_with_the_update_applied(tiny_dir, lora, tmp_path):
    adapter, want = lora
    cfg = MergeConfig(method="task_arithmetic", base_model=tiny_dir, models=[{"model": adapter}])
    got = load_file(str(merge(cfg, tmp_path / "out") / "model.safetensors"))
    changed = [k for k in got if not torch.equal(got[k], load_file(str(tiny_dir / "model.safetensors"))[k])]
    targets = [k for k in got if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert sorted(changed) == sorted(targets) and targets  # only the projections the adapter targets
    for k, v in got.items():
        assert torch.allclose(v.float(), want[k].float(), atol=1e-6), k
    # an adapter needs the base it adapts; DoRA is refused with the reason
    with pytest.raises(MixtuneError, match="give base_model"):
        merge(MergeConfig(method="linear", models=[{"model": adapter}]), tmp_path / "x")
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora adapters are not supported"):
        merge(MergeConfig(method="task_arithmetic", base_model=tiny_dir, models=[{"model": dora}]), tmp_path / "y")


def test_greedy_soup_adds_a_model_only_when_the_score_improves(tmp_path):
    from mixtune.merge.soup import greedy_soup

    ms = [write_model(tmp_path / name, {"w": T}) for name, T in
          [("m1", torch.tensor([1.0])), ("m2", torch.tensor([-1.0])), ("m3", torch.tensor([5.0]))]]
    calls = []

    def score(folder):  # closeness to 0, higher is better
        calls.append(folder)
        return -abs(load_file(str(folder / "model.safetensors"))["w"].item())

    # own scores -1, -1, -5 -> order m1, m2 (stable), m3; m1 + m2 averages to 0 (score 0 > -1: added);
    # adding m3 gives 5/3 (score -1.67 < 0: left out)
    result = greedy_soup(ms, score, tmp_path / "soup")
    assert result.ingredients == [str(ms[0]), str(ms[1])] and result.score == 0
    assert [s["added"] for s in result.steps] == [True, False]
    assert load_file(str(tmp_path / "soup" / "model.safetensors"))["w"].item() == 0
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["candidates"][str(ms[2])] == -5
    assert len(calls) == 5 and not list(tmp_path.glob(".soup*"))  # 3 own scores + 2 trials; no leftovers


def test_cli_soup_scores_with_the_built_in_abilities(tiny_dir, tmp_path):
    result = CliRunner().invoke(app, ["soup", str(tiny_dir), str(tiny_dir), "-o", str(tmp_path / "soup"),
                                      "--abilities", "echo", "--n", "4"])
    assert result.exit_code == 0, result.output
    soup = json.loads((tmp_path / "soup" / "soup.json").read_text())
    # the same model twice: the average is that model, so its score is not strictly higher
    assert soup["ingredients"] == [str(tiny_dir)] and soup["steps"][0]["added"] is False
    assert soup["steps"][0]["score"] == soup["score"]


def rewrite_header(path, key, **fields):
    """Rewrite one entry of a safetensors header (e.g. a shape that lies), leaving the data as it is."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[key].update(fields)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def test_a_header_shape_that_disagrees_with_its_bytes_stops_dry_run_and_merge(tmp_path):
    # the header says 10 rows, the bytes hold 8: `vocab: pad` accepts the 10 rows, so only a size
    # check at open time catches it (before: --dry-run passed and the merge died in reshape)
    base_t = {"model.embed_tokens.weight": torch.randn(8, 6), "norm.weight": torch.ones(6)}
    base = write_model(tmp_path / "base", base_t)
    liar = write_model(tmp_path / "liar", {k: v + 0.1 for k, v in base_t.items()})
    rewrite_header(liar / "model.safetensors", "model.embed_tokens.weight", shape=[10, 6])
    recipe = tmp_path / "merge.yaml"
    recipe.write_text("method: task_arithmetic\nbase_model: base\nmodels:\n  - model: liar\nvocab: pad\n")
    want = (r"model \S+liar: model.safetensors: tensor model.embed_tokens.weight: the header says shape "
            r"\[10, 6\] F32 \(240 bytes\), but its data_offsets \[0, 192\] hold 192 bytes")
    dry = CliRunner().invoke(app, ["merge", str(recipe), "--dry-run"])
    assert isinstance(dry.exception, CheckpointError), dry.output
    assert re_search(want, str(dry.exception)) and "\n" not in str(dry.exception)
    cfg = MergeConfig(method="task_arithmetic", base_model=base, models=[{"model": liar}], vocab="pad")
    with pytest.raises(CheckpointError, match=want):
        merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_data_offsets_outside_the_file_name_the_tensor_and_the_sizes(tmp_path):
    folder = write_model(tmp_path / "m", {"a": torch.zeros(4), "b": torch.zeros(2)})
    rewrite_header(folder / "model.safetensors", "b", data_offsets=[16, 4096])
    with pytest.raises(CheckpointError, match=r"m: model.safetensors: tensor b: data_offsets \[16, 4096\] lie "
                                              r"outside the file's 24-byte data section"):
        CheckpointReader(folder, label=str(folder))
    rewrite_header(folder / "model.safetensors", "b", data_offsets=[16, 24], shape=[-2])
    with pytest.raises(CheckpointError, match=r"tensor b: the header says shape \[-2\], expected a list of "
                                              r"non-negative integers"):
        CheckpointReader(folder)


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None
