"""Saved adapters of both kinds (PERFT, peft LoRA baseline) on one base model: attach, compare, detach, evaluate."""

import pytest
import torch

from perft_qlora import AdapterError, PerftConfig, attach_perft, load_model, save_adapter
from perft_qlora import evaluate
from perft_qlora.adapters import adapter_kind, attach_saved_adapter, detach_adapter
from perft_qlora.train import run
from perft_qlora.train_options import parse_args


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    trainer = run(parse_args([
        "--demo", "--variant", "lora", "--output-dir", str(out), "--max-steps", "2", "--val-size", "0",
        "--batch-size", "4", "--max-length", "128", "--warmup-steps", "0", "--learning-rate", "0.05",
    ]))
    return out, trainer


def _logits(model, tokenizer):
    batch = tokenizer(["Is the following text written in capital letters?"], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_lora_baseline_adapter_reloads_exactly_and_detaches_cleanly(lora_run):
    out, trainer = lora_run
    assert adapter_kind(str(out / "adapter")) == "peft"
    base, tokenizer = load_model(str(out / "base"), device="cpu", progress=False)
    plain = _logits(base, tokenizer)
    adapted = attach_saved_adapter(base, str(out / "adapter"))
    assert torch.equal(_logits(adapted, tokenizer), _logits(trainer.model, tokenizer))
    assert not torch.equal(_logits(adapted, tokenizer), plain)  # two steps at lr 0.05 moved it
    restored = detach_adapter(adapted)
    assert torch.equal(_logits(restored, tokenizer), plain)


def test_perft_adapter_round_trip_through_the_same_functions(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("olmoe")
    model, tokenizer = load_model(path, device="cpu", progress=False)
    plain = _logits(model, tokenizer)
    attach_perft(model, PerftConfig(variant="perft_s", bottleneck=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("perft_experts.up"):
                param.normal_(0, 0.1)
    adapted_logits = _logits(model, tokenizer)
    directory = save_adapter(model, str(tmp_path / "a"))
    assert adapter_kind(directory) == "perft"
    fresh, _ = load_model(path, device="cpu", progress=False)
    adapted = attach_saved_adapter(fresh, directory)
    assert torch.equal(_logits(adapted, tokenizer), adapted_logits)
    assert torch.equal(_logits(detach_adapter(adapted), tokenizer), plain)


def test_not_an_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        adapter_kind(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="corrupt"):
        adapter_kind(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"format_version": 99}')
    with pytest.raises(AdapterError, match="format_version 99"):
        adapter_kind(str(tmp_path))


def test_evaluate_scores_the_lora_baseline_beside_the_base(lora_run, tmp_path):
    out, _ = lora_run
    summary = evaluate.main([
        "--model", str(out / "base"), "--adapter", f"lora={out / 'adapter'}", "--tasks", "demo", "--limit", "2",
        "--greedy", "--batch-size", "2", "--output-dir", str(tmp_path / "eval"), "--device", "cpu",
    ])
    assert set(summary["results"]) == {"base", "lora"}
    assert summary["results"]["lora"]["demo"]["total"] == 2
