"""Compute kernels and their plain-PyTorch references (see README.md in this folder).

``nf4_expert_mlp`` and ``routed_adapter`` run, on CUDA tensors, the ``grouped`` backend (bitsandbytes
dequantize + ``grouped_mm``) where torch's ``grouped_mm`` is fused (sm_90, sm_100) and the Triton kernels
on the other cards (sm_80, sm_86, sm_89, ...), unless the measured table says otherwise; the references
(``reference.py``) on CPU; ``PERFT_QLORA_KERNELS=auto|grouped|triton|reference`` forces one. Triton is
optional: nothing here imports it until a kernel runs.
"""

from .dispatch import (
    ENV_VAR,
    backend_choices,
    kernel_policy,
    nf4_expert_mlp,
    pick_formulation,
    routed_adapter,
    select_backend,
)
from .grouped import dequantize_experts, grouped_nf4_expert_mlp, grouped_routed_adapter
from .reference import (
    dequantize_nf4_reference,
    nested_absmax_reference,
    nf4_expert_matmul,
    nf4_expert_mlp_reference,
    routed_adapter_reference,
    tokens_by_expert,
)
from .sorting import ExpertSort, TileSchedule, gate_matrix, sort_by_expert, tile_schedule

__all__ = [
    "ENV_VAR",
    "ExpertSort",
    "TileSchedule",
    "backend_choices",
    "dequantize_experts",
    "dequantize_nf4_reference",
    "gate_matrix",
    "grouped_nf4_expert_mlp",
    "grouped_routed_adapter",
    "kernel_policy",
    "nested_absmax_reference",
    "nf4_expert_matmul",
    "nf4_expert_mlp",
    "nf4_expert_mlp_reference",
    "pick_formulation",
    "routed_adapter",
    "routed_adapter_reference",
    "select_backend",
    "sort_by_expert",
    "tile_schedule",
    "tokens_by_expert",
]
