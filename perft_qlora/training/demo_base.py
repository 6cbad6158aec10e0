"""The small pre-trained OLMoE that ships with the package, and the script that pre-trains it.

    python -m perft_qlora.training.demo_base            # re-make perft_qlora/data/demo_base/ (seeded; see MANIFEST for time)
    python -m perft_qlora.training.demo_base --check    # the shipped files match the recorded config and hashes

The model is a real ``OlmoeForCausalLM`` (fused experts, top-2 of 8 router, 4 layers, hidden 128; every
dimension a multiple of 64, so NF4 applies as to the full-size models) with a byte-level BPE tokenizer trained
here with ``tokenizers``. It is pre-trained from scratch on the synthetic instruction corpus of
``perft_qlora/formats/demo_corpus.py`` (loss on the responses; the base router's balance loss on), then saved in
bfloat16 as safetensors. ``demo_base.json`` beside the weights records the settings, how long pre-training
took and on what, the held-out accuracy per family, and the sha256 of every shipped file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from ..formats.demo_corpus import DEMO_FAMILY, FAMILIES, TEMPLATES, family_rows, pretraining_example, pretraining_stream

MANIFEST = "demo_base.json"
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
SETTINGS = dict(
    seed=0, vocab_size=640, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_experts=8, num_experts_per_tok=2, steps=300, batch_size=32, learning_rate=5e-3, warmup_steps=15,
    weight_decay=0.01, router_aux_loss_coef=0.01, tokenizer_examples=20000,
)
"""Everything that decides the shipped weights (recorded in the manifest)."""


def demo_base_dir() -> str:
    """Where the shipped model lives inside the installed package."""
    return str(resources.files("perft_qlora") / "data" / "demo_base")


def build_tokenizer(seed: int, examples: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``examples`` corpus rows (both templates)."""
    rng = random.Random(seed + 1)
    texts = ["".join(pretraining_example(rng)) for _ in range(examples)]
    for family in (DEMO_FAMILY,):  # the demo's words are plain English: keep them whole tokens like the rest
        for row in family_rows(family, 200, seed + 2):
            texts.append("".join(TEMPLATES["alpaca"](row["instruction"], row["input"], row["output"])))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1]
    )


def build_config(tokenizer: PreTrainedTokenizerFast, s: dict) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_attention_heads"], num_experts=s["num_experts"],
        num_experts_per_tok=s["num_experts_per_tok"], max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        router_aux_loss_coef=s["router_aux_loss_coef"],
    )


def encode(tokenizer, prompt: str, completion: str, joint: bool) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: loss on the completion and EOS. ``joint`` tokenizes prompt+completion at once
    (as SFT training does); otherwise the prompt alone, then the completion (as generation sees it)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if joint:
        ids = tokenizer(prompt + completion, add_special_tokens=False).input_ids
        start = len(prompt_ids) - 1 if ids[: len(prompt_ids) - 1] == prompt_ids[:-1] else len(prompt_ids)
    else:
        ids, start = prompt_ids + tokenizer(completion, add_special_tokens=False).input_ids, len(prompt_ids)
    ids = ids + [tokenizer.eos_token_id]
    return ids, [-100] * start + ids[start:]


def make_batch(tokenizer, pairs, rng: random.Random) -> dict[str, torch.Tensor]:
    encoded = [encode(tokenizer, p, c, rng.random() < 0.5) for p, c in pairs]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain(s: dict, log=print) -> tuple[OlmoeForCausalLM, PreTrainedTokenizerFast, float]:
    """Pre-train from scratch; returns ``(model, tokenizer, seconds)``."""
    torch.manual_seed(s["seed"])
    tokenizer = build_tokenizer(s["seed"], s["tokenizer_examples"], s["vocab_size"])
    model = OlmoeForCausalLM(build_config(tokenizer, s)).float()
    with torch.no_grad():  # OLMoE's init leaves routers at zero; start from distinct routes
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.02)
    model.config.output_router_logits = True  # adds the base router's balance loss to the loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], weight_decay=s["weight_decay"])
    total, warmup = s["steps"], s["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        optimizer, lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup)))
    stream, rng = pretraining_stream(s["seed"]), random.Random(s["seed"] + 3)
    model.train()
    start = time.perf_counter()
    for step in range(total):
        batch = make_batch(tokenizer, [next(stream) for _ in range(s["batch_size"])], rng)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == total - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:7.1f}s")
    model.config.output_router_logits = False
    return model.eval(), tokenizer, time.perf_counter() - start


@torch.no_grad()
def yes_no_accuracy(model, tokenizer, rows: list[dict], template: str = "alpaca") -> float:
    """Share of ``rows`` where ``true``/``false`` after the answer prefix scores the gold label higher."""
    labels = [tokenizer(f" {w}", add_special_tokens=False).input_ids[0] for w in ("true", "false")]
    prompts = [TEMPLATES[template](r["instruction"], r["input"], "")[0] + "the correct answer is" for r in rows]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    logits = model(**batch).logits[:, -1, labels]
    picked = ["true" if t > f else "false" for t, f in logits.tolist()]
    return sum(p == r["answer"] for p, r in zip(picked, rows)) / len(rows)


def probe(model, tokenizer, seed: int = 1234, count: int = 200) -> dict[str, float]:
    """Held-out yes/no accuracy per family (and the demo task, which the base never saw), both templates."""
    families = {name: f for name, f in FAMILIES.items() if f(random.Random(0))["answer"] in ("true", "false")}
    families["demo (never trained)"] = DEMO_FAMILY
    return {
        f"{name} / {template}": round(yes_no_accuracy(model, tokenizer, family_rows(family, count, seed), template), 3)
        for name, family in families.items() for template in ("alpaca", "released_eval")
    }


def sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def save(model, tokenizer, directory: str, record: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for name in os.listdir(directory):  # package data: readable by everyone
        os.chmod(os.path.join(directory, name), 0o644)
    files = sorted(f for f in os.listdir(directory) if f != MANIFEST)
    record["files"] = {f: sha256(os.path.join(directory, f)) for f in files}
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")


def check(directory: str | None = None) -> list[str]:
    """Problems with the shipped files (missing, changed, or a config unlike the recorded settings); [] if none."""
    directory = directory or demo_base_dir()
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as handle:
        record = json.load(handle)
    problems = [f"{f}: sha256 differs from {MANIFEST}" for f, digest in record["files"].items()
                if not os.path.isfile(os.path.join(directory, f)) or sha256(os.path.join(directory, f)) != digest]
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    s = record["settings"]
    expected = {k: s[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_experts", "num_experts_per_tok")}
    problems += [f"config.json {k}={config.get(k)}, recorded {v}" for k, v in expected.items() if config.get(k) != v]
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perft_qlora.training.demo_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="default: the package's data/demo_base/")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"], help="optimizer steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (on a shared 2-core machine 1 was 20x faster than 2)")
    parser.add_argument("--check", action="store_true", help="only verify the shipped files")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.output_dir)
        print("\n".join(problems) or f"{args.output_dir or demo_base_dir()}: files match {MANIFEST}")
        sys.exit(1 if problems else 0)
    torch.set_num_threads(args.threads)
    settings = {**SETTINGS, "steps": args.steps}
    model, tokenizer, seconds = pretrain(settings)
    accuracy = probe(model, tokenizer)
    print(json.dumps(accuracy, indent=1))
    record = {
        "settings": settings, "pretraining_seconds": round(seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads, "
                   f"{os.cpu_count()} CPUs visible; torch {torch.__version__}",
        "held_out_accuracy_bf16": accuracy,
    }
    save(model, tokenizer, args.output_dir or demo_base_dir(), record)
    print(f"saved to {args.output_dir or demo_base_dir()} after {seconds:.0f}s of pre-training")


if __name__ == "__main__":
    main()
