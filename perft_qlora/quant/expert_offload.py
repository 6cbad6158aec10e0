"""``ExpertStager``: offloaded layers' NF4 experts copied into two reusable compute buffers, one layer ahead.

An offloaded MoE layer keeps its NF4 expert storage (:class:`~perft_qlora.quant.nf4.NF4Weight`: packed bytes,
scales, nested scales, code books) at "home", in host memory (pinned when the compute device is CUDA). The
stager owns two staging slots on the compute device, each a pair of ``NF4Weight`` modules (``gate_up_proj``,
``down_proj``) shaped like one layer's. Offloaded layers are numbered in model order (their *ordinal*); ordinal
``j`` always computes from slot ``j % 2``, so consecutive offloaded layers alternate slots, and the slot an
autograd node saved in its context (the kernels keep the ``NF4Weight`` handle, not a copy) is the slot that
layer is staged into again before its backward runs.

:meth:`acquire` (called by :class:`~perft_qlora.quant.nf4_experts.NF4Experts` when layer ``j`` computes) makes
sure slot ``j % 2`` holds layer ``j`` (staging it if it does not), makes the compute stream wait for that copy,
then starts copying the next layer *in the current direction* into the other slot: ``j + 1`` in a forward pass,
``j - 1`` in backward. The direction is given by the backward hook (``-1``), or read from the order of
requests: a request below the previous one is a checkpoint recompute in backward (reverse layer order), above
it a forward pass, ordinal 0 always starts a forward pass. Under gradient checkpointing a layer's recompute and
its backward share one staging, so a streamed layer crosses the bus twice per training step (forward; recompute
and backward), and without checkpointing also twice (forward; backward).

No buffer is overwritten while a layer still computes from it: a copy into a slot is issued on the side stream
after ``wait_stream(compute)``, so it starts once every kernel queued so far (those reading the slot's previous
layer included) has finished; the compute stream waits on the copy's event before the layer's kernels. Nothing
waits on the host. On the CPU the copies are plain synchronous ``copy_`` (host "home" and host "compute"
buffers), the same code path, which is what the CPU tests exercise; a test copier that defers each copy until
it is waited on stands in for a slow asynchronous stream.

Not built: decode-time streaming of only the experts the router picked (with a cache of recently used ones);
generation streams whole layers like training does.
"""

from __future__ import annotations

import logging

import torch

from .nf4 import NF4Weight

logger = logging.getLogger(__name__)

WEIGHTS = ("gate_up_proj", "down_proj")


class HostCopier:
    """Copies on the CPU: synchronous ``copy_``; nothing to wait for."""

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int):
        for dst, src in pairs:
            dst.copy_(src)

    def wait(self, ticket) -> None:
        pass


class CudaCopier:
    """Copies on a side CUDA stream: after the compute stream's queued work, an event per slot to wait on."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.events = [torch.cuda.Event(), torch.cuda.Event()]

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last readers are queued before
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            self.events[slot].record(self.stream)
        return self.events[slot]

    def wait(self, ticket) -> None:
        if ticket is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket)


def _storage(weight: NF4Weight) -> dict[str, torch.Tensor]:
    return {**weight._buffers, **{k: v for k, v in weight._parameters.items() if v is not None}}


def _empty_like_weight(weight: NF4Weight, device: torch.device) -> NF4Weight:
    """An ``NF4Weight`` of the same shapes and dtypes whose tensors are fresh, uninitialised ones on ``device``."""
    tensors = {name: torch.empty_like(t, device=device) for name, t in _storage(weight).items()}
    nested = (tensors["absmax2"], tensors["code2"], tensors["offset"]) if weight.nested else None
    return NF4Weight(weight.shape, weight.dtype, weight.blocksize, tensors["packed"], tensors["absmax"],
                     tensors["code"], nested)


def _signature(experts) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for w in WEIGHTS for name, t in _storage(getattr(experts, w)).items())


class ExpertStager:
    """Double-buffered staging of the offloaded layers' experts (``experts``: their ``NF4Experts`` in model order)."""

    def __init__(self, experts: list, device: torch.device | str, copier=None):
        self.device = torch.device(device)
        self.experts = list(experts)
        if not self.experts:
            raise ValueError("no offloaded layers to stage")
        if len({_signature(e) for e in self.experts}) != 1:
            raise ValueError("offloaded layers' experts differ in shape; one pair of staging buffers cannot hold them")
        self.copier = copier or (CudaCopier(self.device) if self.device.type == "cuda" else HostCopier())
        count = min(2, len(self.experts))
        self.slots = [{w: _empty_like_weight(getattr(self.experts[0], w), self.device) for w in WEIGHTS}
                      for _ in range(count)]
        self.owner: list[int | None] = [None] * count
        self.tickets: list = [None] * count
        self.last: int | None = None
        self.direction = 1
        self.copies = 0
        """Layer copies issued so far (host to compute buffer)."""
        for ordinal, module in enumerate(self.experts):
            module.stager, module.stage_ordinal = self, ordinal

    @property
    def bytes_per_layer(self) -> int:
        """Bytes one layer's staging moves (every storage tensor of both weights)."""
        return sum(t.numel() * t.element_size() for w in WEIGHTS for t in _storage(getattr(self.experts[0], w)).values())

    def buffers(self) -> list[torch.Tensor]:
        """Every staging tensor (two slots' worth): allocated once, reused for every layer."""
        return [t for slot in self.slots for w in WEIGHTS for t in _storage(slot[w]).values()]

    def _stage(self, ordinal: int) -> None:
        slot = ordinal % len(self.slots)
        home = self.experts[ordinal]
        pairs = []
        for w in WEIGHTS:
            source, target = _storage(getattr(home, w)), _storage(self.slots[slot][w])
            pairs.extend((target[name], source[name]) for name in target)
        self.owner[slot] = ordinal
        self.tickets[slot] = self.copier.copy(pairs, slot)
        self.copies += 1

    def acquire(self, ordinal: int, direction: int | None = None) -> tuple[NF4Weight, NF4Weight]:
        """Layer ``ordinal``'s ``(gate_up_proj, down_proj)`` in its compute buffer, ready for the compute stream;
        the next layer in the current direction starts copying into the other buffer."""
        if direction is None:
            if ordinal == 0:
                direction = 1
            elif self.last is not None and ordinal != self.last:
                direction = 1 if ordinal > self.last else -1
            else:
                direction = self.direction
        self.direction, self.last = direction, ordinal
        slot = ordinal % len(self.slots)
        if self.owner[slot] != ordinal:
            self._stage(ordinal)
        self.copier.wait(self.tickets[slot])
        ahead = ordinal + direction
        if 0 <= ahead < len(self.experts) and self.owner[ahead % len(self.slots)] != ahead:
            self._stage(ahead)
        staged = self.slots[slot]
        return staged["gate_up_proj"], staged["down_proj"]

    def backward_hook(self, ordinal: int):
        """A tensor hook for layer ``ordinal``'s expert output: runs before the experts' backward and stages them
        (into the same slot the forward used, the one the autograd context holds)."""

        def hook(grad: torch.Tensor) -> None:
            self.acquire(ordinal, direction=-1)

        return hook

    def detach(self) -> None:
        """Stop staging: the layers compute from their home storage again (wherever it is)."""
        for module in self.experts:
            module.stager, module.stage_ordinal = None, None

    def __repr__(self) -> str:
        return (f"ExpertStager({len(self.experts)} offloaded layers, {len(self.slots)} buffers of "
                f"{self.bytes_per_layer / 2**20:.1f} MiB on {self.device})")
