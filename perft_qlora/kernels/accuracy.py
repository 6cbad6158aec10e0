"""The accuracy rule every kernel is held to (tests and the benchmark's pre-timing check).

flash-attention's rule (``tests/test_flash_attn.py``): against a float64 ground truth, the kernel's
error may be at most ``slack`` (2) times the error of the PyTorch reference run in the same low
precision. A small floor relative to the truth's magnitude absorbs float32 summation-order noise
where the reference happens to be nearly exact (e.g. fp32 runs, or a gradient that is almost zero).
"""

from __future__ import annotations

import math

import torch

FLOOR = 1e-5
"""Error floor relative to ``max |truth|``: about 100 float32 ulps, far below any fp16/bf16 error."""


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    if value.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(value.shape)} vs {tuple(truth.shape)}")
    if value.numel() == 0:
        return 0.0
    return (value.detach().double() - truth.detach().double()).abs().max().item()


def flash_rule_violation(name: str, kernel, reference, truth, slack: float = 2.0) -> str | None:
    """None when ``kernel`` passes the rule, else a message with the three numbers."""
    kernel_err = max_error(kernel, truth)
    reference_err = max_error(reference, truth)
    floor = FLOOR * (truth.detach().abs().max().item() if truth.numel() else 0.0)
    bound = slack * reference_err + floor
    if kernel_err <= bound and not math.isnan(kernel_err):
        return None
    return (
        f"{name}: kernel error {kernel_err:.3g} exceeds {slack}x the low-precision reference's {reference_err:.3g} "
        f"+ floor {floor:.3g} (vs float64 truth)"
    )


def assert_flash_rule(name: str, kernel, reference, truth, slack: float = 2.0) -> None:
    """Raise AssertionError when ``kernel`` breaks the rule (see :func:`flash_rule_violation`)."""
    message = flash_rule_violation(name, kernel, reference, truth, slack)
    if message is not None:
        raise AssertionError(message)
