"""Loss parity with TRL 1.16.0 (the ``test`` extra pins it): the same log-probabilities give the same
losses to 1e-6, computed by TRL's own trainer methods.

TRL's losses are trainer methods, so each is called unbound with a ``SimpleNamespace`` standing in
for ``self``, holding only the attributes the method reads, and stub models that return given
log-probabilities. No trainer, model or dataset is built. Line numbers refer to TRL 1.16.0:

- ``trl/trainer/dpo_trainer.py`` ``DPOTrainer._compute_loss`` (L1285): ``"sigmoid"`` and ``"ipo"``.
- ``trl/experimental/cpo/cpo_trainer.py`` ``CPOTrainer.cpo_loss`` (L678): ``"simpo"``, and
  ``"sigmoid"`` for label-smoothed DPO; ``CPOTrainer.get_batch_logps`` (L752).
- ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._compute_loss`` (L3020), and the advantages of
  ``_generate_and_score_completions`` (L2759-2810) with ``trl/trainer/utils.py`` ``nanstd``.
"""

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is a test extra (pip install -e '.[test]')")
with warnings.catch_warnings():  # "You are importing from 'trl.experimental'": CPO lives there in 1.16
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd, selective_log_softmax  # noqa: E402

from mixtune.train.grpo import group_advantages, grpo_loss  # noqa: E402
from mixtune.train.preference import dpo_loss, ipo_loss, sequence_logps, simpo_loss  # noqa: E402

TOL = 1e-6
# float64 throughout, so that 1e-6 tests conventions, not the order of float32 roundings (an IPO
# loss of ~50 is only good to ~4e-6 in float32)
F64 = torch.float64
CPU = torch.device("cpu")


def test_trl_version_is_the_pinned_one():
    # the line numbers above, and the conventions each test pins, are 1.16.0's
    assert trl.__version__ == "1.16.0"


def accelerator(num_processes: int = 1) -> SimpleNamespace:
    """One process: gathers and reductions are the identity (TRL uses them for metrics only, and
    ``num_processes`` in the ``"dapo"`` normaliser)."""
    return SimpleNamespace(device=CPU, num_processes=num_processes, process_index=0, sync_gradients=True,
                           gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)


def metrics() -> defaultdict:
    return defaultdict(lambda: defaultdict(list))


# --- preference losses ------------------------------------------------------------------------------------------


def pairs(seed: int, n_pairs: int = 5, length: int = 9, vocab: int = 11) -> dict:
    """A DPO batch as TRL's collator lays it out: rows [chosen..., rejected...], a prompt of 1-3
    tokens, a completion of 1 to the rest, then padding; random policy and reference logits."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    prompt = torch.randint(1, 4, (rows,), generator=g)
    completion = torch.stack([torch.randint(1, length - int(p) + 1, (1,), generator=g)[0] for p in prompt])
    pos = torch.arange(length)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + completion)[:, None])).long()  # (2N, L)
    attention_mask = (pos < (prompt + completion)[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "policy": 2 * torch.randn(rows, length, vocab, generator=g, dtype=F64),
            "ref": 2 * torch.randn(rows, length, vocab, generator=g, dtype=F64)}


class FusedLMStub:
    """Stands in for a model patched by TRL's ``add_fused_lm_head`` (``trl/trainer/utils.py``
    L1548): called with ``labels`` and ``fused_lm_head=True``, it returns per-token log-probs of
    ``labels[:, 1:]`` under fixed logits, 0 where the label is -100, ``(rows, L - 1)``."""

    def __init__(self, logits: torch.Tensor, input_ids: torch.Tensor):
        self.logits, self.input_ids = logits, input_ids

    def __call__(self, *, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head and torch.equal(input_ids, self.input_ids)
        target = labels[:, 1:]
        mask = target != -100
        log_probs = selective_log_softmax(self.logits[:, :-1], target.clamp(min=0)).masked_fill(~mask, 0.0)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               aux_loss=None)


def trl_dpo(batch: dict, loss_type: str, beta: float, label_smoothing: float = 0.0) -> tuple[float, dict]:
    """``DPOTrainer._compute_loss`` on ``batch``, the reference computed on the fly (not precomputed)."""
    model = torch.nn.Module()  # self.model: accelerate's is_peft_model unwraps it, so a real (empty) Module
    model.is_gradient_checkpointing = False
    this = SimpleNamespace(
        model=model, accelerator=accelerator(),
        ref_model=FusedLMStub(batch["ref"], batch["input_ids"]), precompute_ref_logps=False, aux_loss_enabled=False,
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=metrics(), _total_train_tokens=0, _tp_size=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss = DPOTrainer._compute_loss(this, FusedLMStub(batch["policy"], batch["input_ids"]), inputs,
                                    return_outputs=False)
    return loss.item(), {k: v[0] for k, v in this._metrics["train"].items()}


def our_logps(batch: dict, average: bool) -> tuple[torch.Tensor, ...]:
    """(policy chosen, policy rejected, ref chosen, ref rejected) by :func:`sequence_logps`, with
    the labels TRL builds: ``input_ids`` where ``completion_mask`` is 1, -100 elsewhere."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    policy = sequence_logps(batch["policy"], labels, average=average).chunk(2)
    ref = sequence_logps(batch["ref"], labels, average=average).chunk(2)
    return policy[0], policy[1], ref[0], ref[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_dpo_trainer(seed, beta):
    batch = pairs(seed)
    trl_loss, logged = trl_dpo(batch, "sigmoid", beta)
    losses, chosen, rejected = dpo_loss(*our_logps(batch, average=False), beta=beta)
    assert trl_loss > 0
    assert abs(losses.mean().item() - trl_loss) < TOL
    # TRL logs the batch means of the same implicit rewards beta (log pi - log ref)
    assert abs(chosen.mean().item() - logged["rewards/chosen"]) < TOL
    assert abs(rejected.mean().item() - logged["rewards/rejected"]) < TOL
    assert abs((chosen - rejected).mean().item() - logged["rewards/margins"]) < TOL
    assert abs(our_logps(batch, average=False)[0].mean().item() - logged["logps/chosen"]) < TOL


def test_dpo_trainer_sigmoid_ignores_label_smoothing():
    # TRL >= 0.29's "sigmoid" reads no label_smoothing (dpo_trainer.py L1387-1388); ours applies cDPO.
    # If a later TRL honours it again, this fails and preference.dpo_loss's docstring needs updating.
    batch = pairs(3)
    trl_loss, _ = trl_dpo(batch, "sigmoid", 0.1, label_smoothing=0.2)
    logps = our_logps(batch, average=False)
    assert abs(dpo_loss(*logps, beta=0.1)[0].mean().item() - trl_loss) < TOL
    assert abs(dpo_loss(*logps, beta=0.1, label_smoothing=0.2)[0].mean().item() - trl_loss) > 1e-3


def trl_cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float,
                 label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, ...]:
    """``CPOTrainer.cpo_loss``: (losses, chosen_rewards, rejected_rewards), each ``(B,)``."""
    this = SimpleNamespace(alpha=0.0, accelerator=accelerator(), loss_type=loss_type, beta=beta,
                           label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return CPOTrainer.cpo_loss(this, chosen, rejected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_label_smoothing_matches_cpo_sigmoid(beta, label_smoothing):
    # TRL 1.16 keeps the cDPO form -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z) in
    # CPO's "sigmoid" (cpo_trainer.py L723-728), with z = chosen - rejected and no reference model:
    # given the log-ratios log pi - log ref it is DPO's loss, and its rewards beta * input are DPO's.
    pc, pr, rc, rr = our_logps(pairs(4), average=False)
    want = trl_cpo_loss(pc - rc, pr - rr, "sigmoid", beta, label_smoothing)
    got = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(g, w, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_on_mean_logps_matches_dpo_trainer(seed, beta):
    # TRL's "ipo" divides each summed log-ratio by its completion's token count (dpo_trainer.py
    # L1393-1404), so ours gets per-token mean log-probs. TRL counts completion_mask over the
    # unshifted ids; every prompt here has >= 1 token, so that is the scored-token count.
    batch = pairs(seed)
    trl_loss, logged = trl_dpo(batch, "ipo", beta)
    losses, chosen, _ = ipo_loss(*our_logps(batch, average=True), beta=beta)
    assert abs(losses.mean().item() - trl_loss) < TOL
    # documented difference: TRL logs rewards from the *summed* log-ratios, ours are from the means given
    summed = our_logps(batch, average=False)
    assert abs(beta * (summed[0] - summed[2]).mean().item() - logged["rewards/chosen"]) < TOL
    assert abs(chosen.mean().item() - logged["rewards/chosen"]) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_logps_matches_cpo_get_batch_logps(seed):
    batch = pairs(seed)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    for average in (False, True):
        want = CPOTrainer.get_batch_logps(batch["policy"], labels, average_log_prob=average)
        assert torch.allclose(sequence_logps(batch["policy"], labels, average=average), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize(("beta", "gamma_beta_ratio"), [(2.0, 0.5), (2.5, 0.55), (0.1, 5.0)])
def test_simpo_matches_cpo_simpo(beta, gamma_beta_ratio, label_smoothing):
    # TRL's simpo_gamma is the margin gamma itself; ours is gamma / beta (cpo_trainer.py L715-716)
    batch = pairs(5)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    chosen, rejected = CPOTrainer.get_batch_logps(batch["policy"], labels, average_log_prob=True).chunk(2)
    want = trl_cpo_loss(chosen, rejected, "simpo", beta, label_smoothing, simpo_gamma=gamma_beta_ratio * beta)
    got = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing)
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(g, w, atol=TOL, rtol=0)


# --- GRPO ---------------------------------------------------------------------------------------------------------


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """The advantages of ``GRPOTrainer._generate_and_score_completions`` (grpo_trainer.py
    L2759-2788 and L2810), ``multi_objective_aggregation="sum_then_normalize"``, one reward
    function of weight 1, one process; copied line for line since the method also generates."""
    rewards_per_func = rewards.unsqueeze(1)  # (B, 1)
    reward_weights = torch.ones(1)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if num_generations > 1:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 8])
def test_group_advantages_match_trl(group_size, scale_rewards):
    g = torch.Generator().manual_seed(group_size)
    n_prompts = 6
    rewards = torch.randn(n_prompts * group_size, generator=g, dtype=F64)
    rewards[:group_size] = 0.5  # a group with equal rewards
    if group_size > 1:
        rewards[group_size] = torch.nan  # an unscorable completion in a group with others scored
        rewards[2 * group_size:3 * group_size] = torch.nan  # a wholly unscorable group
        rewards[3 * group_size + 1:4 * group_size] = torch.nan  # one scored reward: NaN std
        rewards[4 * group_size:5 * group_size] = torch.randint(0, 2, (group_size,), generator=g).to(F64)  # 0/1
    want = trl_advantages(rewards.clone(), group_size, scale_rewards)
    got = group_advantages(rewards, group_size, scale=scale_rewards == "group")
    assert not got.isnan().any()
    assert torch.allclose(got, want, atol=TOL, rtol=0)


def rollouts(seed: int, group_size: int, n_prompts: int = 3, length: int = 7) -> dict:
    """A GRPO micro-batch: per-token log-probs under the policy, the sampling policy and the
    reference, completion masks with 1 to ``length`` tokens then padding, group advantages."""
    g = torch.Generator().manual_seed(seed)
    rows = n_prompts * group_size
    logp = -3 * torch.rand(rows, length, generator=g, dtype=F64)
    n_tokens = torch.randint(1, length + 1, (rows,), generator=g)
    n_tokens[0] = length  # one completion fills the window
    mask = (torch.arange(length) < n_tokens[:, None]).long()  # (B, T)
    return {"logp": logp, "old": logp + 0.3 * torch.randn(rows, length, generator=g, dtype=F64),
            "ref": logp + 0.3 * torch.randn(rows, length, generator=g, dtype=F64), "mask": mask,
            "advantages": group_advantages(torch.randn(rows, generator=g, dtype=F64), group_size)}


def trl_grpo(batch: dict, logp: torch.Tensor, loss_type: str, beta: float, epsilon_low: float, epsilon_high: float,
             max_completion_length: int, num_items_in_batch: int, num_processes: int) -> torch.Tensor:
    """``GRPOTrainer._compute_loss`` with ``_get_per_token_logps_and_entropies`` patched to return
    ``logp``, one accumulation step per generation batch, no vLLM, entropy masking or bonus."""
    rows, length = batch["mask"].shape

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == length and input_ids.shape == (rows, 2 + length)
        return logp, torch.zeros_like(logp), None

    this = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=accelerator(num_processes), _entropy_bonus_enabled=False, _metrics=metrics(),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    long = torch.long
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=long), "prompt_mask": torch.ones(rows, 2, dtype=long),
              "completion_ids": torch.zeros(rows, length, dtype=long), "completion_mask": batch["mask"],
              "advantages": batch["advantages"], "old_per_token_logps": batch["old"],
              "ref_per_token_logps": batch["ref"], "num_items_in_batch": torch.tensor(num_items_in_batch)}
    return GRPOTrainer._compute_loss(this, None, inputs)


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize(("epsilon_low", "epsilon_high"), [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_and_gradient_match_grpo_trainer(loss_type, beta, epsilon_low, epsilon_high, group_size):
    batch = rollouts(group_size, group_size)
    length = batch["mask"].shape[1]
    max_completion_length = length + 3  # dr_grpo divides by the configured maximum, not the batch's width
    # dapo: the trained tokens of the whole generation batch over 2 processes (this one's and the
    # other's), divided by the process count (grpo_trainer.py L3170)
    num_processes, num_items = 2, int(batch["mask"].sum()) + 17
    aggregation, kwargs = {
        "grpo": ("sequence", {}),
        "bnpo": ("token", {}),
        "dr_grpo": ("constant", {"max_length": max_completion_length}),
        "dapo": ("token", {"num_tokens": num_items / num_processes}),
    }[loss_type]

    trl_logp = batch["logp"].clone().requires_grad_()
    want = trl_grpo(batch, trl_logp, loss_type, beta, epsilon_low, epsilon_high, max_completion_length, num_items,
                    num_processes)
    our_logp = batch["logp"].clone().requires_grad_()
    got = grpo_loss(our_logp, batch["old"], batch["ref"] if beta else None, batch["advantages"], batch["mask"],
                    epsilon=epsilon_low, epsilon_high=epsilon_high, beta=beta, aggregation=aggregation, **kwargs)
    assert abs(want.item()) > 1e-3  # a loss that could differ
    assert abs(got.item() - want.item()) < TOL
    want.backward()
    got.backward()
    assert torch.allclose(our_logp.grad, trl_logp.grad, atol=TOL, rtol=0)
    # the ratios straddle both clip bounds, so the clipping is exercised
    ratio = (batch["logp"] - batch["old"]).exp()[batch["mask"].bool()]
    assert (ratio > 1 + epsilon_high).any() and (ratio < 1 - epsilon_low).any()
