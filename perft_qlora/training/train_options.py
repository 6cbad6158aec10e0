"""Command-line and config-file options of ``python -m perft_qlora.train``, resolved once into
:class:`TrainOptions`, and the configs they turn into (``PerftConfig``, TRL's ``SFTConfig``).

Precedence: command line > ``--config`` file (YAML or JSON, keys named like the options, with ``-`` or
``_``) > ``--demo`` presets > defaults. Defaults follow the authors' released recipe (see
../shared/docs/perft-method.md); ``None`` for learning rate and balance-loss coefficients means "the
recipe's value for this architecture" (OLMoE 1e-5 / 0.01, Mixtral 2e-5 / 0.02), resolved once the model
is known (:func:`make_sft_config`).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

from ..cli import HelpFormatter, add_debug_option
from ..errors import UsageError
from ..formats.demo_data import demo_data_path
from ..formats.detect import FORMATS
from ..method.config import DEFAULT_NUM_EXPERTS, DEFAULT_TOP_K, PerftConfig, default_shape
from .distributed import per_rank_batch_size, rank_device
from .option_values import check_numbers, int_list, read_config_file, str_list

VARIANT_CHOICES = ("perft", "perft_e", "perft_d", "perft_s", "lora")
LOSS_CHOICES = ("auto", "all", "completion", "assistant")

# What `--demo` changes: the shipped small base (perft_qlora/training/demo_base.py) and its demo task; a small adapter
# learns the new mapping in a few dozen steps with a large learning rate, and with the loss on the responses
# (the base was pre-trained that way: it never learned to predict the prompts' random letters). A second --demo
# starts over only in a directory the demo wrote (train.py's DEMO_MARKER).
DEMO_PRESETS = dict(
    data=demo_data_path("train"), output_dir="perft-demo", variant="perft", bottleneck=8,
    adapter_dropout=0.0, val_size=16, epochs=3.0, batch_size=16, learning_rate=1e-2, warmup_steps=5,
    logging_steps=5, eval_steps=15, save_steps=15, max_length=128, completion_only_loss=True,
)


def demo_base_path(output_dir: str) -> str:
    """Where ``--demo`` copies the shipped base model: beside the adapter, where evaluate and the app look for it."""
    return os.path.join(output_dir, "base")


@dataclass(frozen=True)
class TrainOptions:
    """Train's options, resolved: what :func:`parse_args` returns and everything in ``training/`` reads.

    Nothing assigns to it; a changed copy is ``dataclasses.replace(options, ...)``. Each field is the option of
    the same name (``--num-experts`` is ``num_experts``), documented once, with its default, in
    :func:`make_parser` (``--help``); ``--demo``'s own defaults are ``DEMO_PRESETS``. The fields with a
    docstring below hold a value resolved from the options, not the option as typed. Comma-separated
    options are tuples.
    """

    config: str | None
    demo: bool
    # model
    model: str
    """``--model``; with ``--demo`` and no ``--model``, :func:`demo_base_path` of ``output_dir`` (see ``demo_base``)."""
    revision: str | None
    quantize: str
    double_quant: bool
    device: str
    """This rank's device: ``--device``, else cuda when available, else cpu; under ``accelerate launch`` plain
    ``cuda`` is ``cuda:LOCAL_RANK`` (``distributed.rank_device``)."""
    base_dtype: str
    offload_experts: str
    gpu_memory_limit: float | None
    # adapter
    variant: str
    num_experts: int | None
    """M: ``--num-experts``, else ``method.config.DEFAULT_NUM_EXPERTS`` for perft / perft_d (``default_shape``)."""
    top_k: int | None
    """K': ``--top-k``, else ``method.config.DEFAULT_TOP_K`` for perft (``default_shape``)."""
    bottleneck: int
    alpha: float | None
    activation: str | None
    adapter_dropout: float
    aux_loss_coef: float | None
    base_aux_loss_coef: float | None
    layers: tuple[int, ...] | None
    lora_targets: tuple[str, ...]
    adapter_dtype: str
    # data
    data: str
    data_format: str
    data_fields: str | None
    data_split: str
    data_config: str | None
    val_size: int
    max_length: int
    template: str
    chat_template: str | None
    completion_only_loss: bool
    loss_on: str
    show_example: int | None
    packing: bool
    # training
    output_dir: str
    epochs: float
    max_steps: int
    learning_rate: float | None
    batch_size: int
    """Examples per rank and step: ``--batch-size``, or with ``--global-batch-size`` G, G / (ranks x
    ``--grad-accum``) (``distributed.per_rank_batch_size``)."""
    global_batch_size: int | None
    grad_accum: int
    warmup_steps: int
    lr_scheduler: str
    weight_decay: float
    max_grad_norm: float
    seed: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    gradient_checkpointing: bool
    offload_activations: bool
    report_to: tuple[str, ...]
    backend: str
    cpu_threads: int | None
    resume: str | None
    overwrite: bool
    debug: bool
    demo_base: bool
    """Whether ``model`` is the shipped demo base, which this run copies to ``<output_dir>/base`` (``--demo``
    without ``--model``); an earlier run's copy there is replaced like its checkpoints."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perft_qlora.train",
        description="Fine-tune routed PEFT experts (PERFT) on an NF4 mixture-of-experts model with TRL's SFTTrainer.",
        formatter_class=HelpFormatter,
        epilog="Defaults follow the PERFT authors' released recipe (OLMoE / Mixtral values where they differ).",
    )
    p.add_argument("--config", help="YAML or JSON file of options (keys as below); the command line overrides it")
    p.add_argument("--demo", action="store_true",
                   help="the shipped small pre-trained OLMoE + a task it never saw, on the CPU (sets the demo's own defaults)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub name or local path of an OLMoE / Mixtral checkpoint (required unless --demo)")
    g.add_argument("--revision", help="hub revision (default: the main branch)")
    g.add_argument("--quantize", default="nf4", choices=("nf4", "none"), help="nf4: every big weight in 4-bit, experts included")
    g.add_argument("--double-quant", default=True, action=argparse.BooleanOptionalAction, help="quantize the NF4 scales too")
    g.add_argument("--device", default=None, help="where the model lives: cuda, cuda:1, cpu ... (default: cuda when available, else cpu)")
    g.add_argument("--base-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="unquantized base weights and the NF4 compute dtype (float32: exact CPU parity checks)")
    g.add_argument("--offload-experts", default="auto", choices=("auto", "none", "all"),
                   help="routed experts in host memory, streamed to the device a layer ahead: auto = as many MoE layers "
                        "resident as --gpu-memory-limit allows (all resident without a limit), all = every MoE layer "
                        "streamed, none = all resident")
    g.add_argument("--gpu-memory-limit", type=float, default=None, metavar="GIB",
                   help="GiB the model's weights may take on the device (resident experts and the two staging buffers "
                        "included); `python -m perft_qlora.plan --gpu-memory <card GiB>` prints the value for a card"),
    g = p.add_argument_group("adapter")
    g.add_argument("--variant", default="perft", choices=VARIANT_CHOICES, help="lora = peft LoRA on attention (baseline)")
    g.add_argument("--num-experts", type=int, default=None, help=f"M PEFT experts (default: {DEFAULT_NUM_EXPERTS} for perft / perft_d)")
    g.add_argument("--top-k", type=int, default=None, help=f"K' experts per token (perft; default: {DEFAULT_TOP_K})")
    g.add_argument("--bottleneck", type=int, default=16, help="DB, the bottleneck width (LoRA rank for --variant lora)")
    g.add_argument("--alpha", type=float, default=None, help="scaling alpha / DB (default: 2 * DB)")
    g.add_argument("--activation", default=None, choices=("silu", "gelu", "relu"), help="between down and up (default: none, i.e. LoRA-style linear)")
    g.add_argument("--adapter-dropout", type=float, default=0.05, help="dropout on the adapter input")
    g.add_argument("--aux-loss-coef", type=float, default=None, help="PERFT router balance-loss weight (default: the recipe's, 0.01 OLMoE / 0.02 Mixtral)")
    g.add_argument("--base-aux-loss-coef", type=float, default=None, help="base router balance-loss weight (default: the recipe's, 0.01 OLMoE / 0.02 Mixtral)")
    g.add_argument("--layers", type=int_list, default=None, help="comma-separated decoder layers to adapt (default: all)")
    g.add_argument("--lora-targets", type=str_list, default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="modules --variant lora adapts (default: q_proj,k_proj,v_proj,o_proj)")
    g.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="adapter weights; float32 master weights (compute follows the model) keep small updates")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training rows: .json/.jsonl/.parquet/.csv files or datasets hub names, several "
                                  "separated by commas (required unless --demo)")
    g.add_argument("--data-format", default="auto", choices=FORMATS,
                   help="the rows' format: llm-adapters (instruction/input/output), messages (role/content turns), "
                        "prompt-completion (strings or message lists), text, sharegpt (conversations of from/value); "
                        "auto = the format most rows are in")
    g.add_argument("--data-fields", default=None, metavar="FIELD=COLUMN,...",
                   help="read our fields from your columns, e.g. prompt=question,completion=answer")
    g.add_argument("--data-split", default="train", help="split of a hub data set")
    g.add_argument("--data-config", default=None, help="config (subset) of a hub data set")
    g.add_argument("--val-size", type=int, default=120, help="rows held out (seed 42) for eval + best checkpoint; 0 = none")
    g.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated; EOS appended)")
    g.add_argument("--template", default="released", choices=("released", "alpaca"),
                   help="prompt template: released = the authors' exact bytes, alpaca = the clean text (recorded in the adapter)")
    g.add_argument("--chat-template", default=None, metavar="chatml|alpaca|FILE",
                   help="set this chat template (a name or a Jinja file) on the tokenizer, for bases that have none; "
                        "LLM-Adapters rows are then rendered as a conversation through it; recorded in the adapter. Its "
                        "end-of-turn is a token the tokenizer already has (chatml: <|im_end|>, else the EOS token)")
    g.add_argument("--completion-only-loss", default=False, action=argparse.BooleanOptionalAction,
                   help="LLM-Adapters rows: loss on the response only (recipe: whole sequence; --demo: on)")
    g.add_argument("--loss-on", default="auto", choices=LOSS_CHOICES,
                   help="tokens the loss is on: auto = assistant turns of conversations, the completion of "
                        "prompt/completion rows, everything of text rows (LLM-Adapters rows: --completion-only-loss)")
    g.add_argument("--show-example", type=int, default=None, metavar="N",
                   help="print training example N (1 = the first usable row) with the trained tokens in [[...]], "
                        "then exit without training")
    g.add_argument("--packing", default=False, action=argparse.BooleanOptionalAction,
                   help="pack whole examples into rows of --max-length tokens, padding-free (TRL's bfd); refused for a "
                        "model whose attention would cross the examples' boundaries (checked on the loaded model)")
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default="perft-out", help="checkpoints, logs and the final adapter (<dir>/adapter)")
    g.add_argument("--epochs", type=float, default=3.0, help="training epochs")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps, overriding --epochs (default: -1, run --epochs)")
    g.add_argument("--learning-rate", type=float, default=None, help="AdamW learning rate (default: the recipe's, 1e-5 OLMoE / 2e-5 Mixtral)")
    g.add_argument("--batch-size", type=int, default=16, help="examples per device per step")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="examples per optimizer step over all ranks; sets --batch-size to it / (ranks x --grad-accum)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (linear decays to 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--seed", type=int, default=42, help="seed for init, dropout and data order")
    g.add_argument("--logging-steps", type=int, default=10, help="steps between log lines")
    g.add_argument("--eval-steps", type=int, default=80, help="steps between evaluations on the held-out rows")
    g.add_argument("--save-steps", type=int, default=80, help="steps between checkpoints (adapter + optimizer state)")
    g.add_argument("--save-total-limit", type=int, default=3, help="checkpoints kept (the best one is always kept)")
    g.add_argument("--gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction, help="recompute layers in backward")
    g.add_argument("--offload-activations", action="store_true", help="keep checkpointed activations in pinned CPU memory")
    g.add_argument("--report-to", type=str_list, default=["none"], help="Trainer integrations, e.g. tensorboard,wandb (default: none)")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="threads on a CPU (default: one per 256 hidden units, 1 for the demo's model)")
    g.add_argument("--backend", default="default", choices=("default", "unsloth"), help="unsloth: CUDA + Unsloth installed")
    g.add_argument("--resume", nargs="?", const="last", default=None, help="continue from the last checkpoint in --output-dir, or from the checkpoint directory given (default: start a new run)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over: delete an earlier run's checkpoint-* and adapter/ in --output-dir first (--demo "
                        "does this by itself only in a directory a previous --demo wrote)")
    add_debug_option(p)
    return p


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    """The options, in rising precedence: defaults, ``--demo`` presets, ``--config`` file, command line;
    then :func:`resolve`d."""
    parser = make_parser()
    first, _ = parser.parse_known_args(argv)
    if first.demo:
        parser.set_defaults(**DEMO_PRESETS)
    if first.config:
        file_values = read_config_file(first.config, parser)
        if file_values.get("demo") and not first.demo:
            parser.set_defaults(**DEMO_PRESETS)
        parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    if not args.demo and (args.model is None or args.data is None):
        parser.error("--model and --data are required (or pass --demo for the built-in tiny run)")
    check_numbers(args)
    return resolve(args)


def resolve(args: argparse.Namespace) -> TrainOptions:
    """The parsed options with every derived value filled in (the :class:`TrainOptions` fields with a docstring):
    this rank's device, the per-rank batch size, the demo base's path, M and K'."""
    num_experts, top_k = default_shape(args.variant, args.num_experts, args.top_k)
    demo_base = args.demo and args.model is None
    batch_size = args.batch_size
    if args.global_batch_size is not None:
        batch_size = per_rank_batch_size(args.global_batch_size, args.grad_accum)
    return TrainOptions(**{
        **vars(args), "model": demo_base_path(args.output_dir) if demo_base else args.model,
        "device": rank_device(args.device), "num_experts": num_experts, "top_k": top_k, "batch_size": batch_size,
        "layers": None if args.layers is None else tuple(args.layers), "lora_targets": tuple(args.lora_targets),
        "report_to": tuple(args.report_to), "demo_base": demo_base,
    })


_OPTION_NAMES = {"num_experts": "--num-experts", "top_k": "--top-k", "bottleneck": "--bottleneck",
                 "dropout": "--adapter-dropout", "activation": "--activation", "variant": "--variant"}


def make_perft_config(options: TrainOptions) -> PerftConfig | None:
    """The adapter's config (None for ``--variant lora``), validated by ``PerftConfig`` itself; a bad knob is a
    ``UsageError`` naming the option. Built once per run, before ``--demo`` writes anything."""
    if options.variant == "lora":
        if options.bottleneck < 1:
            raise UsageError(f"--bottleneck (the LoRA rank) must be >= 1, got {options.bottleneck}")
        return None
    try:
        return PerftConfig(
            variant=options.variant,
            num_experts=None if options.variant in ("perft_e", "perft_s") else options.num_experts,
            top_k=options.top_k if options.variant == "perft" else None, bottleneck=options.bottleneck,
            alpha=options.alpha, activation=options.activation, dropout=options.adapter_dropout,
            router_aux_loss_coef=options.aux_loss_coef, layers=options.layers,
        )
    except ValueError as error:
        text = str(error)
        for field, option in _OPTION_NAMES.items():
            text = re.sub(rf"\b{field}\b", option, text)
        raise UsageError(f"{text}; fix the option (see --help)") from error


def make_sft_config(options: TrainOptions, arch, has_validation: bool, loss: str | None = None):
    """TRL ``SFTConfig`` for these options; ``arch`` (a ``MoEArch``) supplies the recipe's values; ``loss`` (``all``,
    ``completion``, ``assistant``: ``loss_mask.resolve_loss``) replaces ``--completion-only-loss``."""
    from trl import SFTConfig

    on_cpu = not options.device.startswith("cuda")
    learning_rate = options.learning_rate if options.learning_rate is not None else arch.recipe_learning_rate
    base_coef = options.base_aux_loss_coef if options.base_aux_loss_coef is not None else arch.base_aux_loss_coef
    completion_only = options.completion_only_loss if loss is None else loss == "completion"
    return SFTConfig(
        output_dir=options.output_dir, num_train_epochs=options.epochs, max_steps=options.max_steps,
        learning_rate=learning_rate, per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size, gradient_accumulation_steps=options.grad_accum,
        warmup_steps=options.warmup_steps, lr_scheduler_type=options.lr_scheduler, weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm, optim="adamw_torch", seed=options.seed,
        logging_steps=options.logging_steps, logging_first_step=True, report_to=list(options.report_to),
        eval_strategy="steps" if has_validation else "no", eval_steps=options.eval_steps,
        save_strategy="steps", save_steps=options.save_steps, save_total_limit=options.save_total_limit,
        load_best_model_at_end=has_validation, metric_for_best_model="eval_loss", greater_is_better=False,
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False, "offload": options.offload_activations},
        max_length=options.max_length, completion_only_loss=completion_only, assistant_only_loss=loss == "assistant",
        packing=options.packing,
        router_aux_loss_coef=base_coef,
        use_cpu=on_cpu, bf16=not on_cpu, dataloader_pin_memory=not on_cpu,
        # Top-K routing leaves some PEFT experts without tokens in a micro-batch; DDP must tolerate that.
        ddp_find_unused_parameters=options.variant in ("perft", "perft_e"),
        # The NF4 weights are buffers (NF4Weight): DDP would otherwise re-send them all from rank 0 before every forward.
        ddp_broadcast_buffers=False,
    )
