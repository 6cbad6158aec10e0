"""Compute kernels and their plain-PyTorch references.

Today every op runs its reference (``reference.py``); fused Triton kernels plug in behind the same
functions, selected by device or ``PERFT_QLORA_KERNELS=reference|triton``.
"""

from .reference import dequantize_nf4_reference, nested_absmax_reference, routed_adapter_reference, tokens_by_expert

__all__ = ["dequantize_nf4_reference", "nested_absmax_reference", "routed_adapter_reference", "routed_adapter", "tokens_by_expert"]


def routed_adapter(x, down, up, weights, indices, activation=None, scaling: float = 1.0):
    """Routed bottleneck experts, see :func:`routed_adapter_reference` for the math and shapes."""
    return routed_adapter_reference(x, down, up, weights, indices, activation=activation, scaling=scaling)
