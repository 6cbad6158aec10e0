"""Adapters on disk: ``perft_config.json`` + ``adapter_model.safetensors`` (adapter weights only, no pickle).

The config is not named ``adapter_config.json``: that is peft's file, and transformers and peft open any folder
holding one as a peft adapter (transformers first loads the base model its ``base_model_name_or_path`` names),
then fail on its missing ``peft_type``. Adapters saved before the rename (``adapter_config.json`` with our
``format_version``) are still read.

Saves are atomic: files are written into a temporary sibling directory, which then replaces the target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .._version import __version__
from ..errors import PerftQloraError
from ..quant.arch import get_arch
from .config import PerftConfig
from .model import attach_perft, detach_perft, iter_perft_blocks
from .variants import VARIANTS, BlockFacts

CONFIG_NAME = "perft_config.json"
LEGACY_CONFIG_NAME = "adapter_config.json"  # PERFT adapters saved before the rename; also peft's own config
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"  # the model card the trainer writes beside the adapter
FORMAT_VERSION = 1


class AdapterError(PerftQloraError):
    """An adapter directory that cannot be used with this model."""


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Adapter and PERFT-router parameters as they live in the model (sharded DTensors under FSDP), keyed
    ``layers.{i}.perft_{router,experts}.{name}``."""
    params = {}
    for i, block in iter_perft_blocks(model):
        for prefix, module in (("perft_router", block.perft_router), ("perft_experts", block.perft_experts)):
            for name, param in module.named_parameters():
                params[f"layers.{i}.{prefix}.{name}"] = param
    return params


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter and PERFT-router tensors, whole (keys as :func:`adapter_parameters`).

    Under FSDP each rank holds a shard of every tensor: this gathers them, so every rank must call it.
    """
    return {key: _whole(param.detach()) for key, param in adapter_parameters(model).items()}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def base_fingerprint(config) -> dict:
    """What an adapter records of its base model and must find again: family, width, routed experts, decoder
    layers, all read from the base's ``config`` (so a ``config.json`` checks an adapter before any weight loads;
    a loaded model has ``config.num_hidden_layers`` decoder layers in every supported family)."""
    arch = get_arch(config)
    return {"model_type": arch.model_type, "hidden_size": config.hidden_size, "num_experts": arch.num_experts(config),
            "num_layers": config.num_hidden_layers}


def fingerprint_mismatches(metadata: dict, config) -> dict[str, tuple]:
    """``{key: (the adapter's, the base's)}`` for each fingerprint value that differs; empty when they fit."""
    return {key: (metadata.get(key), value) for key, value in base_fingerprint(config).items()
            if metadata.get(key) != value}


def _adapter_metadata(model) -> dict:
    config: PerftConfig = model.perft_config
    return {
        "format_version": FORMAT_VERSION,
        "library": "perft_qlora",
        "library_version": __version__,
        "perft": config.to_dict(),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
        **base_fingerprint(model.config),
        "layers": [i for i, _ in iter_perft_blocks(model)],
    }


def save_adapter(model, directory: str, extra_metadata: dict | None = None, model_card: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> str:
    """Write the attached adapter to ``directory`` atomically; returns the directory.

    ``model_card`` (markdown) is written as ``README.md`` beside it. ``state``: the tensors to write, when the
    caller gathered them already (:func:`adapter_state_dict` on every rank of a sharded model, then one rank
    writes); by default the model's own. An existing ``directory`` is replaced as a
    whole, so it may hold only a previous adapter's files (the two files and its README.md).
    """
    if getattr(model, "perft_config", None) is None:
        raise AdapterError("no PERFT adapter is attached to this model; call attach_perft first")
    directory = os.path.abspath(directory)
    if os.path.isdir(directory):
        others = sorted(set(os.listdir(directory)) - {CONFIG_NAME, LEGACY_CONFIG_NAME, WEIGHTS_NAME, CARD_NAME})
        if others:
            raise AdapterError(
                f"refusing to replace {directory}: it holds files other than an adapter ({', '.join(others[:3])}); "
                "save into a new directory or one that holds only an adapter"
            )
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    metadata = _adapter_metadata(model)
    if extra_metadata:
        metadata["extra"] = extra_metadata
    staging = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        state = {k: v.contiguous().cpu() for k, v in (state if state is not None else adapter_state_dict(model)).items()}
        save_file(state, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(metadata, f, indent=2)
        if model_card is not None:
            with open(os.path.join(staging, CARD_NAME), "w", encoding="utf-8") as f:
                f.write(model_card)
        if os.path.exists(directory):
            retired = tempfile.mkdtemp(prefix=f".adapter-old-{os.path.basename(directory)}-", dir=parent)  # the name: see training/output_dir.py
            old = os.path.join(retired, "old")
            os.replace(directory, old)
            try:
                os.replace(staging, directory)
            except BaseException:
                os.replace(old, directory)  # put the previous adapter back
                raise
            finally:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def config_path(directory: str) -> str:
    """``perft_config.json`` in ``directory``, else ``adapter_config.json`` (peft's, or a PERFT adapter saved
    before the rename); AdapterError when there is neither."""
    for name in (CONFIG_NAME, LEGACY_CONFIG_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise AdapterError(f"{directory} is not an adapter directory: {CONFIG_NAME} (PERFT) and {LEGACY_CONFIG_NAME} "
                       "(peft) are missing")


def read_config_json(directory: str):
    """The parsed config of the adapter in ``directory`` (:func:`config_path`), unchecked (ours or peft's);
    AdapterError if unreadable."""
    path = config_path(directory)
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is corrupt: {err}") from err


def read_adapter_config(directory: str) -> dict:
    """The parsed config of a PERFT adapter in ``directory``, checked for format version."""
    path = config_path(directory)
    metadata = read_config_json(directory)
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"{path} has format_version {version!r}; this perft_qlora ({__version__}) reads version {FORMAT_VERSION}"
        )
    return metadata


def verify_safetensors(path: str) -> None:
    """Check a safetensors file without loading it: the header parses and the file is exactly as long as the
    header says (a truncated or padded file fails here, before any model is loaded)."""
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing; the adapter directory is incomplete (re-save or re-copy it)")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little") if size >= 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError("no valid header")
            header = json.loads(handle.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not a valid safetensors file ({err}); re-save or re-copy the adapter") from err
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise AdapterError(f"{path} is {'truncated' if size < expected else 'too long'}: {size} bytes, its header "
                           f"says {expected}; re-save or re-copy the adapter")


def verify_adapter_files(directory: str, base_config=None) -> dict:
    """Pre-load check of a PERFT adapter directory: config (format, ``perft`` section), weights file (complete,
    and every tensor's shape and dtype in its header as the config makes them: :func:`check_adapter_header`)
    and, given the base model's ``base_config`` (its ``config.json``), the fit with that base. Reads no tensor.
    Returns the metadata."""
    metadata = read_adapter_config(directory)
    if base_config is not None:
        _check_compatible_config(base_config, metadata, directory)
    _perft_section(metadata, directory)
    verify_safetensors(os.path.join(directory, WEIGHTS_NAME))
    check_adapter_header(directory, metadata)
    return metadata


def _perft_section(metadata: dict, directory: str) -> PerftConfig:
    try:
        return PerftConfig.from_dict(metadata["perft"])
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterError(f"{directory}/{CONFIG_NAME} has an invalid 'perft' section: {err}") from err


def expected_adapter_tensors(metadata: dict, directory: str = "the adapter") -> dict[str, tuple[int, ...]]:
    """The shape of every tensor an adapter with this ``perft_config.json`` holds, from the config alone: per
    adapted layer, the experts' ``down`` (M, DB, D) and ``up`` (M, D, DB), and PERFT's router (M, D)."""
    config = _perft_section(metadata, directory)
    sizes = {key: metadata.get(key) for key in ("hidden_size", "num_experts")}
    layers = metadata.get("layers")
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad or not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
        what = ", ".join(bad) if bad else "layers"
        raise AdapterError(f"{directory}/{CONFIG_NAME} has an invalid {what} ({sizes if bad else layers}); "
                           "re-save or re-copy the adapter")
    block = BlockFacts(hidden_size=sizes["hidden_size"], num_experts=sizes["num_experts"], top_k=1, renormalizes=False)
    try:
        m = VARIANTS[config.variant].num_experts(config, block)
    except ValueError as err:
        raise AdapterError(f"{directory}/{CONFIG_NAME}: {err}") from err
    d, r = sizes["hidden_size"], config.bottleneck
    shapes = {}
    for i in layers:
        shapes[f"layers.{i}.perft_experts.down"] = (m, r, d)
        shapes[f"layers.{i}.perft_experts.up"] = (m, d, r)
        if config.variant == "perft":
            shapes[f"layers.{i}.perft_router.weight"] = (m, d)
    return shapes


_FLOAT_DTYPES = {"F32", "BF16", "F16"}


def check_adapter_header(directory: str, metadata: dict) -> None:
    """The adapter's config against its weights' safetensors header, before anything is built: the same tensor
    names, each of the shape the config makes it (so a config claiming 10^9 experts ends here, not in an
    allocation), and one floating dtype per layer (an adapter is built in one dtype per layer)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > os.path.getsize(path) - 8:
                raise ValueError(f"its header length {length} is past the end of the file")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise AdapterError(f"{path} is corrupt: {err}; re-save or re-copy the adapter") from err
    expected = expected_adapter_tensors(metadata, directory)
    fix = f"{CONFIG_NAME} and {WEIGHTS_NAME} in {directory} disagree; re-save or re-copy the adapter (both files)"
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{path} does not match: missing {missing[:4]}, unexpected {unexpected[:4]}; {fix}")
    for key, shape in expected.items():
        found = header[key].get("shape") if isinstance(header[key], dict) else None
        if not isinstance(found, list) or tuple(found) != shape:
            shown = tuple(found) if isinstance(found, list) else found
            raise AdapterError(f"{key} has shape {shown} in {path}, the config makes it {shape}; {fix}")
    for layer in sorted({key.split(".")[1] for key in expected}, key=int):  # a layer's tensors share one dtype
        dtypes = {str(header[key].get("dtype")) for key in expected if key.split(".")[1] == layer}
        if len(dtypes) != 1 or not dtypes <= _FLOAT_DTYPES:
            raise AdapterError(f"{path} holds layer {layer}'s tensors in {sorted(dtypes)}, one of "
                               f"{sorted(_FLOAT_DTYPES)} expected; {fix}")


def _check_compatible_config(base_config, metadata: dict, directory: str) -> None:
    """The adapter's recorded base (family, width, routed experts, layers) against the base's ``config.json``."""
    wrong = fingerprint_mismatches(metadata, base_config)
    if wrong:
        trained = ", ".join(f"{k}={v[0]!r}" for k, v in wrong.items())
        found = ", ".join(f"{k}={v[1]!r}" for k, v in wrong.items())
        raise AdapterError(f"adapter {directory} was trained for {trained}, but the base model has {found}; "
                           "pass the base model it was trained on")


def _check_compatible(model, metadata: dict, directory: str) -> None:
    for key, (trained, found) in fingerprint_mismatches(metadata, model.config).items():
        raise AdapterError(f"adapter in {directory} was trained for {key}={trained!r} but this model has {found!r}")


def load_adapter(model, directory: str):
    """Attach (if needed) and load the adapter in ``directory`` into ``model``; returns the model.

    A new attachment takes the saved tensors' dtype (float32 master weights stay float32), so a
    reloaded adapter computes exactly what the saved one did.
    """
    metadata = read_adapter_config(directory)
    _check_compatible(model, metadata, directory)
    config = _perft_section(metadata, directory)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise AdapterError(f"{directory} has no {WEIGHTS_NAME}")
    _check_layers(model, config, metadata, weights_path)
    check_adapter_header(directory, metadata)  # sizes and dtypes before anything is attached or read
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights_path} is corrupt: {err}") from err
    attached_here = getattr(model, "perft_config", None) is None
    if attached_here:
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        attach_perft(model, config, dtype=dtypes.pop() if len(dtypes) == 1 else None)
    elif model.perft_config != config:
        raise AdapterError(f"the attached adapter's config differs from {directory}'s; load it into a fresh base model")
    try:
        _copy_weights(model, state, metadata, weights_path)
    except AdapterError:
        if attached_here:  # leave the model as it came: no half-loaded adapter
            detach_perft(model)
        raise
    return model


def _check_layers(model, config: PerftConfig, metadata: dict, weights_path: str) -> None:
    """The layers the adapter covers against those it attaches to (or is attached to) here, before attaching."""
    if getattr(model, "perft_config", None) is not None:
        layers = [i for i, _ in iter_perft_blocks(model)]
    else:
        layers = config.layers if config.layers is not None else get_arch(model.config).moe_layers(model)
    if list(layers) != metadata.get("layers"):
        raise AdapterError(f"adapter {weights_path} covers layers {metadata.get('layers')}, the model has {list(layers)}")


def _copy_weights(model, state: dict[str, torch.Tensor], metadata: dict, weights_path: str) -> None:
    """Check every key and shape first, then copy, so a bad file changes nothing."""
    layers = [i for i, _ in iter_perft_blocks(model)]
    if layers != metadata.get("layers"):
        raise AdapterError(f"adapter {weights_path} covers layers {metadata.get('layers')}, the model has {layers}")
    current = adapter_parameters(model)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise AdapterError(f"{weights_path} does not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, param in current.items():
        if state[key].shape != param.shape:
            raise AdapterError(f"{key} has shape {tuple(state[key].shape)} in {weights_path}, expected {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in current.items():
            _assign(param, state[key])


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter; a sharded (FSDP, DTensor) one takes only its own shard."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(value.to_local())
    else:
        param.copy_(value)
