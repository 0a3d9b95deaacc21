"""TuCo (Nuti et al., 2025): hand-computed values, the exact PTC/FTC split on tiny Llama and GPT-2 models,
padding invariance, and which blocks carry a fine-tuning component."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mixtune.analysis import block_components, tuco_from_components, tuning_contribution
from mixtune.builtin import builtin_tokenizer
from mixtune.core import ConfigError

PROMPTS = ["Question: what is 2 + 3?\nAnswer:", "hello", "def add(a, b):\n    return a + b", "The cat sat on"]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def llama(vocab: int, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def gpt2(vocab: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()


def perturbed(model, scale: float = 0.05, only: str | None = None):
    """A copy of ``model`` with Gaussian noise added to its weights (those whose name contains ``only``)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if only is None or only in name:
                p.add_(scale * torch.randn_like(p))
    return out


def build(kind: str, vocab: int):
    torch.manual_seed(0)
    base = llama(vocab) if kind == "llama" else gpt2(vocab)
    return base, perturbed(base)


def test_tuco_from_components_by_hand():
    # PTC_0 + PTC_1 = (1, 1) + (2, 3) = (3, 4), norm 5; FTC_0 + FTC_1 = (1, 2) + (-1, 3) = (0, 5), norm 5:
    # TuCo = 5 / (5 + 5) = 0.5. Item 2: FTC = 0, so 0. Item 3: both 0, so 0 (not NaN).
    # Item 4: PTC sums to (0, 0) and FTC to (6, 8): 10 / (0 + 10) = 1.
    ptc = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, -1.0]],
                        [[2.0, 3.0], [2.0, 3.0], [0.0, 0.0], [-1.0, 1.0]]])  # (layers 2, batch 4, hidden 2)
    ftc = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [6.0, 0.0]],
                        [[-1.0, 3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 8.0]]])
    assert tuco_from_components(ptc, ftc).tolist() == pytest.approx([0.5, 0.0, 0.0, 1.0])
    # the norm is of the sums, not the sum of norms: FTC (3, 0) then (-3, 0) cancels to 0
    cancel = torch.tensor([[[3.0, 0.0]], [[-3.0, 0.0]]])
    assert tuco_from_components(torch.ones(2, 1, 2), cancel).tolist() == [0.0]
    with pytest.raises(ValueError, match="layers, batch, hidden"):
        tuco_from_components(ptc, ftc[:, :2])


class LinearBlock(torch.nn.Module):
    """x -> (x + W x,): a residual block returning a tuple, as GPT-2 and older transformers blocks do."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, bias=False)
        self.proj.weight.data = w

    def forward(self, x, attention_mask=None):
        return (x + self.proj(x),)


class Toy(torch.nn.Module):
    """Embedding, then linear residual blocks; no final norm, no position ids."""

    def __init__(self, ws: list[torch.Tensor]):
        super().__init__()
        self.embed = torch.nn.Embedding(3, 2)
        self.embed.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        self.layers = torch.nn.ModuleList(LinearBlock(w) for w in ws)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, attention_mask=attention_mask)[0]
        return x


def test_tuple_returning_blocks_give_the_hand_computed_split():
    # one block, x_0 = e1 (token 1): PTC = W0 e1 = (3, 4); FTC = (W - W0) e1 = (0, 5); TuCo = 5 / 10 = 0.5.
    # Token 2, x_0 = e2: PTC = W0 e2 = (0, 1), FTC = (W - W0) e2 = (0, 0): TuCo 0
    w0 = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    pt, ft = Toy([w0]), Toy([w0 + torch.tensor([[0.0, 0.0], [5.0, 0.0]])])
    ptc, ftc = block_components(pt, ft, torch.tensor([[2, 1], [1, 2]]), torch.ones(2, 2, dtype=torch.long))
    assert ptc.tolist() == [[[3.0, 4.0], [0.0, 1.0]]] and ftc.tolist() == [[[0.0, 5.0], [0.0, 0.0]]]
    assert tuco_from_components(ptc, ftc).tolist() == [0.5, 0.0]
    # two blocks: x_1 = x_0 + W x_0 = (4, 9) for x_0 = e1 under the fine-tuned block 0, and block 1 (W0 in
    # both) adds PTC_1 = W0 (4, 9) = (12, 25), FTC_1 = 0; the sums are (15, 29) and (0, 5)
    pt2, ft2 = Toy([w0, w0]), Toy([ft.layers[0].proj.weight.data, w0])
    ptc, ftc = block_components(pt2, ft2, torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long))
    assert ptc[:, 0].tolist() == [[3.0, 4.0], [12.0, 25.0]] and ftc[:, 0].tolist() == [[0.0, 5.0], [0.0, 0.0]]
    assert tuco_from_components(ptc, ftc).item() == pytest.approx(5.0 / (math.hypot(15.0, 29.0) + 5.0))
    with pytest.raises(ValueError, match="pad the prompts on the left"):
        block_components(pt, ft, torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_identical_models_have_zero_tuco(tok, kind):
    base, _ = build(kind, len(tok))
    assert tuning_contribution(base, copy.deepcopy(base), tok, PROMPTS, batch_size=3) == [0.0] * len(PROMPTS)
    assert tuning_contribution(base, base, tok, PROMPTS[:2]) == [0.0, 0.0]  # one object as both: no re-entry


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_components_sum_to_the_fine_tuned_residual_stream(tok, kind):
    base, tuned = build(kind, len(tok))
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask[:, 0] == 0).any()  # the batch really is padded
    ptc, ftc = block_components(base, tuned, ids, mask)
    assert ptc.shape == ftc.shape == (2, len(PROMPTS), 32) and ptc.dtype == torch.float32
    # reference: the fine-tuned model's own forward, x_L from a hook on its last block (HF's last
    # hidden_states entry comes after the final norm), x_0 the embedding output
    last = tuned.model.layers[-1] if kind == "llama" else tuned.transformer.h[-1]
    seen = []
    handle = last.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = tuned(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    use_cache=False, output_hidden_states=True)
    handle.remove()
    x0, x_last = out.hidden_states[0][:, -1], seen[0][:, -1]
    assert torch.allclose((ptc + ftc).sum(0), x_last - x0, atol=1e-4)
    assert ftc.abs().max() > 1e-3  # the perturbation is visible, so the check above is not 0 == 0
    # and PTC_0 is the pre-trained block 0 on the fine-tuned embeddings, computed by hand for Llama
    if kind == "llama":
        x = out.hidden_states[0]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        from transformers.masking_utils import create_causal_mask
        causal = create_causal_mask(config=base.config, inputs_embeds=x, attention_mask=mask, cache=None,
                                    position_ids=pos)
        with torch.no_grad():
            f = base.model.layers[0](x, attention_mask=causal, position_ids=pos,
                                     position_embeddings=tuned.model.rotary_emb(x, position_ids=pos))
        assert torch.allclose(ptc[0], (f - x)[:, -1], atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padding_does_not_change_tuco(tok, kind):
    base, tuned = build(kind, len(tok))
    batched = tuning_contribution(base, tuned, tok, PROMPTS, batch_size=4)
    alone = [tuning_contribution(base, tuned, tok, [p])[0] for p in PROMPTS]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert all(0.0 < t < 1.0 for t in batched) and max(batched) - min(batched) > 1e-3  # prompts differ


def test_only_the_changed_last_block_has_a_fine_tuning_component(tok):
    torch.manual_seed(1)
    base = llama(len(tok), layers=3)
    tuned = perturbed(base, only="model.layers.2.")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ptc, ftc = block_components(base, tuned, enc["input_ids"], enc["attention_mask"])
    assert torch.equal(ftc[:2], torch.zeros_like(ftc[:2]))  # identical blocks on identical states: exactly 0
    assert ftc[2].norm(dim=-1).min() > 1e-3
    same_ptc, same_ftc = block_components(base, base, enc["input_ids"], enc["attention_mask"])
    assert torch.equal(ptc[:2], same_ptc[:2])  # before the changed block, PTC is the base model's own update
    assert torch.equal(same_ftc, torch.zeros_like(same_ftc))


def test_tokenizer_settings_and_train_mode_are_restored_and_progress_counts_prompts(tok):
    base, tuned = build("gpt2", len(tok))  # GPT-2 has dropout 0.1: a forward in train mode would differ
    ref = tuning_contribution(base, tuned, tok, PROMPTS)
    tuned.train()
    tok.padding_side, pad = "right", tok.pad_token
    done = []
    try:
        tok.pad_token = None
        got = tuning_contribution(base, tuned, tok, PROMPTS, batch_size=3, progress=done.append)
        assert tok.padding_side == "right" and tok.pad_token is None
    finally:
        tok.pad_token = pad
    assert done == [3, 1] and len(got) == len(PROMPTS)
    assert got == pytest.approx(ref, abs=1e-4)  # eos rather than pad as padding, in eval mode all the same
    assert tuned.training and all(m.training for m in tuned.modules()) and not base.training


def test_models_of_different_shapes_are_refused(tok):
    torch.manual_seed(0)
    base = llama(len(tok))
    with pytest.raises(ConfigError, match="2 blocks of width 32.*3 of width 32"):
        tuning_contribution(base, llama(len(tok), layers=3), tok, PROMPTS)
    with pytest.raises(ConfigError, match="width 32.*width 16"):
        block_components(base, llama(len(tok), hidden=16), torch.tensor([[1]]), torch.tensor([[1]]))
