"""The accuracy rule every kernel is held to (tests and the benchmark's pre-timing check).

flash-attention's rule (``tests/test_flash_attn.py``): against a float64 ground truth, the kernel's
error may be at most ``slack`` (2) times the error of the PyTorch reference run in the same low
precision. A small floor relative to the truth's magnitude absorbs float32 summation-order noise
where the reference happens to be nearly exact (e.g. fp32 runs, or a gradient that is almost zero).

Given the compute ``dtype``, the rule also bounds the reference's own error by ``REFERENCE_TOLERANCE``
times ``max |truth|``: otherwise a bug shared by kernel and reference (say in their common routing
layout) passes, the kernel being "as wrong as" the reference.
"""

from __future__ import annotations

import math

import torch

FLOOR = 1e-5
"""Error floor relative to ``max |truth|``: about 100 float32 ulps, far below any fp16/bf16 error."""


REFERENCE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
"""Largest reference error relative to ``max |truth|`` by compute dtype; measured on the CPU tests: <= 7e-7
(float32), <= 1e-3 (float16); bfloat16 has 8x float16's rounding step."""


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    if value.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(value.shape)} vs {tuple(truth.shape)}")
    if value.numel() == 0:
        return 0.0
    return (value.detach().double() - truth.detach().double()).abs().max().item()


def flash_rule_violation(name: str, kernel, reference, truth, slack: float = 2.0, dtype: torch.dtype | None = None) -> str | None:
    """None when ``kernel`` passes the rule, else a message with the three numbers.

    ``dtype``: the precision both ran in; when given, the reference must also be within
    ``REFERENCE_TOLERANCE[dtype] · max |truth|`` of the truth.
    """
    kernel_err = max_error(kernel, truth)
    reference_err = max_error(reference, truth)
    scale = truth.detach().abs().max().item() if truth.numel() else 0.0
    floor = FLOOR * scale
    if dtype is not None and not reference_err <= REFERENCE_TOLERANCE[dtype] * scale + floor:
        return (
            f"{name}: the {dtype} reference itself is off by {reference_err:.3g} against float64 truth values up to "
            f"{scale:.3g} (allowed {REFERENCE_TOLERANCE[dtype]:g} of that): a bug shared by reference and kernel?"
        )
    bound = slack * reference_err + floor
    if kernel_err <= bound and not math.isnan(kernel_err):
        return None
    return (
        f"{name}: kernel error {kernel_err:.3g} exceeds {slack}x the low-precision reference's {reference_err:.3g} "
        f"+ floor {floor:.3g} (vs float64 truth)"
    )


def assert_flash_rule(name: str, kernel, reference, truth, slack: float = 2.0, dtype: torch.dtype | None = None) -> None:
    """Raise AssertionError when ``kernel`` breaks the rule (see :func:`flash_rule_violation`)."""
    message = flash_rule_violation(name, kernel, reference, truth, slack, dtype)
    if message is not None:
        raise AssertionError(message)
