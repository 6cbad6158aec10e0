"""``python -m perft_qlora.bench generate``: greedy decode tokens/s of an NF4 model with PERFT, per kernel backend.

    python -m perft_qlora.bench generate --arch olmoe-1b-7b --batches 1,8 --backends grouped,triton,reference
    python -m perft_qlora.bench generate --arch tiny --new-tokens 4      # CPU: checks the script, measures nothing

A random-weight checkpoint at the architecture's real shapes (``random_checkpoint.py``, shared with
``bench train``) is loaded once with ``load_model`` (NF4 experts) and PERFT attached (up-projections
randomised so the adapter does work). For each backend (``PERFT_QLORA_KERNELS``, read on every call) and
batch size: one untimed warm-up generation, then ``--repeats`` timed ones of exactly ``--new-tokens``
tokens after a ``--prompt`` token prompt; tokens/s = batch x new tokens / median seconds (prefill
included: it is one step of ``--new-tokens``). Writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..errors import UsageError
from .random_checkpoint import ARCHES, CACHE_DIR, cached_checkpoint

BACKENDS = ("auto", "grouped", "triton", "reference")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_seconds(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> list[float]:
    """Seconds of each timed greedy generation of exactly ``new_tokens`` tokens (after one warm-up)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    seconds = []
    for i in range(repeats + 1):
        _sync(ids.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **kwargs)
        _sync(ids.device)
        if i:  # the first run warms up (kernel compilation, caches)
            seconds.append(time.perf_counter() - start)
    return seconds


def run(args) -> dict:
    from ..kernels import backend_choices
    from ..method.config import PerftConfig
    from ..method.model import attach_perft
    from ..quant.loader import load_model

    path = cached_checkpoint(args.arch, args.num_layers, args.cache_dir, progress=False)
    name = os.path.basename(path)
    model, _ = load_model(path, device=args.device, progress=False)
    top_k = args.top_k if args.variant == "perft" else None
    experts = args.num_experts if args.variant in ("perft", "perft_d") else None
    perft = PerftConfig(variant=args.variant, num_experts=experts, top_k=top_k, bottleneck=args.bottleneck, dropout=0.0)
    attach_perft(model, perft, dtype=torch.float32)  # fp32 masters, as training leaves them
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.abs().max() == 0:
                param.normal_(0.0, 0.02)  # zero-initialised up-projections would let the adapter be skipped
    model.eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for backend in args.backends.split(","):
        os.environ["PERFT_QLORA_KERNELS"] = backend
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt), generator=generator).to(args.device)
            row = dict(backend=backend, batch=batch, new_tokens=args.new_tokens)
            try:
                seconds = _decode_seconds(model, ids, args.new_tokens, args.repeats)
                row.update(seconds=statistics.median(seconds), tokens_per_s=batch * args.new_tokens / statistics.median(seconds))
            except Exception as error:  # noqa: BLE001 - record and go on: one backend failing is a result
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            row["choices"] = backend_choices()
            rows.append(row)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    return dict(arch=name, variant=args.variant, prompt=args.prompt, device=device, torch=torch.__version__, rows=rows)


def render(result: dict) -> str:
    lines = [f"{result['arch']}, {result['variant']}, prompt {result['prompt']} tokens, device {result['device']}", "",
             "| backend | batch | new tokens | s | tokens/s | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['new_tokens']} | - | - | {r['error'][:80]} |")
        else:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['new_tokens']} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | |")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perft_qlora.bench generate", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHES), help="shapes to build (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=None, help="cut the model to this many decoder layers")
    p.add_argument("--variant", default="perft", choices=("perft", "perft_e", "perft_d", "perft_s"))
    p.add_argument("--num-experts", type=int, default=4, help="M (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=2, help="K' (default: %(default)s)")
    p.add_argument("--bottleneck", type=int, default=16, help="DB (default: %(default)s)")
    p.add_argument("--backends", default="grouped,triton,reference", help="comma list of " + ", ".join(BACKENDS))
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (streams) (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    unknown = sorted(set(args.backends.split(",")) - set(BACKENDS))
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    result = run(args)
    print(render(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0 if all("error" not in r for r in result["rows"]) else 1
