import torch

from mixtune.data.abilities import ABILITIES
from mixtune.data.format import prompt_text
from mixtune.eval import evaluate, generate


def sharpened(tiny_dir):
    """The tiny model with larger weights, so greedy argmaxes are far from ties."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model.eval()


def test_batched_and_unbatched_greedy_outputs_are_identical(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    recs = ABILITIES.get("math").generate(6, split="test") + ABILITIES.get("code").generate(6, split="test")
    prompts = [prompt_text(r["messages"], tokenizer) for r in recs]  # different lengths -> left padding
    one = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=12)
    assert batched == one
    assert len(set(one)) > 1  # a real comparison, not all-empty outputs
    assert generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=5) == one  # ragged batches too


def test_few_shot_prompts_read_their_shared_prefix_once_and_generate_as_alone(tiny_dir, tokenizer, monkeypatch):
    import importlib

    from mixtune.models.prefix import MIN_SHARED_PREFIX

    gen_module = importlib.import_module("mixtune.models.generate")  # the module; mixtune.models.generate is the function

    model = sharpened(tiny_dir)
    shots = "".join(f"Q: what is {i} plus {i}?\nA: {2 * i}\n\n" for i in range(4))
    prompts = [f"{shots}Q: what is {i} plus {i % 3}?\nA:" for i in range(7)] + [shots + "Q: and 1000 plus 1?\nA:"]
    one = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]  # alone: nothing shared
    shared = []
    real = gen_module.prefix_cache
    monkeypatch.setattr(gen_module, "prefix_cache", lambda m, s: shared.append(len(s)) or real(m, s))
    assert generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3) == one
    assert len(shared) == 1 and shared[0] >= MIN_SHARED_PREFIX  # read once, for all three batches
    assert len(set(one)) > 1
    kw = dict(num_samples=2, temperature=1.0, seed=3, max_new_tokens=12)
    assert sample(model, tokenizer, prompts, batch_size=5, **kw) == [sample(model, tokenizer, [p], **kw)[0]
                                                                     for p in prompts]


def test_stop_strings_cut_the_output(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompt = prompt_text(ABILITIES.get("math").generate(1)[0]["messages"], tokenizer)
    full = generate(model, tokenizer, [prompt], max_new_tokens=20)[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = generate(model, tokenizer, [prompt], max_new_tokens=20, stop=[stop])[0]
    assert cut == full.split(stop, 1)[0]



def test_evaluate_scores_gold_replies_one_and_others_zero(tiny_dir, tokenizer, monkeypatch):
    import mixtune.eval.run as run

    gold = {}
    for name in ("math", "general"):
        for r in ABILITIES.get(name).generate(10, split="test"):
            gold[prompt_text(r["messages"], tokenizer)] = r["messages"][-1]["content"]
    monkeypatch.setattr(run, "generate", lambda m, t, prompts, **kw: [gold[p] for p in prompts])
    scores = run.evaluate(None, tokenizer, ["math", "general"], n=10)
    assert {a: s.score for a, s in scores.items()} == {"math": 1.0, "general": 1.0}
    monkeypatch.setattr(run, "generate", lambda m, t, prompts, **kw: ["Answer: nope"] * len(prompts))
    assert run.evaluate(None, tokenizer, ["math"], n=10)["math"].score == 0.0


def test_budget_is_four_times_the_longest_gold_reply_and_at_least_128():
    from mixtune.models.generate import max_tokens_for

    def words(text, add_special_tokens):  # a tokenizer of one token per word
        return {"input_ids": text.split()}

    def records(*lengths):
        return [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "w " * k}]}
                for k in lengths]

    assert max_tokens_for(records(3, 10), words) == 128  # 4 * 10 = 40: the floor
    assert max_tokens_for(records(5, 32), words) == 128  # 4 * 32 = 128
    assert max_tokens_for(records(33, 7), words) == 132  # 4 * 33
    assert max_tokens_for(records(40), words, slack=1.5, floor=16) == 60


def test_a_model_that_stops_pays_nothing_for_the_budget(tiny_dir, tokenizer):
    """Generation ends once every row has emitted EOS: one forward pass per batch, whatever the budget."""
    model = sharpened(tiny_dir)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1.0)[tokenizer.eos_token_id] = 1.0  # every next token is EOS
    model.lm_head = head
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    prompts = [prompt_text(r["messages"], tokenizer) for r in ABILITIES.get("math").generate(10, split="test")]
    assert generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=5) == [""] * 10
    assert len(calls) == 2


def test_untrained_model_scores_zero_on_real_generation(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    scores = evaluate(model, tokenizer, ["math", "code"], n=8)
    assert scores["math"].n == 8 and len(scores["math"].examples) == 8
    assert scores["math"].score == 0.0 and scores["code"].score == 0.0


# --- sampling ---------------------------------------------------------------------------------

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from mixtune.core import ConfigError  # noqa: E402
from mixtune.models.generate import draw, sample, sampling_probs, stream_seed  # noqa: E402


def mixed_prompts(tokenizer, n=6):
    recs = ABILITIES.get("math").generate(n, split="test") + ABILITIES.get("code").generate(n, split="test")
    return [prompt_text(r["messages"], tokenizer) for r in recs]


def test_temperature_divides_the_logits():
    # logits (0, ln 9) / T=2 = (0, ln 3): softmax = (1, 3) / 4
    probs = sampling_probs(torch.tensor([0.0, math.log(9)], dtype=torch.float64), temperature=2.0)
    assert torch.allclose(probs, torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_top_k_keeps_the_k_largest_logits_and_their_ties():
    # logits (1, 3, 2, 0), k=2: keep 3 and 2; softmax over them = (e^3, e^2) / (e^3 + e^2) = (e, 1) / (e + 1)
    probs = sampling_probs(torch.tensor([1.0, 3.0, 2.0, 0.0], dtype=torch.float64), top_k=2)
    e = math.e
    assert torch.allclose(probs, torch.tensor([0, e / (e + 1), 1 / (e + 1), 0], dtype=torch.float64))
    # k=1 with a tie at the top keeps both tied tokens (as HF's TopKLogitsWarper): (1/2, 0, 1/2, 0)
    tied = sampling_probs(torch.tensor([2.0, 1.0, 2.0, 0.0], dtype=torch.float64), top_k=1)
    assert torch.allclose(tied, torch.tensor([0.5, 0, 0.5, 0], dtype=torch.float64))


def test_top_p_keeps_the_smallest_nucleus_with_enough_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()
    # p=0.7: mass before each token 0, 0.5, 0.8, 0.95; keep those with mass before < 0.7 -> (0.5, 0.3) / 0.8
    assert torch.allclose(sampling_probs(logits, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64))
    # p=0.85: 0.8 < 0.85 too -> (0.5, 0.3, 0.15) / 0.95
    expect = torch.tensor([0.5, 0.3, 0.15, 0], dtype=torch.float64) / 0.95
    assert torch.allclose(sampling_probs(logits, top_p=0.85), expect)
    # a tiny p keeps only the most likely token; p=1 keeps the softmax as it is
    assert torch.allclose(sampling_probs(logits, top_p=0.01), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(sampling_probs(logits), logits.exp())


def test_top_k_is_applied_before_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    # top_k=3 first: (4, 3, 2, 0) / 9; mass before: 0, 4/9, 7/9 -> p=0.75 keeps two: (4, 3) / 7.
    # (top_p alone would keep three: mass before 0, 0.4, 0.7 < 0.75.)
    probs = sampling_probs(logits, top_k=3, top_p=0.75)
    assert torch.allclose(probs, torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64))
    assert int((sampling_probs(logits, top_p=0.75) > 0).sum()) == 3


def test_filtering_matches_hf_warpers_on_random_logits():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=gen) * 3
    for t, k, p in [(0.7, 0, 0.9), (1.3, 10, 1.0), (1.0, 20, 0.5), (2.0, 5, 0.3)]:
        hf = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            hf = TopKLogitsWarper(k)(None, hf)
        if p < 1:
            hf = TopPLogitsWarper(p)(None, hf)
        assert torch.allclose(sampling_probs(logits, temperature=t, top_k=k, top_p=p), hf.softmax(-1), atol=1e-6)


def test_draw_is_the_inverse_cdf():
    # probs (0.5, 0, 0.5): cdf (0.5, 0.5, 1.0). u < 0.5 -> token 0; u >= 0.5 -> token 2, never the empty token 1
    probs = torch.tensor([[0.5, 0.0, 0.5]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.999999])
    assert draw(probs, u).tolist() == [0, 0, 2, 2]
    # unnormalised weights are scaled by their sum: (1, 3) -> cdf (0.25, 1.0)
    assert draw(torch.tensor([[1.0, 3.0], [1.0, 3.0]]), torch.tensor([0.24, 0.26])).tolist() == [0, 1]


def test_stream_seeds_differ_by_seed_index_and_prompt():
    seeds = {stream_seed(s, j, p) for s in (0, 1) for j in (0, 1, 2) for p in ("a", "b")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, 1, "a") == stream_seed(0, 1, "a")


def test_samples_do_not_depend_on_batch_size_or_prompt_order(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer)
    kw = dict(num_samples=3, temperature=1.0, top_p=0.95, seed=7, max_new_tokens=10)
    one = sample(model, tokenizer, prompts, batch_size=1, **kw)
    assert sample(model, tokenizer, prompts, batch_size=8, **kw) == one
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled = sample(model, tokenizer, [prompts[i] for i in order], batch_size=5, **kw)
    assert [shuffled[order.index(i)] for i in range(len(prompts))] == one
    # a prompt alone gives the same samples as within the batch
    assert sample(model, tokenizer, [prompts[3]], batch_size=8, **kw) == [one[3]]
    assert all(len(s) == 3 for s in one)
    assert sum(len(set(s)) > 1 for s in one) >= len(prompts) // 2  # the samples of a prompt differ


def test_different_seeds_give_different_samples(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer, 3)
    a = sample(model, tokenizer, prompts, num_samples=2, seed=0, max_new_tokens=10)
    b = sample(model, tokenizer, prompts, num_samples=2, seed=1, max_new_tokens=10)
    assert a != b
    assert sample(model, tokenizer, prompts, num_samples=2, seed=0, max_new_tokens=10) == a


def test_top_k_one_and_low_temperature_equal_greedy(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=12)
    assert len(set(greedy)) > 1
    top1 = sample(model, tokenizer, prompts, num_samples=2, top_k=1, temperature=1.5, max_new_tokens=12)
    assert top1 == [[g, g] for g in greedy]
    cold = generate(model, tokenizer, prompts, temperature=1e-4, max_new_tokens=12, batch_size=4)
    assert cold == greedy


def test_generate_with_temperature_is_sample_zero(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer, 3)
    kw = dict(temperature=1.2, top_k=40, seed=3, max_new_tokens=10)
    first = generate(model, tokenizer, prompts, **kw)
    assert first == [s[0] for s in sample(model, tokenizer, prompts, num_samples=3, **kw)]


def test_sampled_completions_are_cut_at_stop_strings(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer, 3)
    kw = dict(num_samples=2, temperature=1.0, seed=5, max_new_tokens=20)
    full = sample(model, tokenizer, prompts, **kw)
    text = next(t for s in full for t in s if len(t) > 3)
    stop = text[1:3]
    cut = sample(model, tokenizer, prompts, stop=[stop], **kw)
    assert cut == [[t.split(stop, 1)[0] for t in s] for s in full]


def test_progress_counts_prompts_once_all_their_samples_finish(tiny_dir, tokenizer):
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer, 2)  # 4 prompts, 3 samples each = 12 rows, batches of 5
    seen = []
    sample(model, tokenizer, prompts, num_samples=3, max_new_tokens=3, batch_size=5, progress=seen.append)
    assert seen == [1, 2, 1]  # rows 0-4: prompt A done; 5-9: B, C; 10-11: D


@pytest.mark.parametrize(("kw", "words"), [
    (dict(temperature=-1.0), "temperature = -1.0"),
    (dict(temperature=1.0, top_p=0.0), "top_p = 0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p = 1.5"),
    (dict(temperature=1.0, top_k=-2), "top_k = -2"),
    (dict(temperature=1.0, num_samples=0), "num_samples = 0"),
    (dict(temperature=0.0, num_samples=4), "greedy decoding gives the same completion"),
    (dict(temperature=0.0, top_p=0.9), "no effect with temperature = 0"),
])
def test_bad_decoding_parameters_are_config_errors(tokenizer, kw, words):
    with pytest.raises(ConfigError, match=words):
        sample(None, tokenizer, ["x"], **kw)


def test_greedy_generate_rejects_sampling_knobs_without_temperature(tokenizer):
    with pytest.raises(ConfigError, match="no effect with temperature = 0"):
        generate(None, tokenizer, ["x"], top_k=5)


def test_samples_with_their_ids_are_the_samples_and_their_ids_the_tokens_drawn(tiny_dir, tokenizer):
    # return_ids decodes in a loop whose finished rows leave the batch: the same draws as generate's path
    model = sharpened(tiny_dir)
    prompts = mixed_prompts(tokenizer)
    kw = dict(num_samples=3, temperature=1.0, top_p=0.9, top_k=50, seed=5, max_new_tokens=12)
    texts = sample(model, tokenizer, prompts, batch_size=8, **kw)
    with_ids = sample(model, tokenizer, prompts, batch_size=5, return_ids=True, **kw)
    assert [[t for t, _ in row] for row in with_ids] == texts
    eos = tokenizer.eos_token_id
    for row in with_ids:
        for text, ids in row:
            assert ids and (ids[-1] == eos or len(ids) == 12) and eos not in ids[:-1]  # through the first EOS
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert any(len(ids) < 12 for row in with_ids for _, ids in row)  # some rows left the batch early
