"""Shared fixtures: tiny random Llama/Qwen2 models with offline-built chat tokenizers.

Builders live in tests/tiny.py so test modules can also call them directly (e.g. to make a
model they then corrupt). Tests marked `slow` use the embedded 0.5B model; deselect them with
`-m "not slow"`.
"""

from __future__ import annotations

import os
from pathlib import Path

# Nothing here may reach the hub; fail fast instead of hanging on a network lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tests.tiny import ARCHS, build_model, build_tokenizer, save_tiny, template_for

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
# only spin against other processes (observed: 10x slower generation).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the embedded 0.5B model (minutes on CPU)")


BIG_FILE_BYTES = 64 << 20


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test keeps its tmp_path (retention "failed") but not its checkpoints and score files.

    Left behind, one failed embedded-model test's 2 GB files filled CI's disk and failed the next
    test too; its JSON, logs and reports stay for the post-mortem.
    """
    report = yield
    path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when == "call" and report.failed and path is not None:
        for f in Path(path).rglob("*"):
            if f.is_file() and not f.is_symlink() and f.stat().st_size > BIG_FILE_BYTES:
                f.unlink()
    return report


@pytest.fixture
def chatml_tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture
def llama2_tokenizer():
    return build_tokenizer("llama2")


# Session scope: tests may attach hooks (and must leave none behind) but never change weights;
# a test that needs to corrupt a model builds its own with tests.tiny.build_model.
@pytest.fixture(scope="session")
def tiny_qwen2():
    tokenizer = build_tokenizer("chatml")
    return build_model("qwen2", tokenizer), tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    tokenizer = build_tokenizer("llama2")
    return build_model("llama", tokenizer), tokenizer


@pytest.fixture(params=ARCHS)
def tiny_pair(request):
    """(model, tokenizer) for each architecture in turn."""
    return request.getfixturevalue("tiny_qwen2" if request.param == "qwen2" else "tiny_llama")


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """Factory: save a fresh tiny model + tokenizer and return the directory for load_model."""

    def make(arch: str = "qwen2", seed: int = 0, mutate=None):
        tokenizer = build_tokenizer(template_for(arch))
        model = build_model(arch, tokenizer, seed=seed)
        if mutate is not None:
            mutate(model)
        return save_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), model, tokenizer)

    return make
