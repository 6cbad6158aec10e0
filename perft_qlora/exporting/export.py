"""``python -m perft_qlora.export``: a base model and an adapter as one Hugging Face folder that plain transformers
loads (``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)``), without perft_qlora.

PERFT adapters add modules, so they travel as code: ``modeling_perft.py`` (``folder.py``) beside the base's
weights and the adapter's tensors (``weights.py``), written one decoder layer per shard. ``--variant lora``
adapters (peft) are merged into the weights with peft's ``merge_and_unload``: a plain model, no code.

Host memory: one decoder layer's tensors in ``--dtype`` and safetensors' serialised copy of its shard (Mixtral-8x7B:
its experts are 2.8 GB per layer in bf16, so about 6 GB), plus with ``--dequantized`` the NF4 model itself
(about a quarter of the bf16 model). A LoRA export holds the whole merged model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

from ..cli import HelpFormatter, add_debug_option, error_path
from ..errors import UsageError
from ..method.adapters import adapter_kind, attach_saved_adapter, training_record
from ..method.checkpoint import WEIGHTS_NAME, AdapterError, read_adapter_config, verify_adapter_files
from ..quant.arch import get_arch
from ..quant.model_config import model_config
from .folder import ADAPTER_SUBDIR, copy_adapter, copy_modeling_file, model_card, save_tokenizer, write_perft_config
from .weights import CheckpointTensors, DequantizedTensors, ShardWriter, expected_tensors, layer_of

DTYPES = ("bfloat16", "float16", "float32")
FORMAT_VERSION = 1
GENERATION_CONFIG = "generation_config.json"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m perft_qlora.export", formatter_class=HelpFormatter,
        description="Write a base model and a trained adapter as a Hugging Face folder that "
                    "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) loads without perft_qlora.",
    )
    parser.add_argument("--model", required=True, help="the base model the adapter was trained on (directory or hub id)")
    parser.add_argument("--adapter", required=True, help="adapter directory written by python -m perft_qlora.train")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist yet, or be empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the exported weights")
    parser.add_argument("--dequantized", action="store_true",
                        help="write the NF4 values the adapter was trained against, dequantized, instead of the "
                             "base checkpoint's own weights")
    add_debug_option(parser)
    return parser


def check_options(args) -> str:
    """Everything that can be checked before a weight is read; returns the adapter kind (perft or peft)."""
    if not os.path.isdir(args.adapter):
        raise UsageError(f"--adapter {args.adapter}: no such directory; pass the adapter folder train wrote")
    kind = adapter_kind(args.adapter)
    if kind == "perft":
        verify_adapter_files(args.adapter)
    elif args.dequantized:
        raise UsageError("--dequantized applies to PERFT adapters; a LoRA adapter is merged into the base's weights")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out} exists and is not empty; pass a new folder or remove it")
    config = model_config(args.model)
    if kind == "perft":
        metadata = read_adapter_config(args.adapter)
        if metadata.get("model_type") != config.model_type or metadata.get("hidden_size") != config.hidden_size:
            raise UsageError(f"--adapter {args.adapter} was trained on a {metadata.get('model_type')} model of width "
                             f"{metadata.get('hidden_size')}, --model {args.model} is a {config.model_type} of width "
                             f"{config.hidden_size}; pass the base it was trained on")
    return kind


def perft_section(adapter_dir: str, config, state: dict[str, torch.Tensor], weights: str) -> dict:
    """``config.json``'s ``perft``: what ``modeling_perft.py`` needs to rebuild the blocks, and the provenance."""
    metadata = read_adapter_config(adapter_dir)
    knobs, arch = metadata["perft"], get_arch(config)
    layers = metadata["layers"]
    return {
        "format_version": FORMAT_VERSION,
        "variant": knobs["variant"],
        "num_experts": int(state[f"layers.{layers[0]}.perft_experts.down"].shape[0]),
        "top_k": knobs.get("top_k"),
        "bottleneck": knobs["bottleneck"],
        "scaling": knobs["alpha"] / knobs["bottleneck"],
        "activation": knobs.get("activation"),
        "layers": layers,
        "gating": arch.gating,
        "renormalize": arch.renormalizes_top_k(config),
        "moe_block": arch.moe_block,
        "experts": arch.experts,
        "prompt_template": training_record(adapter_dir).get("template"),
        "base_weights": weights,
        "library_version": metadata.get("library_version"),
    }


def _adapter_tensors(state: dict[str, torch.Tensor], moe_block: str, layer: int, dtype) -> dict[str, torch.Tensor]:
    prefix = f"layers.{layer}."
    return {f"model.layers.{layer}.{moe_block}.{key[len(prefix):]}": value.to(dtype)
            for key, value in state.items() if key.startswith(prefix)}


def export_perft(args, staging: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..quant.loader import load_model, resolve_checkpoint

    dtype = getattr(torch, args.dtype)
    directory = resolve_checkpoint(args.model, None)
    config = AutoConfig.from_pretrained(directory)
    arch = get_arch(config)
    state = load_file(os.path.join(args.adapter, WEIGHTS_NAME))
    weights = "dequantized NF4" if args.dequantized else "the base checkpoint's"
    perft = perft_section(args.adapter, config, state, weights)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = expected_tensors(meta)
    num_layers = config.num_hidden_layers
    if args.dequantized:
        model, tokenizer = load_model(directory, quantize="nf4", device="cpu", dtype=dtype, progress=False)
        source = DequantizedTensors(model, expected)
    else:
        from ..quant.loader import load_tokenizer

        tokenizer = load_tokenizer(directory)
        source = CheckpointTensors(directory, arch, expected)
    writer = ShardWriter(staging, num_layers + 1)
    try:
        for layer in [None, *range(num_layers)]:
            tensors = dict(source.tensors(layer))
            wanted = {name for name in expected if layer_of(name) == layer}
            if set(tensors) != wanted:
                raise AdapterError(f"the base's tensors for layer {layer} do not match the model: missing "
                                   f"{sorted(wanted - set(tensors))[:3]}")
            if layer in perft["layers"]:
                tensors.update(_adapter_tensors(state, arch.moe_block, layer, dtype))
            writer.write(tensors)
            del tensors
        writer.finish()
    finally:
        source.close()
    config.dtype = dtype
    config.save_pretrained(staging)
    write_perft_config(staging, perft)
    if os.path.isfile(os.path.join(directory, GENERATION_CONFIG)):
        shutil.copyfile(os.path.join(directory, GENERATION_CONFIG), os.path.join(staging, GENERATION_CONFIG))
    copy_modeling_file(staging)
    copy_adapter(args.adapter, os.path.join(staging, ADAPTER_SUBDIR))
    save_tokenizer(tokenizer, staging, perft["prompt_template"])
    _write_card(staging, model_card(perft, args.model, args.adapter, args.dtype, weights, perft["prompt_template"]))


def export_lora(args, staging: str) -> None:
    """peft LoRA merged into the base (loaded unquantized in ``--dtype``) with ``merge_and_unload``."""
    from ..quant.loader import load_model

    model, tokenizer = load_model(args.model, quantize="none", device="cpu", dtype=getattr(torch, args.dtype),
                                  progress=False)
    merged = attach_saved_adapter(model, args.adapter).merge_and_unload()  # AdapterError when it does not fit
    merged.save_pretrained(staging, max_shard_size="4GB")
    template = training_record(args.adapter).get("template")
    save_tokenizer(tokenizer, staging, template)
    _write_card(staging, model_card(None, args.model, args.adapter, args.dtype, "the base checkpoint's, LoRA merged",
                                    template))


def _write_card(directory: str, text: str) -> None:
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text)


def export(args) -> str:
    """Write the folder into a temporary sibling of ``--out``, then rename it into place; returns ``--out``."""
    kind = check_options(args)
    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 (and safetensors' 0600) are not for a shared folder
    try:
        (export_perft if kind == "perft" else export_lora)(args, staging)
        for folder, _, files in os.walk(staging):
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        if os.path.isdir(out):
            os.rmdir(out)  # checked empty above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    with error_path(args.debug, on_interrupt=lambda: "nothing was written (the partial folder was removed)"):
        out = export(args)
        print(f"exported to {out}\nload: AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)",
              file=sys.stderr)
        return out
