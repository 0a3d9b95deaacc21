"""Multiple choice by log-likelihood: hand-computed acc/acc_norm, and parity with lm-evaluation-harness
0.4.13 itself (a test extra, MIT) on a local MMLU-style task and the built-in tiny model."""

import json
import math
import random
import textwrap

import numpy as np
import pytest
import torch

from mixtune.core import DataError
from mixtune.eval.choice import (
    ChoiceItem,
    choice_metrics,
    continuation_loglikelihoods,
    encode_pair,
    score_multiple_choice,
)
from mixtune.models.prefix import MIN_SHARED_PREFIX, shared_prefix
from mixtune.models import load_model

# MMLU-style questions with choices of unequal length, so acc and acc_norm can disagree. Two contexts end
# in whitespace (lm-eval moves it into the continuation); one has non-ASCII text (characters != bytes).
QUESTIONS = [
    ("Question: What is the capital of France?\nAnswer:", ["Paris", "Lyon", "Marseille", "Nice"], 0),
    ("Question: Which gas do plants take in?\nAnswer:", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    ("Question: How many legs has a spider?\nAnswer:", ["six", "ten", "eight", "four"], 2),
    ("Question: What is 7 times 6?\nAnswer:", ["42", "36", "48", "49"], 0),
    ("Question: Which planet is the largest?\nAnswer: ", ["Mars", "Venus", "Jupiter", "Mercury"], 2),
    ("Question: Boiling point of water at sea level?\nAnswer:", ["90 °C", "100 °C", "120 °C", "80 °C"], 1),
    ("Question: Who wrote Hamlet?\nAnswer:", ["Charles Dickens", "Jane Austen", "Mark Twain", "Shakespeare"], 3),
    ("Question: The café served crème brûlée. Which language?\nAnswer:", ["French", "German", "Italian", "Thai"], 0),
    ("Question: Which is a prime number?\nAnswer:", ["21", "27", "29", "33"], 2),
    ("Question: Opposite of 'ancient'?\nAnswer:  ", ["modern", "old", "antique", "archaic"], 0),
    ("Question: What colour is a ripe banana?\nAnswer:", ["blue", "yellow", "purple", "a dark shade of green"], 1),
    ("Question: Which animal is a mammal?\nAnswer:", ["shark", "trout", "dolphin", "octopus"], 2),
]
ITEMS = [ChoiceItem(q, c, g) for q, c, g in QUESTIONS]
# the same questions after a shared few-shot prompt (the first two answered), as MMLU's 5-shot contexts are
SHOTS = "The following are questions (with answers) about general knowledge.\n\n" + "".join(
    f"{q} {c[g]}\n\n" for q, c, g in QUESTIONS[:2])
SHOT_ITEMS = [ChoiceItem(SHOTS + q, c, g) for q, c, g in QUESTIONS]


# --- acc / acc_norm on made-up log-likelihoods (lm-eval's process_results, by hand) ---------------

def test_acc_and_acc_norm_by_hand():
    # item 0: lls (-2, -4), lengths (1, 4): acc argmax -> 0; per char -2/1 = -2 < -4/4 = -1 -> acc_norm 1
    # item 1: lls (-6, -3, -9), lengths (3, 3, 9): argmax -> 1; per char (-2, -1, -1) tie -> first, 1
    # item 2: "é" is 1 character (2 bytes): per char (-3/1, -5/2) = (-3, -2.5) -> 1; argmax -> 0
    r = choice_metrics([[-2.0, -4.0], [-6.0, -3.0, -9.0], [-3.0, -5.0]],
                       [["a", "bbbb"], ["ccc", "ddd", "eeeeeeeee"], ["é", "ff"]], [1, 1, 0])
    assert r.pred == [0, 1, 0]
    assert r.pred_norm == [1, 1, 1]
    assert r.acc == [0.0, 1.0, 1.0] and r.acc_norm == [1.0, 1.0, 0.0]
    assert r.acc_mean == pytest.approx(2 / 3) and r.acc_norm_mean == pytest.approx(2 / 3)
    # stderr = sample sd / sqrt(n): values (0, 1, 1), mean 2/3, sum of squares 4/9 + 1/9 + 1/9 = 2/3,
    # / (n - 1) = 1/3, sd = 0.57735, / sqrt(3) = 1/3
    assert r.acc_stderr == pytest.approx(1 / 3) and r.acc_norm_stderr == pytest.approx(1 / 3)


def test_ties_go_to_the_first_choice_and_one_item_has_no_stderr():
    r = choice_metrics([[-1.0, -1.0, -2.0]], [["xx", "xx", "y"]], [1])
    assert (r.pred, r.pred_norm, r.acc) == ([0], [0], [0.0])  # numpy.argmax's rule; -2/1 < -1/2
    assert math.isnan(r.acc_stderr)


@pytest.mark.parametrize("lls, choices, gold, where", [
    ([[-1.0, -2.0]], [["a", "b"]], [2], "item 0: gold index 2; expected an integer in 0..1"),
    ([[-1.0, -2.0]], [["a", ""]], [0], "item 0: choice 1 is empty"),
])
def test_bad_items_are_data_errors(lls, choices, gold, where):
    with pytest.raises(DataError, match=where):
        choice_metrics(lls, choices, gold)


def test_an_item_without_choices_is_a_data_error(tiny_dir):
    model, tok = load_model(tiny_dir)
    with pytest.raises(DataError, match="item 1: no choices"):
        score_multiple_choice(model, tok, [ITEMS[0], ChoiceItem("Q?", [], 0)])


# --- tokenization and log-likelihoods against a plain forward pass per request ---------------------

def reference_loglikelihood(model, ctx, cont, max_length):
    """lm-eval's definition written out: one full forward of (ctx + cont)[-(L+1):][:-1] per request."""
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).logits[0], -1)[len(inp) - len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_trailing_context_whitespace_moves_into_the_continuation(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "Paris")
    assert ctx == tokenizer.encode("Answer:")
    assert cont == tokenizer.encode("Answer: Paris")[len(ctx):]
    assert tokenizer.decode(cont) == " Paris"
    # an empty context is the prefix token (BOS here)
    assert encode_pair(tokenizer, "", " Paris") == ([tokenizer.bos_token_id], tokenizer.encode(" Paris"))


def test_the_shared_prefix_leaves_every_context_a_token_and_is_long_or_nothing():
    long = list(range(MIN_SHARED_PREFIX))
    assert shared_prefix([long + [1, 2], long + [1, 3], long + [1]]) == tuple(long)  # [1] keeps its last token
    assert shared_prefix([long + [1, 2], long + [1, 2, 5]]) == tuple(long + [1])
    assert shared_prefix([long[1:] + [2, 1], long[1:] + [3, 1]]) == ()  # 15 tokens: not worth a pass
    assert shared_prefix([long + [1, 2]]) == () and shared_prefix([[7] + long, long]) == ()


@pytest.mark.parametrize("batch_size, max_length, shots", [(16, None, False), (1, None, False), (5, 12, False),
                                                           (16, None, True), (5, None, True), (5, 40, True)])
def test_loglikelihoods_match_one_forward_per_request(tiny_dir, batch_size, max_length, shots):
    model, tok = load_model(tiny_dir)
    if shots:  # every context starts with the few-shot prompt: it runs once, the contexts from its cache
        requests = [(it.context, " " + c) for it in SHOT_ITEMS[:6] for c in it.choices]
        truncated = [encode_pair(tok, c, x)[0][-(max_length or 1024) - 1 + len(encode_pair(tok, c, x)[1]):]
                     for c, x in requests]
        # cut from the left to 40 tokens, the contexts no longer start alike: the plain path
        assert (len(shared_prefix(truncated)) >= MIN_SHARED_PREFIX) == (max_length is None)
    else:
        requests = [(it.context, " " + c) for it in ITEMS[:6] for c in it.choices] + [("", " alone"), ("abc", "d")]
    got = continuation_loglikelihoods(model, tok, requests, batch_size=batch_size, max_length=max_length)
    for (c, x), (ll, greedy) in zip(requests, got, strict=True):
        ref_ll, ref_greedy = reference_loglikelihood(model, *encode_pair(tok, c, x), max_length or 1024)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


def test_a_continuation_longer_than_the_model_is_a_data_error(tiny_dir):
    model, tok = load_model(tiny_dir)
    with pytest.raises(DataError, match=r"request 0: continuation ' a b c d e f' encodes to \d+ tokens; "
                                        r"expected 1 to 3"):
        continuation_loglikelihoods(model, tok, [("Q:", " a b c d e f")], max_length=3)


# --- parity with lm-evaluation-harness itself ------------------------------------------------------

@pytest.fixture(scope="module")
def lm_eval_run(sharp_dir, tmp_path_factory):
    """lm-eval's own HF backend on a local MMLU-style task YAML, offline, once per max_length."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_task")
    (folder / "tasks").mkdir()
    for task, items in (("mixtune_mc", ITEMS), ("mixtune_mc_shots", SHOT_ITEMS)):
        (folder / f"{task}.json").write_text("".join(json.dumps(
            {"question": it.context, "choices": list(it.choices), "answer": it.gold}) + "\n" for it in items))
        (folder / "tasks" / f"{task}.yaml").write_text(textwrap.dedent(f"""\
        task: {task}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / f'{task}.json'}
          cache_dir: {folder / 'hf_cache'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    runs = {}
    states = random.getstate(), np.random.get_state()  # simple_evaluate seeds the global generators
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        # 16 tokens: every request is cut from the left; the few-shot contexts run from their prefix's cache
        for task, max_length in (("mixtune_mc", None), ("mixtune_mc", 16), ("mixtune_mc_shots", None)):
            extra = f",max_length={max_length}" if max_length else ""
            runs[task, max_length] = lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={sharp_dir},dtype=float32{extra}", tasks=[task],
                task_manager=TaskManager(include_path=str(folder / "tasks"), include_defaults=False),
                log_samples=True, batch_size=8, device="cpu")
    random.setstate(states[0])
    np.random.set_state(states[1])
    return runs


@pytest.mark.parametrize("task, max_length", [("mixtune_mc", None), ("mixtune_mc", 16), ("mixtune_mc_shots", None)])
def test_same_loglikelihoods_choices_and_scores_as_lm_eval(sharp_dir, lm_eval_run, task, max_length):
    run = lm_eval_run[task, max_length]
    items = SHOT_ITEMS if task == "mixtune_mc_shots" else ITEMS
    samples = sorted(run["samples"][task], key=lambda s: s["doc_id"])
    model, tok = load_model(sharp_dir)
    ours = score_multiple_choice(model, tok, items, batch_size=8, max_length=max_length)
    requests = [(it.context, " " + c) for it in items for c in it.choices]
    greedy = [g for _, g in continuation_loglikelihoods(model, tok, requests, max_length=max_length)]

    assert [tuple(a) for s in samples for a in s["arguments"]] == requests  # the same requests
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    assert np.allclose(ours.loglikelihoods, theirs, rtol=0, atol=1e-4)
    assert greedy == [g for s in samples for _, g in s["filtered_resps"]]
    assert ours.pred == [int(np.argmax(t)) for t in theirs]
    assert ours.acc == [s["acc"] for s in samples] and ours.acc_norm == [s["acc_norm"] for s in samples]
    res = run["results"][task]
    assert ours.acc_mean == pytest.approx(res["acc,none"]) and ours.acc_norm_mean == pytest.approx(res["acc_norm,none"])
    assert ours.acc_stderr == pytest.approx(res["acc_stderr,none"])
    assert ours.acc_norm_stderr == pytest.approx(res["acc_norm_stderr,none"])
    assert ours.pred != ours.pred_norm  # the comparison has teeth: acc_norm disagrees with acc on some items


def test_same_loglikelihoods_as_lm_eval_with_a_bos_adding_tokenizer(sharp_dir):
    """A Llama-style tokenizer that adds BOS: lm-eval's special-token rules (BOS already in the text, empty
    context, add_bos_token=False) on the same awkward requests, through lm-eval's HFLM.loglikelihood."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers.processors import TemplateProcessing

    model, tok = load_model(sharp_dir)
    prompt = tok.encode("Q:")
    with torch.no_grad():  # the model's own greedy continuation, so one request has is_greedy True
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)
    greedy_text = tok.decode(generated[0, len(prompt):])
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
    assert tok.encode("hi")[0] == tok.bos_token_id
    requests = [(ITEMS[0].context, " Paris"), (ITEMS[4].context, " Mars"), ("", " alone"), (bos + "Q: x?", " y"),
                ("Q:", bos + " z"), ("abc", "d"), ("Q:", greedy_text)]
    for add_bos in (None, False):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", add_bos_token=add_bos)
        theirs = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)],
                                  disable_tqdm=True)
        ours = continuation_loglikelihoods(model, tok, requests, add_bos_token=add_bos)
        assert [encode_pair(tok, *r, add_bos_token=add_bos) for r in requests if r[0]] == [
            lm._encode_pair(*r) for r in requests if r[0]]  # lm-eval handles "" before _encode_pair
        assert np.allclose([ll for ll, _ in ours], [ll for ll, _ in theirs], rtol=0, atol=1e-4)
        assert [g for _, g in ours] == [g for _, g in theirs]
        if add_bos is False:  # the context the generation saw, so the greedy check has a True to match
            assert ours[-1][1]

