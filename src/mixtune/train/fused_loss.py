"""Fused linear cross-entropy for ``train.fused_loss``: an SFT step's token losses computed from
the model's last hidden states and its output embedding, chunk by chunk, by Liger's kernel (Hsu
et al., 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv:2410.10989, its
FusedLinearCrossEntropy kernel), so that the (tokens x vocabulary) logits and their gradient are never
held whole: for a 150k-token vocabulary they are most of a small model's activation memory.

The forward asks the model for its hidden states and the logits of the last position only
(transformers' ``logits_to_keep=1``), then the kernel computes each trained position's
cross-entropy against ``lm_head`` (with Gemma-2's final soft-capping where the config has it), with
``reduction="none"`` so that the loop's per-token weights (MFTCoder's cases, rewards) apply as they
do to :func:`~mixtune.train.losses.token_losses`. The logits the model did compute check, once per
stage, that its logits are indeed ``lm_head`` of the last hidden state (an architecture that scales
them, or a LoRA on ``lm_head``, is refused rather than trained on a wrong loss).

Liger's kernels are written in triton: they run on CUDA (and Intel XPU) GPUs, and on a CPU only under
triton's interpreter (``TRITON_INTERPRET=1``, slowly; how the tests check the numbers).
"""

from __future__ import annotations

import os

import torch

from mixtune.core import ConfigError
from mixtune.train.losses import IGNORE

_DEVICES = ("cuda", "xpu")


def check_fused_loss(name: str, device: torch.device, *, objectives: bool) -> None:
    """Refuse, before anything trains, a fused loss that cannot run here (with sharded parameters:
    :func:`~mixtune.train.sharding.check_plan`).

    Raises:
        ConfigError: objective stages (their losses are log-probabilities, not this cross-entropy),
            liger-kernel missing, or a device its kernels do not run on.
    """
    where = f"train.fused_loss = {name}"
    if objectives:
        raise ConfigError(f"{where}: not with objective stages (rft, dpo, grpo), whose losses are the policy's "
                          "log-probabilities; leave train.fused_loss unset for them")
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{where} needs liger-kernel (pip install 'mixtune[liger]'): {e}") from None
    if device.type not in _DEVICES and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"{where}: Liger's triton kernels run on CUDA or XPU GPUs, and this run is on "
                          f"{device.type} (TRITON_INTERPRET=1 runs them on a CPU, slowly, for checking)")


class FusedTokenLosses:
    """``(B, L - 1)`` token losses of a micro-batch through Liger's fused linear cross-entropy, the
    drop-in for ``token_losses(model(...).logits, labels)`` in the SFT step.

    Args:
        model: the unwrapped model (its output embedding and config).
    """

    def __init__(self, model) -> None:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        self.head = model.get_output_embeddings()
        if self.head is None or not isinstance(getattr(self.head, "weight", None), torch.Tensor):
            raise ConfigError(f"train.fused_loss: {type(model).__name__} has no output embedding to fuse the loss with")
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none", softcap=self.softcap)
        self.checked = False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head makes of ``hidden`` (soft-capped where the model is), for the check."""
        out = torch.nn.functional.linear(hidden, self.head.weight, self.head.bias)
        return out if self.softcap is None else torch.tanh(out / self.softcap) * self.softcap

    def __call__(self, model, mb: dict) -> torch.Tensor:
        """The token losses of ``mb`` (``input_ids``, ``position_ids``, ``labels``) under ``model``
        (wrapped or not: its forward is what runs)."""
        out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (m, L, H): the input of lm_head
        if not self.checked:
            self._check(hidden[:, -1].detach(), out.logits[:, -1].detach())
        labels = mb["labels"][:, 1:]
        ce = self.loss(self.head.weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels.reshape(-1),
                       self.head.bias)
        return ce.view_as(labels).float()

    def _check(self, last: torch.Tensor, logits: torch.Tensor) -> None:
        with torch.no_grad():
            ours = self.logits(last).float()
        if ours.shape != logits.shape:
            gap = f"{tuple(logits.shape)} logits, {tuple(ours.shape)} from the head"
        elif not torch.allclose(ours, logits.float(), rtol=1e-2, atol=1e-2):
            gap = f"largest difference {float((ours - logits.float()).abs().max()):.3g}"
        else:
            self.checked = True
            return
        raise ConfigError(f"train.fused_loss: this model's logits are not its lm_head of the last hidden state ({gap}: "
                          "a scaled head, or an adapter on lm_head); leave train.fused_loss unset for it")
