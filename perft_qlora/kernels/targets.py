"""The CUDA cards the kernels target: capability query, per-card limits, where torch's ``grouped_mm`` is fused.

The mission's cards are mostly pre-Hopper (24 and 48 GB: RTX 3090 / A6000 sm_86, RTX 4090 / L40S sm_89,
A100 sm_80); the H100/H200 (sm_90) is where the ``grouped`` backend was first measured. Two facts from
them drive the backend choice (``dispatch``) and the tile tables (``triton_*.py``), and ``compile_check``
measures every kernel against the limits below:

- torch's ``grouped_mm`` (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``) runs its fused CUTLASS
  kernel only for bfloat16 on compute capability major 9 or 10: torch 2.13's ``_grouped_mm_cuda`` takes the
  fast path iff ``_scaled_mm_allowed_device(sm90_only=true, sm100_only=true)`` (``major == 9 || major == 10``)
  and a, b and out are bf16. Everywhere else (sm_80, sm_86, sm_89, sm_12x) it runs ``_grouped_mm_fallback``:
  one ``mm`` per group after a device-to-host copy of the offsets (pytorch#186615 / #186620: "we currently
  dont plan to add in a fused non H2D sync variant on ampere").
- shared memory per block differs threefold: the opt-in maximum per block is the SM's carve-out minus the
  1 KB the driver reserves (CUDA C++ Programming Guide, compute capabilities; the Ampere / Ada / Hopper
  tuning guides): 164 KB per SM on sm_80, 100 KB on sm_86 and sm_89, 228 KB on sm_90.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Target(NamedTuple):
    arch: int
    """Compute capability as one number (86 = 8.6), as ``triton.backends.compiler.GPUTarget`` takes it."""
    cards: str
    shared_per_block: int
    """Bytes of shared memory one block may use (opt-in maximum: what Triton's launcher checks against)."""
    regs_per_thread: int = 255
    regs_per_block: int = 65536
    """The register file of one SM (64K 32-bit registers): registers x threads of one block must fit."""


KIB = 1024
TARGETS = {
    80: Target(80, "A100, A30", 163 * KIB),
    86: Target(86, "RTX 3090, A6000, A40, A10", 99 * KIB),
    89: Target(89, "RTX 4090, L40S, L4, RTX 6000 Ada", 99 * KIB),
    90: Target(90, "H100, H200, GH200", 227 * KIB),
}
"""Every target ``compile_check`` builds for, with its per-block limits."""

FUSED_GROUPED_MM_MAJORS = (9, 10)
"""Capability majors where torch 2.13's bf16 ``grouped_mm`` is the fused kernel (Hopper, datacenter Blackwell)."""
MIN_KERNEL_CAPABILITY = (8, 0)
"""Oldest capability the Triton kernels are built for: bf16 ``tl.dot`` needs Ampere's tensor cores."""


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device: the one capability query (tests replace it to fake a card)."""
    return torch.cuda.get_device_capability(device)


def capability_name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def grouped_mm_fused(capability: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether torch's ``grouped_mm`` runs its fused kernel here (else a per-group loop with a host sync)."""
    return capability[0] in FUSED_GROUPED_MM_MAJORS and dtype == torch.bfloat16


def tile_family(capability: tuple[int, int] | None) -> int:
    """Which tile table a capability uses: 80 for sm_8x (``mma.sync``, 255 registers hold the accumulators
    and the epilogue), 90 otherwise (sm_90 ``wgmma``; also the CPU interpreter, ``None``)."""
    return 80 if capability is not None and capability[0] == 8 else 90


def over_limits(row: dict, target: Target, threads: int) -> list[str]:
    """What one compiled kernel (``compile_check`` row) exceeds on ``target``: spills, registers, shared memory."""
    problems = []
    if row.get("stack", 0) or row.get("local", 0):
        problems.append(f"spills (stack {row.get('stack')} B, local {row.get('local')} B)")
    regs = row.get("regs", 0)
    if regs > target.regs_per_thread or regs * threads > target.regs_per_block:
        problems.append(
            f"{regs} registers x {threads} threads > {target.regs_per_thread}/thread, {target.regs_per_block}/block"
        )
    if row["shared"] > target.shared_per_block:
        problems.append(f"shared memory {row['shared']} B > {target.shared_per_block} B per block on sm_{target.arch}")
    return problems
