"""Skill localization by grafting (Panigrahi et al., 2023, "Task-Specific Skill Localization in
Fine-tuned Language Models", ICML 2023, arXiv:2302.06600), following the official
``src/graft_trainer.py`` (``create_basepatch``, ``interpolate_model``, ``train_graft``).

A graft keeps the fine-tuned values on a region gamma of the parameters and the pre-trained ones
elsewhere: theta_gamma = theta_0 + gamma * (theta_ft - theta_0) = theta_0 + gamma * tau. The region
is found from a basepatch b, the top sparsity * N entries of |tau| over every parameter at once,
by a manual gradient descent (no optimiser, no sparsity penalty) on the relaxation

    gamma = b + (1 - 2b) * sigmoid(S - c),   S ~ U[0, 1),   c = sigmoid_bias = 10,

which starts within sigmoid(-9) ~ 1.2e-4 of b and can turn entries off (b = 1) or on (b = 0):
with g = the mean over ``accumulation`` batches of lr * grad_theta L(theta_gamma) * tau,

    S <- S - (1 - 2b) * g * sigmoid'(S - c),

the chain rule through gamma. The region is gamma rounded to {0, 1}. The tiny sigmoid'(-10) ~
4.5e-5 is why the learning rate is 1e7, and, with the bias, what keeps the region near b.

Masks are dicts name -> tensor of the parameter's shape (bool, or gamma in [0, 1]); a parameter
without one keeps its base value in a graft. State dicts are dicts name -> tensor.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mixtune.core import CheckpointError
from mixtune.data.format import tokenize_records
from mixtune.data.packing import IGNORE
from mixtune.merge.methods import kth_smallest
from mixtune.models.load import pad_id_of

StateDict = Mapping[str, torch.Tensor]
Masks = Mapping[str, torch.Tensor]


def _names(base: StateDict, tuned: StateDict, names: Iterable[str] | None) -> list[str]:
    """The parameters to localize over: ``names``, checked, or every floating-point tensor of
    ``tuned`` that ``base`` holds with the same shape (in ``tuned``'s order)."""
    if names is None:
        out = [k for k, v in tuned.items() if v.is_floating_point() and k in base and base[k].shape == v.shape]
        if not out:
            raise ValueError("base and tuned share no floating-point tensor of one name and shape")
        return out
    out = list(names)
    for k in out:
        if k not in base or k not in tuned:
            raise ValueError(f"parameter {k!r} is missing from the {'base' if k not in base else 'tuned'} state dict")
        if base[k].shape != tuned[k].shape or not tuned[k].is_floating_point():
            raise ValueError(f"parameter {k!r}: base {tuple(base[k].shape)} and tuned {tuple(tuned[k].shape)} "
                             f"({tuned[k].dtype}) are not one floating-point shape")
    if not out:
        raise ValueError("names is empty: give at least one parameter to localize over")
    return out


def _tau(base: StateDict, tuned: StateDict, name: str) -> torch.Tensor:
    """tau = theta_ft - theta_0 in float32 (float64 when an input is)."""
    dtype = torch.promote_types(torch.promote_types(base[name].dtype, tuned[name].dtype), torch.float32)
    return tuned[name].to(dtype) - base[name].to(dtype)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as it is; a relaxed gamma rounded to {0, 1} (> 0.5, as ``torch.round`` does)."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def _top_entries(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly k entries of 1-D ``flat`` (1 <= k <= n): those above the k-th largest value,
    then as many of those equal to it as are missing, first positions first."""
    n = flat.numel()
    kth = kth_smallest(flat, n - k + 1)  # the k-th largest
    keep = flat > kth
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        keep[(flat == kth).nonzero().flatten()[:missing]] = True
    return keep


def _patch(mags: list[torch.Tensor], names: list[str], shapes: list[torch.Size], sparsity: float) -> dict:
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity = {sparsity}: expected a fraction in (0, 1] of the entries")
    flat = torch.cat(mags)
    n = flat.numel()
    if n == 0:
        raise ValueError("the parameters hold no entry")
    keep = _top_entries(flat, min(n, max(1, int(sparsity * n))))
    parts = keep.split([m.numel() for m in mags])
    return {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}


def _magnitudes(base: StateDict, tuned: StateDict, names: list[str]) -> list[torch.Tensor]:
    mags = [_tau(base, tuned, k).abs().flatten() for k in names]
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in mags) else torch.float32
    return [m.to(dtype).cpu() for m in mags]


def basepatch(base: StateDict, tuned: StateDict, sparsity: float, names: Iterable[str] | None = None) -> dict:
    """The basepatch (official ``create_basepatch``, ``mask_path: highest_movement``): the top
    k = max(1, int(sparsity * N)) entries of |tau| over all of ``names`` at once (N = their entry
    count; default: every floating-point tensor of ``tuned`` that ``base`` holds in one shape).

    Exactly k entries are kept: equal magnitudes at the cut go to the earlier parameter of
    ``names``, then the earlier flat position. (The official code keeps |tau| strictly above the
    k-th largest, so k - 1 entries when magnitudes are distinct.)

    Returns:
        name -> bool mask of the parameter's shape, for every name (all False where nothing is kept).

    Raises:
        ValueError: ``sparsity`` is not in (0, 1], or a name is missing or differs in shape.
    """
    names = _names(base, tuned, names)
    return _patch(_magnitudes(base, tuned, names), names, [tuned[k].shape for k in names], sparsity)


def graft(base: StateDict, tuned: StateDict, masks: Masks) -> dict:
    """theta_0 + gamma * tau (official ``interpolate_model``): for each parameter of ``base``, the
    fine-tuned values where a bool mask is True (exactly, not base + tau), theta_0 + gamma * tau
    (in float32) for a float gamma, and the base's own tensor (not a copy) for a parameter without
    a mask. Outputs keep the base's dtype.

    Raises:
        ValueError: a mask names a parameter missing from ``base`` or ``tuned``, or differs in shape.
    """
    for k, m in masks.items():
        if k not in base or k not in tuned:
            raise ValueError(f"mask {k!r} names a parameter missing from the {'base' if k not in base else 'tuned'}"
                             " state dict")
        if m.shape != base[k].shape or tuned[k].shape != base[k].shape:
            raise ValueError(f"mask {k!r}: shape {tuple(m.shape)}, base {tuple(base[k].shape)}, "
                             f"tuned {tuple(tuned[k].shape)}")
    out = {}
    for k, b in base.items():
        m = masks.get(k)
        if m is None:
            out[k] = b
        elif m.dtype == torch.bool:
            out[k] = torch.where(m, tuned[k].to(b.dtype), b)
        else:
            out[k] = (b.float() + m.float() * _tau(base, tuned, k).float()).to(b.dtype)
    return out


def mask_overlap(a: Masks, b: Masks) -> float:
    """Jaccard |A & B| / |A | B| of two masks over the parameters both cover (float gammas are
    rounded): the paper's proxy for how similar two tasks are (their regions are nearly disjoint
    when the tasks differ). 1 when both are empty.

    Raises:
        ValueError: the masks share no parameter, or a shared one differs in shape.
    """
    shared = [k for k in a if k in b]
    if not shared:
        raise ValueError(f"the masks share no parameter (first: {sorted(a)[:3]} and {sorted(b)[:3]})")
    inter = union = 0
    for k in shared:
        x, y = _as_bool(a[k]), _as_bool(b[k])
        if x.shape != y.shape:
            raise ValueError(f"mask {k!r}: shapes {tuple(x.shape)} and {tuple(y.shape)}")
        inter += int(torch.count_nonzero(x & y))
        union += int(torch.count_nonzero(x | y))
    return inter / union if union else 1.0


def sparsity_curve(base: StateDict, tuned: StateDict, sparsities: Sequence[float],
                   score: Callable[[dict], float], names: Iterable[str] | None = None) -> list[tuple[float, float]]:
    """(sparsity, score) for each sparsity: the basepatch graft (the official ``no_train`` mode,
    pure magnitude grafting) scored by ``score(state_dict)``, which loads the state into a model
    and returns, say, its accuracy. |tau| is computed once for every sparsity."""
    names = _names(base, tuned, names)
    mags, shapes = _magnitudes(base, tuned, names), [tuned[k].shape for k in names]
    return [(s, float(score(graft(base, tuned, _patch(mags, names, shapes, s))))) for s in sparsities]


def relaxed_mask(scores: torch.Tensor, patch: torch.Tensor, sigmoid_bias: float = 10.0) -> torch.Tensor:
    """gamma = b + (1 - 2b) * sigmoid(S - c) of one parameter (``interpolate_model``), in float32."""
    b = patch.float()
    return b + (1 - 2 * b) * torch.sigmoid(scores - sigmoid_bias)


def mask_step(scores: torch.Tensor, patch: torch.Tensor, grad: torch.Tensor,
              sigmoid_bias: float = 10.0) -> torch.Tensor:
    """One step of ``train_graft``: S - (1 - 2b) * g * sigmoid'(S - c), sigmoid' = sigmoid (1 - sigmoid),
    with g = lr * dL/dtheta * tau (averaged over the batches): dL/dS by the chain rule through gamma."""
    s = torch.sigmoid(scores - sigmoid_bias)
    return scores - (1 - 2 * patch.float()) * grad * s * (1 - s)


def localize(model: torch.nn.Module, base: StateDict, tuned: StateDict, batches: Iterable,
             loss_fn: Callable[[torch.nn.Module, object], torch.Tensor], *, sparsity: float = 1e-5,
             sigmoid_bias: float = 10.0, lr: float = 1e7, epochs: int = 1, accumulation: int = 128, seed: int = 0,
             names: Iterable[str] | None = None, start: Masks | None = None,
             score: Callable[[torch.nn.Module], float] | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """The official grafting optimisation (``train_graft``): learn the region whose graft keeps the
    fine-tuned model's loss, starting from the basepatch.

    S ~ U[0, 1) per entry (a CPU generator seeded by ``seed``, in the order of ``names``). Each
    epoch goes through ``batches`` once; every ``accumulation`` batches (and the rest at the end)
    make one step: graft gamma into ``model``, backpropagate ``loss_fn(model, batch)`` to the
    parameters, average lr * grad * tau over the batches, update S (:func:`mask_step`). With at most
    ``accumulation`` batches this is the official loop: one step per epoch. After each epoch the
    rounded mask is kept if ``score(model)``, with that mask grafted, is the best so far (the
    official code keeps the best train + validation score; give that sum); without ``score`` the
    last is kept.

    Args:
        model: a module whose named parameters include ``names``; its other parameters are left
            as they are (the official code keeps the fine-tuned head) and its train/eval mode is
            the caller's (eval gives deterministic gradients).
        base, tuned: the pre-trained and fine-tuned state dicts.
        batches: re-iterable (a list or a DataLoader), read once per epoch.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss.
        sparsity: the basepatch's fraction of entries (official default 1e-5; the paper's
            regions are ~0.01% of the parameters).
        sigmoid_bias, lr, epochs, accumulation: c, the step size, the passes over ``batches`` and
            the batches per step (official: 10, 1e7, 10-100, 128).
        names: the parameters to localize over (default: every floating-point tensor shared by
            ``base``, ``tuned`` and the model's parameters; the official code takes the encoder
            blocks only).
        start: a mask to start from instead of the basepatch (the official ``mask_path``);
            names it lacks start empty.
        score: evaluates the model holding a rounded graft; higher is better.
        progress: called with a line per epoch.

    Returns:
        name -> bool mask: gamma rounded to {0, 1}. The model is left holding its graft (the
        fine-tuned values on the mask, the base elsewhere, over ``names``).

    Raises:
        ValueError: a name is not a parameter of the model, or ``batches`` gave no batch.
    """
    params = dict(model.named_parameters())
    if names is None:
        names = [k for k in (start or tuned) if k in params]
    names = _names(base, tuned, names)
    missing = [k for k in names if k not in params]
    if missing:
        raise ValueError(f"not parameters of the model: {missing[:5]}")
    if start is None:
        patch = basepatch(base, tuned, sparsity, names)
    else:
        patch = {k: _as_bool(start[k]) if k in start else torch.zeros(tuned[k].shape, dtype=torch.bool)
                 for k in names}
    dev = {k: params[k].device for k in names}
    gen = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(tuned[k].shape, generator=gen).to(dev[k]) for k in names}  # S ~ U[0, 1)
    b = {k: patch[k].to(dev[k]) for k in names}
    theta0 = {k: base[k].to(dev[k], torch.float32) for k in names}
    tau = {k: _tau(base, tuned, k).to(dev[k], torch.float32) for k in names}
    flags = {k: params[k].requires_grad for k in names}
    total = sum(t.numel() for t in tau.values())

    def load(masks: dict) -> None:  # the model's parameters <- theta_0 + gamma * tau
        with torch.no_grad():
            for k in names:
                m = masks[k]
                if m.dtype == torch.bool:
                    params[k].copy_(torch.where(m, tuned[k].to(dev[k]), base[k].to(dev[k])))
                else:
                    params[k].copy_(theta0[k] + m * tau[k])

    def relaxed() -> dict:
        return {k: relaxed_mask(scores[k], b[k], sigmoid_bias) for k in names}

    acc = {k: torch.zeros_like(tau[k]) for k in names}  # sum of dL/dtheta * tau over the step's batches
    count = 0

    def step() -> None:
        nonlocal count
        for k in names:  # g = lr * mean(dL/dtheta * tau); S <- S - (1 - 2b) g sigmoid'(S - c)
            scores[k] = mask_step(scores[k], b[k], lr * acc[k] / count, sigmoid_bias)
            acc[k].zero_()
        count = 0

    best, best_score = None, -math.inf
    try:
        for k in names:
            params[k].requires_grad_(True)
        for epoch in range(epochs):
            seen, losses = 0, 0.0
            load(relaxed())
            for batch in batches:
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
                for k, g in zip(names, grads):
                    if g is not None:  # a parameter the loss does not reach has a zero gradient
                        acc[k] += g.float() * tau[k]
                losses += float(loss.detach())
                count, seen = count + 1, seen + 1
                if count == accumulation:
                    step()
                    load(relaxed())
            if seen == 0:
                raise ValueError(f"epoch {epoch + 1}: batches gave no batch (a generator is read once; pass a list "
                                 "or a DataLoader)")
            if count:
                step()
            mask = {k: g > 0.5 for k, g in relaxed().items()}
            kept = sum(int(torch.count_nonzero(m)) for m in mask.values())
            line = f"epoch {epoch + 1}/{epochs}: mean loss {losses / seen:.4g}, {kept} of {total} entries grafted"
            if score is None:
                best = mask
            else:
                load(mask)
                with torch.no_grad():
                    value = float(score(model))
                line += f", score {value:.4g}"
                if value > best_score:
                    best, best_score = mask, value
            if progress is not None:
                progress(line)
        if best is None:  # epochs = 0: the starting mask
            best = {k: g > 0.5 for k, g in relaxed().items()}
        load(best)
    finally:
        for k in names:
            params[k].requires_grad_(flags[k])
    return {k: m.cpu() for k, m in best.items()}


def record_batches(records: Sequence[dict], tokenizer, batch_size: int = 8) -> list[dict]:
    """Right-padded causal-LM batches of chat records, in their order, as training sees them.

    Each record is tokenized by :func:`mixtune.data.format.tokenize_records` (rendered with the
    tokenizer's chat template; labels keep only the assistant tokens, -100 elsewhere). Every
    ``batch_size`` records (the last batch may be smaller) make one dict of int64 tensors
    ``(rows, longest)``: ``input_ids`` padded on the right with the tokenizer's pad id (its EOS, else
    0, when it has none), ``labels`` -100 on the padding, ``attention_mask`` 1 on the tokens and 0
    on the padding. Nothing is truncated.

    Raises:
        ValueError: no record, ``batch_size`` < 1, or a record with no token to take the loss on
            (no assistant turn), whose loss would be undefined.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: expected at least 1")
    if not records:
        raise ValueError("no record to make batches of")
    examples = tokenize_records(records, tokenizer)
    for i, ex in enumerate(examples):
        if all(t == IGNORE for t in ex.labels):
            raise ValueError(f"record {i} has no assistant token to take the loss on")
    pad = pad_id_of(tokenizer)
    pad = 0 if pad is None else pad
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(ex.input_ids) for ex in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ex in enumerate(chunk):
            n = len(ex.input_ids)
            ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
            attention[row, :n] = 1
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own causal-LM loss on a :func:`record_batches` batch (moved to the model's
    device): the mean cross-entropy over the tokens whose label is not -100."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def localize_on_records(model: torch.nn.Module, base: StateDict, tuned: StateDict, records: Sequence[dict],
                        tokenizer, *, sparsity: float, batch_size: int = 8, epochs: int = 1, lr: float = 1e7,
                        sigmoid_bias: float = 10.0, accumulation: int = 128, seed: int = 0,
                        score: Callable[[torch.nn.Module], float] | None = None,
                        progress: Callable[[str], None] | None = None) -> dict:
    """The graft region of an ability (Panigrahi et al., 2023, arXiv:2302.06600): :func:`localize`
    on a causal LM with the loss of the fine-tuning itself, given the ability's chat records.

    The records are ``{"messages": [user, assistant, ...], ...}`` chats, e.g. the built-in
    ``ABILITIES.get("math").generate(64, seed=0, split="train")``. They become right-padded
    batches of ``batch_size`` (:func:`record_batches`): the loss is the model's causal-LM loss
    (``model(input_ids=..., attention_mask=..., labels=...).loss``) on the assistant tokens only,
    as training takes it, never on the prompt or the padding. The paper's setting (and the official
    defaults: lr 1e7, sigmoid_bias 10, accumulation 128, so one step per epoch over up to 128
    batches) is otherwise :func:`localize`'s, to which the other arguments pass unchanged.

    The region covers every floating-point parameter of the model (``named_parameters``, so a
    tied LM head counts once, under the embedding's name) that ``base`` and ``tuned`` hold in the
    same shape; a state dict of a tied model saved with safetensors holds only the embedding,
    which is the name the model reports. The model's train/eval mode is the caller's (eval, the
    ``from_pretrained`` default, gives deterministic gradients).

    Returns:
        name -> bool mask, as :func:`localize`: gamma rounded to {0, 1}, which may hold more or
        fewer entries than the basepatch's k once the scores have moved. The model is left
        holding its graft (fine-tuned on the mask, base elsewhere, over those parameters).

    Raises:
        ValueError: the records make no batch (:func:`record_batches`), or the model shares no
            floating-point parameter with ``base`` and ``tuned``.
    """
    batches = record_batches(records, tokenizer, batch_size)
    names = [k for k, p in model.named_parameters()
             if p.is_floating_point() and k in base and k in tuned and base[k].shape == tuned[k].shape == p.shape
             and tuned[k].is_floating_point()]
    if not names:
        raise ValueError("the model shares no floating-point parameter of one shape with base and tuned")
    return localize(model, base, tuned, batches, causal_lm_loss, sparsity=sparsity, sigmoid_bias=sigmoid_bias, lr=lr,
                    epochs=epochs, accumulation=accumulation, seed=seed, names=names, score=score, progress=progress)


def save_masks(masks: Masks, path: str | os.PathLike) -> Path:
    """Write ``masks`` as one safetensors file of bool tensors (float gammas rounded), through a
    temporary file beside it and a rename: the file is complete or absent."""
    path = Path(path)
    data = save({k: _as_bool(m).contiguous().cpu() for k, m in masks.items()}, metadata={"mixtune": "graft masks"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:  # open() follows the umask, where mkstemp would write 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_masks(path: str | os.PathLike) -> dict:
    """The masks :func:`save_masks` wrote (any safetensors file of 0/1 tensors), as bool tensors.

    Raises:
        CheckpointError: the file is missing or is not safetensors.
    """
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such mask file") from None
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a safetensors file of masks ({e})") from None
    return {k: v.bool() for k, v in tensors.items()}
