"""Router capture: what every MoE layer's base router and PERFT router chose, for analysis and the app.

The one recorder of the package. It hooks the router *instances* (forward hooks, removed by ``remove`` or
on leaving a ``with`` block; no class is patched), like transformers' ``OutputRecorder`` declares capture of a
named submodule's output. Each router call appends ``(weights (T, K) float32, indices (T, K) int64)`` on the
CPU to ``base[layer]`` / ``peft[layer]``. Layers whose block is a dense MLP (DeepSeek's first ones) route
nothing and have no entry. The trainer's routing logs read ``PerftMoEBlock.last_routing`` instead: the block
keeps its latest routing anyway for the balance loss, so training adds no hook.
"""

from __future__ import annotations

import torch

from ..quant.arch import decoder_layers, get_arch
from .layer import PerftMoEBlock

Choice = tuple[torch.Tensor, torch.Tensor]
"""``(weights, indices)`` of one router call: (T, K) float32 and (T, K) int64, on the CPU."""


class RouterRecorder:
    """Record every router call of ``model`` while attached.

    ``last_token_only``: keep only each call's last row (T = 1), the position that predicts the next token
    when generating one sequence (the app's per-token trace).
    """

    def __init__(self, model, last_token_only: bool = False):
        arch = get_arch(model.config)
        self.rows = slice(-1, None) if last_token_only else slice(None)
        self.base: dict[int, list[Choice]] = {}
        self.peft: dict[int, list[Choice]] = {}
        self.handles = []
        for i, layer in enumerate(decoder_layers(model)):
            block = getattr(layer, arch.moe_block)
            if not arch.is_moe_block(block):
                continue
            if isinstance(block, PerftMoEBlock):
                self._hook(self.base, i, getattr(block.base, arch.router), lambda out: (out[1], out[2]))
                self._hook(self.peft, i, block.perft_router, lambda out: (out.weights, out.indices))
            else:  # the router returns (logits, weights, indices): quant/arch.py's contract
                self._hook(self.base, i, getattr(block, arch.router), lambda out: (out[1], out[2]))

    def _hook(self, store: dict[int, list[Choice]], layer: int, module, unpack) -> None:
        store[layer] = []

        def record(_module, _args, output):
            weights, indices = unpack(output)  # (T, K), (T, K)
            store[layer].append((weights[self.rows].detach().float().cpu(), indices[self.rows].detach().cpu()))

        self.handles.append(module.register_forward_hook(record))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> RouterRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @staticmethod
    def indices(calls: list[Choice]) -> torch.Tensor:
        """(sum of T, K) expert ids of all the recorded calls of one router, in call order."""
        return torch.cat([idx for _, idx in calls])

    @staticmethod
    def weights(calls: list[Choice]) -> torch.Tensor:
        """(sum of T, K) gate weights of all the recorded calls of one router, in call order."""
        return torch.cat([w for w, _ in calls])
