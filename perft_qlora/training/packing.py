"""``train --packing``: TRL's best-fit-decreasing packing, checked on the loaded model before it is used.

With ``packing=True`` TRL packs whole examples into rows of ``--max-length`` tokens and collates them
padding-free: one flat sequence per batch, ``position_ids`` restarting at 0 where an example starts, and no
attention mask. Two things must then hold, and this module makes sure they do:

- **No attention across examples.** transformers 5 builds the attention mask from ``position_ids`` when no mask
  is given (``masking_utils.find_packed_sequence_indices``: block-diagonal for eager / SDPA / flex, the varlen
  kernels for flash attention), but only without a KV cache (TRL's ``compute_loss`` passes ``use_cache=False``)
  and only for models whose attention goes through those helpers. So the loaded
  model is probed: a short random sequence packed after another must give the logits it gives alone
  (:func:`packing_leak`); a model where it does not is refused in one line.
- **Balance losses over real tokens only.** A padding-free batch has no padding, so every token in it is a real
  one: the PERFT router's loss (``method.losses.perft_balance_loss``, attention mask None) and the base router's
  (transformers' ``load_balancing_loss_func`` inside the model) both average over exactly the examples' tokens.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

PROBE_LENGTHS = (5, 7)
"""Tokens in the two probe sequences."""
LEAK_TOLERANCE = 0.25
"""Largest accepted :func:`packing_leak`: low-precision kernels on other shapes (NF4 / bf16: a few percent of a
real leak) stay far below it; attention across the boundary gives 1."""


@torch.no_grad()
def packing_leak(model, seed: int = 0) -> float:
    """How far the second of two random sequences moves when packed after the first, as a fraction of how far it
    moves when it plainly follows the first (full causal attention over both): 0 when nothing crosses, 1 when
    everything does. Measured on its logits (max absolute difference)."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    first, second = (torch.randint(2, vocab, (1, n), generator=generator).to(device) for n in PROBE_LENGTHS)
    both = torch.cat([first, second], dim=1)  # (1, T)
    alone = model(input_ids=second, use_cache=False).logits.float()  # (1, n2, V)
    positions = torch.cat([torch.arange(n, device=device) for n in PROBE_LENGTHS])[None]  # (1, T), restarts at 0
    packed = model(input_ids=both, position_ids=positions, use_cache=False).logits.float()[:, first.shape[1]:]
    following = model(input_ids=both, use_cache=False).logits.float()[:, first.shape[1]:]
    reach = (following - alone).abs().max().clamp_min(1e-6)
    return ((packed - alone).abs().max() / reach).item()


def check_packing_backend(backend: str) -> None:
    """Before loading: the probe covers transformers' attention, not a backend that replaces it (Unsloth)."""
    if backend != "default":
        raise UsageError(f"--packing is checked with the default backend only, not --backend {backend}; "
                         "drop one of them")


def check_packing(model) -> None:
    """Refuse ``--packing`` for a model whose attention would cross packed examples' boundaries."""
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        leak = packing_leak(model)
    finally:
        model.train(was_training)
    if not leak <= LEAK_TOLERANCE:
        kind = getattr(model.config, "_attn_implementation", None) or "its"
        raise UsageError(f"--packing: this model's attention ({kind}) lets packed examples see each other ("
                         f"{leak:.0%} of the full effect in a probe); train without --packing")
