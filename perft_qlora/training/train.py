"""Fine-tune routed PEFT experts on an NF4 mixture-of-experts model with TRL's SFTTrainer.

    python -m perft_qlora.train --demo                       # shipped small base + demo task, CPU, < 3 minutes
    python -m perft_qlora.train --model allenai/OLMoE-1B-7B-0924 --data commonsense_170k.json \\
        --variant perft --num-experts 4 --top-k 2 --bottleneck 16 --output-dir runs/olmoe-perft
    python -m perft_qlora.train --model M --data chats.jsonl --show-example 1  # any format, trained tokens in [[...]]
    python -m perft_qlora.train --config run.yaml --learning-rate 2e-5   # the command line overrides the file
    python -m perft_qlora.train --config run.yaml --resume              # continue from the last checkpoint
    accelerate launch --config_file examples/accelerate/ddp.yaml -m perft_qlora.train --config run.yaml  # data parallel
    accelerate launch --config_file examples/accelerate/fsdp.yaml -m perft_qlora.train --config run.yaml  # sharded

Writes ``<output-dir>/checkpoint-N/`` (adapter + optimizer state) every ``--save-steps`` and the final
adapter (the best on the held-out rows when there are any) to ``<output-dir>/adapter/``. With ``--demo``
the shipped pre-trained base is copied to ``<output-dir>/base/`` and a before/after table ends the run.
``--help`` lists every option and its default.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback, set_seed

from ..cli import error_path
from ..errors import UsageError
from ..formats.chat_templates import read_chat_template
from ..method.config import PerftConfig
from ..method.model import attach_perft, parameter_report
from ..quant.arch import get_arch
from ..quant.loader import load_model
from ..quant.memory import memory_report
from ..quant.model_config import model_config
from ..quant.sharding import shardable_storage
from .backends import get_backend
from .baseline import attach_lora_baseline
from .data import count_truncated, prepare_data, split_validation
from .demo import prepare_demo_base, run_demo
from .demo_base import demo_base_dir
from .distributed import expert_shard, is_main_process, launch_engine, load_device, main_process_first, prepare_ranks
from .guard_rails import cpu_threads, mask_warning, schedule_warning
from .loss_mask import marked_example, token_labels
from .output_dir import card_is_free, clean_leftovers, earlier_outputs, names, start_over
from .packing import check_packing, check_packing_backend
from .resume_checks import check_resume_checkpoint
from .run_checkpoints import incomplete_reason, last_complete_checkpoint, survey_checkpoints
from .run_lock import run_lock
from .train_checks import check_against_model, check_offload, check_output_dir, check_schedule, expert_budget_gib
from .train_options import TrainOptions, make_perft_config, make_sft_config, parse_args
from .trainer import PerftSFTTrainer

DEMO_MARKER = ".perft-qlora-demo"
"""Written into ``--output-dir`` by ``--demo``: a later ``--demo`` may start over only where it finds it."""


def say(text: str) -> None:
    """Print to stderr on the first rank only (every rank runs this script under ``accelerate launch``)."""
    if is_main_process():
        print(text, file=sys.stderr)


def resolve_resume(options: TrainOptions, remove: bool = True) -> str | None:
    """The checkpoint to resume from, or None; an earlier run's outputs go only with --overwrite or in a --demo
    directory, and only what a run of ours wrote (``output_dir.py``).

    ``remove=False`` (every rank but the first under data parallel) decides the same but deletes nothing: by the
    time it looks, rank 0 has already started over and written this run's files."""
    earlier = earlier_outputs(options.output_dir, options.demo_base)  # refuses what is not ours, touching nothing
    if remove:
        for line in clean_leftovers(options.output_dir):
            say(f"{options.output_dir}: {line}")
        if not card_is_free(options.output_dir):
            say(f"{options.output_dir}/README.md is not a model card of ours: it is kept, and the card is written "
                "to adapter/README.md only")
    if options.resume is None:
        if earlier and remove:
            demo_dir = options.demo and os.path.isfile(os.path.join(options.output_dir, DEMO_MARKER))
            if not (options.overwrite or demo_dir):
                hint = " (it was not written by --demo)" if options.demo else ""
                raise UsageError(
                    f"{options.output_dir} already holds an earlier run ({names(earlier)}){hint}; pass --resume to "
                    "continue it, --overwrite to delete those and start over, or another --output-dir"
                )
            start_over(options.output_dir, earlier, "--overwrite" if options.overwrite else "--demo (a previous demo run)")
        return None
    last, skipped = survey_checkpoints(options.output_dir)
    if options.resume != "last":
        if not os.path.isdir(options.resume):
            raise UsageError(f"--resume {options.resume}: no such checkpoint directory")
        reason = incomplete_reason(options.resume)
        if reason is not None:
            raise UsageError(f"--resume {options.resume}: an incomplete checkpoint ({reason}); pass --resume alone "
                             "to continue from the last complete one" + (f" ({last})" if last else ""))
        return options.resume
    for directory, reason in skipped:
        say(f"--resume: skipping {directory}, incomplete ({reason}); training writes it again at its step")
    if last is None:
        if skipped:
            raise UsageError(f"--resume: no complete checkpoint in {options.output_dir} ({names([d for d, _ in skipped])} "
                             "did not finish saving); leave out --resume and pass --overwrite to start over")
        raise UsageError(f"--resume: no checkpoint-* directory in {options.output_dir} to continue from; "
                         "leave out --resume to start a new run")
    return last


def mark_demo_dir(output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, DEMO_MARKER), "w") as handle:
        json.dump({"written_by": "python -m perft_qlora.train --demo", "contents": ["base", "adapter", "checkpoint-*"]},
                  handle)


def interrupted_message(options: TrainOptions) -> str:
    """What a Ctrl-C leaves behind and how to continue."""
    last = last_complete_checkpoint(options.output_dir)
    if last is None:
        return (f"no checkpoint written yet (one every {options.save_steps} steps in {options.output_dir}); "
                "nothing to resume, run the command again to start over")
    return f"the last checkpoint is {last}; continue with the same command plus --resume"


def attach_adapter(model, options: TrainOptions, perft_config: PerftConfig | None):
    """PERFT blocks on every MoE layer, or peft LoRA on attention for ``--variant lora`` (``perft_config`` None)."""
    if perft_config is None:
        alpha = options.alpha if options.alpha is not None else 2.0 * options.bottleneck
        return attach_lora_baseline(model, options.bottleneck, alpha, options.adapter_dropout, options.lora_targets)
    return attach_perft(model, perft_config, dtype=getattr(torch, options.adapter_dtype))


def run(options: TrainOptions, callbacks: list[TrainerCallback] | None = None) -> PerftSFTTrainer:
    """Check, load, attach, train and save; returns the trainer (its ``state.log_history`` holds every log line).

    Everything a user passes is checked before any model weight is read (``train_options.make_perft_config``,
    ``train_checks.py``, ``quant/model_config.py``, ``records.py``)."""
    backend = get_backend(options.backend)  # fails at once if, e.g., Unsloth has no GPU here
    prepare_ranks(options)  # under accelerate launch: launch checks, the same options on every rank
    perft_config = make_perft_config(options)  # the knobs on their own, before --demo writes anything
    check_schedule(options)
    check_offload(options)
    if options.packing:
        check_packing_backend(options.backend)
    if options.chat_template is not None:
        read_chat_template(options.chat_template)  # a missing file or bad Jinja fails before anything is written
    check_output_dir(options.output_dir)  # a file, or no writable parent, before the lock creates the directory
    with run_lock(options.output_dir, enabled=is_main_process(), report=say):  # one run per directory; writable
        return _run_locked(options, callbacks, backend, perft_config)


def _run_locked(options: TrainOptions, callbacks, backend, perft_config: PerftConfig | None) -> PerftSFTTrainer:
    """``run`` once it holds ``--output-dir`` (rank 0 holds the lock)."""
    set_seed(options.seed)
    with main_process_first():  # rank 0 removes old checkpoints and writes the demo base before others look
        resume = resolve_resume(options, remove=is_main_process())
        if options.demo and is_main_process():
            mark_demo_dir(options.output_dir)
        if options.demo_base and is_main_process():
            prepare_demo_base(options.output_dir)  # into options.model
    base_config = model_config(options.model, options.revision)
    check_against_model(options, base_config)
    if resume is not None:  # its files and its fit with this run, before the model loads
        check_resume_checkpoint(resume, base_config, perft_config)
    budget = expert_budget_gib(options, base_config)
    use_cpu_threads(options, base_config)
    prepared = prepare_data(options, options.model, say)
    data, tokenizer = prepared.data, prepared.tokenizer
    train_set, val_set = split_validation(data.dataset, options.val_size)
    learning_rate = options.learning_rate
    if learning_rate is None:
        learning_rate = get_arch(base_config).recipe_learning_rate
    for warning in (schedule_warning(options, len(train_set), learning_rate),
                    mask_warning(prepared.lengths.trained_tokens, prepared.lengths.tokens, prepared.lengths.kept)):
        if warning:
            say(warning)
    if resume is not None:
        say(f"resuming from {resume}")

    model, _ = load_model(
        options.model, quantize=options.quantize, device=load_device(options.device), double_quant=options.double_quant,
        revision=options.revision, dtype=getattr(torch, options.base_dtype), experts_shard=expert_shard(),
        offload_experts=options.offload_experts if options.quantize == "nf4" else "none", expert_budget_gib=budget,
    )
    if model.expert_stager is not None:
        placement = model.expert_placement
        say(f"experts of {len(placement.offloaded)} of {len(placement.moe_layers)} MoE layers in host memory "
            f"({placement.host_bytes / 2**30:.2f} GiB), streamed through {model.expert_stager}")
    if options.packing:
        check_packing(model)  # before the adapter: attention is the base's
    arch = get_arch(model.config)
    too_long, checked = (count_truncated(train_set, tokenizer, options.max_length)
                         if data.loss == "all" and "prompt" in train_set.column_names  # not tokenized before
                         else (prepared.lengths.too_long, prepared.lengths.kept))
    if too_long:
        say(f"warning: {too_long} of {checked} examples checked are longer than --max-length {options.max_length} "
              "tokens and lose the end of their response; raise --max-length")
    model = attach_adapter(model, options, perft_config)
    say(memory_report(model))
    if launch_engine() == "fsdp":
        shardable_storage(model)  # the 4-bit storage as parameters, which FSDP2 shards (quant/sharding.py)
    say(f"{options.variant}: {parameter_report(model)}")

    run_metadata = {
        "base_model": options.model, "data": options.data, "variant": options.variant, "seed": options.seed,
        "template": options.template, "data_format": data.format, "loss_on": data.loss,
        **({"chat_template": prepared.chat.to_record()} if prepared.chat is not None else {}),
    }
    trainer = PerftSFTTrainer(
        model, args=make_sft_config(options, arch, val_set is not None, data.loss), train_dataset=train_set,
        eval_dataset=val_set, processing_class=tokenizer, callbacks=callbacks, run_metadata=run_metadata,
    )
    backend.apply(trainer.model)
    trainer.train(resume_from_checkpoint=resume)
    final_dir = os.path.join(options.output_dir, "adapter")
    trainer.save_model(final_dir)
    best = trainer.state.best_metric
    say(f"adapter saved to {final_dir}" + (f" (best eval_loss {best:.4f})" if best is not None else ""))
    return trainer


def use_cpu_threads(options: TrainOptions, config) -> None:
    """On a CPU, ``--cpu-threads`` or the count ``guard_rails.cpu_threads`` picks for the model's width, said once."""
    if options.device.startswith("cuda"):
        return
    threads, line = cpu_threads(options.cpu_threads, config.get_text_config().hidden_size)
    torch.set_num_threads(threads)
    if line:
        say(line)


def show_example(options: TrainOptions) -> str:
    """``--show-example N``: the Nth usable example as the trainer will see it, trained tokens in ``[[...]]``."""
    prepared = prepare_data(options, demo_base_dir() if options.demo_base else options.model, say)
    data, number = prepared.data, options.show_example
    if not 1 <= number <= len(data.dataset):
        raise UsageError(f"--show-example {number}: the data has {len(data.dataset)} usable rows; pass 1 to "
                         f"{len(data.dataset)}")
    ids, labels = token_labels(data.dataset[number - 1], prepared.tokenizer, data.loss, prepared.chat_template)
    source, row = data.origins[number - 1]
    return (f"{source} row {row} ({data.format} rows, loss on {data.loss}):\n"
            + marked_example(ids, labels, prepared.tokenizer, options.max_length))


def main(argv: list[str] | None = None) -> None:
    """The command line: bad input ends as one ``error:`` line and exit status 1 (``cli.error_path``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with error_path("--debug" in argv):  # a --config file that cannot be used, a global batch that does not divide
        options = parse_args(argv)
    with error_path(options.debug, on_interrupt=lambda: interrupted_message(options)):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # SFTTrainer's five per-split preprocessing bars; the training bar stays
        if options.show_example is not None:
            print(show_example(options))
        elif options.demo:
            run_demo(options, run)  # trains, then prints the before/after table and the next commands
        else:
            run(options)


if __name__ == "__main__":
    main()
