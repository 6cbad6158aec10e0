"""A base checkpoint's ``config.json`` checked against its weights' safetensors headers, before any weight is read.

A ``config.json`` that does not belong to the weights beside it (copied from another size of the model, edited by
hand) would otherwise fail deep inside loading, after minutes of reading, with a shape error naming a tensor.
The headers hold every tensor's name and shape; the model the config describes is built on the ``meta`` device
(no memory). Each tensor both have must agree in shape, the routed experts (fused ``experts.gate_up_proj`` or the
hub's per-expert tensors) in shape and in count, and the weights may not hold decoder layers the config lacks.
``load_model`` calls :func:`check_weights_match_config`, so train, evaluate, the app and Python users all get it.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import UsageError
from .arch import MoEArch, get_arch
from .checkpoint_reader import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, CheckpointReader

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _header_shapes(directory: str) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape from the safetensors headers (no tensor data read); None without safetensors files
    (the loader then says what is missing)."""
    if not any(os.path.isfile(os.path.join(directory, n)) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        return None
    try:
        with CheckpointReader(directory) as reader:
            return {key: reader.entry(key).shape for key in reader.keys()}  # noqa: SIM118 -- a reader, not a dict
    except (ValueError, KeyError, TypeError, OSError) as error:  # a header that is not JSON, a short file, ...
        if isinstance(error, FileNotFoundError):
            raise
        raise UsageError(f"the weights in {directory} are not valid safetensors ({error}); re-download or re-save "
                         "the checkpoint") from error


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter and persistent buffer of the model ``config`` describes (built on ``meta``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _stored_names(name: str, arch: MoEArch) -> list[str]:
    """Names a model tensor may have in a checkpoint (Mixtral's hub files say ``block_sparse_moe``)."""
    return [name] + [name.replace(f".{arch.moe_block}.", f".{other}.", 1) for other in arch.checkpoint_block_names]


def _expert_problem(name: str, shape: tuple[int, ...], stored: dict, arch: MoEArch) -> str | None:
    """The routed experts' tensor ``name`` (fused ``(E, out, in)``) against the fused or per-expert stored ones."""
    for key in _stored_names(name, arch):
        if key in stored:
            return None if stored[key] == shape else f"{key} is {list(stored[key])}, the config makes it {list(shape)}"
    prefix = name.split(f"{arch.moe_block}.{arch.experts}.")[0]
    which = name.rsplit(".", 1)[1]
    _, out, inner = shape
    gate, _, down = arch.expert_checkpoint_keys
    key0 = prefix + (gate if which == "gate_up_proj" else down).format(e=0)
    if key0 not in stored:
        return None  # neither layout: the loader names the missing tensor
    want = (out // 2, inner) if which == "gate_up_proj" else (out, inner)
    if stored[key0] != want:
        return f"{key0} is {list(stored[key0])}, the config makes it {list(want)}"
    count = 0
    while prefix + (gate if which == "gate_up_proj" else down).format(e=count) in stored:
        count += 1
    if count != shape[0]:
        pattern = prefix + (gate if which == "gate_up_proj" else down)
        return f"the weights hold {count} experts in layer {prefix.split('.')[2]} ({pattern}), the config says {shape[0]}"
    return None


def weight_mismatches(directory: str, config) -> list[str]:
    """What disagrees between ``config`` and the safetensors headers in ``directory``; empty when they agree."""
    stored = _header_shapes(directory)
    if stored is None:
        return []
    arch = get_arch(config)
    problems = []
    stored_layers = {int(m.group(1)) for key in stored if (m := _LAYER.match(key))}
    if stored_layers and max(stored_layers) >= config.num_hidden_layers:
        problems.append(f"the weights hold {max(stored_layers) + 1} decoder layers, the config says "
                        f"num_hidden_layers {config.num_hidden_layers}")
    for name, shape in _expected_shapes(config).items():
        if name.endswith((f".{arch.experts}.gate_up_proj", f".{arch.experts}.down_proj")) and len(shape) == 3:
            problem = _expert_problem(name, shape, stored, arch)
        else:
            key = next((k for k in _stored_names(name, arch) if k in stored), None)
            problem = None if key is None or stored[key] == shape else (
                f"{key} is {list(stored[key])}, the config makes it {list(shape)}")
        if problem:
            problems.append(problem)
    return problems


def check_weights_match_config(directory: str, config, name: str | None = None) -> None:
    """Refuse, in one line, a ``config.json`` whose sizes disagree with the weights' headers (see module doc)."""
    problems = weight_mismatches(directory, config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(
            f"config.json of {name or directory} does not match its weights: {problems[0]}{more}; the config.json "
            "belongs to another model: put back the checkpoint's own config.json (or re-save the model)"
        )
