"""Experts offloaded to host memory and streamed through two staging buffers (quant/expert_offload.py) compute
exactly what resident experts compute, for every family, in forward, checkpoint recompute, backward and generation;
the buffers are reused; and a copy that lands late is waited for (a deferred copier stands in for a slow stream)."""

from __future__ import annotations

import pytest
import torch
from test_model import _randomize_adapters

from perft_qlora import PerftConfig, attach_perft, load_model
from perft_qlora.quant.arch import ARCHITECTURES
from perft_qlora.quant.expert_offload import ExpertStager
from perft_qlora.quant.nf4_experts import NF4Experts
from perft_qlora.training.tiny import save_tiny_model

LAYERS = 4
STEPS = 2


@pytest.fixture(scope="module")
def four_layer_checkpoint(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            directory = str(tmp_path_factory.mktemp(f"offload-{arch}"))
            cache[arch] = save_tiny_model(directory, arch, seed=0, num_hidden_layers=LAYERS)
        return cache[arch]

    return make


def _load(directory, offload="none", **kwargs):
    model, tokenizer = load_model(directory, device="cpu", progress=False, offload_experts=offload, **kwargs)
    return model, tokenizer


def _train(model, ids, mask, checkpointing=True, steps=STEPS):
    """Losses, first-step logits and first-step adapter gradients of a few AdamW steps."""
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0))
    _randomize_adapters(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses, logits, grads = [], None, None
    for step in range(steps):
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        if step == 0:
            logits = out.logits.detach().clone()
            grads = [p.grad.clone() for p in params]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses, logits, grads


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_offloaded_experts_train_and_generate_like_resident_ones(four_layer_checkpoint, arch, token_batch):
    directory = four_layer_checkpoint(arch)
    ids, mask = token_batch
    resident, tokenizer = _load(directory)
    offloaded, _ = _load(directory, "all")
    stager = offloaded.expert_stager
    assert isinstance(stager, ExpertStager) and len(stager.experts) == len(offloaded.expert_placement.moe_layers) >= 3
    kwargs = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        assert torch.equal(resident.generate(ids[:1], **kwargs), offloaded.generate(ids[:1], **kwargs))
    expected = _train(resident, ids, mask)
    got = _train(offloaded, ids, mask)
    assert torch.equal(expected[1], got[1])  # logits
    assert _equal(expected[2], got[2])  # every adapter gradient
    assert expected[0] == got[0]  # the losses of every step
    assert stager.copies > 0


def test_without_checkpointing_backward_stages_the_layer_again(four_layer_checkpoint, token_batch):
    directory = four_layer_checkpoint("olmoe")
    ids, mask = token_batch
    expected = _train(_load(directory)[0], ids, mask, checkpointing=False, steps=2)
    got = _train(_load(directory, "all")[0], ids, mask, checkpointing=False, steps=2)
    assert _equal(expected[2], got[2]) and expected[0] == got[0]


def test_the_two_staging_buffers_are_reused_and_copies_per_step_are_constant(four_layer_checkpoint, token_batch):
    model, _ = _load(four_layer_checkpoint("mixtral"), "all")
    stager = model.expert_stager
    pointers = [t.data_ptr() for t in stager.buffers()]
    assert len(stager.slots) == 2
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=0.0))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = token_batch
    per_step = []
    for _ in range(3):
        before = stager.copies
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        per_step.append(stager.copies - before)
    assert [t.data_ptr() for t in stager.buffers()] == pointers  # no buffer allocated after the first
    assert per_step[1] == per_step[2]
    # forward: every layer; recompute + backward share one staging: the two layers still staged need no copy
    assert per_step[1] <= 2 * LAYERS - 2


class DeferredCopier:
    """A copy lands only when it is waited for, in issue order, like copies queued on one side stream."""

    def __init__(self):
        self.pending: list[tuple[int, list]] = []
        self.issued = 0

    def copy(self, pairs, slot):
        self.issued += 1
        self.pending.append((self.issued, [(dst, src.clone()) for dst, src in pairs]))
        for dst, _ in pairs:
            dst.fill_(0)  # the buffer's old bytes are gone the moment a copy into it is queued
        return self.issued

    def wait(self, ticket):
        while self.pending and self.pending[0][0] <= ticket:
            for dst, src in self.pending.pop(0)[1]:
                dst.copy_(src)


def _restage(model, copier):
    experts = model.expert_stager.experts
    model.expert_stager.detach()
    model.expert_stager = ExpertStager(experts, "cpu", copier=copier)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_copy_that_lands_late_is_waited_for(four_layer_checkpoint, token_batch, checkpointing):
    directory = four_layer_checkpoint("qwen3_moe")
    ids, mask = token_batch
    expected = _train(_load(directory)[0], ids, mask, checkpointing=checkpointing, steps=2)
    model, _ = _load(directory, "all")
    _restage(model, DeferredCopier())
    got = _train(model, ids, mask, checkpointing=checkpointing, steps=2)
    assert torch.equal(expected[1], got[1]) and _equal(expected[2], got[2]) and expected[0] == got[0]


def test_auto_keeps_as_many_layers_resident_as_the_budget_allows(four_layer_checkpoint, token_batch):
    directory = four_layer_checkpoint("olmoe")
    everything, _ = _load(directory, "auto")  # no budget: all resident
    assert everything.expert_stager is None and not everything.expert_placement.offloaded
    layer = max(_load(directory, "all")[0].expert_placement.layer_bytes)
    model, _ = _load(directory, "auto", expert_budget_gib=(3 * layer + layer // 2) / 2**30)  # 1 resident + 2 buffers
    placement = model.expert_placement
    assert len(placement.resident) == 1 and len(placement.offloaded) == LAYERS - 1
    assert placement.device_bytes <= 3.5 * layer
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    assert sum(m.offloaded for m in experts) == LAYERS - 1
    with torch.no_grad():
        assert torch.equal(model(token_batch[0]).logits, everything(token_batch[0]).logits)


def test_bad_offload_arguments_are_refused_before_loading(four_layer_checkpoint):
    directory = four_layer_checkpoint("olmoe")
    with pytest.raises(ValueError, match="offload_experts must be"):
        _load(directory, "some")
    with pytest.raises(ValueError, match="needs quantize='nf4'"):
        load_model(directory, quantize="none", device="cpu", progress=False, offload_experts="all")
    with pytest.raises(ValueError, match="expert_budget_gib must be >= 0"):
        _load(directory, "auto", expert_budget_gib=-1)


def test_auto_without_a_budget_loads_a_fsdp_shard_and_a_placement_with_one_is_refused(four_layer_checkpoint):
    """``--offload-experts auto`` is the default: under FSDP (a shard, no budget) it must keep every expert resident."""
    from perft_qlora.quant.sharding import ExpertShard

    directory = four_layer_checkpoint("olmoe")
    shard = ExpertShard(rank=0, world=1, gather=lambda local: local)
    model, _ = _load(directory, "auto", experts_shard=shard)
    assert model.expert_stager is None and not model.expert_placement.offloaded
    for mode, budget in (("all", None), ("auto", 1.0)):
        with pytest.raises(ValueError, match="not supported under FSDP"):
            _load(directory, mode, experts_shard=shard, expert_budget_gib=budget)


def test_train_with_offloaded_experts_logs_the_same_losses(tmp_path):
    from perft_qlora.training.train import run
    from perft_qlora.training.train_options import parse_args

    def losses(out, *extra):
        trainer = run(parse_args([
            "--demo", "--output-dir", str(out), "--max-steps", "2", "--val-size", "0", "--batch-size", "2",
            "--max-length", "64", "--logging-steps", "1", "--save-steps", "100", "--warmup-steps", "0", *extra]))
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer.model

    resident, _ = losses(tmp_path / "resident")
    streamed, model = losses(tmp_path / "streamed", "--offload-experts", "all")
    assert model.expert_stager is not None and model.expert_stager.copies > 0
    assert streamed == resident


@pytest.mark.parametrize("extra, message", [
    (["--gpu-memory-limit", "0"], "must be a positive number"),
    (["--gpu-memory-limit", "8", "--offload-experts", "all"], "drop it or --offload-experts all"),
    (["--offload-experts", "all", "--quantize", "none"], "streams NF4 experts"),
    (["--gpu-memory-limit", "0.000001"], "below the"),
])
def test_bad_offload_options_end_as_one_line(tmp_path, capsys, extra, message):
    from perft_qlora.training.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--output-dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_fsdp_with_offload_is_refused(monkeypatch, tmp_path):
    from perft_qlora.errors import UsageError
    from perft_qlora.training.distributed import check_fsdp
    from perft_qlora.training.train_options import parse_args

    monkeypatch.setenv("FSDP_VERSION", "2")
    options = parse_args(["--demo", "--output-dir", str(tmp_path), "--offload-experts", "all"])
    with pytest.raises(UsageError, match="not supported under FSDP"):
        check_fsdp(options)
