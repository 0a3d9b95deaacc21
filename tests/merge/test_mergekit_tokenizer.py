"""Tokenizers and vocabularies as mergekit 0.1.5 handles them: the same YAML through mergekit's
``run_merge`` and ``mixtune merge`` gives the same tensors (``torch.equal``, float32 and bfloat16) and
the same tokenizer, for ``tokenizer_source`` base / union / a model, ``tokenizer:`` with token rules,
``pad_to_multiple_of`` and ``chat_template``; without a tokenizer field both stop at vocabularies
that differ. Tiny Llamas with BPE tokenizers built here (no hub), sharing tokens in different orders.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixtune.core import CheckpointError, ConfigError
from mixtune.merge import load_merge_config, merge
from mixtune.merge.chat_templates import CHAT_TEMPLATES
from mixtune.merge.run import check_merge

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = ["<unk>", "<s>", "</s>"]
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
MODELS = {  # name: (tokens by id, extra special tokens, config vocab_size (None: the tokenizer's), chat template)
    "base": (SPECIAL + list("abcd"), [], 9, None),            # two padding rows past its tokenizer
    "ft0": (SPECIAL + list("caxbd"), ["<|im_start|>"], None, TEMPLATE),
    "ft1": (SPECIAL + list("byadcx"), [], None, TEMPLATE),
    "short": (SPECIAL + list("abcd"), [], 6, None),           # 'd' (id 6) past its vocab_size: cut from it
    "twin": (SPECIAL + list("abcd"), [], 9, None),            # the base's tokenizer, other weights
}
EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")
CONVERSATIONS = [
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi "},
     {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Q"}, {"role": "user_context", "content": " ctx "},
     {"role": "assistant", "content": "A"}],
    [{"role": "user", "content": "only\nuser"}],
]


def llama_with_tokenizer(folder, words, extra=(), template=None, *, seed=0, vocab_size=None, dtype=torch.float32):
    """A 2-layer random Llama in ``folder`` with a BPE tokenizer built here (no hub): ``words`` by id,
    ``extra`` special tokens added, an optional chat template, the config's vocab_size (default: the
    tokenizer's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    if template:
        tok.chat_template = template
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok.get_vocab()), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    for seed, (name, (words, extra, size, template)) in enumerate(MODELS.items()):
        llama_with_tokenizer(root / name, words, extra, template, seed=seed, vocab_size=size)
    return root


def run_both(root, doc, name):
    """mergekit's and mixtune's outputs of ``doc``: (folder, tensors, tokenizer) each."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoTokenizer

    (root / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))  # token rules keep their order
    run_merge(MergeConfiguration.model_validate(doc), str(root / f"mk-{name}"),
              options=MergeOptions(lazy_unpickle=False, low_cpu_memory=False, quiet=True))
    merge(load_merge_config(root / f"{name}.yaml"), root / f"mx-{name}", overwrite=True)
    return [(root / f"{t}-{name}", load_file(str(root / f"{t}-{name}" / "model.safetensors")),
             AutoTokenizer.from_pretrained(str(root / f"{t}-{name}"))) for t in ("mk", "mx")]


def assert_same_by_token(theirs, ours):
    """Every tensor equal; embedding and head rows compared token by token (mergekit's union gives its
    appended tokens ids in hash order), rows past the vocabulary (padding) compared as they lie."""
    (mk, a, tok_a), (mx, b, tok_b) = theirs, ours
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    assert va.keys() == vb.keys()
    assert {t.content: (t.special, t.normalized) for t in tok_a.added_tokens_decoder.values()} == \
        {t.content: (t.special, t.normalized) for t in tok_b.added_tokens_decoder.values()}
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if key in EMBEDS:
            for t in va:
                assert torch.equal(a[key][va[t]], b[key][vb[t]]), (key, t)
            assert torch.equal(a[key][len(va):], b[key][len(vb):]), key
        else:
            assert torch.equal(a[key], b[key]), key
    for folder in (mk, mx):
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == a[EMBEDS[0]].shape[0]


def assert_identical(theirs, ours):
    """As :func:`assert_same_by_token`, and the same ids: the tokenizer files and whole tensors are equal."""
    assert_same_by_token(theirs, ours)
    (mk, a, _), (mx, b, _) = theirs, ours
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((mk / name).read_text()) == json.loads((mx / name).read_text()), name
    for key in EMBEDS:
        assert torch.equal(a[key], b[key]), key


def task_arithmetic(root, dtype, **fields):
    return {"merge_method": "task_arithmetic", "base_model": str(root / fields.pop("base", "base")), "dtype": dtype,
            "models": [{"model": str(root / "ft0"), "parameters": {"weight": 0.6}},
                       {"model": str(root / "ft1"), "parameters": {"weight": 0.9}}]} | fields


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokenizer_source_base_cuts_to_the_bases_vocabulary(zoo, dtype):
    # 'short' holds 6 rows and a 7-token tokenizer: 'd' is cut from it, so ft0's and ft1's 'd' rows go;
    # 'b' is forced to ft0's row in every model; 6 rows are padded to 8 with each input's mean row
    doc = task_arithmetic(zoo, dtype, base="short", tokenizer={
        "source": "base", "tokens": {"b": {"source": str(zoo / "ft0"), "force": True}}, "pad_to_multiple_of": 4})
    theirs, ours = run_both(zoo, doc, f"base-{dtype}")
    assert_identical(theirs, ours)
    assert sorted(ours[2].get_vocab()) == sorted(SPECIAL + list("abc")) and ours[1][EMBEDS[0]].shape[0] == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokenizer_source_union_aligns_by_token_string(zoo, dtype):
    # x is in ft0 and ft1 (the mean of theirs for the base), y in ft1 only, <|im_start|> in ft0 only;
    # 'base' has 9 rows for 7 tokens: its two padding rows are dropped
    doc = {"merge_method": "linear", "base_model": str(zoo / "base"), "dtype": dtype, "tokenizer_source": "union",
           "models": [{"model": str(zoo / m), "parameters": {"weight": w}} for m, w in
                      [("base", 1.0), ("ft0", 0.5), ("ft1", 0.7)]]}
    theirs, ours = run_both(zoo, doc, f"union-{dtype}")
    assert_same_by_token(theirs, ours)
    vocab = ours[2].get_vocab()  # mixtune's order: the base's, then ft0's new tokens, then ft1's, added ones last
    assert sorted(vocab, key=vocab.get)[7:] == ["x", "y", "<|im_start|>"] and ours[1][EMBEDS[0]].shape[0] == 10


def test_slices_align_each_tensor_to_its_own_sources(zoo):
    # a frankenmerge: the embeddings come from ft0 alone, the head from ft1 alone; a union token its
    # one source lacks gets zeros there (no other input has a row to give)
    doc = {"merge_method": "passthrough", "base_model": str(zoo / "base"), "dtype": "bfloat16",
           "tokenizer_source": "union",
           "slices": [{"sources": [{"model": str(zoo / "ft0"), "layer_range": [0, 1]}]},
                      {"sources": [{"model": str(zoo / "ft1"), "layer_range": [1, 2]}]}]}
    theirs, ours = run_both(zoo, doc, "slices")
    assert_same_by_token(theirs, ours)
    vocab, head = ours[2].get_vocab(), ours[1]["lm_head.weight"]
    assert not head[vocab["<|im_start|>"]].any() and head[vocab["y"]].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_models_tokenizer_with_token_rules(zoo, dtype):
    rules = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(zoo / "ft1"), "token": "</s>"}},  # ft0's own
        "<new>": {"source": {"kind": "zero"}},                                             # in no model: added
        "y": {"source": str(zoo / "ft1"), "force": True},                                 # ft1's row for all
        "a": {"source": {"kind": "model_token", "model": str(zoo / "ft0"), "token_id": 3}, "force": True},
    }
    doc = task_arithmetic(zoo, dtype, tokenizer={"source": str(zoo / "ft1"), "tokens": rules, "pad_to_multiple_of": 8})
    theirs, ours = run_both(zoo, doc, f"model-{dtype}")
    assert_identical(theirs, ours)
    emb, vocab = ours[1][EMBEDS[0]], ours[2].get_vocab()
    assert emb.shape[0] == 16 and list(vocab)  # 9 of ft1 + <|im_start|> + <new>, padded to 16
    ft0 = load_file(str(zoo / "ft0" / "model.safetensors"))[EMBEDS[0]].to(emb.dtype)
    base = load_file(str(zoo / "base" / "model.safetensors"))[EMBEDS[0]].to(emb.dtype)
    # 'a' is ft0's row 3 in every input, so its task vectors are zero: the merged row is that row
    assert torch.equal(emb[vocab["a"]], ft0[3]) and not torch.equal(ft0[3], base[3])


def test_tokenizer_source_a_model_and_chat_template_auto(zoo):
    doc = task_arithmetic(zoo, "float32", tokenizer_source=str(zoo / "ft0"), chat_template="auto")
    theirs, ours = run_both(zoo, doc, "auto")
    assert_identical(theirs, ours)
    assert ours[2].chat_template == theirs[2].chat_template == TEMPLATE.strip()  # ft0's and ft1's, not the base's none


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_a_named_chat_template_renders_as_mergekits(zoo, name):
    doc = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base", "chat_template": name,
           "models": [{"model": str(zoo / m), "parameters": {"weight": 0.5}} for m in ("base", "twin")]}
    theirs, ours = run_both(zoo, doc, f"template-{name}")
    assert_same_by_token(theirs, ours)
    render = lambda tok, c: tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)  # noqa: E731
    for c in CONVERSATIONS:
        assert render(ours[2], c) == render(theirs[2], c)


def test_a_chat_template_without_a_tokenizer_field(zoo):
    # no tokenizer: the vocabularies must match (base and twin share one); the base's tokenizer is saved
    # again with the template, as mergekit's copy does
    doc = {"merge_method": "linear", "dtype": "bfloat16", "chat_template": "{% for m in messages %}{{ m.content }}"
           "{% endfor %}", "models": [{"model": str(zoo / m), "parameters": {"weight": 0.5}} for m in ("base", "twin")]}
    theirs, ours = run_both(zoo, doc, "template-only")
    assert_identical(theirs, ours)
    assert ours[2].chat_template == doc["chat_template"]


def test_every_named_template_renders_as_mergekits():
    from importlib.resources import files

    from transformers.utils.chat_template_utils import render_jinja_template

    def renders(template):
        out = []
        for c in CONVERSATIONS + [[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]]:
            for prompt in (False, True):
                try:
                    out.append(render_jinja_template(conversations=[c], chat_template=template, bos_token="<s>",
                                                     eos_token="</s>", add_generation_prompt=prompt)[0][0])
                except Exception as e:  # noqa: BLE001 - mistral refuses some conversations; so must ours
                    out.append(type(e).__name__)
        return out

    shipped = files("mergekit._data.chat_templates")
    assert sorted(CHAT_TEMPLATES) == sorted(p.name[:-6] for p in shipped.iterdir() if p.name.endswith(".jinja"))
    for name, text in CHAT_TEMPLATES.items():
        assert renders(text) == renders(shipped.joinpath(f"{name}.jinja").read_text()), name


def test_without_a_tokenizer_field_differing_vocabularies_stop_both(zoo):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    doc = task_arithmetic(zoo, "float32", base="short")  # 6 rows; ft0's and ft1's 9
    with pytest.raises(Exception, match="Align vocabulary axes with tokenizer configuration"):
        run_merge(MergeConfiguration.model_validate(doc), str(zoo / "mk-error"),
                  options=MergeOptions(lazy_unpickle=False, low_cpu_memory=False, quiet=True))
    (zoo / "error.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError, match=r"ft0: tensor \S+ has shape \[9, 16\].*\[6, 16\].*tokenizer_source") as e:
        check_merge(load_merge_config(zoo / "error.yaml"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fields,match", [  # paths are taken from the config's folder, the zoo
    ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "tokenizer_source or tokenizer, not both"),
    ({"chat_template": "chatml2"}, "chat_template 'chatml2': expected auto, a template name"),
    ({"tokenizer": {"tokens": {"q": {"source": "nowhere"}}}}, r"tokens\['q'\].source: .*nowhere is not a "),
    ({"tokenizer": {"tokens": {"q": {"source": {"kind": "model_token", "model": "ft0", "token": "zz"}}}}},
     r"tokenizer.tokens\['q'\].source.token 'zz': not in .*ft0's tokenizer"),
    ({"tokenizer": {"tokens": {"y": {"source": "base"}}}}, r"tokenizer.tokens\['y'\].source: .*base has no token 'y'"),
])
def test_tokenizer_mistakes_are_one_line_errors_naming_the_field(zoo, fields, match):
    (zoo / "bad.yaml").write_text(yaml.safe_dump(task_arithmetic(zoo, "float32", **fields)))
    with pytest.raises(ConfigError, match=match) as e:
        check_merge(load_merge_config(zoo / "bad.yaml"), base_dir=zoo)
    assert "\n" not in str(e.value)
