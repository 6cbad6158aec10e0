"""``NF4Stack``: quantize a fused expert tensor ``(E, out, in)`` to NF4 chunk by chunk, as its rows arrive.

The result's bytes are those of ``bitsandbytes.functional.quantize_4bit(fused, blocksize, quant_type="nf4",
compress_statistics=double_quant)``: NF4 blocks never straddle experts (``out * in`` is a multiple of the
block size), so quantizing any run of whole experts gives the matching slice of the fused result, and the
nested statistics are computed once over the finished ``absmax`` as bitsandbytes does. Packed values and
scales go straight into buffers allocated once on the target device (no ``torch.cat`` of parts at the end).

On CUDA (and any device but the CPU) each chunk goes through bitsandbytes' own ``quantize_4bit`` kernel.
On the CPU, bitsandbytes 0.50 runs a plain-PyTorch kernel whose ``torch.bucketize`` takes ~85% of a
load's CPU time; :func:`quantize_nf4_cpu` performs the same float32 arithmetic (absmax per block, scale,
clamp) and replaces the binary search by counting the 15 code midpoints below each value, which is the
same index by definition (``bucketize`` with ``right=False``), at ~3x the speed. Blocks with a
non-finite scale go through bitsandbytes itself, so even NaN/inf weights give its bytes.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import torch

from .nf4 import NESTED_BLOCKSIZE, NF4Weight

SLAB = 1 << 20  # values quantized per step on the CPU: 4 MiB of float32 scratch, reused (no page faults)


def _nf4_midpoints() -> list[float]:
    code = bnbF.get_4bit_type("nf4", device="cpu")
    ordered = code.sort().values
    return ((ordered[:-1] + ordered[1:]) / 2).tolist()  # what bitsandbytes' CPU kernel bucketizes against


_MIDPOINTS = _nf4_midpoints()


def quantize_nf4_cpu(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed (n // 2, 1) uint8, absmax (n // blocksize,) float32)``: bitsandbytes' NF4 of a CPU tensor.

    ``weight.numel()`` must be a multiple of ``blocksize`` (and ``blocksize`` even).
    """
    flat = weight.reshape(-1)
    n = flat.numel()
    if n % blocksize or blocksize % 2:
        raise ValueError(f"{n} values are not a whole number of {blocksize}-value blocks")
    packed = torch.empty((n // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(n // blocksize, dtype=torch.float32)
    step = max(blocksize, SLAB // blocksize * blocksize)
    scratch = (torch.empty(min(n, step)), torch.empty(min(n, step), dtype=torch.uint8),
               torch.empty(min(n, step), dtype=torch.bool))
    for start in range(0, n, step):
        part = flat[start : start + step]
        stop = start + part.numel()
        blocks = slice(start // blocksize, stop // blocksize)
        _quantize_slab(part, packed[start // 2 : stop // 2], absmax[blocks], blocksize, scratch)
    return packed, absmax


def _quantize_slab(part, packed, absmax, blocksize, scratch) -> None:
    """bitsandbytes' CPU NF4 arithmetic on one slab, in preallocated scratch (float32 values, index, mask)."""
    m = part.numel()
    values, index, mask = (t[:m] for t in scratch)
    values.copy_(part)  # float32, as bitsandbytes' A.float()
    blocks = values.view(-1, blocksize)
    torch.amax(blocks.abs(), dim=-1, out=absmax)
    if not torch.isfinite(absmax).all():  # NaN / inf: let bitsandbytes decide, byte for byte
        ref_packed, state = bnbF.quantize_4bit(part.contiguous(), blocksize=blocksize, quant_type="nf4")
        packed.copy_(ref_packed.view(-1, 1))
        absmax.copy_(state.absmax)
        return
    blocks.mul_((1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1)
    torch.gt(values, _MIDPOINTS[0], out=index)
    for midpoint in _MIDPOINTS[1:]:  # index = number of midpoints below the value = torch.bucketize's answer
        torch.gt(values, midpoint, out=mask)
        index.add_(mask)
    torch.bitwise_or(index[::2] << 4, index[1::2], out=packed.view(-1))


class NF4Stack:
    """Fills an :class:`NF4Weight` of ``shape`` on ``device`` from consecutive chunks of whole experts.

    ``experts=(start, stop)`` fills only those experts (one rank's share under FSDP, ``sharding.ExpertShard``):
    the other experts' packed bytes stay unwritten, and :meth:`finish` takes every expert's scales from
    ``gather``.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device, blocksize: int = 64,
                 experts: tuple[int, int] | None = None):
        num_experts, out_features, in_features = shape
        per_expert = out_features * in_features
        if per_expert % blocksize:
            raise ValueError(f"expert matrices of {out_features}x{in_features} are not a whole number of "
                             f"{blocksize}-value blocks")
        self.shape, self.dtype, self.device, self.blocksize = tuple(shape), dtype, torch.device(device), blocksize
        self.packed = torch.empty((num_experts * per_expert // 2, 1), dtype=torch.uint8, device=self.device)
        self.absmax = torch.empty(num_experts * per_expert // blocksize, dtype=torch.float32, device=self.device)
        self.start, self.stop = experts if experts is not None else (0, num_experts)
        self.filled = self.start  # experts so far
        self.code = bnbF.get_4bit_type("nf4", device=self.device)

    def add(self, chunk: torch.Tensor) -> None:
        """Quantize ``chunk`` (k, out, in), the next ``k`` experts, on this stack's device."""
        if tuple(chunk.shape[1:]) != self.shape[1:] or self.filled + chunk.shape[0] > self.shape[0]:
            raise ValueError(f"chunk {tuple(chunk.shape)} does not continue {self.shape} at expert {self.filled}")
        chunk = chunk.to(device=self.device, dtype=self.dtype)
        per_expert = self.shape[1] * self.shape[2]
        start, stop = self.filled * per_expert, (self.filled + chunk.shape[0]) * per_expert
        if self.device.type == "cpu":
            packed, absmax = quantize_nf4_cpu(chunk, self.blocksize)
        else:
            packed, state = bnbF.quantize_4bit(chunk.contiguous(), blocksize=self.blocksize, quant_type="nf4")
            absmax = state.absmax
        self.packed[start // 2 : stop // 2].copy_(packed.view(-1, 1))
        self.absmax[start // self.blocksize : stop // self.blocksize].copy_(absmax)
        self.filled += chunk.shape[0]

    def finish(self, double_quant: bool = True, gather=None) -> NF4Weight:
        """The finished weight (every expert added); nested statistics as ``quantize_4bit`` computes them.

        For a partial stack, ``gather(own scales)`` returns all experts' float32 scales (a collective)."""
        if self.filled != self.stop:
            raise ValueError(f"only experts {self.start}..{self.filled} of {self.start}..{self.stop} were added")
        absmax, nested = self.absmax, None
        if (self.start, self.stop) != (0, self.shape[0]):
            per_expert = self.shape[1] * self.shape[2] // self.blocksize
            absmax = gather(absmax[self.start * per_expert : self.stop * per_expert])
            if absmax.shape != self.absmax.shape:
                raise ValueError(f"gathered scales {tuple(absmax.shape)}, expected {tuple(self.absmax.shape)}")
        if double_quant:
            offset = absmax.mean()
            qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            nested, absmax = (state2.absmax, state2.code, offset), qabsmax
        return NF4Weight(self.shape, self.dtype, self.blocksize, self.packed, absmax, self.code, nested)
