"""Checks that run before any model weight is read: the base model's config, the adapter knobs against it,
the output directory. Each failure is a :class:`~perft_qlora.cli.UsageError` naming the problem and the fix.

Data files are checked by ``records.read_records`` and adapter directories by
``checkpoint.verify_adapter_files``; both also run before loading.
"""

from __future__ import annotations

import json
import os
import re

from .errors import UsageError
from .method.config import PerftConfig
from .quant.arch import ARCHITECTURES, get_arch

_OPTION_NAMES = {"num_experts": "--num-experts", "top_k": "--top-k", "bottleneck": "--bottleneck",
                 "dropout": "--adapter-dropout", "activation": "--activation", "variant": "--variant"}


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a directory here rather than a hub id (exists, or is spelt like a path)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def model_config(name: str, revision: str | None = None):
    """The base model's ``PretrainedConfig``, read from ``config.json`` only, for a supported MoE family."""
    from transformers import AutoConfig

    if is_local_path(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise UsageError(f"--model {name}: no such directory; pass a save_pretrained directory or a hub name")
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise UsageError(f"no config.json in {name}; --model must be a save_pretrained directory of an OLMoE or "
                             "Mixtral checkpoint (or a hub name)")
        try:
            with open(config_path, encoding="utf-8") as handle:
                model_type = json.load(handle).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise UsageError(f"{config_path} is not a JSON object ({error}); the checkpoint is damaged") from error
        if model_type not in ARCHITECTURES:
            raise UsageError(f"{name} is a {model_type!r} model, not a supported mixture-of-experts family "
                             f"({', '.join(sorted(ARCHITECTURES))}); pass an OLMoE or Mixtral checkpoint")
        name = path
    config = AutoConfig.from_pretrained(name, revision=revision)
    get_arch(config)  # a hub model of an unsupported family fails here, before any weight
    return config


def check_perft_config(args, config=None) -> PerftConfig | None:
    """The adapter config the options make (None for ``--variant lora``), checked on its own and, given the
    base model's ``config``, against it (``--layers``)."""
    from .training.train_options import perft_config_from_args

    if config is not None:
        check_base_balance_loss(args, config)
    if config is not None and args.layers is not None:
        layers = config.num_hidden_layers
        bad = [i for i in args.layers if not 0 <= i < layers]
        if bad or not args.layers:
            raise UsageError(f"--layers {args.layers}: {config.model_type} has decoder layers 0..{layers - 1}; "
                             "pass indices in that range, or leave --layers out for all")
    if args.variant == "lora":
        if args.bottleneck < 1:
            raise UsageError(f"--bottleneck (the LoRA rank) must be >= 1, got {args.bottleneck}")
        return None
    try:
        return perft_config_from_args(args)
    except ValueError as error:
        text = str(error)
        for field, option in _OPTION_NAMES.items():
            text = re.sub(rf"\b{field}\b", option, text)
        raise UsageError(f"{text}; fix the option (see --help)") from error


def check_schedule(args) -> None:
    """With held-out rows the best checkpoint is picked at evaluations, so checkpoints must fall on them."""
    for option in ("eval_steps", "save_steps", "logging_steps"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.val_size > 0 and args.save_steps % args.eval_steps:
        raise UsageError(
            f"--save-steps {args.save_steps} is not a multiple of --eval-steps {args.eval_steps}: with held-out rows "
            "(--val-size) the best checkpoint is chosen at evaluations; make it a multiple, or pass --val-size 0"
        )


def check_base_balance_loss(args, config) -> None:
    """``--base-aux-loss-coef`` > 0 only for families whose base router takes the Switch balance loss: TRL's
    loss reads ``config.num_experts``, which DeepSeek-V3 / GLM-4 configs lack (they balance by a score bias)."""
    coef = getattr(args, "base_aux_loss_coef", None)
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
