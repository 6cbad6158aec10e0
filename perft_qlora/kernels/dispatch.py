"""The dispatch layer: which backend runs each op, and why (``PERFT_QLORA_KERNELS=auto|grouped|triton|reference``).

- ``reference``: the plain-PyTorch specification (per-expert loop); the CPU path of ``auto``.
- ``grouped``: bitsandbytes dequantize + ``torch.nn.functional.grouped_mm`` (``grouped.py``); the floor no
  CUDA configuration may fall below.
- ``triton``: the fused kernels (on CPU tensors only under ``TRITON_INTERPRET=1``, for tests).

``auto`` on CUDA decides by the GPU's capability and the measured table (``measured.py``, filled from
benchmark runs, empty until one is run), in this order: a measured entry for the op, capability and shape
class wins; else ``grouped`` where torch's ``grouped_mm`` is its fused kernel (bf16 on sm_90 / sm_100,
``targets.grouped_mm_fused``), ``triton`` on the other cards from sm_80 on (there ``grouped_mm`` is a
per-group loop with a device-to-host sync), ``grouped`` when Triton is missing there (said once, with a
warning) or cannot take the call, the reference when neither can. A Triton kernel that raises under
``auto`` falls back to ``grouped`` with a warning. Every choice is logged once (logger
``perft_qlora.kernels``) with its reason and kept in :func:`backend_choices` for the trainer's logs and
the benchmark JSONs. Triton is imported only when a kernel is about to run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import warnings

import torch
from transformers.activations import ACT2FN

from . import measured
from .grouped import grouped_nf4_expert_mlp, grouped_routed_adapter
from .reference import nf4_expert_mlp_reference, routed_adapter_reference
from .targets import MIN_KERNEL_CAPABILITY, capability_name, device_capability, grouped_mm_fused

ENV_VAR = "PERFT_QLORA_KERNELS"
BACKENDS = ("auto", "grouped", "triton", "reference")
MIN_TRITON = (3, 4)
"""Oldest Triton known to build the kernels for sm_90 (compile_check: 3.4.0 to 3.9.0; sm_80/86/89: 3.9.0 only)."""
KERNEL_ACTIVATIONS = ("silu", "relu", "gelu")
"""Activations the kernels compute, by ``ACT2FN`` name (``gelu`` is the exact erf form)."""
DENSE_MAX_WIDTH = 256
"""Largest padded M*DB the dense adapter kernel keeps in registers; wider banks take the sorted one."""
MAX_SORTED_BOTTLENECK = 128
"""Largest DB the sorted adapter kernel keeps in registers."""
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger("perft_qlora.kernels")
_CHOICES: dict[str, str] = {}
_LOGGED: set[tuple[str, str, str]] = set()
_WARNED: set[str] = set()


def requested_backend() -> str:
    """``auto``, ``grouped``, ``triton`` or ``reference`` from ``PERFT_QLORA_KERNELS`` (read on every call)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend: use one of {', '.join(BACKENDS)} (unset means auto).")
    return value


def backend_choices() -> dict[str, str]:
    """``{op: "backend (reason)"}``: the latest choice per op in this process (for logs and benchmark JSONs)."""
    return dict(_CHOICES)


def shape_class(tokens: int, dims: str) -> str:
    """Shape class of a call for the measured table: the layer dims and a token bucket."""
    bucket = "decode" if tokens <= 16 else "small" if tokens <= 512 else "large"
    return f"{dims}/{bucket}"


def capability(device: torch.device) -> str:
    """``sm_XY`` of a CUDA device (the key of the measured table)."""
    return capability_name(device_capability(device))


def kernel_policy(device: torch.device) -> dict:
    """What ``auto`` prefers on this device before any per-call check (for benchmark JSONs and logs)."""
    if device.type != "cuda":
        return dict(device=str(device), auto="reference")
    cap = device_capability(device)
    fused = grouped_mm_fused(cap, torch.bfloat16)
    prefers = "grouped" if fused or cap < MIN_KERNEL_CAPABILITY else "triton" if _triton_installed() else "grouped"
    return dict(capability=capability_name(cap), grouped_mm_fused_bf16=fused, triton_installed=_triton_installed(), auto=prefers)


def _record(op: str, backend: str, reason: str) -> str:
    _CHOICES[op] = f"{backend} ({reason})"
    if (op, backend, reason) not in _LOGGED:
        _LOGGED.add((op, backend, reason))
        logger.info("%s: %s backend (%s)", op, backend, reason)
    return backend


def _check_routing(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
    if indices.dim() != 2 or weights.shape != indices.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"routing must be weights and indices of shape (tokens, top_k) with tokens = x.shape[0] = {x.shape[0]}; "
            f"got weights {tuple(weights.shape)}, indices {tuple(indices.shape)}"
        )


def select_backend(op: str, x: torch.Tensor, unsupported: str | None, grouped_unsupported: str | None = None, dims: str = "") -> str:
    """``"reference"``, ``"grouped"`` or ``"triton"`` for one call of ``op`` on ``x``'s device.

    ``unsupported`` / ``grouped_unsupported``: why the Triton kernels / the grouped backend cannot
    take this call (None when they can). ``auto`` then picks another backend; a forced one raises.
    """
    choice = requested_backend()
    if choice == "reference":
        return _record(op, "reference", f"{ENV_VAR}=reference")
    if choice == "grouped":
        if grouped_unsupported is not None:
            raise ValueError(f"{ENV_VAR}=grouped, but the {op} grouped backend cannot take this call: {grouped_unsupported}.")
        return _record(op, "grouped", f"{ENV_VAR}=grouped")
    if choice == "triton":
        _check_triton_forced(op, x, unsupported)
        return _record(op, "triton", f"{ENV_VAR}=triton")
    if not x.is_cuda:
        return _record(op, "reference", "auto on CPU tensors: the reference is the CPU path")
    return _record(op, *_auto_cuda(op, x, unsupported, grouped_unsupported, dims))


def _auto_cuda(op: str, x, unsupported, grouped_unsupported, dims: str) -> tuple[str, str]:
    cap_tuple = device_capability(x.device)
    cap, cls = capability_name(cap_tuple), shape_class(x.shape[0], dims)
    triton_ok = _triton_installed() and unsupported is None and cap_tuple >= MIN_KERNEL_CAPABILITY
    entry = measured.MEASURED.get((cap, op, cls))
    if entry == "triton" and triton_ok:
        return "triton", f"measured faster than grouped on {cap} for {cls}"
    if entry == "grouped" and grouped_unsupported is None:
        return "grouped", f"measured faster than triton on {cap} for {cls}"
    fused = grouped_mm_fused(cap_tuple, x.dtype)
    if fused and grouped_unsupported is None:
        return "grouped", f"{cap}: torch grouped_mm is the fused kernel here; no measured entry for {cls} says triton is faster"
    if triton_ok:
        if grouped_unsupported is not None:
            return "triton", f"grouped cannot take this call: {grouped_unsupported}"
        return "triton", f"{cap}: torch grouped_mm is a per-group loop with a host sync here (fused only on sm_90/sm_100)"
    if grouped_unsupported is None:
        why = _why_not_triton(cap_tuple, unsupported)
        if not fused and not _triton_installed() and cap_tuple >= MIN_KERNEL_CAPABILITY:
            _warn_once(cap, f"{op}: triton is not installed, so on {cap} the grouped backend runs torch grouped_mm's "
                       "per-group loop with a device-to-host sync per call (slow): pip install 'perft-qlora[triton]'")
        return "grouped", f"{cap}: {why}; grouped (torch grouped_mm loops over groups here)"
    why = _why_not_triton(cap_tuple, unsupported)
    return "reference", f"neither grouped ({grouped_unsupported}) nor triton ({why}) can take it"


def _why_not_triton(cap: tuple[int, int], unsupported: str | None) -> str:
    if not _triton_installed():
        return f"triton>={'.'.join(map(str, MIN_TRITON))} not installed"
    if cap < MIN_KERNEL_CAPABILITY:
        return f"the triton kernels need {capability_name(MIN_KERNEL_CAPABILITY)} or newer"
    return f"the triton kernel cannot take this call: {unsupported}"


def _warn_once(key: str, message: str) -> None:
    """A warning and a log line, once per process and key (the capability)."""
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)
        warnings.warn(message, stacklevel=4)


def _check_triton_forced(op: str, x, unsupported: str | None) -> None:
    if not _triton_installed():
        raise RuntimeError(
            f"{ENV_VAR}=triton but triton>={'.'.join(map(str, MIN_TRITON))} is not installed: "
            f"pip install 'perft-qlora[triton]', or unset {ENV_VAR}."
        )
    if unsupported is not None:
        raise ValueError(f"{ENV_VAR}=triton, but the {op} kernel cannot take this call: {unsupported}. Unset {ENV_VAR} to fall back.")
    if not x.is_cuda:
        _check_interpreter(op)


def _run_triton(op: str, kernel, fallback):
    """``kernel()``; under ``auto`` a Triton failure warns and runs ``fallback()`` (grouped) instead."""
    if requested_backend() != "auto":
        return kernel()
    try:
        return kernel()
    except Exception as error:  # noqa: BLE001 - any compiler/launch failure: the grouped floor takes over
        warnings.warn(f"{op}: the Triton kernel raised {type(error).__name__}: {error}; falling back to grouped", stacklevel=3)
        _record(op, "grouped", f"triton raised {type(error).__name__}")
        return fallback()


@functools.cache
def _triton_installed() -> bool:
    """Whether a Triton of at least MIN_TRITON is importable (checked once, without importing it)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        version = importlib.metadata.version("triton")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):  # broken or blocked: absent
        return False
    parts = re.match(r"(\d+)\.(\d+)", version)
    return parts is not None and (int(parts[1]), int(parts[2])) >= MIN_TRITON


def _check_interpreter(op: str) -> None:
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    if not interpret:
        raise RuntimeError(
            f"{ENV_VAR}=triton on CPU tensors runs the {op} kernel in Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported (slow; for tests). "
            f"On CPU, unset {ENV_VAR} to use the PyTorch reference."
        )
    from .triton_common import INTERPRETED

    if not INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton (or perft_qlora's kernels) had been imported for a GPU; "
            "set it before anything imports triton: first thing in the process (tests/conftest.py does this "
            "when CUDA is absent)."
        )


@functools.cache
def _act_module(name: str):
    return ACT2FN[name]


def _ops():
    from . import ops  # imports triton: only reached when a kernel runs

    return ops


def _inputs_for_grad_mode(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` detached under ``no_grad``: an autograd.Function's ``ctx.needs_input_grad`` follows
    ``requires_grad`` even then, so without this the kernels would store backward activations that no
    backward will ever read (e.g. the adapters' parameters during generation)."""
    return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)


# NF4 grouped expert MLP ---------------------------------------------------------------------------


def _nf4_unsupported(x, gate_up, down, hidden_act: str) -> str | None:
    if hidden_act not in KERNEL_ACTIVATIONS:
        return f"hidden_act {hidden_act!r} is not one of {KERNEL_ACTIVATIONS}"
    if x.dtype not in FLOAT_DTYPES or x.dim() != 2:
        return f"x must be a 2-D float16/bfloat16/float32 tensor, got {tuple(x.shape)} {x.dtype}"
    for name, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
        if weight.blocksize != 64:
            return f"{name} uses NF4 blocks of {weight.blocksize}; the kernels read 64-value blocks"
        if weight.shape[2] % 64:
            return f"{name} rows of {weight.shape[2]} values are not whole 64-value NF4 blocks"
        if weight.packed.device != x.device:
            return f"{name} is on {weight.packed.device} but x is on {x.device}"
    return None


def _grouped_unsupported(x, *widths: int) -> str | None:
    """Why ``grouped_mm`` cannot take rows of these widths in x's dtype (its strides must be 16-byte multiples)."""
    if x.dtype not in FLOAT_DTYPES or x.dim() != 2:
        return f"x must be a 2-D float16/bfloat16/float32 tensor, got {tuple(x.shape)} {x.dtype}"
    if x.is_cuda and x.dtype != torch.bfloat16:
        # torch documents grouped_mm on CUDA for bf16 (sm >= 80); other dtypes await a GPU session's check
        return f"torch grouped_mm on CUDA is documented for bfloat16, got {x.dtype}"
    align = 16 // x.element_size()
    odd = [w for w in widths if w % align]
    if odd:
        return f"grouped_mm needs row widths that are multiples of {align} {x.dtype} values, got {odd}"
    return None


def nf4_expert_mlp(x, gate_up, down, weights, indices, hidden_act: str, blocks=None) -> torch.Tensor:
    """Routed frozen gated-MLP experts in NF4: ``Σ_k w[t,k] · down_e(act(gate_e x_t) * up_e x_t)``.

    Args:
        x: (T, H). gate_up: NF4Weight (E, 2I, H); down: NF4Weight (E, H, I). weights, indices: (T, K).
        hidden_act: the model's activation name (``ACT2FN`` key). blocks: kernel tile override (tests).
    Returns:
        out: (T, H) in x's dtype; differentiable in x and weights (the experts are frozen).
    """
    _check_routing(x, weights, indices)
    x, weights = _inputs_for_grad_mode(x, weights)
    num_experts, two_inter, hidden = gate_up.shape
    grouped_no = _grouped_unsupported(x, hidden, two_inter // 2)
    if grouped_no is None and gate_up.packed.device != x.device:
        grouped_no = f"gate_up_proj is on {gate_up.packed.device} but x is on {x.device}"
    dims = f"E{num_experts}xH{hidden}xI{two_inter // 2}"
    backend = select_backend("nf4_expert_mlp", x, _nf4_unsupported(x, gate_up, down, hidden_act), grouped_no, dims)
    act_fn = _act_module(hidden_act)
    if backend == "reference":
        return nf4_expert_mlp_reference(x, gate_up, down, weights, indices, act_fn)
    if backend == "grouped":
        return grouped_nf4_expert_mlp(x, gate_up, down, weights, indices, act_fn)
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    return _run_triton(
        "nf4_expert_mlp",
        lambda: _ops().NF4ExpertMLPFunction.apply(x.contiguous(), weights, indices.long(), gate_up, down, hidden_act, blocks),
        lambda: grouped_nf4_expert_mlp(x, gate_up, down, weights, indices, act_fn),
    )


# routed adapter -------------------------------------------------------------------------------------


def pick_formulation(num_experts: int, bottleneck: int) -> str:
    """``dense`` while the padded hidden layer of all M experts fits one register tile, else ``sorted``.

    Dense costs ``4·T·M·DB·D`` FLOPs but reads x and writes out once; sorted costs ``4·T·K·DB·D``
    FLOPs but reads x K times (gathered) and adds K float32 partials per output element. With a GPU
    doing ~300 bf16 FLOPs per byte moved, the dense product wins while M·DB is small next to D
    (PERFT Top2/4 DB=16: M·DB = 64); the register tile caps it at DENSE_MAX_WIDTH.
    """
    width = max(16, 1 << max(0, num_experts * bottleneck - 1).bit_length())
    return "dense" if width <= DENSE_MAX_WIDTH else "sorted"


def _activation_name(activation) -> str | None:
    """Kernel name of ``activation`` (None or an ACT2FN name), or None when only the reference knows it."""
    if activation is None:
        return "identity"
    if isinstance(activation, str) and activation in KERNEL_ACTIVATIONS:
        return activation
    return None


def _adapter_unsupported(x, down, up, activation, formulation: str) -> str | None:
    if _activation_name(activation) is None:
        return f"activation {activation!r} is not None or one of {KERNEL_ACTIVATIONS}"
    if x.dtype not in FLOAT_DTYPES or x.dim() != 2 or not (x.dtype == down.dtype == up.dtype):
        return f"x, down and up must share one float dtype with x 2-D, got {x.dtype}, {down.dtype}, {up.dtype}"
    if not (x.device == down.device == up.device):
        return f"x, down and up must be on one device, got {x.device}, {down.device}, {up.device}"
    m, bottleneck, _ = down.shape
    if formulation == "dense" and pick_formulation(m, bottleneck) != "dense":
        return f"M*DB = {m * bottleneck} is wider than the dense kernel's {DENSE_MAX_WIDTH} columns"
    if formulation == "sorted" and bottleneck > MAX_SORTED_BOTTLENECK:
        return f"bottleneck {bottleneck} is wider than the sorted kernel's {MAX_SORTED_BOTTLENECK}"
    return None


def routed_adapter(
    x, down, up, weights, indices, activation=None, scaling: float = 1.0, formulation: str = "auto", blocks=None
) -> torch.Tensor:
    """Routed bottleneck experts ``Σ_k w[t,k] · scaling · up_j act(down_j x_t)``, see :func:`routed_adapter_reference`.

    Args:
        x: (T, D); down: (M, DB, D); up: (M, D, DB); weights, indices: (T, K).
        activation: None, an ``ACT2FN`` name, or any callable (callables run on the reference only).
        formulation: ``auto`` (:func:`pick_formulation`), ``dense`` or ``sorted`` (Triton and grouped).
    Returns:
        out: (T, D) in x's dtype; differentiable in x, down, up and weights.
    """
    if formulation not in ("auto", "dense", "sorted"):
        raise ValueError(f"formulation must be 'auto', 'dense' or 'sorted', got {formulation!r}")
    _check_routing(x, weights, indices)
    x, down, up, weights = _inputs_for_grad_mode(x, down, up, weights)
    if formulation == "auto":
        formulation = pick_formulation(down.shape[0], down.shape[1])
    unsupported = _adapter_unsupported(x, down, up, activation, formulation)
    grouped_no = _grouped_unsupported(x, x.shape[1])
    if grouped_no is None and not (x.device == down.device == up.device):
        grouped_no = f"x, down and up must be on one device, got {x.device}, {down.device}, {up.device}"
    dims = f"M{down.shape[0]}xDB{down.shape[1]}xD{x.shape[1]}"
    backend = select_backend("routed_adapter", x, unsupported, grouped_no, dims)
    act_fn = _act_module(activation) if isinstance(activation, str) else activation
    if backend == "reference":
        return routed_adapter_reference(x, down, up, weights, indices, activation=act_fn, scaling=scaling)
    if backend == "grouped":
        return grouped_routed_adapter(x, down, up, weights, indices, act_fn, scaling, formulation)
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    function = _ops().DenseRoutedAdapterFunction if formulation == "dense" else _ops().SortedRoutedAdapterFunction
    args = (x.contiguous(), down.contiguous(), up.contiguous(), weights, indices.long())
    return _run_triton(
        "routed_adapter",
        lambda: function.apply(*args, _activation_name(activation), float(scaling), blocks),
        lambda: grouped_routed_adapter(x, down, up, weights, indices, act_fn, scaling, formulation),
    )
