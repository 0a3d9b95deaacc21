"""Shared fixtures: the built-in tokenizer and a tiny model folder, built once per session."""

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from mixtune.builtin import builtin_tokenizer

    return builtin_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mixtune.builtin import init_builtin

    return init_builtin(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)
