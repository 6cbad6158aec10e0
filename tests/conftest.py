"""Shared fixtures: tiny OLMoE / Mixtral checkpoints written with save_pretrained (no downloads)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Kernel tests run Triton's interpreter on CPU; it must be on before anything imports triton
    # (bitsandbytes does, through perft_qlora below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from perft_qlora import load_model
from perft_qlora.training.tiny import save_tiny_model

ARCHS = ("olmoe", "mixtral")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch)`` -> directory of a tiny random model + tokenizer, written once per session."""
    cache: dict[str, str] = {}

    def make(arch: str = "olmoe") -> str:
        if arch not in cache:
            cache[arch] = save_tiny_model(str(tmp_path_factory.mktemp(f"tiny-{arch}")), arch, seed=0)
        return cache[arch]

    return make


@pytest.fixture
def tiny_nf4(tiny_checkpoint):
    """``tiny_nf4(arch)`` -> a freshly loaded NF4 model and tokenizer on CPU."""

    def make(arch: str = "olmoe"):
        return load_model(tiny_checkpoint(arch), device="cpu", progress=False)

    return make


@pytest.fixture
def token_batch():
    """A (2, 12) batch of token ids inside the tiny vocabulary, and its attention mask (second row padded)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def pytest_configure(config):
    """Under tests/mutation/mutate.py: refuse to run against any package but the mutated copy."""
    expected = os.environ.get("PERFT_QLORA_EXPECT_ROOT")
    if expected:
        import perft_qlora

        if not os.path.abspath(perft_qlora.__file__).startswith(os.path.abspath(expected) + os.sep):
            raise pytest.UsageError(f"perft_qlora imported from {perft_qlora.__file__}, not the copy in {expected}")
