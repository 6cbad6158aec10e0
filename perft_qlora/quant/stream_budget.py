"""``StreamBudget``: the PCIe traffic of streaming offloaded experts in a training step, next to its compute.

Arithmetic, not a measurement. With :class:`~perft_qlora.quant.expert_offload.ExpertStager` a streamed layer's
experts cross the bus twice per micro-batch: once in the forward pass, once for the checkpoint recompute and
the backward together (they share one staging; without checkpointing the backward alone re-stages). The compute
of a step is ``8 · N_active · T`` FLOPs with checkpointing (forward 2, recompute 2, backward 4: input gradients
through the frozen weights, 2, and the adapters' weight gradients, counted at 2 as if every weight had one:
an upper bound), ``6 · N_active · T`` without. The stream hides behind compute when it takes less time than
the compute at the stated bandwidth and throughput (the copy of the next streamed layer runs while the current
one and the resident layers before it compute; evenly spread streamed layers are assumed).
"""

from __future__ import annotations

from dataclasses import dataclass

from .expert_placement import ExpertPlacement

TRANSFERS_PER_STEP = 2
"""Copies of each streamed layer per micro-batch (forward; recompute + backward)."""
DEFAULT_PCIE_GBPS = 25.0
"""Host-to-device bandwidth assumed by default, GB/s (PCIe 4.0 x16 pinned copies are commonly ~25)."""
DEFAULT_TFLOPS = 50.0
"""Sustained bf16 throughput assumed by default, TFLOP/s (an assumption to override, not a measurement)."""


@dataclass(frozen=True)
class StreamBudget:
    placement: ExpertPlacement
    active_parameters: int
    """Parameters one token goes through (routed experts counted top-k of E)."""
    tokens: int
    """Tokens per micro-batch (batch x sequence)."""
    pcie_gbps: float = DEFAULT_PCIE_GBPS
    tflops: float = DEFAULT_TFLOPS
    checkpointing: bool = True

    @property
    def bytes_per_step(self) -> int:
        return TRANSFERS_PER_STEP * self.placement.host_bytes

    @property
    def stream_seconds(self) -> float:
        return self.bytes_per_step / (self.pcie_gbps * 1e9)

    @property
    def flops_per_step(self) -> float:
        return (8 if self.checkpointing else 6) * self.active_parameters * self.tokens

    @property
    def compute_seconds(self) -> float:
        return self.flops_per_step / (self.tflops * 1e12)

    @property
    def hidden(self) -> bool:
        """Whether the stream takes no longer than the compute (it can then overlap it entirely)."""
        return self.stream_seconds <= self.compute_seconds

    def lines(self) -> list[str]:
        p = self.placement
        if not p.offloaded:
            return [f"  offload      none needed: all {len(p.moe_layers)} MoE layers' experts resident"]
        verdict = "hides behind compute" if self.hidden else "does NOT hide behind compute (the step waits on PCIe)"
        return [
            (f"  offload      {len(p.offloaded)} of {len(p.moe_layers)} MoE layers' experts in pinned host memory "
             f"({p.host_bytes / 2**30:.2f} GiB of host RAM), {len(p.resident)} resident; experts on the GPU "
             f"{p.device_bytes / 2**30:.2f} GiB (incl. two staging buffers {p.staging_bytes / 2**30:.2f} GiB)"),
            (f"  PCIe         {self.bytes_per_step / 1e9:.1f} GB per step ({TRANSFERS_PER_STEP} copies of each streamed "
             f"layer) = {self.stream_seconds:.2f} s at {self.pcie_gbps:g} GB/s (assumed) vs compute "
             f"{self.flops_per_step:.2e} FLOP = {self.compute_seconds:.2f} s at {self.tflops:g} TFLOP/s (assumed): "
             f"the stream {verdict}"),
        ]
