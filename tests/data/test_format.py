import random

import pytest
import torch

from mixtune.core import DataError
from mixtune.data.format import IGNORE, Example, pack, prompt_text, render_with_spans, tokenize_record, tokenize_records

RECORD = {"messages": [{"role": "user", "content": "Tom has 2 pens. He finds 8 more. Then he loses 4. How many?"},
                       {"role": "assistant", "content": "2+8=10. 10-4=6. Answer: 6"}]}


def trained_text(ex: Example, tok) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_labels_cover_exactly_the_assistant_reply_and_end_marker(tokenizer):
    ex = tokenize_record(RECORD, tokenizer)
    assert tokenizer.decode(ex.input_ids) == (
        "<|bos|><|user|>\nTom has 2 pens. He finds 8 more. Then he loses 4. How many?<|end|>\n"
        "<|assistant|>\n2+8=10. 10-4=6. Answer: 6<|end|>\n")
    assert trained_text(ex, tokenizer) == "2+8=10. 10-4=6. Answer: 6<|end|>\n"
    # the trained tokens are one contiguous run at the end, and labels equal the inputs there
    mask = [lab != IGNORE for lab in ex.labels]
    first = mask.index(True)
    assert all(mask[first:]) and not any(mask[:first])
    assert ex.labels[first:] == ex.input_ids[first:]


def test_every_assistant_turn_is_trained_and_nothing_else(tokenizer):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a?"},
                        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "b?"},
                        {"role": "assistant", "content": "B2"}]}
    ex = tokenize_record(rec, tokenizer)
    assert trained_text(ex, tokenizer) == "A1<|end|>\nB2<|end|>\n"


def test_default_template_for_tokenizers_without_one(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert tokenize_record(RECORD, bare) == tokenize_record(RECORD, tokenizer)


def test_a_tokenizer_without_a_chat_template_is_warned_about_once(tokenizer, caplog):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with caplog.at_level("WARNING", logger="mixtune.data.format"):
        tokenize_records([RECORD, RECORD], bare)
        prompt_text(RECORD["messages"], bare)
    warned = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warned) == 1 and "mixtune's default format" in warned[0]
    caplog.clear()
    tokenize_record(RECORD, tokenizer)  # a tokenizer with its own template: no warning
    assert not [r for r in caplog.records if "no chat template" in r.getMessage()]


# A ChatML template as Qwen2.5-Instruct's behaves (written here): a default system turn when the
# conversation has none, and a generation prompt that opens the assistant turn.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_the_models_own_template_renders_as_apply_chat_template_and_trains_each_reply(tokenizer, system):
    import copy

    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML
    turns = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    text, spans = render_with_spans(messages, chatml)
    assert text == chatml.apply_chat_template(messages, tokenize=False)
    assert [text[a:b] for a, b in spans] == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    ex = tokenize_record({"messages": messages}, chatml)
    assert chatml.decode(ex.input_ids) == text
    assert trained_text(ex, chatml) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    assert prompt_text(messages[:-1], chatml) == chatml.apply_chat_template(messages[:-1], tokenize=False,
                                                                            add_generation_prompt=True)


def test_prompt_is_the_training_prefix(tokenizer):
    text, spans = render_with_spans(RECORD["messages"], tokenizer)
    prompt = prompt_text(RECORD["messages"], tokenizer)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)
    assert spans == [(len(prompt), len(text))]


def test_prefix_unstable_template_is_an_error(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)
    # renders the number of messages first, so a prefix of the conversation renders differently
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_record(RECORD, odd)


def random_examples(n, seed=0, lo=3, hi=60):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        ids = [rng.randrange(10, 500) for _ in range(k)]
        out.append(Example(ids, [IGNORE] * (k // 2) + ids[k // 2:]))
    return out


def test_packing_keeps_every_token_once():
    exs = random_examples(300)
    p = pack(exs, 128, pad_id=2, sources=[i % 3 for i in range(300)])
    assert p.input_ids.shape[1] == 128
    seen = {}
    for r in range(p.input_ids.shape[0]):
        for c in range(128):
            e = int(p.example_ids[r, c])
            if e < 0:
                assert p.input_ids[r, c] == 2 and p.labels[r, c] == IGNORE and p.source_ids[r, c] == -1
                continue
            pos = int(p.position_ids[r, c])
            assert (e, pos) not in seen
            seen[(e, pos)] = (int(p.input_ids[r, c]), int(p.labels[r, c]), int(p.source_ids[r, c]))
    assert len(seen) == sum(len(e.input_ids) for e in exs)
    for i, ex in enumerate(exs):
        got = [seen[(i, j)] for j in range(len(ex.input_ids))]
        assert [g[0] for g in got] == ex.input_ids
        assert [g[1] for g in got] == [IGNORE] + ex.labels[1:]  # first label of each example masked
        assert {g[2] for g in got} == {i % 3}


def test_packing_is_tight_and_each_example_sits_in_one_row():
    exs = random_examples(500)
    p = pack(exs, 256, pad_id=0)
    lower_bound = -(-sum(len(e.input_ids) for e in exs) // 256)
    assert p.input_ids.shape[0] <= lower_bound + 1
    assert p.efficiency > 0.97
    rows_of = {}
    for r in range(p.input_ids.shape[0]):
        for e in set(p.example_ids[r].tolist()) - {-1}:
            assert rows_of.setdefault(e, r) == r


def test_long_examples_error_drop_or_truncate():
    exs = [Example(list(range(10, 20)), list(range(10, 20))), Example([5, 6, 7], [5, 6, 7])]
    with pytest.raises(DataError, match="math #0 has 10 tokens, longer than seq_len = 8"):
        pack(exs, 8, pad_id=0, where=["math #0", "math #1"])
    with pytest.raises(DataError, match="^example 1 has 10 tokens"):  # counted from 1, as lines are
        pack(exs, 8, pad_id=0)
    dropped = pack(exs, 8, pad_id=0, long_examples="drop")
    assert dropped.dropped == 1 and dropped.n_tokens == 3
    cut = pack(exs, 8, pad_id=0, long_examples="truncate")
    assert cut.truncated == 1 and cut.n_tokens == 11
    assert cut.input_ids[0].tolist() == list(range(10, 18))


def test_packed_examples_do_not_attend_to_each_other(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from mixtune.data.abilities import ABILITIES

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.weight, std=0.5)  # make attention matter
    recs = ABILITIES.get("math").generate(3) + ABILITIES.get("code").generate(3)
    exs = tokenize_records(recs, tokenizer)
    p = pack(exs, 256, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
        naive = model(input_ids=p.input_ids, use_cache=False).logits
        worst_packed = worst_naive = 0.0
        for i, ex in enumerate(exs):
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            r = int((p.example_ids == i).any(1).nonzero()[0])
            cols = (p.example_ids[r] == i).nonzero().flatten()
            worst_packed = max(worst_packed, (packed[r, cols] - alone).abs().max().item())
            worst_naive = max(worst_naive, (naive[r, cols] - alone).abs().max().item())
    assert worst_packed < 1e-4  # same logits as running the example alone
    assert worst_naive > 1e-2  # while plain concatenation would leak (so the check can fail)


def test_c_rlft_condition_opens_every_turn_and_is_never_trained(tokenizer):
    from mixtune.data.format import prompt_text, render_with_spans, tokenize_records

    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "Answer: 5"}]
    text, spans = render_with_spans(messages, tokenizer, "GPT4")
    assert "<|user|>\nGPT4 What is 2+3?" in text and "<|assistant|>\nGPT4 Answer: 5" in text
    assert text[spans[0][0]:spans[0][1]].startswith("Answer: 5")  # the tag is context, not target
    (ex,) = tokenize_records([{"messages": messages, "condition": "GPT4"}], tokenizer)
    trained = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
    assert "GPT4" not in trained and "5" in trained
    assert prompt_text(messages, tokenizer, "GPT4").endswith("<|assistant|>\nGPT4 ")  # the inference condition
    assert prompt_text(messages, tokenizer) == prompt_text(messages, tokenizer, None)
    assert "GPT4" not in prompt_text(messages, tokenizer)


def test_raw_text_is_trained_on_every_token_and_long_documents_are_cut_into_rows(tokenizer):
    doc = "Steel is an alloy of iron and carbon. " * 6
    chat, text = tokenize_records([RECORD, {"text": doc}], tokenizer)
    assert not chat.divisible and text.divisible
    assert text.input_ids == tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]  # the document, then EOS
    assert text.labels == text.input_ids  # every token trained
    ids, seq = text.input_ids, len(text.input_ids) // 3 + 1  # two full rows and a shorter piece
    packed = pack([text, chat], seq, pad_id=0, long_examples="truncate")
    assert packed.truncated == 1 and packed.dropped == 0  # only the conversation is cut short; the text is divided
    pieces = []
    for r in range(packed.input_ids.shape[0]):
        mine = packed.example_ids[r] == 0
        if mine.any():
            assert packed.position_ids[r][mine].tolist() == list(range(int(mine.sum())))  # a piece starts at 0
            pieces.append((packed.input_ids[r][mine].tolist(), packed.labels[r][mine].tolist()))
    assert sorted(p for p, _ in pieces) == sorted([ids[:seq], ids[seq:2 * seq], ids[2 * seq:]])
    assert all(lab == [IGNORE] + p[1:] for p, lab in pieces)  # every token but a row's first is trained
