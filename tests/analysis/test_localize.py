"""Skill localization by grafting (Panigrahi et al., 2023) on tensors and tiny linear models worked by hand, and
on the built-in tiny model from chat records."""

import importlib
import math

import pytest
import torch

from mixtune.analysis import (basepatch, graft, load_masks, localize, localize_on_records, mask_overlap, record_batches,
                              save_masks, sparsity_curve)
from mixtune.analysis.localize import mask_step, relaxed_mask
from mixtune.core import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")
localize_module = importlib.import_module("mixtune.analysis.localize")  # the module (the package exports the function)

T = torch.tensor
ZERO2 = {"a": torch.zeros(4), "b": torch.zeros(4)}
TWO = {"a": T([4.0, -1, 0, 2]), "b": T([-3.0, 1, 5, -2])}  # |tau| 0,1,1,2,2,3,4,5 over both tensors


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_basepatch_takes_the_top_entries_over_every_parameter_at_once():
    # N = 8, k = int(0.375 * 8) = 3: |tau| 5, 4, 3, so b gets two entries and a one (per tensor: one each)
    m = basepatch(ZERO2, TWO, 0.375)
    assert m["a"].tolist() == [True, False, False, False] and m["b"].tolist() == [True, False, True, False]
    assert m["a"].dtype == torch.bool
    # at least one entry, however small the sparsity; names restrict the search
    assert [int(v.sum()) for v in basepatch(ZERO2, TWO, 1e-9).values()] == [0, 1]
    assert list(basepatch(ZERO2, TWO, 0.25, names=["a"])) == ["a"]
    # k = int(0.25 * 4) = 1 within a alone
    assert basepatch(ZERO2, TWO, 0.25, names=["a"])["a"].tolist() == [True, False, False, False]


def test_basepatch_breaks_ties_by_parameter_order_then_position():
    base, tuned = {"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": T([2.0, 2]), "b": T([-2.0, 1])}
    # k = int(0.25 * 4) = 1 of three equal magnitudes 2: the first of a
    m = basepatch(base, tuned, 0.25)
    assert m["a"].tolist() == [True, False] and not m["b"].any()
    m = basepatch(base, tuned, 0.25, names=["b", "a"])
    assert m["b"].tolist() == [True, False] and not m["a"].any()
    assert sum(int(v.sum()) for v in basepatch(base, tuned, 0.5).values()) == 2  # exactly k, not every tie


def test_basepatch_rejects_bad_sparsity_and_unknown_names():
    with pytest.raises(ValueError, match="sparsity"):
        basepatch(ZERO2, TWO, 0.0)
    with pytest.raises(ValueError, match="missing from the tuned"):
        basepatch(ZERO2 | {"c": torch.zeros(1)}, TWO, 0.5, names=["c"])


def test_graft_is_base_plus_gamma_times_tau():
    base = {"w": T([1.0, 2, 3]), "v": T([9.0])}
    tuned = {"w": T([5.0, 6, 7]), "v": T([0.0])}
    # gamma (0, 0.5, 1): 1 + 0 * 4, 2 + 0.5 * 4, 3 + 1 * 4; v has no mask and stays at its base
    out = graft(base, tuned, {"w": T([0.0, 0.5, 1.0])})
    assert out["w"].tolist() == [1.0, 4.0, 7.0] and out["v"] is base["v"]
    assert graft(base, tuned, {"w": T([True, False, True])})["w"].tolist() == [5.0, 2.0, 7.0]
    # a bool graft takes the fine-tuned values themselves, in the base's dtype
    b16 = {"w": T([0.1, 0.2, 0.3]).to(torch.bfloat16)}
    t16 = {"w": T([0.7, 1.3, -0.9]).to(torch.bfloat16)}
    got = graft(b16, t16, {"w": T([True, True, False])})["w"]
    assert got.dtype == torch.bfloat16 and torch.equal(got[:2], t16["w"][:2]) and got[2] == b16["w"][2]
    with pytest.raises(ValueError, match="missing"):
        graft(base, tuned, {"u": T([True])})
    with pytest.raises(ValueError, match="shape"):
        graft(base, tuned, {"w": T([True])})


def test_mask_overlap_is_the_jaccard_over_shared_parameters():
    a = {"x": T([True, True, False, False]), "y": T([True, False]), "only_a": T([True])}
    b = {"x": T([False, True, True, False]), "y": T([True, True])}
    # x: & = {1}, | = {0, 1, 2}; y: & = {0}, | = {0, 1}; over both: 2 / 5 (only_a is not shared)
    assert mask_overlap(a, b) == pytest.approx(2 / 5)
    assert mask_overlap(a, a) == 1.0
    assert mask_overlap({"x": torch.zeros(3, dtype=torch.bool)}, {"x": torch.zeros(3, dtype=torch.bool)}) == 1.0
    assert mask_overlap({"x": T([0.9, 0.2])}, {"x": T([True, True])}) == pytest.approx(0.5)  # gamma rounded
    with pytest.raises(ValueError, match="share no parameter"):
        mask_overlap({"x": T([True])}, {"y": T([True])})


def test_sparsity_curve_scores_each_basepatch_graft():
    # score = the sum of the grafted state: k = 1 keeps 5; k = 2 adds 4; k = 8 keeps all (sum 6)
    curve = sparsity_curve(ZERO2, TWO, [0.125, 0.25, 1.0], lambda sd: float(sum(v.sum() for v in sd.values())))
    assert curve == [(0.125, 5.0), (0.25, 9.0), (1.0, 6.0)]


def test_save_and_load_masks_round_trip(tmp_path):
    masks = {"a": T([True, False, True]), "b.weight": T([[0.0, 1.0]])}
    path = save_masks(masks, tmp_path / "sub" / "masks.safetensors")
    got = load_masks(path)
    assert got["a"].tolist() == [True, False, True] and got["b.weight"].tolist() == [[False, True]]
    assert all(v.dtype == torch.bool for v in got.values())
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temporary file left
    with pytest.raises(CheckpointError, match="no such mask file"):
        load_masks(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_text("xx")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_masks(tmp_path / "bad.safetensors")


def test_the_relaxation_starts_at_the_basepatch():
    s = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    b = torch.rand(1000, generator=torch.Generator().manual_seed(1)) > 0.5
    gamma = relaxed_mask(s, b, 10.0)
    # |gamma - b| = sigmoid(S - 10) <= sigmoid(-9) = 1.234e-4 for S in [0, 1); 4.54e-5 at S = 0
    assert (gamma - b.float()).abs().max() < 1.24e-4
    assert torch.allclose((gamma - b.float()).abs(), torch.sigmoid(s - 10), rtol=1e-3)
    assert (relaxed_mask(torch.zeros(2), T([True, False])) - T([1.0, 0.0])).abs().max() < 1e-4
    # by hand: S = (0, 0.5), b = (1, 0): gamma = (1 - sigmoid(-10), sigmoid(-9.5)) = (1 - 4.5398e-5, 7.4846e-5)
    assert relaxed_mask(T([0.0, 0.5]), T([True, False])).tolist() == pytest.approx([1 - 4.5397869e-05, 7.4846228e-05])


def test_one_mask_step_by_hand():
    # sigmoid'(z) = sigmoid(z)(1 - sigmoid(z)): 4.53958e-5 at -10, 7.48406e-5 at -9.5; g = 1e4 on both.
    # b = 1: S + g sigmoid' = 0 + 0.453958 (gamma moves down); b = 0: S - g sigmoid' = 0.5 - 0.748406
    s = mask_step(T([0.0, 0.5]), T([True, False]), T([1e4, 1e4]), 10.0)
    assert s.tolist() == pytest.approx([0.45395808, -0.24840626], rel=1e-5)


LINEAR = {"weight": T([[0.0, 0.0]])}, {"weight": T([[2.0, 1.0]])}  # base, tuned: tau = (2, 1)


def squared_error(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def one_step_lr(delta):
    """The learning rate at which one step of localize on LINEAR with the batch x = (1, 1), y = 2.5
    lands S of the second entry at c + delta, by the formulas worked independently in float64."""
    s0 = torch.rand(1, 2, generator=torch.Generator().manual_seed(0)).double()[0].tolist()  # localize's S draw
    b = [1.0, 0.0]  # basepatch, sparsity 0.5: |tau| 2 beats 1
    sig = [sigmoid(s - 10) for s in s0]
    gamma = [bi + (1 - 2 * bi) * si for bi, si in zip(b, sig)]
    r = gamma[0] * 2 + gamma[1] * 1 - 2.5  # residual of theta = gamma * tau on x = (1, 1)
    g1 = 2 * r * 1.0 * 1.0  # dL/dtheta_1 = 2 r x_1, times tau_1 = 1 (the lr comes out of it)
    # S1 = S0 - (1 - 2b) lr g1 sigmoid'(S0 - c) = c + delta
    return (s0[1] - 10 - delta) / (g1 * sig[1] * (1 - sig[1]))


def test_one_localize_step_matches_the_formula():
    batch = (T([[1.0, 1.0]]), T([[2.5]]))
    for delta, want in [(1e-3, [True, True]), (-1e-3, [True, False])]:
        model = torch.nn.Linear(2, 1, bias=False)
        lr = one_step_lr(delta)
        mask = localize(model, *LINEAR, [batch], squared_error, sparsity=0.5, lr=lr, epochs=1, seed=0)
        assert mask["weight"][0].tolist() == want, delta
        # the model is left holding the graft of the mask: tuned where it is on, base elsewhere
        assert model.weight.detach()[0].tolist() == [2.0, 1.0 if want[1] else 0.0]
        # two copies of the batch in one step average to the same gradient
        twice = localize(torch.nn.Linear(2, 1, bias=False), *LINEAR, [batch, batch], squared_error, sparsity=0.5,
                         lr=lr, epochs=1, accumulation=2)
        assert twice["weight"][0].tolist() == want


TOY = {"weight": torch.zeros(1, 3)}, {"weight": T([[3.0, 1.0, 0.5]])}


def toy_batches():
    # the target uses only the second entry of tau: y = x . (0, 1, 0); entries 1 and 3 only add error
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    y = x[:, 1:2]
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]


def test_localize_moves_a_wrong_basepatch_to_the_useful_entry():
    base, tuned = TOY
    # sparsity 0.34 of 3 entries: the basepatch is the largest |tau|, the first entry, which hurts
    assert basepatch(base, tuned, 0.34)["weight"].tolist() == [[True, False, False]]
    model, lines = torch.nn.Linear(3, 1, bias=False), []
    mask = localize(model, base, tuned, toy_batches(), squared_error, sparsity=0.34, epochs=2, progress=lines.append)
    assert mask["weight"].tolist() == [[False, True, False]]
    assert model.weight.detach().tolist() == [[0.0, 1.0, 0.0]] and model.weight.requires_grad
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: mean loss ") and "1 of 3 entries grafted" in lines[1]


def test_localize_keeps_the_best_scored_mask():
    base, tuned = TOY
    seen = []

    def score(model):  # prefers any graft holding the first entry: only the basepatch does
        seen.append(model.weight.detach()[0].tolist())
        return float(model.weight[0, 0] != 0)

    # lr 3e3: the first step only dents S, so epoch 1's rounded mask is still the basepatch; by
    # epoch 6 the useful entry is on (and the first off), which the last-epoch rule returns
    last = localize(torch.nn.Linear(3, 1, bias=False), base, tuned, toy_batches(), squared_error, sparsity=0.34,
                    lr=3e3, epochs=6)
    assert last["weight"].tolist() == [[False, True, False]]
    model = torch.nn.Linear(3, 1, bias=False)
    best = localize(model, base, tuned, toy_batches(), squared_error, sparsity=0.34, lr=3e3, epochs=6, score=score)
    assert len(seen) == 6 and seen[0] == [3.0, 0.0, 0.0] and seen[-1] == [0.0, 1.0, 0.0]
    assert best["weight"].tolist() == [[True, False, False]] and model.weight.detach().tolist() == [[3.0, 0.0, 0.0]]


def test_localize_starts_from_a_given_mask_and_rejects_bad_input():
    base, tuned = TOY
    start = {"weight": T([[False, True, False]])}  # already right: the gradient keeps it (S only moves away from c)
    got = localize(torch.nn.Linear(3, 1, bias=False), base, tuned, toy_batches(), squared_error, start=start)
    assert got["weight"].tolist() == start["weight"].tolist()
    with pytest.raises(ValueError, match="no batch"):
        localize(torch.nn.Linear(3, 1, bias=False), base, tuned, [], squared_error, sparsity=0.34)
    with pytest.raises(ValueError, match="not parameters of the model"):
        localize(torch.nn.Linear(3, 1, bias=False), {"w": torch.zeros(1)}, {"w": torch.ones(1)}, toy_batches(),
                 squared_error, names=["w"])


# --- localize_on_records: the built-in tiny model and chat records -------------------------------

CHANGED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The built-in tiny model's folder and tokenizer (the one ``builtin_tokenizer`` builds, saved
    beside the weights), and 6 math chat records."""
    from transformers import AutoTokenizer

    from mixtune.builtin import init_builtin
    from mixtune.data.abilities import ABILITIES

    folder = init_builtin(tmp_path_factory.mktemp("builtin") / "m")
    return folder, AutoTokenizer.from_pretrained(folder), ABILITIES.get("math").generate(6, seed=0, split="train")


def load_tiny(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def one_tensor_changed(folder):
    """The base state as safetensors holds it (a tied model: the embedding only, no lm_head) and
    a tuned state that differs from it in CHANGED only."""
    from safetensors.torch import load_file

    base = load_file(str(folder / "model.safetensors"))
    tuned = dict(base)
    tuned[CHANGED] = base[CHANGED] + 0.05 * torch.randn(base[CHANGED].shape, generator=torch.Generator().manual_seed(0))
    return base, tuned


def test_record_batches_pad_on_the_right_and_train_only_the_replies(tiny):
    from mixtune.data.format import prompt_text, tokenize_records

    _, tok, records = tiny
    examples = tokenize_records(records[:5], tok)
    batches = record_batches(records[:5], tok, 2)
    assert [tuple(b["input_ids"].shape) for b in batches] == [
        (len(c), max(len(e.input_ids) for e in c)) for c in (examples[0:2], examples[2:4], examples[4:5])]
    for start, batch in zip((0, 2, 4), batches):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(v.dtype == torch.long for v in batch.values())
        for row, ex in enumerate(examples[start:start + 2]):
            n = len(ex.input_ids)
            assert batch["input_ids"][row, :n].tolist() == ex.input_ids
            assert batch["labels"][row, :n].tolist() == ex.labels  # tokenize_records' masking, unchanged
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert (batch["input_ids"][row, n:] == tok.pad_token_id).all() and (batch["labels"][row, n:] == -100).all()
    # by hand, record 0: the prompt (everything up to the reply) is -100, the reply and its end of turn trained
    ids, labels = batches[0]["input_ids"][0].tolist(), batches[0]["labels"][0].tolist()
    first = next(i for i, t in enumerate(labels) if t != -100)
    assert tok.decode(ids[:first]) == prompt_text(records[0]["messages"], tok)
    reply = tok.decode([t for t in labels if t != -100])
    assert reply.startswith(records[0]["messages"][-1]["content"] + tok.eos_token)
    assert all(t == -100 for t in labels[:first]) and all(t != -100 for t in labels[first:len(examples[0].input_ids)])


def test_record_batches_reject_what_has_no_loss(tiny):
    _, tok, records = tiny
    with pytest.raises(ValueError, match="batch_size"):
        record_batches(records, tok, 0)
    with pytest.raises(ValueError, match="no record"):
        record_batches([], tok, 2)
    with pytest.raises(ValueError, match="record 1 has no assistant token"):
        record_batches([records[0], {"messages": records[1]["messages"][:1]}], tok, 2)


def test_localize_on_records_passes_the_reply_loss_and_the_model_names(tiny, monkeypatch):
    folder, tok, records = tiny
    model = load_tiny(folder)
    sd = model.state_dict()  # a tied model's state dict holds lm_head.weight too; named_parameters does not
    seen = {}

    def fake(model_, base, tuned, batches, loss_fn, **kwargs):
        seen.update(model=model_, batches=batches, loss_fn=loss_fn, **kwargs)
        return {}

    monkeypatch.setattr(localize_module, "localize", fake)
    marker = [].append
    localize_on_records(model, sd, sd, records, tok, sparsity=0.25, batch_size=4, epochs=3, lr=5.0, sigmoid_bias=7.0,
                        accumulation=2, seed=9, score=len, progress=marker)
    assert seen["model"] is model
    assert {k: seen[k] for k in ("sparsity", "epochs", "lr", "sigmoid_bias", "accumulation", "seed", "score",
                                 "progress")} == dict(sparsity=0.25, epochs=3, lr=5.0, sigmoid_bias=7.0, accumulation=2,
                                                      seed=9, score=len, progress=marker)
    assert seen["names"] == [k for k, _ in model.named_parameters()] and "lm_head.weight" not in seen["names"]
    assert [b["labels"].tolist() for b in seen["batches"]] == [b["labels"].tolist()
                                                              for b in record_batches(records, tok, 4)]
    # the loss is the mean cross-entropy of the next token over the trained (reply) labels only
    batch = seen["batches"][0]
    with torch.no_grad():
        got = float(seen["loss_fn"](model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        keep = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # the prompt trained as well
        everything = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), keep[:, 1:].flatten())
    assert got == pytest.approx(float(want), rel=1e-5) and abs(got - float(everything)) > 1e-3


def test_localize_on_records_finds_the_one_changed_tensor(tiny):
    folder, tok, records = tiny
    base, tuned = one_tensor_changed(folder)
    model = load_tiny(folder)
    names = [k for k, _ in model.named_parameters()]
    k = int(1e-3 * sum(base[n].numel() for n in names))  # the basepatch's k over the model's parameters
    patch = basepatch(base, tuned, 1e-3, names=names)
    assert sum(int(m.sum()) for m in patch.values()) == k and int(patch[CHANGED].sum()) == k

    def count(mask):
        return sum(int(m.sum()) for m in mask.values())

    # no learning (lr 0, or no epoch): the region is the basepatch itself, k entries, all in CHANGED
    for kwargs in (dict(lr=0.0), dict(epochs=0)):
        mask = localize_on_records(model, base, tuned, records, tok, sparsity=1e-3, batch_size=4, **kwargs)
        assert list(mask) == names and count(mask) == k
        assert all(torch.equal(mask[n], patch[n]) for n in names), kwargs
    # learning keeps k only implicitly (the count may move), but tau = 0 elsewhere, so S moves
    # only inside CHANGED: with the official lr, and with a lr large enough to move many entries
    for lr in (1e7, 1e9):
        mask = localize_on_records(model, base, tuned, records, tok, sparsity=1e-3, batch_size=4, lr=lr)
        assert all(not mask[n].any() for n in names if n != CHANGED) and mask[CHANGED].any(), lr
        if lr == 1e9:
            assert not torch.equal(mask[CHANGED], patch[CHANGED]) and count(mask) != k


def test_localize_on_records_leaves_the_model_holding_the_graft(tiny):
    folder, tok, records = tiny
    base, tuned = one_tensor_changed(folder)
    model, lines = load_tiny(folder), []
    mask = localize_on_records(model, base, tuned, records, tok, sparsity=1e-3, batch_size=3, lr=1e9, epochs=2,
                               progress=lines.append)
    want = graft(base, tuned, mask)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n].detach(), want[n]) for n in params)
    changed = params[CHANGED].detach()
    assert torch.equal(changed[mask[CHANGED]], tuned[CHANGED][mask[CHANGED]])
    assert torch.equal(changed[~mask[CHANGED]], base[CHANGED][~mask[CHANGED]])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2: mean loss ")
