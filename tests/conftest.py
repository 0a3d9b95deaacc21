"""Shared fixtures: the built-in tokenizer and a tiny model folder, built once per session."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # triton's kernels (liger-kernel's, for train.fused_loss) run interpreted on a machine without a GPU; triton
    # reads this as each kernel is defined, its own helpers on import, so it is set before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from mixtune.builtin import builtin_tokenizer

    return builtin_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mixtune.builtin import init_builtin

    return init_builtin(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def sharp_dir(tiny_dir, tmp_path_factory):
    """The tiny model with its weight matrices x4, so choices are far from ties and some continuations
    are greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    out = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    matrices gain nothing from threads, and one keeps the module fast on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
