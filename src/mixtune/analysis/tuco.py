"""TuCo, the tuning contribution: how much of a fine-tuned model's forward pass on a prompt is due to
fine-tuning (Nuti et al., "Tuning Contribution", ICML 2025, PMLR v267, Algorithm 1).

Each fine-tuned block's residual update splits exactly into a pre-training component, the pre-trained
block applied to the fine-tuned model's own hidden state, and a fine-tuning component, the rest:

    x_0 = the fine-tuned model's embedding output
    PTC_l = f_PT(x_l) - x_l,   FTC_l = f_FT(x_l) - x_l - PTC_l,   x_{l+1} = x_l + PTC_l + FTC_l
    TuCo = ||sum_l FTC_l[-1]|| / (||sum_l PTC_l[-1]|| + ||sum_l FTC_l[-1]||)   in [0, 1]

What is implemented (the official code is not public; the points the paper's pseudocode leaves open
are settled as follows):

- a layer is a whole decoder block (attention and MLP together), as found by
  :func:`mixtune.models.structure.find_structure`; f(x) is the block's output, so its update is f(x) - x;
- the norm is L2, over the hidden dimension, in float32;
- only the last token (position -1) is summed; prompts are left padded so it is each prompt's own;
- x_0 is the fine-tuned model's embedding output (with position embeddings, for GPT-2); the final norm
  and the unembedding are not part of either sum;
- the pre-trained block gets the very call the fine-tuned block got: the same hidden state, attention
  mask, position embeddings and ids, so the split is exact: sum_l (PTC_l + FTC_l) = x_L - x_0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from mixtune.core import ConfigError, DataError
from mixtune.models.structure import find_structure


def tuco_from_components(ptc: torch.Tensor, ftc: torch.Tensor) -> torch.Tensor:
    """TuCo per item from last-token components (Nuti et al., 2025, Algorithm 1, its final line):
    ||sum_l FTC_l|| / (||sum_l PTC_l|| + ||sum_l FTC_l||), L2 norms; 0 where both sums are 0.

    Args:
        ptc: (layers, batch, hidden) pre-training components PTC_l at the last token.
        ftc: (layers, batch, hidden) fine-tuning components FTC_l, same shape.

    Returns:
        (batch,) float32 TuCo, each in [0, 1].
    """
    if ptc.shape != ftc.shape or ptc.dim() != 3:
        raise ValueError(f"PTC and FTC must both be (layers, batch, hidden), got {tuple(ptc.shape)} and "
                         f"{tuple(ftc.shape)}")
    pt = ptc.to(torch.float32).sum(0).norm(dim=-1)  # (batch,) ||I_PTC||
    ft = ftc.to(torch.float32).sum(0).norm(dim=-1)  # (batch,) ||I_FTC||
    den = pt + ft
    return torch.where(den > 0, ft / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(den))


def _width(model) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


def _paired_blocks(pretrained, tuned) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(pre-trained block l, fine-tuned block l) for every l.

    Raises:
        ConfigError: the models differ in block count or hidden size.
    """
    pt, ft = find_structure(pretrained, "tuco").blocks, find_structure(tuned, "tuco").blocks
    if len(pt) != len(ft) or _width(pretrained) != _width(tuned):
        raise ConfigError(f"tuco: the pre-trained model has {len(pt)} blocks of width {_width(pretrained)}, the "
                          f"fine-tuned one {len(ft)} of width {_width(tuned)}; TuCo compares a fine-tune with "
                          "its own base model")
    return [(p.module, f.module) for p, f in zip(pt, ft)]


def _to(obj, device: torch.device):
    """``obj`` (a tensor, or tuples, lists and dicts of them) with its tensors on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden(out) -> torch.Tensor:
    """A block's output hidden state: the tensor itself (newer transformers) or element 0 of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def block_components(pretrained, tuned, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PTC_l and FTC_l of every block at the last token (Nuti et al., 2025, Algorithm 1): one forward
    pass of ``tuned``; as each fine-tuned block l runs, the pre-trained block l is called on the same
    input x_l with the same arguments, giving PTC_l = f_PT(x_l) - x_l and FTC_l = f_FT(x_l) - f_PT(x_l).
    Both models are run in eval mode (restored afterwards), without a cache or gradients.

    Args:
        pretrained: the base causal LM (transformers); only its blocks are used.
        tuned: the fine-tuned causal LM, with as many blocks of the same width.
        input_ids: (batch, seq) token ids, left padded, so position -1 is every prompt's last token.
        attention_mask: (batch, seq) 1 for tokens, 0 for padding; position ids are counted from it.

    Returns:
        (PTC, FTC), each (layers, batch, hidden) float32.

    Raises:
        ConfigError: the models differ in block count or hidden size.
        ValueError: the last position is padding somewhere (the prompts are not left padded).
    """
    pairs = _paired_blocks(pretrained, tuned)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("block_components reads the last position: pad the prompts on the left")
    ptc: list[torch.Tensor] = []
    ftc: list[torch.Tensor] = []
    busy = []  # non-empty while a pre-trained block runs: guards against re-entry when both are one model

    def hook(pt_block, device):
        def run(_module, args, kwargs, out):
            if busy:
                return
            x = args[0] if args else kwargs["hidden_states"]
            busy.append(True)
            try:
                f_pt = _hidden(pt_block(*_to(args, device), **_to(kwargs, device)))
            finally:
                busy.pop()
            x_last = x[:, -1].to(torch.float32)  # (batch, hidden)
            pt_last = f_pt[:, -1].to(x.device, torch.float32)
            ptc.append(pt_last - x_last)  # PTC_l = f_PT(x_l) - x_l
            ftc.append(_hidden(out)[:, -1].to(torch.float32) - pt_last)  # FTC_l = f_FT(x_l) - x_l - PTC_l
        return run

    base = getattr(tuned, "base_model", tuned)  # the decoder without the LM head: logits are not needed
    device = tuned.get_input_embeddings().weight.device
    mask = attention_mask.to(device)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": mask, "use_cache": False}
    if "position_ids" in inspect.signature(base.forward).parameters:
        # positions count real tokens only, so a left-padded prompt is placed as it is alone (as generate does)
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    modes = {m: m.training for model in (pretrained, tuned) for m in model.modules()}
    handles = []
    try:
        pretrained.eval()
        tuned.eval()
        for pt_block, ft_block in pairs:
            pt_device = next(pt_block.parameters()).device
            handles.append(ft_block.register_forward_hook(hook(pt_block, pt_device), with_kwargs=True))
        with torch.no_grad():
            base(**inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    assert len(ptc) == len(pairs), f"{len(ptc)} of {len(pairs)} fine-tuned blocks ran (each must run once per forward)"
    return torch.stack(ptc), torch.stack(ftc)


def tuning_contribution(pretrained, tuned, tokenizer, prompts: list[str], *, batch_size: int = 8,
                        progress: Callable[[int], None] | None = None) -> list[float]:
    """TuCo of ``tuned`` relative to ``pretrained`` on each prompt (Nuti et al., 2025, Algorithm 1):
    :func:`block_components` then :func:`tuco_from_components`, ``batch_size`` prompts at a time.

    Args:
        pretrained: the base causal LM.
        tuned: the fine-tuned causal LM (same architecture, blocks and width).
        tokenizer: the tuned model's tokenizer; it is used left padded (restored afterwards), with its
            end-of-sequence token as the pad token if it has none, and its default special tokens.
        prompts: the final texts (any chat template already applied).
        batch_size: prompts per forward pass.
        progress: optional callable given the number of prompts in each finished batch.

    Returns:
        One TuCo in [0, 1] per prompt, in order.

    Raises:
        ConfigError: the models differ in block count or hidden size, or the tokenizer has neither a
            pad nor an end-of-sequence token.
        DataError: a prompt tokenizes to no tokens.
    """
    _paired_blocks(pretrained, tuned)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if pad is None and tokenizer.eos_token is None:
        raise ConfigError(f"tuco: the tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; "
                          "set tokenizer.pad_token")
    out: list[float] = []
    try:
        tokenizer.padding_side = "left"
        if pad is None:
            tokenizer.pad_token = tokenizer.eos_token
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True)
            empty = (enc["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise DataError(f"tuco: prompt {i + empty[0]} tokenizes to no tokens; TuCo reads the last token")
            ptc, ftc = block_components(pretrained, tuned, enc["input_ids"], enc["attention_mask"])
            out += tuco_from_components(ptc, ftc).tolist()
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return out
