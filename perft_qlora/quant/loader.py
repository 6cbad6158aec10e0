"""``load_model``: a supported MoE checkpoint (``arch.py``) with every big weight in NF4, the experts included.

How it loads: the model is built on the ``meta`` device (no memory), its decoder layers' ``nn.Linear``
modules (attention, shared experts, dense MLP layers) become bitsandbytes ``Linear4bit`` (NF4), except a
family's ``keep_dense`` ones, and its fused routed experts become
:class:`~perft_qlora.quant.nf4_experts.NF4Experts`. Then the checkpoint is streamed one decoder layer at a
time: every tensor is read by file offset into a fresh buffer (no memory map: nothing the model keeps pins
a shard, and no page of a shard stays resident), experts in chunks of whole experts that a background
thread reads one ahead (:mod:`~perft_qlora.quant.expert_stream`) while the current chunk is quantized on the
device (:class:`~perft_qlora.quant.nf4_quantize.NF4Stack`) and dropped. Host memory while loading is the final
host-resident footprint plus a few chunks (tens of MiB each) and one layer's small tensors in bf16.
With ``offload_experts`` (``expert_placement.py``) some MoE layers' experts, once quantized on the device, move to
host memory (pinned on CUDA) and stream back through two staging buffers when they compute
(``expert_offload.ExpertStager``, ``model.expert_stager``).
Embeddings, norms, routers and ``lm_head`` stay in the compute dtype (the router must be exact for
PERFT-E), or in float32 where the model class keeps it (DeepSeek's router). ``model.load_report`` (:class:`~perft_qlora.quant.load_report.LoadReport`) says what the load cost.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .arch import MoEArch, decoder_layers, get_arch
from .checkpoint_reader import CheckpointReader
from .expert_offload import ExpertStager
from .expert_placement import ExpertPlacement, expert_layer_bytes, move_home, place_experts
from .expert_stream import WHICH, ExpertStream, expert_chunks
from .host_memory import release_free_heap
from .load_report import LoadMeter, LoadProgress
from .nf4_experts import NF4Experts
from .nf4_quantize import NF4Stack
from .quant_guard import disable_cpu_weight_repacking
from .sharding import ExpertShard
from .weights_check import check_weights_match_config

logger = logging.getLogger(__name__)

BLOCKSIZE = 64
CHUNK_BYTES = 64 * 2**20  # checkpoint bytes of experts read (and quantized) at a time, at least one expert
EXPORTED_ADAPTER_KEYS = (".perft_router.weight", ".perft_experts.down", ".perft_experts.up")
"""Tensors of a folder written by ``python -m perft_qlora.export``: its PERFT adapter, which ``load_model`` leaves
out (the base model only) and ``load_adapter(model, f"{folder}/adapter")`` attaches."""


def load_model(
    name_or_path: str,
    quantize: Literal["nf4", "none"] = "nf4",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    revision: str | None = None,
    progress: bool = True,
    experts_shard: ExpertShard | None = None,
    offload_experts: Literal["none", "all", "auto"] | tuple[int, ...] = "none",
    expert_budget_gib: float | None = None,
):
    """Load a supported MoE causal LM and its tokenizer, frozen, in eval mode.

    Args:
        name_or_path: a local directory written by ``save_pretrained`` or a Hub model id.
        quantize: ``"nf4"`` (experts and linears in NF4) or ``"none"`` (plain ``dtype`` weights).
        device: where the weights live; default ``cuda`` when available, else ``cpu``.
        dtype: compute dtype of unquantized weights and of the matmuls.
        double_quant: also quantize the NF4 block scales (bitsandbytes' ``compress_statistics``).
        experts_shard: under FSDP, read and quantize only this rank's routed experts (``sharding.ExpertShard``);
            the model is whole-shaped but holds only those experts' bytes, until ``fully_shard`` keeps them.
        offload_experts: ``none`` (every layer's experts on ``device``), ``all`` (every MoE layer's experts in
            host memory, streamed a layer ahead through two staging buffers) or ``auto`` (as many layers
            resident as ``expert_budget_gib`` allows; all resident without a budget). ``model.expert_placement``
            says which; ``model.expert_stager`` streams the others (None when nothing is offloaded). A tuple of
            decoder-layer indices offloads exactly those MoE layers (benchmarks).
        expert_budget_gib: GiB the routed experts may take on ``device`` (resident layers + staging buffers).
    Returns:
        ``(model, tokenizer)``.
    """
    if quantize not in ("nf4", "none"):
        raise ValueError(f"quantize must be 'nf4' or 'none', got {quantize!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    directory = resolve_checkpoint(name_or_path, revision)
    config = AutoConfig.from_pretrained(directory)
    arch = get_arch(config)  # fail on unsupported families before touching weights
    _refuse_prequantized(config, name_or_path)
    check_weights_match_config(directory, config, name_or_path)  # sizes against the headers, before any weight
    placement = _placement(config, arch, device, dtype, double_quant, quantize, offload_experts, expert_budget_gib,
                           experts_shard)
    tokenizer = load_tokenizer(directory)
    with LoadMeter(device) as meter:
        if quantize == "none":
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map={"": device})
        else:
            model = _load_nf4(directory, config, arch, device, dtype, double_quant, progress, meter, experts_shard,
                              placement.offloaded)
    _attach_stager(model, arch, placement, device)
    model.load_report = meter.report
    logger.info("%s", meter.report)
    model.name_or_path = name_or_path
    model.config._name_or_path = name_or_path
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def _placement(config, arch: MoEArch, device, dtype, double_quant, quantize, mode, budget_gib, shard) -> ExpertPlacement:
    if budget_gib is not None and budget_gib < 0:
        raise ValueError(f"expert_budget_gib must be >= 0, got {budget_gib}")
    explicit = isinstance(mode, (tuple, list))
    if not explicit and mode not in ("none", "all", "auto"):
        raise ValueError(f"offload_experts must be 'none', 'all' or 'auto', got {mode!r}")
    if mode != "none" and quantize != "nf4":
        raise ValueError("offload_experts streams NF4 experts; it needs quantize='nf4'")
    if mode == "none" or (mode == "auto" and budget_gib is None) or (explicit and not mode):
        return ExpertPlacement((), ())  # everything resident (auto without a budget), which FSDP's shard allows too
    if shard is not None:
        raise ValueError("offload_experts is not supported under FSDP (experts_shard); use one or the other")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layer_bytes = expert_layer_bytes(meta, double_quant)
    if explicit:
        bad = [i for i in mode if not (0 <= i < len(layer_bytes) and layer_bytes[i])]
        if bad:
            raise ValueError(f"offload_experts layers {bad} are not MoE layers of this model")
        return ExpertPlacement(tuple(layer_bytes), tuple(sorted(set(mode))))
    budget = None if budget_gib is None else int(budget_gib * 2**30)
    return place_experts(layer_bytes, mode, budget)


def _attach_stager(model, arch: MoEArch, placement: ExpertPlacement, device) -> None:
    model.expert_placement = placement
    model.expert_stager = None
    if not placement.offloaded:
        return
    layers = decoder_layers(model)
    experts = [getattr(getattr(layers[i], arch.moe_block), arch.experts) for i in placement.offloaded]
    model.expert_stager = ExpertStager(experts, device)
    # Accelerate leaves a model with a device map of several entries where it is (no .to(device) moving the
    # offloaded experts back); the Trainer's own move is skipped by PerftSFTTrainer for the same reason.
    names = {id(module): name for name, module in model.named_modules()}
    model.hf_device_map = {"": str(device), **{names[id(e)]: "cpu" for e in experts}}
    logger.info("experts of %d of %d MoE layers in host memory (%.2f GiB), streamed through %s",
                len(placement.offloaded), len(placement.moe_layers), placement.host_bytes / 2**30, model.expert_stager)


def resolve_checkpoint(name_or_path: str, revision: str | None) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as err:  # network, auth, or a typo: say which
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory and could not be fetched from the Hugging Face Hub ({err}). "
            "Pass a directory written by save_pretrained, or check the model id and your network."
        ) from err


def _refuse_prequantized(config, name_or_path: str) -> None:
    """Hub checkpoints stored in FP8 / MXFP4 / ... (DeepSeek-V3 itself, gpt-oss) are not bf16 weights to quantize."""
    method = (getattr(config, "quantization_config", None) or {})
    method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", None)
    if method is not None:
        raise ValueError(
            f"{name_or_path} holds {method}-quantized weights; perft_qlora quantizes bf16/fp32 safetensors to NF4. "
            "Use a bf16 release of the model (e.g. moonshotai/Moonlight-16B-A3B for the DeepSeek-V3 layout)."
        )


def load_tokenizer(directory: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as err:
        raise FileNotFoundError(
            f"no usable tokenizer in {directory} ({err}); save one there with tokenizer.save_pretrained"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_nf4(directory, config, arch: MoEArch, device, dtype, double_quant, progress, meter: LoadMeter,
              shard: ExpertShard | None = None, offloaded: tuple[int, ...] = ()):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    with CheckpointReader(directory) as reader:
        bar = LoadProgress(reader.total_bytes, len(layers), enabled=progress)
        reader.on_read = bar.read
        experts = shard.experts if shard is not None else None
        stream = ExpertStream(expert_chunks(reader, arch, _expert_shapes(layers, arch), CHUNK_BYTES, experts))
        pinned = True
        try:
            _load_tensors(model, "", reader, device, dtype, arch, skip_prefix="model.layers.", optional=tied)
            for i, layer in enumerate(layers):
                _load_layer(layer, i, reader, stream, arch, device, dtype, double_quant, config.hidden_act, shard)
                if i in offloaded:
                    pinned = _offload_layer(layer, arch, device, pinned)
                reader.close_finished()  # no file of a finished layer stays open
                release_free_heap()  # freed chunks and float32 scales back to the OS, not kept as heap holes
                bar.layer_done(i)
                meter.sample()
        finally:
            stream.close()
            bar.close(complete=sys.exc_info()[0] is None)
        unused = [k for k in reader.keys() if k not in reader.used and not k.endswith(EXPORTED_ADAPTER_KEYS)]
        if unused:
            logger.warning("checkpoint tensors not used by the model: %s", unused[:8])
        meter.report.bytes_read = reader.bytes_read
    _tie_output_embeddings(model)
    _rebuild_meta_buffers(model, device)
    disable_cpu_weight_repacking(model)
    return model


def _expert_shapes(layers, arch: MoEArch) -> list[dict[str, tuple[int, int, int]]]:
    shapes = []
    for layer in layers:
        moe = getattr(layer, arch.moe_block)
        if not arch.is_moe_block(moe):  # a dense MLP layer (Qwen's mlp_only_layers, DeepSeek's first layers)
            shapes.append({})
            continue
        experts = getattr(moe, arch.experts)
        shapes.append({which: tuple(getattr(experts, which).shape) for which in WHICH})
    return shapes


def _load_layer(layer, index: int, reader, stream, arch: MoEArch, device, dtype, double_quant, hidden_act,
                shard: ExpertShard | None = None) -> None:
    prefix = f"model.layers.{index}."
    moe = getattr(layer, arch.moe_block)
    if arch.is_moe_block(moe):  # some families keep dense MLP layers (Qwen's mlp_only_layers)
        experts = getattr(moe, arch.experts)
        setattr(moe, arch.experts, _load_experts(stream, index, experts, device, dtype, double_quant, hidden_act, shard))
    _replace_linears(layer, device, dtype, double_quant, keep=arch.keep_dense)
    _load_tensors(layer, prefix, reader, device, dtype, arch)


def _offload_layer(layer, arch: MoEArch, device, pinned: bool) -> bool:
    """Move the layer's experts (quantized on ``device``) to host memory, pinned on CUDA; warns once, the first
    time pinning fails, and returns whether the memory is still pinned."""
    experts = getattr(getattr(layer, arch.moe_block), arch.experts)
    pin = device.type == "cuda" and pinned
    ok = all([move_home(experts.gate_up_proj, pin), move_home(experts.down_proj, pin)])
    if pin and not ok:
        logger.warning("could not pin host memory for the offloaded experts; they stay pageable, so each copy to "
                       "the GPU is synchronous (no overlap with compute) and slower")
    return pinned and ok


def _checkpoint_keys(name: str, arch: MoEArch) -> list[str]:
    """Names a model tensor may have in a checkpoint (Mixtral's hub files say ``block_sparse_moe``)."""
    keys = [name]
    for other in arch.checkpoint_block_names:
        keys.append(name.replace(f".{arch.moe_block}.", f".{other}.", 1))
    return keys


def _read(reader: CheckpointReader, name: str, arch: MoEArch) -> torch.Tensor:
    for key in _checkpoint_keys(name, arch):
        if key in reader:
            return reader.get(key)
    raise KeyError(name)


def _meta_tensors(root: nn.Module, prefix: str):
    """(module, full name, attribute) of every still-meta parameter and persistent buffer under ``root``."""
    for module_name, module in root.named_modules(prefix=prefix.rstrip(".")):
        persistent = [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for attr, tensor in list(module._parameters.items()) + persistent:
            if tensor is not None and tensor.is_meta:
                yield module, f"{module_name}.{attr}" if module_name else attr, attr


def _load_tensors(root, prefix, reader, device, dtype, arch, skip_prefix=None, optional=frozenset()) -> None:
    """Fill the meta tensors under ``root`` (named from ``prefix``), except names starting with ``skip_prefix``.

    Walks only ``root``'s own subtree, so loading layer by layer touches each module once.
    """
    missing = []
    for module, name, attr in list(_meta_tensors(root, prefix)):
        if skip_prefix and name.startswith(skip_prefix):
            continue
        try:
            value = _read(reader, name, arch)
        except KeyError:
            if name not in optional:
                missing.append(name)
            continue
        value = value.to(device=device, dtype=stored_dtype(module, getattr(module, attr), value, dtype))
        if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
            module.weight = _quantized_linear_weight(value, module, device, dtype)
        elif attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    if missing:
        raise KeyError(f"checkpoint is missing {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")


def stored_dtype(module: nn.Module, meta: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint tensor is loaded in: integers as stored; NF4 linears' weights (quantized from it)
    and biases in ``dtype``; other floating tensors in the dtype the model was built with, which is ``dtype``
    except where the model class keeps float32 on purpose (DeepSeek-V3's router and its score bias)."""
    if not value.is_floating_point():
        return value.dtype
    if isinstance(module, bnb.nn.Linear4bit) or not meta.is_floating_point():
        return dtype
    return meta.dtype


def _quantized_linear_weight(value: torch.Tensor, module, device, dtype) -> bnb.nn.Params4bit:
    """``Params4bit`` holding ``quantize_4bit(value)``'s bytes, quantized by the loader's fast path on the CPU."""
    if value.numel() % BLOCKSIZE:  # a partial last block: bitsandbytes' own path (Params4bit quantizes on .to)
        return bnb.nn.Params4bit(value, requires_grad=False, blocksize=BLOCKSIZE, quant_type="nf4", module=module,
                                 compress_statistics=module.weight.compress_statistics).to(device)
    stack = NF4Stack((1, *value.shape), dtype, device, BLOCKSIZE)
    stack.add(value.unsqueeze(0))
    state = stack.finish(module.weight.compress_statistics).quant_state()
    state.shape = value.shape
    weight = bnb.nn.Params4bit(
        stack.packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
        compress_statistics=module.weight.compress_statistics, quant_type="nf4", module=module, bnb_quantized=True,
    )
    module.quant_state = state
    return weight


def _load_experts(stream, index: int, experts, device, dtype, double_quant, hidden_act: str,
                  shard: ExpertShard | None = None) -> NF4Experts:
    """Quantize layer ``index``'s experts (this rank's, under FSDP) from ``stream``'s chunks into NF4 on ``device``."""
    stacks = {}
    for which in WHICH:
        shape = tuple(getattr(experts, which).shape)
        stacks[which] = NF4Stack(shape, dtype, device, BLOCKSIZE, shard.experts(shape[0]) if shard else None)
    while any(stack.filled < stack.stop for stack in stacks.values()):
        chunk = next(stream)
        if chunk.layer != index or chunk.start != stacks[chunk.which].filled:
            raise RuntimeError(f"expert chunk of layer {chunk.layer} {chunk.which}[{chunk.start}] out of order")
        stacks[chunk.which].add(chunk.tensor)
        del chunk
    gather = shard.gather if shard is not None else None
    gate_up, down = (stacks[which].finish(double_quant, gather) for which in WHICH)
    return NF4Experts(gate_up, down, hidden_act=hidden_act)


def quantizes_linear(name: str, module: nn.Module, device: torch.device, keep: tuple[str, ...] = ()) -> bool:
    """Whether the loader turns this decoder-layer module into an NF4 ``Linear4bit`` (``plan`` uses the same rule)."""
    if type(module) is not nn.Linear or name.rpartition(".")[2] in keep:
        return False
    # bitsandbytes' CPU kernels mis-index rows that are not whole blocks: such a linear stays unquantized on CPU.
    return not (device.type == "cpu" and module.in_features % BLOCKSIZE)


def _replace_linears(layer: nn.Module, device, dtype, double_quant, keep: tuple[str, ...] = ()) -> None:
    """Swap the layer's ``nn.Linear`` modules for meta ``Linear4bit`` ones, filled by ``_load_tensors``."""
    for name, module in list(layer.named_modules()):
        if not quantizes_linear(name, module, device, keep):
            if type(module) is nn.Linear and module.in_features % BLOCKSIZE and device.type == "cpu":
                logger.warning("keeping %s in %s: in_features=%d is not a multiple of %d on CPU", name, dtype, module.in_features, BLOCKSIZE)
            continue
        parent_name, _, attr = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=dtype,
            compress_statistics=double_quant, quant_type="nf4", device="meta",
        )
        setattr(layer.get_submodule(parent_name), attr, quantized)


def _tie_output_embeddings(model) -> None:
    # Tied even when the checkpoint also holds an lm_head tensor (as transformers does): one copy in memory.
    output = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and output is not None:
        output.weight = model.get_input_embeddings().weight


def _rebuild_meta_buffers(model, device) -> None:
    """Re-create modules whose non-persistent buffers (rotary ``inv_freq``) are still on ``meta``."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if any(p.is_meta for p in module.parameters(recurse=False)):
            raise RuntimeError(f"{name} still has meta parameters after loading")
        with torch.device(device):
            fresh = type(module)(config=model.config)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, fresh)
