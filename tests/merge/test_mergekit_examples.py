"""mergekit's own example configs, run through mergekit 0.1.5 and through mixtune on local tiny checkpoints.

The configs (tests/merge/mergekit_examples/, whose README names their source and how each is adapted)
are mergekit's examples/*.yml, the merge blocks of its README and docs/multimerge.md, changed only in
model paths. Each runs as the file is and with its ``dtype`` set to float32 and to bfloat16. Every
tensor must be equal (``torch.equal``) for the deterministic methods; for the random ones (DARE),
whose masks mergekit draws from torch's global generator, the statistics of the change from the base
must agree. config.json must be the same, and so must the tokenizer where the config builds one.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixtune.merge import load_merge_config, merge
from mixtune.merge.multi import load_multi_config, run_multi

from tests.merge.test_mergekit_parity import assert_same, perturbed
from tests.merge.test_mergekit_tokenizer import SPECIAL, assert_identical, assert_same_by_token, llama_with_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).parent / "mergekit_examples"
FILES = sorted(p.name for p in EXAMPLES.glob("*.yml"))
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
WRITES_FLOAT32 = {"arcee_fusion"}  # in mergekit, whatever the dtype (without out_dtype)
TOKENIZER_FIELDS = ("tokenizer", "tokenizer_source", "chat_template")
LAYERS = 40  # the 13B Llamas' depth: gradient-slerp takes layers [0, 40], the frankenmerge [0, 24] + [20, 40]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
VOCABS = {  # folder: (tokens by id, added special tokens, chat template); each a 2-layer Llama
    "base": (SPECIAL + list("abcd"), [], None),
    "ft0": (SPECIAL + list("caxbd"), ["<token_name>"], TEMPLATE),
    "ft1": (SPECIAL + list("byadcx"), [], TEMPLATE),
    "ft2": (SPECIAL + list("abcd"), [], TEMPLATE),  # the base's vocabulary
    "path/to/chatml/model": (SPECIAL + list("abcd"), ["<|im_start|>", "<|im_end|>"], None),
    "path/to/model": (SPECIAL + list("dcbae"), ["<|special|>", "<|original_token|>"], None),
    "chatml_model": (SPECIAL + list("abcd"), ["<|im_start|>", "<|im_end|>"], TEMPLATE),
    "llama3_model": (SPECIAL + list("badc"), ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None),
}
STORED = {"llamas": "float32", "vocabs": "float16"}  # the checkpoints' dtype: what a config without dtype computes in


def documents(name):
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d is not None]


def zoo_of(name):
    """Configs that build a tokenizer run on the checkpoints with different vocabularies."""
    return "vocabs" if any(k in d for d in documents(name) for k in TOKENIZER_FIELDS) else "llamas"


def variants():
    """Each file as it is (None), and with ``dtype`` float32 and bfloat16 where that differs from it."""
    for name in FILES:
        own = {d.get("dtype") for d in documents(name)} - {None}
        own = own.pop() if own else STORED[zoo_of(name)]
        for dtype in (None, "float32", "bfloat16"):
            if dtype is None or dtype != own:
                yield pytest.param(name, dtype, id=f"{name[:-4]}-{dtype or 'as-is'}")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """./base and four noisy 'fine-tunes' ./ft0 ... ./ft3 of a 40-layer Llama (hidden 16), float32; and
    arcee_fusion.yml's own placeholders model_a and model_b, links to ft0 and ft1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "src")
    perturbed(root / "src", root, torch.float32, seed=1, n=4)
    (root / "model_a").symlink_to(root / "ft0", target_is_directory=True)
    (root / "model_b").symlink_to(root / "ft1", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """The folders of :data:`VOCABS`: tiny float16 Llamas with BPE tokenizers built here (no hub), whose
    vocabularies hold the README's tokens in different orders."""
    root = tmp_path_factory.mktemp("vocabs")
    for seed, (name, (words, extra, template)) in enumerate(VOCABS.items()):
        llama_with_tokenizer(root / name, words, extra, template, seed=seed, dtype=torch.float16)
    return root


def run_both(root, name, dtype):
    """``name`` (with ``dtype`` set in every document, unless None) merged by mergekit and by mixtune in
    ``root`` (the working folder: the configs' paths are relative); one (document, mergekit's folder,
    mixtune's folder) per document."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from mergekit.scripts.multimerge import main

    tag = f"{name[:-4]}-{dtype or 'as-is'}"
    path = root / f"{tag}.yml"
    docs = documents(name)
    if dtype is None:
        shutil.copy(EXAMPLES / name, path)  # the file as it is, comments and all
    else:
        docs = [d | {"dtype": dtype} for d in docs]
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    mk, mx = root / f"mk-{tag}", root / f"mx-{tag}"
    if len(docs) == 1:
        options = MergeOptions(copy_tokenizer=zoo_of(name) == "vocabs", write_model_card=False, lazy_unpickle=False,
                               low_cpu_memory=False, quiet=True)
        run_merge(MergeConfiguration.model_validate(docs[0]), str(mk), options=options)
        merge(load_merge_config(path), mx, base_dir=root, overwrite=True)
        return [(docs[0], mk, mx)]
    final = any("name" not in d for d in docs)  # mergekit-multi: named ones to the intermediate folder
    parts = mk.with_name(f"{mk.name}.parts") if final else mk
    main.main([str(path), "--intermediate-dir", str(parts), *(["--out-path", str(mk)] if final else []),
               "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], standalone_mode=False)
    steps = load_multi_config(path, mx)
    run_multi(steps)
    ours = {st.name: st.out for st in steps}
    return [(d, parts / d["name"] if "name" in d else mk, ours[d.get("name")]) for d in docs]


def assert_same_statistics(theirs, ours, base):
    """The random methods: same tensors, dtypes and shapes, and the change from the base alike in the
    share of entries left at the base, its mean magnitude and its spread, pooled over the model and per
    tensor (within 6 standard errors of a share)."""
    def shares_agree(d_mk, d_mx):
        z_mk, z_mx = (d_mk == 0).float().mean(), (d_mx == 0).float().mean()
        p = (z_mk + z_mx) / 2
        return abs(z_mk - z_mx) <= 6 * (2 * p * (1 - p) / d_mk.numel()).sqrt() + 1e-6

    assert set(ours) == set(theirs)
    pooled = {"mk": [], "mx": []}
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        d_mk, d_mx = (t.float() - base[key].to(t.dtype).float() for t in (theirs[key], ours[key]))
        assert shares_agree(d_mk, d_mx), key
        pooled["mk"].append(d_mk.flatten())
        pooled["mx"].append(d_mx.flatten())
    # pooled over ~10^5 entries: a share within ~0.007 (0.6 vs 0.55 density on one model moves it 0.009)
    d_mk, d_mx = torch.cat(pooled["mk"]), torch.cat(pooled["mx"])
    assert shares_agree(d_mk, d_mx)
    torch.testing.assert_close(d_mx.abs().mean(), d_mk.abs().mean(), rtol=0.01, atol=0)
    torch.testing.assert_close(d_mx.std(), d_mk.std(), rtol=0.01, atol=0)


def config_json(folder):
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


def test_every_example_is_here_and_described():
    assert FILES == ["arcee_fusion.yml", "bio-merge.yml", "gradient-slerp.yml", "linear.yml",
                     "multimerge-all-named.yml", "multimerge.yml", "orcamini-platy-44layer.yml",
                     "readme-chat-template.yml", "readme-tokenizer-practical.yml", "readme-tokenizer-source.yml",
                     "readme-tokenizer-tokens.yml", "readme-tokenizer.yml", "ties.yml"]
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in FILES)
    assert len(list(variants())) == 36


def listed(cfg):
    """The models a mergekit config names, in the order it names them (the base first).

    Without a base model, mergekit 0.1.5 takes its tokenizer's base vocabulary and the output's
    config.json from ``referenced_models()[0]`` (mergekit/tokenizer/build.py:185-186,
    mergekit/merge.py:296-299), the first of a ``set`` (mergekit/config.py:122-142), which varies
    with the process's string hashing; mixtune takes the first model listed, one of mergekit's
    outcomes, and the tests pin mergekit to it."""
    refs = [cfg.base_model] if cfg.base_model else []
    for part in [cfg, *(cfg.modules or {}).values()]:  # its planner moves models and slices into modules
        refs += [m.model for m in part.models or []]
        refs += [src.model for s in part.slices or [] for src in s.sources]
    return list(dict.fromkeys(refs))


@pytest.mark.parametrize("name,dtype", list(variants()))
def test_example_gives_mergekits_tensors(name, dtype, request, monkeypatch):
    from mergekit.architecture.auto import infer_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache

    root = request.getfixturevalue(zoo_of(name))
    monkeypatch.chdir(root)  # mergekit takes relative paths from the working folder, mixtune from the config's
    monkeypatch.setattr(MergeConfiguration, "referenced_models", listed)
    # mergekit caches what it read by model path for the process: ./base must not be the other zoo's
    monkeypatch.setattr(LoaderCache, "loaders", {})
    infer_architecture_info.cache_clear()
    for doc, mk, mx in run_both(root, name, dtype):
        theirs, ours = load_file(str(mk / "model.safetensors")), load_file(str(mx / "model.safetensors"))
        want = getattr(torch, doc.get("dtype") or STORED[zoo_of(name)])
        assert all(t.dtype == want for t in ours.values())
        if zoo_of(name) == "vocabs":
            from transformers import AutoTokenizer

            pair = [(f, t, AutoTokenizer.from_pretrained(str(f))) for f, t in ((mk, theirs), (mx, ours))]
            # union vocabularies: mergekit numbers the added tokens in hash order, so rows go by token
            check = assert_same_by_token if "tokenizer" in doc or "tokenizer_source" in doc else assert_identical
            check(*pair)
            tok = pair[1][2]
            assert tok.chat_template == pair[0][2].chat_template
            if name == "readme-chat-template.yml":  # auto: the one template among the inputs, ./ft2's
                assert tok.chat_template == TEMPLATE
            if name == "readme-tokenizer-tokens.yml":
                # in neither model: <|unused|> added with zeros; <|renamed_token|> given path/to/model's
                # <|original_token|> row (id 9) in both, so 0.5 r + 0.5 r = r
                emb = ours["model.embed_tokens.weight"]
                assert not emb[tok.convert_tokens_to_ids("<|unused|>")].any()
                donor = load_file(str(root / "path/to/model" / "model.safetensors"))["model.embed_tokens.weight"]
                assert torch.equal(emb[tok.convert_tokens_to_ids("<|renamed_token|>")], donor[9].to(want))
        elif doc["merge_method"] in RANDOM:
            assert_same_statistics(theirs, ours, load_file(str(root / doc["base_model"] / "model.safetensors")))
        else:
            if doc["merge_method"] in WRITES_FLOAT32 and want != torch.float32:
                # mergekit's arcee_fusion multiplies by a float32 mask and writes the float32 result, its
                # config.json saying otherwise; mixtune writes the dtype asked for (compat_select.py's docstring)
                assert all(t.dtype == torch.float32 for t in theirs.values())
                theirs = {k: t.to(want) for k, t in theirs.items()}
            assert_same(theirs, ours)
        assert config_json(mx) == config_json(mk)
    if name == "orcamini-platy-44layer.yml":  # 24 layers of ft0, then ft1's 20..39
        assert config_json(mx)["num_hidden_layers"] == 44
        ft1 = load_file(str(root / "ft1" / "model.safetensors"))
        assert torch.equal(ours["model.layers.24.self_attn.q_proj.weight"],
                           ft1["model.layers.20.self_attn.q_proj.weight"].to(want))
