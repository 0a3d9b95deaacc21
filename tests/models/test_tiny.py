import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mixtune.builtin import builtin_corpus, builtin_tokenizer
from mixtune.core import UnknownNameError
from mixtune.models import SIZES, build_tokenizer, init_tiny


def test_roundtrip_through_from_pretrained(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert (tiny_dir / "model.safetensors").exists() and not list(tiny_dir.glob("*.bin"))
    again = tiny_dir.parent / "again"
    model.save_pretrained(again)
    tok.save_pretrained(again)
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    ids = tok("2+8=10", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert AutoTokenizer.from_pretrained(again).get_vocab() == tok.get_vocab()


def test_sizes_have_the_advertised_parameter_counts():
    # tiny: 4 x (attn 4*128^2 + mlp 3*128*512) + norms + tied embedding 512*128 = 1,115,264
    counts = {}
    for name, s in SIZES.items():
        cfg = LlamaConfig(hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
                          num_attention_heads=s.num_attention_heads, intermediate_size=s.intermediate_size,
                          vocab_size=s.vocab_size, tie_word_embeddings=True)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert counts["tiny"] == 4 * (4 * 128**2 + 3 * 128 * 512 + 2 * 128) + 128 + 512 * 128 == 1_115_264
    assert 10e6 <= counts["small"] <= 20e6


def test_builtin_tokenizer_is_deterministic_with_single_digits():
    a, b = builtin_tokenizer(), builtin_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) == 512
    ids = a("12345+678=13023", add_special_tokens=False).input_ids
    assert [a.decode([i]) for i in ids] == list("12345") + ["+"] + list("678") + ["="] + list("13023")
    text = "Ünïcödé ☃ and \t tabs\n"  # byte-level: anything round-trips
    assert a.decode(a(text, add_special_tokens=False).input_ids) == text
    assert a.eos_token == "<|end|>" and a.pad_token == "<|pad|>" and a.chat_template


def test_init_is_seeded_and_refuses_unknown_size(tmp_path):
    corpus = builtin_corpus()[:200]
    init_tiny(tmp_path / "a", corpus=corpus, seed=1)
    init_tiny(tmp_path / "b", corpus=corpus, seed=1)
    init_tiny(tmp_path / "c", corpus=corpus, seed=2)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(tmp_path / x).model.embed_tokens.weight for x in "abc")
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(UnknownNameError, match="unknown model size 'huge'; available: tiny, small"):
        init_tiny(tmp_path / "d", corpus=corpus, size="huge")
    with pytest.raises(FileExistsError):
        init_tiny(tmp_path / "a", corpus=corpus)


def test_tokenizer_vocab_is_capped():
    tok = build_tokenizer(["aaa bbb ccc"] * 10, vocab_size=300)
    assert len(tok) <= 300
