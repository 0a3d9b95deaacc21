"""``lift``: Low-rank Informed sparse Fine-Tuning, only each matrix's principal weights train."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from mixtune.core import Strict
from mixtune.models.structure import find_structure
from mixtune.train.methods.base import check_share, register, save_full


class LiftParams(Strict):
    name: Literal["lift"] = "lift"
    rank: int = Field(default=128, ge=1)
    """Budget: each m x n matrix trains K = min((m + n) * rank, m n) entries, as many as a LoRA of
    this rank (official: 128 for 7B models; a tiny model wants ~8)."""
    filter_rank: int = Field(default=64, ge=1)
    """Rank of the approximation whose largest entries are the principal weights (official: 64)."""
    update_interval: int = Field(default=400, ge=1)
    """Optimizer steps between mask refreshes from the current weights (official: 400 for maths)."""
    svd: Literal["full", "lowrank"] = "full"
    """``lowrank``: torch.svd_lowrank with q = 2 * filter_rank (the official 'rand' variant; for big matrices)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates (beta1, beta2) of the sparse optimizer."""
    eps: float = Field(default=1e-6, gt=0)
    """Adam's epsilon of the sparse optimizer."""


def budget(weight: torch.Tensor, rank: int) -> int:
    """K = min((m + n) * rank, m n): the entries of an m x n matrix that train."""
    m, n = weight.shape
    return min((m + n) * rank, m * n)


def principal_mask(weight: torch.Tensor, rank: int, filter_rank: int, svd: str = "full") -> torch.Tensor:
    """Flat indices (sorted) of the principal weights of ``weight`` (LIFT, Liu et al., 2025,
    arXiv:2506.00772, Sec. 3): W_r = U_r S_r V_r^T, the rank-``filter_rank`` approximation, and the
    K = min((m + n) * rank, m n) entries of largest |W_r|."""
    m, n = weight.shape
    k = budget(weight, rank)
    w = weight.detach().float()
    if svd == "lowrank":
        u, s, v = torch.svd_lowrank(w, q=min(2 * filter_rank, m, n))
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.T
    r = min(filter_rank, s.numel())
    approx = (u[:, :r] * s[:r]) @ v[:, :r].T
    return torch.topk(approx.abs().reshape(-1), k, sorted=False).indices.sort().values


class SparseAdamW(torch.optim.Optimizer):
    """AdamW on a subset of each matrix's entries, with state only for that subset.

    Each parameter keeps the flat indices of its trainable entries and their two moments, so the
    state is K x (8 + 4 + 4) bytes per matrix instead of 8 bytes per entry. Every
    ``update_interval`` steps the subset is chosen again from the current weights; moments of
    entries that stay are carried over, new entries start at zero (as the official SparseAdamW).
    Decoupled weight decay applies to the trained entries only.
    """

    def __init__(self, params, *, select, lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, update_interval: int = 400) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.select, self.update_interval = select, update_interval
        for group in self.param_groups:
            for p in group["params"]:
                idx = select(p)
                self.state[p] = {"idx": idx, "exp_avg": torch.zeros(idx.numel(), device=p.device),
                                 "exp_avg_sq": torch.zeros(idx.numel(), device=p.device), "step": 0}

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor to its parameter's dtype: in bf16, flat indices past 256 round
        # (and in fp32 past 2**24), and the moments lose their fp32; so they are put back as saved
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(ids, [p for g in self.param_groups for p in g["params"]]):
            if i in saved:
                st = self.state[p]
                st["idx"] = saved[i]["idx"].to(p.device, torch.long)
                for name in ("exp_avg", "exp_avg_sq"):
                    st[name] = saved[i][name].to(p.device, torch.float32)

    def trainable_entries(self) -> int:
        """Entries that train (K summed over the matrices), what the method really tunes."""
        return sum(s["idx"].numel() for s in self.state.values())

    def state_bytes(self) -> int:
        return sum(s["idx"].numel() * 16 for s in self.state.values())

    @torch.no_grad()
    def refresh(self, p: torch.Tensor) -> None:
        """Choose ``p``'s entries again; carry the moments of those that stay."""
        st = self.state[p]
        new = self.select(p)
        where = torch.searchsorted(st["idx"], new).clamp(max=st["idx"].numel() - 1)
        stays = st["idx"][where] == new
        for name in ("exp_avg", "exp_avg_sq"):
            moved = torch.zeros(new.numel(), device=p.device)
            moved[stays] = st[name][where[stays]]
            st[name] = moved
        st["idx"] = new

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                flat, idx = p.view(-1), st["idx"]
                grad = p.grad.view(-1)[idx].float()
                st["step"] += 1
                st["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** st["step"]) / (1 - beta1 ** st["step"])
                update = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update.mul_(step_size).add_(flat[idx].float(), alpha=group["lr"] * group["weight_decay"])
                    flat.index_add_(0, idx, update.to(flat.dtype), alpha=-1)
                else:
                    flat.index_add_(0, idx, update.to(flat.dtype), alpha=-step_size)
                if st["step"] % self.update_interval == 0:
                    self.refresh(p)
        return loss


def _targets(model) -> dict[str, torch.nn.Parameter]:
    """Weights of every matrix inside the decoder blocks (``nn.Linear`` and ``Conv1D``, attention and
    FFN alike, from :func:`mixtune.models.structure.find_structure`). A Conv1D weight is stored
    transposed; its principal entries are the same entries either way (the SVD of W^T is that of W)."""
    return {f"{m.name}.weight": m.module.weight for m in find_structure(model, "lift").matrices()}


def prepare(model, p: LiftParams, seed: int):
    """LIFT (Liu et al., 2025, arXiv:2506.00772, Sec. 3; official SparseAdamW ``lift_sparse``):
    only the principal weights of each linear layer in the blocks train, the K = min((m + n) r, m n)
    largest entries of its rank-``filter_rank`` approximation, re-chosen every ``update_interval``
    steps; embeddings, norms and the head are frozen. The block matrices come from the module
    tree (GPT-2's Conv1D layers included)."""
    targets = _targets(model)
    chosen = {id(t) for t in targets.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return model


def optimizer(model, p: LiftParams, lr: float, weight_decay: float) -> SparseAdamW:
    """The sparse AdamW over every block matrix's principal entries; checks that they are K per
    matrix, as many as a rank-``rank`` LoRA of every block matrix would train."""
    targets = _targets(model)
    params = [t for t in targets.values() if t.requires_grad]
    opt = SparseAdamW(params, select=lambda w: principal_mask(w, p.rank, p.filter_rank, p.svd), lr=lr,
                      betas=p.betas, eps=p.eps, weight_decay=weight_decay, update_interval=p.update_interval)
    intended = sum(budget(t, p.rank) for t in targets.values())
    check_share("lift", model, trained=opt.trainable_entries(), intended=intended,
                of=f"principal entries (K per block matrix, {len(targets)} matrices)",
                why="every block matrix trains its K principal entries")
    return opt


register("lift", LiftParams, prepare=prepare, export=lambda model, p, out, sd: save_full(model, out, sd),
         optimizer=optimizer)
