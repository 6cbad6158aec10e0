"""Checks of train's options that run before any model weight is read: the schedule, the options against the
base model's config, the output directory. Each failure is a :class:`~perft_qlora.errors.UsageError` naming
the problem and the fix.

The adapter knobs are checked where they become a ``PerftConfig`` (``train_options.make_perft_config``), the
base model's ``config.json`` by ``quant.model_config``, data files by ``records.read_records``; all of them
also run before loading.
"""

from __future__ import annotations

import os

from ..errors import UsageError
from ..quant.arch import get_arch
from ..quant.footprint import other_weight_bytes
from .option_values import check_numbers
from .train_options import TrainOptions


def check_schedule(options: TrainOptions) -> None:
    """Every numeric option in its range (``option_values.NUMBER_RULES``: the command line checked them already,
    a ``TrainOptions`` built in Python is checked here); with held-out rows the best checkpoint is picked at
    evaluations, so checkpoints must fall on them."""
    check_numbers(options)
    if options.val_size > 0 and options.save_steps % options.eval_steps:
        raise UsageError(
            f"--save-steps {options.save_steps} is not a multiple of --eval-steps {options.eval_steps}: with held-out "
            "rows (--val-size) the best checkpoint is chosen at evaluations; make it a multiple, or pass --val-size 0"
        )


def check_offload(options: TrainOptions) -> None:
    """``--offload-experts`` / ``--gpu-memory-limit``: NF4 experts only, a positive limit, a mode that uses it."""
    if options.offload_experts != "none" and options.quantize != "nf4" and (
            options.offload_experts == "all" or options.gpu_memory_limit is not None):
        raise UsageError("--offload-experts streams NF4 experts: drop it or --quantize none")
    if options.gpu_memory_limit is not None:
        if options.gpu_memory_limit <= 0:
            raise UsageError(f"--gpu-memory-limit must be a positive number of GiB, got {options.gpu_memory_limit}")
        if options.offload_experts != "auto":
            raise UsageError(f"--gpu-memory-limit is what --offload-experts auto fits the experts into; drop it or "
                             f"--offload-experts {options.offload_experts}")


def expert_budget_gib(options: TrainOptions, config) -> float | None:
    """``load_model``'s ``expert_budget_gib``: ``--gpu-memory-limit`` less the weights that are not routed experts
    (``quant/footprint.py``'s exact count); None without a limit. Refuses a limit below those weights."""
    if options.gpu_memory_limit is None or options.offload_experts != "auto":
        return None
    import torch

    other = other_weight_bytes(config, options.device, getattr(torch, options.base_dtype), options.double_quant)
    budget = options.gpu_memory_limit - other / 2**30
    if budget < 0:
        raise UsageError(f"--gpu-memory-limit {options.gpu_memory_limit:g} GiB is below the {other / 2**30:.2f} GiB of "
                         "weights that are not routed experts (they stay on the device); raise it")
    return budget


def check_against_model(options: TrainOptions, config) -> None:
    """The options that depend on the base model, given its ``config``: the base balance loss and ``--layers``."""
    check_base_balance_loss(options, config)
    if options.layers is not None:
        layers = config.num_hidden_layers
        bad = [i for i in options.layers if not 0 <= i < layers]
        if bad or not options.layers:
            raise UsageError(f"--layers {list(options.layers)}: {config.model_type} has decoder layers "
                             f"0..{layers - 1}; pass indices in that range, or leave --layers out for all")


def check_base_balance_loss(options: TrainOptions, config) -> None:
    """``--base-aux-loss-coef`` > 0 only for families whose base router takes the Switch balance loss: TRL's
    loss reads ``config.num_experts``, which DeepSeek-V3 / GLM-4 configs lack (they balance by a score bias)."""
    coef = options.base_aux_loss_coef
    arch = get_arch(config)
    if coef and not arch.base_balance_loss:
        raise UsageError(f"--base-aux-loss-coef {coef}: {arch.model_type} has no Switch balance loss on its base router "
                         "(it balances with a score-correction bias, and TRL's loss needs config.num_experts, which "
                         f"{arch.model_type} configs lack); leave --base-aux-loss-coef out (0 for this family)")


def check_output_dir(path: str) -> None:
    """``path`` must be a directory or creatable as one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output-dir {path} is a file; pass a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--output-dir {path}: cannot create it under {parent} (not a writable directory)")
