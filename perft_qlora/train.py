"""Fine-tune routed PEFT experts on an NF4 mixture-of-experts model with TRL's SFTTrainer.

    python -m perft_qlora.train --demo                       # tiny built-in model + data, CPU, ~2 minutes
    python -m perft_qlora.train --model allenai/OLMoE-1B-7B-0924 --data commonsense_170k.json \\
        --variant perft --num-experts 4 --top-k 2 --bottleneck 16 --output-dir runs/olmoe-perft
    python -m perft_qlora.train --config run.yaml --learning-rate 2e-5   # the command line overrides the file
    python -m perft_qlora.train --config run.yaml --resume              # continue from the last checkpoint
    accelerate launch --config_file examples/accelerate/ddp.yaml -m perft_qlora.train --config run.yaml  # data parallel

Writes ``<output-dir>/checkpoint-N/`` (adapter + optimizer state) every ``--save-steps`` and the final
adapter (the best on the held-out rows when there are any) to ``<output-dir>/adapter/``. With ``--demo``
the tiny base model is written to ``<output-dir>/base/``. ``--help`` lists every option and its default.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .arch import get_arch
from .backends import get_backend
from .baseline import attach_lora_baseline
from .data import count_truncated, split_validation, to_prompt_completion
from .distributed import is_main_process, main_process_first, prepare_ranks
from .loader import load_model
from .memory import memory_report
from .model import attach_perft, parameter_report
from .records import read_records
from .tiny import save_tiny_model
from .train_options import DEMO_INIT_RANGE, parse_args, perft_config_from_args, sft_config_from_args
from .trainer import PerftSFTTrainer


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from, or None; refuses to silently train over an earlier run's checkpoints."""
    existing = sorted(glob.glob(os.path.join(args.output_dir, "checkpoint-*")))
    if args.resume is None:
        if existing and not args.overwrite:
            raise SystemExit(
                f"error: {args.output_dir} already holds checkpoints ({os.path.basename(existing[-1])}); "
                "pass --resume to continue that run, --overwrite to start over, or another --output-dir"
            )
        for directory in existing:  # --overwrite: the earlier run's checkpoints go (nothing else is touched)
            shutil.rmtree(directory)
        return None
    if args.resume != "last":
        if not os.path.isdir(args.resume):
            raise SystemExit(f"error: --resume {args.resume}: no such checkpoint directory")
        return args.resume
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last is None:
        raise SystemExit(f"error: --resume: no checkpoint-* directory in {args.output_dir} to continue from")
    return last


def attach_adapter(model, args: argparse.Namespace):
    """PERFT blocks on every MoE layer, or peft LoRA on attention for ``--variant lora``."""
    if args.variant == "lora":
        alpha = args.alpha if args.alpha is not None else 2.0 * args.bottleneck
        return attach_lora_baseline(model, args.bottleneck, alpha, args.adapter_dropout, args.lora_targets)
    return attach_perft(model, perft_config_from_args(args), dtype=getattr(torch, args.adapter_dtype))


def run(args: argparse.Namespace, callbacks: list[TrainerCallback] | None = None) -> PerftSFTTrainer:
    """Load, attach, train and save; returns the trainer (its ``state.log_history`` holds every log line)."""
    backend = get_backend(args.backend)  # fails at once if, e.g., Unsloth has no GPU here
    args.device = prepare_ranks(args)  # under accelerate launch: this rank's own GPU, launch checks
    set_seed(args.seed)
    with main_process_first():  # rank 0 removes old checkpoints and writes the demo base before others look
        resume = resolve_resume(args)
        if args.demo and args.model is None:
            base = os.path.join(args.output_dir, "base")
            args.model = save_tiny_model(base, "olmoe", initializer_range=DEMO_INIT_RANGE) if is_main_process() else base
    records = read_records(args.data, required=("instruction", "output"), split=args.data_split)
    print(records.report(), file=sys.stderr)
    train_set, val_set = split_validation(to_prompt_completion(records), args.val_size)

    model, tokenizer = load_model(
        args.model, quantize=args.quantize, device=args.device, double_quant=args.double_quant, revision=args.revision,
        dtype=getattr(torch, args.base_dtype),
    )
    arch = get_arch(model.config)
    too_long, checked = count_truncated(train_set, tokenizer, args.max_length)
    if too_long:
        print(f"warning: {too_long} of {checked} examples checked are longer than --max-length {args.max_length} "
              "tokens and lose the end of their response; raise --max-length", file=sys.stderr)
    model = attach_adapter(model, args)
    print(memory_report(model), file=sys.stderr)
    print(f"{args.variant}: {parameter_report(model)}", file=sys.stderr)

    run_metadata = {"base_model": args.model, "data": args.data, "variant": args.variant, "seed": args.seed}
    trainer = PerftSFTTrainer(
        model, args=sft_config_from_args(args, arch, val_set is not None), train_dataset=train_set,
        eval_dataset=val_set, processing_class=tokenizer, callbacks=callbacks, run_metadata=run_metadata,
    )
    backend.apply(trainer.model)
    trainer.train(resume_from_checkpoint=resume)
    final_dir = os.path.join(args.output_dir, "adapter")
    trainer.save_model(final_dir)
    best = trainer.state.best_metric
    print(f"adapter saved to {final_dir}" + (f" (best eval_loss {best:.4f})" if best is not None else ""), file=sys.stderr)
    return trainer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run(args)
    if args.demo:
        base = args.model
        print(
            "next: python -m perft_qlora.evaluate --model {0} --adapter {1} --tasks demo\n"
            "      python apps/compare.py --demo --demo-dir {2}".format(base, os.path.join(args.output_dir, "adapter"), args.output_dir),
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
