"""train.fused_loss = liger: Liger's fused linear cross-entropy, run on this CPU by triton's
interpreter (TRITON_INTERPRET=1, set before liger's kernels are defined), gives the loss and the
gradients of the logits-then-cross-entropy path, through the real loop and on architectures with
tied embeddings and soft-capped logits; what it cannot run is refused in one line."""

import importlib
import json
import re
import sys

import pytest
import torch
import transformers

from mixtune.core import ConfigError
from mixtune.train.losses import IGNORE, token_losses

from tests.train.test_loop import run, weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def liger():
    """liger-kernel, its triton kernels compiled for the GPU, or interpreted on a CPU (tests/conftest.py)."""
    module = importlib.import_module("liger_kernel.transformers.fused_linear_cross_entropy")
    kernel = importlib.import_module("liger_kernel.ops.cross_entropy").liger_cross_entropy_kernel
    assert torch.cuda.is_available() or type(kernel).__name__ == "InterpretedFunction"
    return module


def test_the_loop_trains_with_liger_what_it_trains_with_the_logits(liger, tiny_dir, tmp_path, monkeypatch):
    """Case 3 with task weights, so the per-token weights (reduction='none') decide the gradients. The
    logged losses agree to float rounding, the weights after 2 stages x 2 steps to 2e-4 (measured 1.6e-5:
    Adam amplifies rounding on near-zero gradients, as in the accumulation test); the kernel ran once per
    micro-batch."""
    calls = []
    forward = liger.LigerFusedLinearCrossEntropyLoss.forward
    monkeypatch.setattr(liger.LigerFusedLinearCrossEntropyLoss, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    train = dict(steps=2, micro_batch_size=4, loss="case3", task_weights={"math": 2.0, "code": 0.5}, log_every=1)
    plain = run(tiny_dir, tmp_path / "plain", **train)
    fused = run(tiny_dir, tmp_path / "fused", fused_loss="liger", **train)
    assert len(calls) == 2 * 2 * 2  # stages x steps x micro-batches
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("plain", "fused")]
    losses = [[e["loss"] for e in log if "loss" in e] for log in logs]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-6)
    a, b = weights(plain[-1]), weights(fused[-1])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-4


GEMMA2 = {"head_dim": 8, "final_logit_softcapping": 2.0}


def _tiny(arch: str, **fields):
    config = getattr(transformers, arch)(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("arch, fields", [
    ("LlamaConfig", {}),
    ("Qwen2Config", {"tie_word_embeddings": True}),  # the head is the embedding: one leaf, two uses
    # soft-capped logits (a small cap, to matter); triton's interpreter does not take liger's float softcap argument
    pytest.param("Gemma2Config", GEMMA2, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="liger's softcap kernel argument needs a GPU (triton's interpreter "
                                              "refuses it); the head check with soft-capping runs on CPU below")),
])
def test_fused_token_losses_and_gradients_match_the_logits_path(liger, arch, fields):
    from mixtune.train.fused_loss import FusedTokenLosses

    model = _tiny(arch, **fields).to(DEVICE)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a prompt
    mb = {"input_ids": ids, "position_ids": torch.arange(12, device=DEVICE).expand(2, 12), "labels": labels}
    w = torch.rand(2, 11, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    ref = token_losses(model(input_ids=ids, position_ids=mb["position_ids"]).logits, labels)
    (ref * w).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = FusedTokenLosses(model)(model, mb)
    (got * w).sum().backward()
    assert got.shape == ref.shape and (got[0, :4] == 0).all()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5, msg=n)


def test_soft_capped_logits_are_the_head_of_the_last_hidden_state(liger):
    """Gemma-2's soft-capping, as the fused loss applies it, gives the model's own logits: the check passes."""
    from mixtune.train.fused_loss import FusedTokenLosses

    model = _tiny("Gemma2Config", **GEMMA2)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    fused = FusedTokenLosses(model)
    assert fused.softcap == 2.0 and out.logits.abs().max() < 2.0  # capped
    fused._check(out.hidden_states[-1][:, -1], out.logits[:, -1])
    assert fused.checked


def test_a_head_that_is_not_the_last_hidden_state_times_lm_head_is_refused(liger):
    """Cohere scales its logits (logit_scale): fused cross-entropy on lm_head alone would train on a wrong loss."""
    from mixtune.train.fused_loss import FusedTokenLosses

    model = _tiny("CohereConfig", logit_scale=0.25)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    mb = {"input_ids": ids, "position_ids": torch.arange(8)[None], "labels": ids}
    with pytest.raises(ConfigError, match="train.fused_loss: this model's logits are not its lm_head of the last "
                                          "hidden state .largest difference"):
        FusedTokenLosses(model)(model, mb)


def test_what_liger_cannot_run_is_refused_before_training(liger, monkeypatch):
    from mixtune.train.fused_loss import check_fused_loss
    from mixtune.train.methods.full import FullParams
    from mixtune.train.sharding import Plan, check_plan

    cpu = torch.device("cpu")
    check_fused_loss("liger", cpu, objectives=False)  # interpreted: runs
    with pytest.raises(ConfigError, match=r"train.fused_loss = liger: not with objective stages \(rft, dpo, grpo\)"):
        check_fused_loss("liger", cpu, objectives=True)
    ok = dict(objectives=False, evaluating=False, mixed_precision="no", fused_loss="liger")
    check_plan(Plan("ddp"), FullParams(), **ok)
    check_plan(Plan("deepspeed", zero_stage=2), FullParams(), **ok)  # ZeRO-2 keeps whole parameters
    for plan in (Plan("fsdp2"), Plan("deepspeed", zero_stage=3)):
        with pytest.raises(ConfigError, match=rf"train.fused_loss = liger does not run under "
                                              rf"{re.escape(plan.describe())} yet"):
            check_plan(plan, FullParams(), **ok)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="Liger's triton kernels run on CUDA or XPU GPUs, and this run is on cpu"):
        check_fused_loss("liger", cpu, objectives=False)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.fused_linear_cross_entropy", None)
    with pytest.raises(ConfigError, match=r"needs liger-kernel \(pip install 'mixtune\[liger\]'\)"):
        check_fused_loss("liger", torch.device("cuda"), objectives=False)
