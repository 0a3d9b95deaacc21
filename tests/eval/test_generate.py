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


def test_untrained_model_scores_zero_on_real_generation(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    scores = evaluate(model, tokenizer, ["math", "code"], n=8)
    assert scores["math"].n == 8 and len(scores["math"].examples) == 8
    assert scores["math"].score == 0.0 and scores["code"].score == 0.0
