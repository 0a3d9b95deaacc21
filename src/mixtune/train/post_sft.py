"""The stages after SFT inside the one loop (:mod:`mixtune.train.loop`): what an objective stage
(:mod:`mixtune.strategy.objectives`) does at its start and at each optimizer step.

At the stage's start, from its starting weights (before a checkpoint is restored, so a resumed
stage starts from what it started from):

- ``rft`` samples, keeps what the scorer accepts and packs it: the stage then trains as SFT on
  those rows (the samples, with the acceptance rate per ability, are written to
  ``OUT/samples/<stage>.jsonl``);
- ``dpo`` tokenizes its pairs (building on-policy ones where a record has no ``rejected``) and
  computes the reference log-probabilities once, under the starting weights (TRL's
  ``precompute_ref_log_probs``), so no second model is held;
- ``grpo`` keeps a frozen copy of the starting weights as the KL reference (when beta > 0).

Each step then asks a runner for the step's gradients (:meth:`PreferenceRunner.step`,
:meth:`GrpoRunner.step`, like the loop's SFT runner), so the optimizer, schedule, checkpoints,
resume, evaluation and logging are the loop's. The loss of a step is that of its global batch,
whatever the micro-batch size or number of processes: each micro-batch's share is normalised by
the global batch (and multiplied by the number of processes, which DDP divides back out).
A GRPO step samples from the weights it starts with, on streams seeded by (seed, stage, step), so a
stage resumed from a checkpoint samples, hence trains, exactly as the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from mixtune.core import ConfigError, atomic_write_text
from mixtune.core.seeds import seed_int
from mixtune.data.format import Packed, pack, tokenize_records
from mixtune.models.load import pad_id_of
from mixtune.train.grpo import grpo_loss, group_advantages
from mixtune.train.losses import IGNORE, token_logps
from mixtune.strategy.objectives import DpoParams, GrpoParams, RftParams
from mixtune.train.preference import dpo_loss, ipo_loss, simpo_loss
from mixtune.train.rollouts import budget, check_rewardable, completion_batch, pad_examples, rollout


def shared(acc, items: Sequence, work: Callable[[list], list]) -> list:
    """``work`` over ``items`` split across processes (process p takes items p, p + N, ...), the
    results gathered back in the items' order on every process."""
    world, me = acc.num_processes, acc.process_index
    mine = work(list(items[me::world]))
    if world == 1:
        return mine
    from accelerate.utils import gather_object

    parts = gather_object([mine])  # one list per process, in process order
    out = [None] * len(items)
    for p, part in enumerate(parts):
        out[p::world] = part
    return out


def sampled_records(acc, model, tokenizer, records: Sequence[dict], *, samples: int, sampling, seed: int,
                    max_new_tokens: int, how=None) -> list[list[tuple[str, float]]]:
    """Per record, its ``samples`` completions and their rewards (processes share the prompts)."""
    def work(part: list) -> list:
        if not part:
            return []
        ro = rollout(model, tokenizer, part, samples=samples, sampling=sampling, seed=seed,
                     max_new_tokens=max_new_tokens, how=how)
        out = [[] for _ in part]
        for i, text, r in zip(ro.prompt_index, ro.texts, ro.rewards.tolist()):
            out[i].append((text, r))
        return out

    return shared(acc, records, work)


def _reply(record: dict, text: str) -> dict:
    """The record with ``text`` as its last assistant turn."""
    end = len(record["messages"]) - (record["messages"][-1]["role"] == "assistant")
    return record | {"messages": record["messages"][:end] + [{"role": "assistant", "content": text}]}


def acceptance(records: Sequence[dict], sampled: Sequence[Sequence[tuple[str, float]]]) -> dict[str, float]:
    """Share of the sampled completions the scorer accepts (reward 1), per ability."""
    hits, total = defaultdict(float), defaultdict(int)
    for record, outs in zip(records, sampled):
        hits[record["ability"]] += sum(r for _, r in outs)
        total[record["ability"]] += len(outs)
    return {a: hits[a] / total[a] for a in sorted(total)}


def rft_records(p: RftParams, records: Sequence[dict], sampled: Sequence[Sequence[tuple[str, float]]]) -> list[
        tuple[int, dict]]:
    """What rejection sampling trains on, as (record position, record) pairs.

    RFT (Yuan et al., 2023, arXiv:2308.01825, Sec. 4): each prompt's accepted completions, without
    duplicates (the paper dedupes reasoning paths by their equations; here by exact text), at most
    ``keep``, with the gold reply when ``gold``. S3FT (Gupta et al., 2024, arXiv:2409.04787,
    Sec. 3): one reply per prompt, the model's first accepted completion, else the gold one.
    """
    out = []
    for i, (record, outs) in enumerate(zip(records, sampled)):
        accepted = list(dict.fromkeys(text for text, r in outs if r >= 1.0))
        if p.s3ft:
            out.append((i, _reply(record, accepted[0]) if accepted else record))
            continue
        if p.gold:
            out.append((i, record))
        out += [(i, _reply(record, t)) for t in accepted[:p.keep] if t != record["messages"][-1]["content"]]
    return out


def rft_rows(stage, p: RftParams, model, tokenizer, *, acc, seed: int, index: int, out_dir, log) -> Packed:
    """Sample the stage's prompts, keep what the scorer accepts, pack it (the rows rft trains on)."""
    records = list(stage.records)
    check_rewardable(records, stage.name, p.reward)
    sampled = sampled_records(acc, model, tokenizer, records, samples=p.samples, sampling=p.sampling,
                              seed=seed_int(seed, "rft", index), max_new_tokens=budget(records, tokenizer, p.sampling),
                              how=p.reward)
    rate = acceptance(records, sampled)
    kept = rft_records(p, records, sampled)
    n_own = sum(r is not records[i] for i, r in kept)
    log.note(f"stage {stage.name}: rft kept {n_own} sampled replies (+{len(kept) - n_own} gold) of "
             f"{len(records) * p.samples}; accepted " + ", ".join(f"{a} {v:.1%}" for a, v in rate.items()))
    log.write({"stage": stage.name} | {f"accepted/{a}": v for a, v in rate.items()} | {"kept": len(kept)})
    if acc.is_main_process:
        write_samples(out_dir, stage.name, records, sampled, rate)
    if not kept:
        raise ConfigError(f"stage {stage.name!r}: rft accepted no completion and keeps no gold reply (gold: false); "
                          "nothing to train on: sample more (samples, temperature) or keep the gold replies")
    pad_id = pad_id_of(tokenizer)
    examples = tokenize_records([r for _, r in kept], tokenizer)
    return pack(examples, stage.packed.input_ids.shape[1], pad_id=pad_id,
                sources=[stage.record_sources[i] for i, _ in kept], long_examples="drop")


def write_samples(out_dir, name: str, records: Sequence[dict], sampled, rate: dict[str, float]) -> None:
    """``OUT/samples/<stage>.jsonl``: a summary line, then every prompt's completions and rewards."""
    lines = [json.dumps({"stage": name, "accepted": rate})]
    lines += [json.dumps({"prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
                          "ability": r["ability"], "answer": r.get("answer"),
                          "completions": [{"text": t, "reward": v} for t, v in outs]}) for r, outs in zip(records, sampled)]
    atomic_write_text(out_dir / "samples" / f"{name}.jsonl", "\n".join(lines) + "\n")


@dataclass
class Pairs:
    """Tokenized preference pairs and their reference log-probabilities."""

    chosen: list
    """Examples (:class:`mixtune.data.format.Example`) of prompt + chosen reply."""
    rejected: list
    sources: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None


def preference_pairs(stage, p: DpoParams, model, tokenizer, *, acc, seed: int, index: int, out_dir, log) -> Pairs:
    """The stage's pairs: a record's ``rejected`` reply against its chosen one, or, for a record
    without one, pairs sampled on-policy (Tajwar et al., 2024, arXiv:2404.14367): of ``samples``
    completions, the first the scorer accepts is chosen and the first it rejects is rejected (a
    prompt with no correct or no incorrect completion gives no pair). With a reference (dpo, ipo),
    the log-probabilities of both replies under the starting weights."""
    records = list(stage.records)
    given = [i for i, r in enumerate(records) if "rejected" in r]
    todo = [i for i, r in enumerate(records) if "rejected" not in r]
    pairs = [(i, records[i], _reply(records[i], records[i]["rejected"])) for i in given]
    if todo:
        asked = [records[i] for i in todo]
        check_rewardable(asked, stage.name, p.reward)
        sampled = sampled_records(acc, model, tokenizer, asked, samples=p.samples, sampling=p.sampling,
                                  seed=seed_int(seed, "dpo", index), max_new_tokens=budget(asked, tokenizer, p.sampling),
                                  how=p.reward)
        rate = acceptance(asked, sampled)
        for i, record, outs in zip(todo, asked, sampled):
            good = [t for t, r in outs if r >= 1.0]
            bad = [t for t, r in outs if r < 1.0]
            if good and bad:
                pairs.append((i, _reply(record, good[0]), _reply(record, bad[0])))
        log.note(f"stage {stage.name}: dpo built {len(pairs) - len(given)} on-policy pairs from {len(todo)} prompts; "
                 "accepted " + ", ".join(f"{a} {v:.1%}" for a, v in rate.items()))
        log.write({"stage": stage.name, "pairs": len(pairs)} | {f"accepted/{a}": v for a, v in rate.items()})
        if acc.is_main_process:
            write_samples(out_dir, stage.name, asked, sampled, rate)
    if not pairs:
        raise ConfigError(f"stage {stage.name!r}: dpo has no preference pair (no record has a rejected reply, and "
                          "no prompt had both a correct and an incorrect sample); sample more or give pairs")
    pairs.sort(key=lambda t: t[0])
    chosen = tokenize_records([c for _, c, _ in pairs], tokenizer)
    rejected = tokenize_records([r for _, _, r in pairs], tokenizer)
    sources = torch.tensor([stage.record_sources[i] for i, _, _ in pairs])
    out = Pairs(chosen, rejected, sources, None, None)
    if p.loss != "simpo":
        out.ref_chosen, out.ref_rejected = reference_logps(model, out, tokenizer, average=p.loss == "ipo",
                                                           micro=16, device=acc.device)
    return out


def reply_logps(model, chosen: Sequence, rejected: Sequence, pad_id: int, device, *, average: bool) -> tuple[
        torch.Tensor, torch.Tensor, int]:
    """Summed (or mean) log-probabilities of the chosen and the rejected replies, in one forward
    pass over both; and the number of real tokens."""
    batch = pad_examples([*chosen, *rejected], pad_id)
    logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                   use_cache=False).logits
    logp, mask = token_logps(logits, batch["labels"].to(device))
    total = logp.sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    n = len(chosen)
    return total[:n], total[n:], int((batch["input_ids"] != pad_id).sum())


@torch.no_grad()
def reference_logps(model, pairs: Pairs, tokenizer, *, average: bool, micro: int, device) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Every pair's reference log-probabilities under ``model`` as it is now (eval mode, no dropout)."""
    pad_id = pad_id_of(tokenizer)
    was = model.training
    model.eval()
    chosen, rejected = [], []
    for lo in range(0, len(pairs.chosen), micro):
        c, r, _ = reply_logps(model, pairs.chosen[lo:lo + micro], pairs.rejected[lo:lo + micro], pad_id, device,
                              average=average)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    model.train(was)
    return torch.cat(chosen), torch.cat(rejected)


class Meter:
    """Named sums over a log window, summed over processes when flushed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.tokens, self.steps, self.t0 = 0, 0, time.perf_counter()

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)

    def flush(self, acc) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        if acc.num_processes > 1 and keys:
            values = acc.reduce(values.to(acc.device), reduction="sum").cpu()
        out = dict(zip(keys, values.tolist()))
        out["tokens_per_s"] = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        out["steps"] = self.steps
        self.sums, self.tokens, self.steps, self.t0 = defaultdict(float), 0, 0, time.perf_counter()
        return out


class PreferenceRunner:
    """A dpo stage's steps: ``train.batch_size`` pairs per global batch, each micro-batch's pairs
    forward once (chosen and rejected together), the loss the mean over the global batch's pairs."""

    def __init__(self, acc, model, cfg, p: DpoParams, pairs: Pairs, mixer, tokenizer, stage, source_names) -> None:
        self.acc, self.model, self.cfg, self.p, self.pairs, self.mixer = acc, model, cfg, p, pairs, mixer
        self.stage, self.source_names = stage, source_names
        self.pad_id = pad_id_of(tokenizer)
        self.beta = p.beta or (2.0 if p.loss == "simpo" else 0.1)
        self.meter = Meter()
        model.train()

    def losses(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The pairs' losses and rewards (chosen, rejected) under the policy, and their token count."""
        p, pairs, dev = self.p, self.pairs, self.acc.device
        pc, pr, tokens = reply_logps(self.model, [pairs.chosen[i] for i in idx], [pairs.rejected[i] for i in idx],
                                     self.pad_id, dev, average=p.loss != "dpo")
        if p.loss == "simpo":
            return (*simpo_loss(pc, pr, beta=self.beta, gamma_beta_ratio=p.gamma_beta_ratio,
                                label_smoothing=p.label_smoothing), tokens)
        rc, rr = pairs.ref_chosen[idx].to(dev), pairs.ref_rejected[idx].to(dev)
        if p.loss == "ipo":
            return (*ipo_loss(pc, pr, rc, rr, beta=self.beta), tokens)
        return (*dpo_loss(pc, pr, rc, rr, beta=self.beta, label_smoothing=p.label_smoothing), tokens)

    def step(self, step: int) -> int:
        acc, cfg, world = self.acc, self.cfg, self.acc.num_processes
        rows = self.mixer.rows(step)
        accum = cfg.batch_size // (cfg.micro_batch_size * world)
        tokens = 0
        for g in range(accum):
            first = (g * world + acc.process_index) * cfg.micro_batch_size
            idx = rows[first:first + cfg.micro_batch_size]
            with nullcontext() if g == accum - 1 else acc.no_sync(self.model):
                losses, chosen, rejected, n = self.losses(idx)
                acc.backward(losses.sum() / cfg.batch_size * world)
            tokens += n
            self.meter.add(loss=losses.detach().sum(), pairs=len(idx), margin=(chosen - rejected).sum(),
                           accuracy=(chosen > rejected).float().sum())
        self.meter.tokens += tokens * world
        return tokens * world

    def after(self, step: int) -> None:
        pass

    def log_entry(self, step: int, at, lr: float, grad_norm) -> dict:
        m = self.meter.flush(self.acc)
        n = max(m.pop("pairs", 0.0), 1.0)
        return {"loss": m["loss"] / n, "reward_margin": m["margin"] / n, "reward_accuracy": m["accuracy"] / n,
                "tokens_per_s": m["tokens_per_s"], "step": at.global_step, "stage": self.stage.name,
                "stage_step": at.step, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None}


@dataclass(frozen=True)
class PackedGroups:
    """Groups of completions packed one group a row, ``[prompt][c_1][c_2]...[c_G]``: each
    completion sees the prompt and itself (a block-causal 4D mask), positions restart after the
    prompt for every completion, so each completion reads as if alone after its prompt while the
    prompt goes through the model once per group instead of G times."""

    input_ids: torch.Tensor
    """``(R, L)``, one row a group, right-padded."""
    position_ids: torch.Tensor
    mask: torch.Tensor
    """``(R, 1, L, L)`` bool: may position i attend to position j."""
    row: torch.Tensor
    """Per completion token: its row, the position whose logits predict it, its id, its completion
    (index in the batch) and its place in that completion; each ``(N,)``."""
    pred: torch.Tensor
    token: torch.Tensor
    completion: torch.Tensor
    place: torch.Tensor


def pack_groups(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], group: int,
                pad_id: int) -> PackedGroups:
    """Pack consecutive groups of ``group`` completions (each group sharing its prompt) one a row."""
    rows, positions, spans = [], [], []
    row, pred, token, completion, place = [], [], [], [], []
    for r, lo in enumerate(range(0, len(completion_ids), group)):
        prompt = list(prompt_ids[lo])
        ids, pos, blocks = list(prompt), list(range(len(prompt))), []
        for b in range(lo, min(lo + group, len(completion_ids))):
            c = list(completion_ids[b])
            start = len(ids)
            for k, t in enumerate(c):
                row.append(r)
                pred.append(len(prompt) - 1 if k == 0 else start + k - 1)
                token.append(t)
                completion.append(b)
                place.append(k)
            ids += c
            pos += range(len(prompt), len(prompt) + len(c))
            blocks.append((start, len(ids)))
        rows.append(ids)
        positions.append(pos)
        spans.append((len(prompt), blocks))
    width = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees itself (no empty rows)
    for r, (ids, pos, (n_prompt, blocks)) in enumerate(zip(rows, positions, spans)):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        position_ids[r, :len(pos)] = torch.tensor(pos)
        mask[r, :n_prompt, :n_prompt] = causal[:n_prompt, :n_prompt]
        for a, b in blocks:
            mask[r, a:b, :n_prompt] = True
            mask[r, a:b, a:b] = causal[:b - a, :b - a]
    as_t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return PackedGroups(input_ids, position_ids, mask.unsqueeze(1), as_t(row), as_t(pred), as_t(token),
                        as_t(completion), as_t(place))


def completion_logps(model, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int,
                     device, *, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every completion token under ``model``, ``(B, T)`` with its mask.

    ``group=None``: each completion is a padded row ``[prompt][completion]``. ``group=G``: each
    group of G consecutive completions (one prompt) is one packed row (:func:`pack_groups`); the
    same numbers up to float rounding, with the prompt read once per group."""
    if group is None:
        batch = {k: v.to(device) for k, v in completion_batch(prompt_ids, completion_ids, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return token_logps(logits, batch["labels"])
    pk = pack_groups(prompt_ids, completion_ids, group, pad_id)
    logits = model(input_ids=pk.input_ids.to(device), position_ids=pk.position_ids.to(device),
                   attention_mask=pk.mask.to(device), use_cache=False).logits
    picked = logits[pk.row.to(device), pk.pred.to(device)].float()  # (N, V)
    logp = picked.gather(-1, pk.token.to(device)[:, None]).squeeze(-1) - torch.logsumexp(picked, -1)
    width = max(len(c) for c in completion_ids)
    out = torch.zeros(len(completion_ids), width, device=device, dtype=logp.dtype)
    mask = torch.zeros(len(completion_ids), width, device=device, dtype=torch.bool)
    where = (pk.completion.to(device), pk.place.to(device))
    out = out.index_put(where, logp)
    mask[where] = True
    return out, mask


@torch.no_grad()
def packing_works(model, device, *, tolerance: float = 1e-3) -> bool:
    """Whether ``model`` honours a packed group's 4D attention mask: a made-up prompt and two
    completions give the same log-probabilities packed as padded (eval mode, so dropout is off)."""
    was = model.training
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (12,), generator=g).tolist()
    completions = [torch.randint(vocab, (n,), generator=g).tolist() for n in (5, 3)]
    try:
        a, mask = completion_logps(model, [prompt] * 2, completions, 0, device)
        b, _ = completion_logps(model, [prompt] * 2, completions, 0, device, group=2)
        # the padded rows hold [prompt][completion] positions, the packed ones the completions' alone
        ok = all(bool((a[i][mask[i]] - b[i, :len(c)]).abs().max() < tolerance) for i, c in enumerate(completions))
    except Exception:  # a model that refuses a 4D mask
        ok = False
    model.train(was)
    return ok


def frozen_copy(model):
    """A frozen, eval-mode copy of ``model`` (GRPO's reference: the stage's starting weights)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


class GrpoRunner:
    """A grpo stage's steps (Shao et al., 2024, arXiv:2402.03300, Sec. 4.1, Eq. 3): the step's
    ``prompts`` (shuffled over the stage's records, shared among processes) each get ``group``
    completions from the current weights; rewards from the scorer; group-normalised advantages;
    then one policy update on them (so the sampling policy is the policy: the ratio is 1 at the
    update and the clip acts on later ones, as TRL with ``num_iterations=1``)."""

    def __init__(self, acc, model, cfg, p: GrpoParams, mixer, tokenizer, stage, source_names, *, seed: int,
                 index: int, reference, log) -> None:
        self.acc, self.model, self.cfg, self.p, self.mixer, self.tokenizer = acc, model, cfg, p, mixer, tokenizer
        self.stage, self.seed, self.index, self.reference = stage, seed, index, reference
        self.pad_id = pad_id_of(tokenizer)
        self.records = list(stage.records)
        self.max_new = budget(self.records, tokenizer, p.sampling)
        self.meter = Meter()
        self.packed = packing_works(acc.unwrap_model(model), acc.device)
        if not self.packed:
            log.note(f"stage {stage.name}: this model does not take a packed group's attention mask (its "
                     "log-probabilities differ from the padded rows'); each completion is a padded row")
        model.train()

    def step(self, step: int) -> int:
        acc, p, cfg, world = self.acc, self.p, self.cfg, self.acc.num_processes
        rows = self.mixer.rows(step)[acc.process_index::world]
        records = [self.records[i] for i in rows]
        ro = rollout(acc.unwrap_model(self.model), self.tokenizer, records, samples=p.group, sampling=p.sampling,
                     seed=seed_int(self.seed, "grpo", self.index, step), max_new_tokens=self.max_new, how=p.reward)
        adv = group_advantages(ro.rewards, p.group, scale=p.scale_rewards).float()
        n_global = p.prompts * p.group
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float64)
        n_tokens = lengths.sum()
        if world > 1 and p.aggregation == "token":  # only the token mean needs the step's global count
            n_tokens = acc.reduce(n_tokens.to(acc.device), reduction="sum").cpu()
        # packed: a micro-batch is whole groups, each group one row (its prompt read once)
        micro = max(1, cfg.micro_batch_size // p.group) * p.group if self.packed else cfg.micro_batch_size
        starts = list(range(0, len(ro.texts), micro))
        kl_sum = 0.0
        for g, lo in enumerate(starts):
            part = slice(lo, lo + micro)
            prompts, completions = ro.prompt_ids[part], ro.completion_ids[part]
            m = len(completions)
            with nullcontext() if g == len(starts) - 1 else acc.no_sync(self.model):
                logp, mask = completion_logps(self.model, prompts, completions, self.pad_id, acc.device,
                                              group=p.group if self.packed else None)
                ref = None
                if p.beta > 0:
                    with torch.no_grad():
                        ref = completion_logps(self.reference, prompts, completions, self.pad_id, acc.device,
                                               group=p.group if self.packed else None)[0]
                    d = (ref - logp.detach())
                    kl_sum += float(((d.exp() - d - 1) * mask).sum())
                kw = dict(epsilon=p.epsilon, epsilon_high=p.epsilon_high, beta=p.beta, aggregation=p.aggregation)
                a = adv[part].to(acc.device)
                if p.aggregation == "sequence":
                    loss = grpo_loss(logp, logp.detach(), ref, a, mask, **kw) * m / n_global
                elif p.aggregation == "token":
                    loss = grpo_loss(logp, logp.detach(), ref, a, mask, num_tokens=float(n_tokens), **kw)
                else:
                    loss = grpo_loss(logp, logp.detach(), ref, a, mask, max_length=self.max_new, **kw) * m / n_global
                acc.backward(loss * world)
            self.meter.add(loss=float(loss.detach()))  # this micro-batch's share of the step's loss
        self.meter.steps += 1
        by_ability = defaultdict(list)
        for i, r in zip(ro.prompt_index, ro.rewards.tolist()):
            by_ability[records[i]["ability"]].append(r)
        self.meter.add(completions=len(ro.texts), reward=float(ro.rewards.sum()), completion_tokens=float(lengths.sum()),
                       kl=kl_sum, solved_groups=sum(float(ro.rewards[k:k + p.group].max() > 0)
                                                    for k in range(0, len(ro.texts), p.group)),
                       groups=len(rows),
                       **{f"reward/{a}": sum(v) for a, v in by_ability.items()},
                       **{f"n/{a}": len(v) for a, v in by_ability.items()})
        tokens = int(sum(len(q) + len(c) for q, c in zip(ro.prompt_ids, ro.completion_ids))) * world
        self.meter.tokens += tokens
        return tokens

    def after(self, step: int) -> None:
        pass

    def log_entry(self, step: int, at, lr: float, grad_norm) -> dict:
        m = self.meter.flush(self.acc)
        n = max(m["completions"], 1.0)
        entry = {"loss": m["loss"] / max(m["steps"], 1), "reward": m["reward"] / n, "completion_tokens": m["completion_tokens"] / n,
                 "solved_groups": m["solved_groups"] / max(m["groups"], 1.0),
                 "tokens_per_s": m["tokens_per_s"]}
        if self.p.beta > 0:
            entry["kl"] = m["kl"] / max(m["completion_tokens"], 1.0)
        entry |= {k: m[k] / m["n/" + k.split("/", 1)[1]] for k in m if k.startswith("reward/")}
        return entry | {"step": at.global_step, "stage": self.stage.name, "stage_step": at.step, "lr": lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None}


def objective_length(n_prompts: int, cfg, objective, *, steps: int | None, epochs: float | None) -> int:
    """Optimizer steps of an objective stage: explicit steps, else ceil(epochs x prompts / per-step)."""
    from mixtune.strategy.objectives import objective_batch

    if steps or cfg.steps:
        return steps or cfg.steps
    return max(1, math.ceil((epochs or cfg.epochs) * n_prompts / objective_batch(objective, cfg.batch_size)))


def check_processes(objective, cfg, world: int) -> None:
    """Raise :class:`ConfigError` when a grpo step's prompts do not split evenly over the processes."""
    if isinstance(objective, GrpoParams) and objective.prompts % world:
        raise ConfigError(f"objective.prompts = {objective.prompts} must be a multiple of the {world} processes")


__all__ = ["GrpoRunner", "Meter", "Pairs", "PreferenceRunner", "acceptance", "check_processes", "frozen_copy",
           "objective_length", "preference_pairs", "reference_logps", "rft_records", "rft_rows", "sampled_records",
           "shared", "write_samples"]
