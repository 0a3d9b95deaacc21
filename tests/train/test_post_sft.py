"""The stages after SFT (rft, dpo, grpo) in the loop: what they train on, that they learn, and that a
killed stage resumes to the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import ConfigError, validate
from mixtune.pipeline import run_training
from mixtune.recipe import Recipe
from mixtune.train.losses import token_logps
from mixtune.strategy.objectives import RftParams
from mixtune.train.post_sft import acceptance, rft_records
from mixtune.train.preference import sequence_logps
from mixtune.train.rollouts import completion_batch


def rec(q, gold, ability="math"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": gold}], "ability": ability}


def test_rft_keeps_distinct_accepted_replies_capped_with_the_gold_and_s3ft_one_per_prompt():
    records = [rec("q1", "g1"), rec("q2", "g2", "code")]
    sampled = [[("a", 1.0), ("b", 0.0), ("a", 1.0), ("g1", 1.0), ("c", 1.0)], [("x", 0.0), ("y", 0.0)]]
    kept = rft_records(RftParams(), records, sampled)
    # prompt 1: gold, then distinct accepted a, c (the duplicate a and the sample equal to the gold dropped)
    assert [(i, r["messages"][-1]["content"]) for i, r in kept] == [(0, "g1"), (0, "a"), (0, "c"), (1, "g2")]
    capped = rft_records(RftParams(keep=1, gold=False), records, sampled)
    assert [(i, r["messages"][-1]["content"]) for i, r in capped] == [(0, "a")]
    s3ft = rft_records(RftParams(s3ft=True), records, sampled)  # own correct reply, else the gold one
    assert [(i, r["messages"][-1]["content"]) for i, r in s3ft] == [(0, "a"), (1, "g2")]
    assert s3ft[0][1]["messages"][0] == records[0]["messages"][0]
    assert acceptance(records, sampled) == {"code": 0.0, "math": 0.8}
    with pytest.raises(ValueError, match="s3ft keeps one reply"):
        RftParams(s3ft=True, keep=2)


def test_completion_rows_train_only_the_completion_and_token_logps_sum_to_sequence_logps():
    batch = completion_batch([[5, 6, 7], [5]], [[8, 9, 2], [3, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 3, 2, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, 2], [-100, 3, 2, -100, -100, -100]]
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    logp, mask = token_logps(logits, batch["labels"])
    assert mask.sum(-1).tolist() == [3, 2]
    by_hand = torch.log_softmax(logits, -1)[0, 2, 8] + torch.log_softmax(logits, -1)[0, 3, 9]
    assert logp[0, 2] + logp[0, 3] == pytest.approx(float(by_hand), abs=1e-6)
    assert torch.allclose(logp.sum(-1), sequence_logps(logits, batch["labels"]), atol=1e-6)


def recipe(tiny_dir, objective: dict, *, steps=4, save_every=0, sources=None, lr=1e-3) -> Recipe:
    return validate(Recipe, {
        "model": str(tiny_dir),
        "sources": sources or {"math": {"builtin": "math", "n": 16}},
        "format": {"seq_len": 128},
        "stages": [{"name": "sft", "mixture": {"sources": {"math": None}}, "steps": 2},
                   {"name": "post", "mixture": {"sources": {next(iter(sources or {"math": 0})): None}},
                    "steps": steps, "objective": objective}],
        "train": {"lr": lr, "batch_size": 4, "micro_batch_size": 2, "precision": "fp32"},
        "run": {"log_every": 1, "save_every": save_every},
    })


EVEN = {"scorer": "tests.train.rewards:even_length"}  # half the samples earn it, whatever the model


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


OBJECTIVES = {
    "rft": {"name": "rft", "samples": 2, "sampling": {"max_new_tokens": 12}, "reward": EVEN},
    "dpo": {"name": "dpo", "samples": 3, "sampling": {"max_new_tokens": 12}, "reward": EVEN},
    "grpo": {"name": "grpo", "group": 3, "prompts": 2, "sampling": {"max_new_tokens": 12}, "reward": EVEN},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_killed_objective_stage_resumes_to_bitwise_identical_weights(name, tiny_dir, tmp_path):
    full = run_training(recipe(tiny_dir, OBJECTIVES[name], save_every=2), tiny_dir, tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 5:  # stage post, step 3: its checkpoint at global step 4 holds steps 1-2
            raise Killed

    with pytest.raises(Killed):
        run_training(recipe(tiny_dir, OBJECTIVES[name], save_every=2), tiny_dir, tmp_path / "resumed", progress=False,
                     on_step=kill)
    assert (tmp_path / "resumed" / "checkpoints").exists()
    resumed = run_training(recipe(tiny_dir, OBJECTIVES[name], save_every=2), tiny_dir, tmp_path / "resumed",
                           progress=False)
    assert "resuming from " in (tmp_path / "resumed" / "log.jsonl").read_text()
    a, b = load_file(full[-1] / "model.safetensors"), load_file(resumed[-1] / "model.safetensors")
    before = load_file(full[0] / "model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)  # the objective stage changed the weights
    for k in a:
        assert torch.equal(a[k], b[k]), k
    post = [e for e in log_of(tmp_path / "full") if e.get("stage") == "post" and "step" in e]
    assert [e["stage_step"] for e in post] == [1, 2, 3, 4]
    if name == "grpo":
        assert all(0.0 <= e["reward"] <= 1.0 and e["reward/math"] == e["reward"] and e["kl"] >= 0 for e in post)
        assert 0 < sum(e["reward"] for e in post) < 4  # the reward varies, so there is something to learn
    else:
        samples = (tmp_path / "full" / "samples" / "post.jsonl").read_text().splitlines()
        assert json.loads(samples[0])["accepted"]["math"] == pytest.approx(
            sum(c["reward"] for line in samples[1:] for c in json.loads(line)["completions"])
            / sum(len(json.loads(line)["completions"]) for line in samples[1:]))
    if name == "dpo":
        assert all("reward_margin" in e and 0 <= e["reward_accuracy"] <= 1 for e in post)


def test_grpo_learns_what_its_reward_asks(tiny_dir, tmp_path):
    # reward: stop early. The tiny model's samples run to the budget at first; GRPO raises the EOS
    objective = {"name": "grpo", "group": 8, "prompts": 4, "beta": 0.0, "sampling": {"max_new_tokens": 16},
                 "reward": {"scorer": "tests.train.rewards:short"}}
    run_training(recipe(tiny_dir, objective, steps=12, lr=3e-3), tiny_dir, tmp_path, progress=False)
    post = [e for e in log_of(tmp_path) if e.get("stage") == "post" and "step" in e]
    first, last = sum(e["reward"] for e in post[:3]) / 3, sum(e["reward"] for e in post[-3:]) / 3
    assert last > first + 0.3, [round(e["reward"], 3) for e in post]
    assert post[-1]["completion_tokens"] < post[0]["completion_tokens"]


def test_dpo_on_a_preference_file_raises_the_chosen_over_the_rejected(tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say a word about {w}.", "chosen": f"{w} is good.", "rejected": f"{w} bad bad bad."}
            for w in ("cats", "dogs", "owls", "fish", "rain", "snow", "tea", "jam")]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = {"prefs": {"path": str(pairs)}}
    for loss in ("dpo", "ipo", "simpo"):
        out = tmp_path / loss
        r = validate(Recipe, recipe(tiny_dir, {"name": "dpo", "loss": loss}, steps=8, lr=3e-3).model_dump(mode="json")
                     | {"sources": {"math": {"builtin": "math", "n": 16}} | sources,
                        "stages": [{"name": "post", "mixture": {"sources": {"prefs": None}}, "steps": 8,
                                    "objective": {"name": "dpo", "loss": loss}}]})
        run_training(r, tmp_path, out, progress=False)
        post = [e for e in log_of(out) if "step" in e]
        assert post[-1]["loss"] < post[0]["loss"], (loss, [e["loss"] for e in post])
        assert post[-1]["reward_margin"] > post[0]["reward_margin"], loss
        assert not (out / "samples").exists()  # every pair came from the file


def test_objective_stages_refuse_what_they_cannot_use(tiny_dir, tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text(json.dumps({"text": "plain text"}) + "\n")
    r = recipe(tiny_dir, OBJECTIVES["grpo"], sources={"docs": {"path": str(text)}, "math": {"builtin": "math", "n": 16}})
    with pytest.raises(ConfigError, match="raw-text records have none"):
        run_training(r, tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="draws its prompts shuffled; drop mixing"):
        validate(Recipe, recipe(tiny_dir, OBJECTIVES["grpo"]).model_dump(mode="json") | {"stages": [
            {"name": "x", "mixture": {"sources": {"math": None}}, "objective": {"name": "grpo"},
             "mixing": {"name": "stratified"}}]})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "phi3", "phi", "gpt2", "gpt_neox"])
def test_a_packed_group_gives_the_padded_rows_log_probabilities(arch):
    import transformers

    from mixtune.train.post_sft import completion_logps, pack_groups, packing_works
    from tests.train.test_architectures import ARCHS, COMMON

    cls, fields, *_ = ARCHS[arch]
    config = getattr(transformers, cls)(vocab_size=97, pad_token_id=0, **({} if arch == "gpt2" else COMMON) | fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(97, (n,), generator=g).tolist() for n in (7, 4)]
    completions = [torch.randint(97, (n,), generator=g).tolist() for n in (3, 5, 1, 4, 2, 6)]
    prompt_ids = [prompts[0]] * 3 + [prompts[1]] * 3
    with torch.no_grad():
        padded, mask = completion_logps(model, prompt_ids, completions, 0, "cpu")
        packed, pmask = completion_logps(model, prompt_ids, completions, 0, "cpu", group=3)
    assert pmask.sum(-1).tolist() == [3, 5, 1, 4, 2, 6]
    worst = max(float((padded[i][mask[i]] - packed[i][pmask[i]]).abs().max()) for i in range(6))
    if arch == "gemma2":  # its attention does not take the 4D mask as given: GRPO sees that and pads instead
        assert worst > 1e-2 and not packing_works(model, "cpu")
    else:
        assert worst < 1e-4, worst  # measured: ~1e-6 (float rounding of the same products)
        assert packing_works(model, "cpu")
    pk = pack_groups(prompt_ids, completions, 3, 0)
    assert pk.input_ids.shape == (2, 7 + 9) and pk.position_ids[0].tolist() == list(range(10)) + [7, 8, 9, 10, 11, 7]
    assert pk.mask[0, 0, 10, 6] and not pk.mask[0, 0, 10, 7]  # the second completion sees the prompt, not the first


def test_rewards_are_the_built_in_ability_a_scorer_over_a_field_or_the_users_function():
    from mixtune.data.abilities import ABILITIES
    from mixtune.strategy.objectives import Reward
    from mixtune.train.rollouts import check_rewardable, reward

    maths = ABILITIES.get("math").generate(1, seed=0)[0]
    assert reward(maths, f"so. Answer: {maths['answer']}") == 1.0 and reward(maths, "Answer: -1") == 0.0
    mine = rec("How many legs has a cat?", "4") | {"ability": "trivia", "gold": ["4", "four"]}
    numeric = Reward(scorer="numeric", references="gold")
    assert reward(mine, "It has 4 legs.", numeric) == 1.0 and reward(mine, "3", numeric) == 0.0
    assert reward(mine, "four", Reward(scorer="exact", references="gold")) == 1.0
    assert reward(mine, "ab", Reward(scorer="tests.train.rewards:even_length")) == 1.0
    with pytest.raises(ConfigError, match=r"'trivia' has none; take prompts from built-in abilities"):
        check_rewardable([mine], "rl")
    with pytest.raises(ConfigError, match=r"references = 'answer', and record 1 of the stage has no such field"):
        check_rewardable([mine], "rl", Reward(scorer="exact"))
    check_rewardable([mine], "rl", numeric)
    with pytest.raises(ValueError, match="scorer"):
        Reward(scorer="nonsense")
