"""save_adapter is atomic: a save that fails halfway leaves the previous adapter as it was and no temporary files."""

from __future__ import annotations

import os

import pytest
import torch

from perft_qlora import PerftConfig, attach_perft, load_adapter, save_adapter
from perft_qlora.method import checkpoint
from perft_qlora.method.checkpoint import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def saved(tiny_nf4, tmp_path):
    """(model, adapter directory, {file name: bytes}) after a first save; the model's weights then change."""
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=4))
    directory = save_adapter(model, str(tmp_path / "runs" / "adapter"))
    before = {name: (tmp_path / "runs" / "adapter" / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    return model, directory, before


def _assert_untouched(directory: str, before: dict[str, bytes]) -> None:
    assert sorted(os.listdir(directory)) == sorted(before)
    for name, data in before.items():
        with open(os.path.join(directory, name), "rb") as handle:
            assert handle.read() == data, f"{name} changed"
    parent = os.path.dirname(directory)
    assert os.listdir(parent) == [os.path.basename(directory)], "temporary files left behind"


def test_a_save_failing_while_writing_the_weights_keeps_the_previous_adapter(saved, monkeypatch, tiny_nf4):
    model, directory, before = saved

    def write_half_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 100)  # a torn file where the save was writing
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory)
    _assert_untouched(directory, before)
    fresh, _ = tiny_nf4("olmoe")
    load_adapter(fresh, directory)  # still a whole, loadable adapter


def test_a_save_failing_at_the_final_rename_keeps_the_previous_adapter(saved, monkeypatch):
    model, directory, before = saved
    real_replace, calls = os.replace, []

    def replace_failing_into_place(src, dst):
        calls.append((src, dst))
        if dst == directory and ".adapter-old-" not in src:  # the new files moving into place
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_into_place)
    with pytest.raises(OSError, match="interrupted"):
        save_adapter(model, directory)
    assert any(dst == directory for _, dst in calls)  # the failure happened where it was meant to
    _assert_untouched(directory, before)


def test_a_successful_save_replaces_the_adapter_and_leaves_no_temporary_files(saved):
    model, directory, before = saved
    save_adapter(model, directory)
    with open(os.path.join(directory, WEIGHTS_NAME), "rb") as handle:
        assert handle.read() != before[WEIGHTS_NAME]
    assert os.listdir(os.path.dirname(directory)) == [os.path.basename(directory)]
