"""GRAPE and perplexity selection: the argmax by hand, the model's scores, the cache."""

import json
import math

import pytest
import torch

from mixtune.data.select import SelectConfig, grape, perplexity_filter, response_logprobs, select


def rec(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_grape_keeps_the_best_length_normalised_candidate_per_prompt():
    records = [rec("a", "x"), rec("a", "y"), rec("b", "z"), rec("a", "w")]
    # (sum log p, tokens): a: -4/4 = -1.0, -3/2 = -1.5, -0.9/1 = -0.9 -> the last; b alone
    scores = [(-4.0, 4), (-3.0, 2), (-10.0, 5), (-0.9, 1)]
    assert grape(records, scores) == [2, 3]
    # by the sum alone the first would lose to the second (-3 > -4); normalising by length decides
    assert grape(records[:2], scores[:2]) == [0]
    assert grape(records[:2], [(-2.0, 2), (-1.0, 1)]) == [0]  # a tie keeps the first


def test_perplexity_filter_keeps_the_lowest_fraction():
    scores = [(-4.0, 2), (-1.0, 2), (-9.0, 3), (-0.5, 1)]  # ppl e^2, e^0.5, e^3, e^0.5
    assert perplexity_filter(scores, 0.5) == [1, 3]
    assert perplexity_filter(scores, 0.01) == [1]  # at least one; the tie goes to the earlier


def test_scores_are_the_models_log_probs_and_are_cached(tiny_dir, tmp_path):
    from mixtune.models import load_model

    model, tok = load_model(tiny_dir)
    records = [rec("What is 2+3?", "5"), rec("Say hi.", "hi there friend"), rec("What is 2+3?", "six")]
    cache = tmp_path / "scores.json"
    scores = response_logprobs(records, model, tok, batch_size=2, cache=cache, fingerprint="m")
    # one record by hand: the assistant tokens' log-probs from one unpadded forward pass
    from mixtune.data.format import tokenize_record

    ex = tokenize_record(records[1], tok)
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    target = torch.tensor(ex.labels[1:])
    mask = target != -100
    want = float(logp[mask.nonzero().squeeze(1), target[mask]].sum())
    assert scores[1][1] == int(mask.sum()) and math.isclose(scores[1][0], want, rel_tol=1e-4)
    assert len(json.loads(cache.read_text())) == 3

    class NoForward:  # a second run must not call the model at all
        def eval(self):
            return self

        def __call__(self, **kw):
            raise AssertionError("recomputed a cached score")

    assert response_logprobs(records, NoForward(), tok, cache=cache, fingerprint="m") == scores
    kept = select(records, SelectConfig(method="grape"), NoForward(), tok, cache=cache, fingerprint="m")
    assert kept == ([0, 1] if scores[0][0] / scores[0][1] >= scores[2][0] / scores[2][1] else [1, 2])
    with pytest.raises(Exception, match="last assistant turn"):
        response_logprobs([{"messages": [{"role": "user", "content": "x"}]}], model, tok)


def test_a_recipe_source_selects_with_the_starting_model(tiny_dir, tmp_path, monkeypatch):
    from mixtune.core import validate
    from mixtune.pipeline import prepare_data
    from mixtune.recipe import Recipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = [rec("What is 1+1?", a) for a in ("2", "two", "It is 2")] + [rec("Name a colour.", "red")]
    (tmp_path / "cands.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = validate(Recipe, {"model": str(tiny_dir), "sources": {"c": {"path": "cands.jsonl", "select":
                                                                         {"method": "grape"}}},
                               "format": {"seq_len": 64}, "train": {"steps": 1}})
    data = prepare_data(recipe, tmp_path, select_with=tiny_dir)
    assert data.selected == {"c": (4, 2)}
    assert sum(st.packed.input_ids.shape[0] for st in data.stages) >= 1
    assert list((tmp_path / "cache" / "mixtune" / "select").glob("*.json"))


def test_raw_text_records_cannot_be_selected(tokenizer):
    from mixtune.core import DataError

    with pytest.raises(DataError, match="a raw-text record \\(continued pretraining\\) has none"):
        response_logprobs([{"text": "Alloys are mixtures.", "ability": "domain"}], None, tokenizer)
