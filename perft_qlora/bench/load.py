"""``python -m perft_qlora.bench load``: load time and memory of ``load_model`` against the HF routes.

    python -m perft_qlora.bench load --arch olmoe-1b-7b --device cpu
    python -m perft_qlora.bench load --arch olmoe-1b-7b --num-layers 2 --baseline hf-qlora,hf-bf16

Writes (once) the same random-weight checkpoint as ``bench train`` and loads it in a fresh process per setup,
as a user would: ``perft_qlora`` (``load_model``, NF4 everywhere), ``hf-qlora`` (``BitsAndBytesConfig
(load_in_4bit)``, experts stay bf16) and ``hf-bf16``. Reports wall and CPU seconds (user, system), the host
peak while loading split into anonymous and file-backed resident pages (``/proc/self/status``; mapped
checkpoint pages count), the device peak on CUDA, and the bytes of weights the model holds. HF's loaders map
the checkpoint lazily: their peaks grow as weights are first read, after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from ..errors import UsageError
from ..quant.host_memory import HostPeak
from .isolate import run_each_in_own_process
from .random_checkpoint import ARCHES, CACHE_DIR, cached_checkpoint

SETUPS = ("perft_qlora", "hf-qlora", "hf-bf16")
GIB = 2**30


def _load(setup: str, path: str, device: str):
    if setup == "perft_qlora":
        from ..quant.loader import load_model

        return load_model(path, device=device, progress=False)[0]
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if setup == "hf-qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map=device)


def measure_load(setup: str, path: str, device: str) -> dict:
    """Load ``path`` with ``setup`` in this process and return the measurements (GiB, seconds)."""
    import transformers  # noqa: F401  (import cost is not load cost)

    from ..quant import loader  # noqa: F401

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with HostPeak() as host:
        model = _load(setup, path, device)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    r = host.report
    return {
        "setup": setup, "load_s": seconds, "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime, "host_peak_gib": gib(r.peak), "host_peak_anon_gib": gib(r.peak_anon),
        "host_peak_file_gib": gib(r.peak_file), "host_start_gib": gib(r.start), "host_end_gib": gib(r.end),
        "device_peak_gib": gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
        "weights_gib": weights / GIB, "threads": torch.get_num_threads(),
    }


def gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def render(rows: list[dict]) -> str:
    head = (f"{'setup':<12} {'load s':>8} {'user s':>8} {'sys s':>7} {'host peak':>10} {'anon':>7} {'file':>7} "
            f"{'device':>8} {'weights':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setup']:<12} failed: {r['error']}")
            continue
        dev = "-" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.2f} G"
        lines.append(f"{r['setup']:<12} {r['load_s']:>8.1f} {r['user_s']:>8.1f} {r['sys_s']:>7.1f} "
                     f"{r['host_peak_gib']:>8.2f} G {r['host_peak_anon_gib']:>5.2f} G "
                     f"{r['host_peak_file_gib']:>5.2f} G "
                     f"{dev:>8} {r['weights_gib']:>6.2f} G")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perft_qlora.bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHES), help="shapes to build (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=None, help="cut the model to this many decoder layers")
    p.add_argument("--baseline", default="none", help=f"comma list of {', '.join(SETUPS[1:])}, or none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one setup in this process
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    baselines = [] if args.baseline == "none" else [b.strip() for b in args.baseline.split(",") if b.strip()]
    unknown = sorted(set(baselines) - set(SETUPS[1:]))
    if unknown:
        raise UsageError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(SETUPS[1:])}")
    path = cached_checkpoint(args.arch, args.num_layers, args.cache_dir)
    name = os.path.basename(path)
    if args.only:
        print(json.dumps(measure_load(args.only, path, args.device)))
        return 0
    rows = run_each_in_own_process("load", argv if argv is not None else sys.argv[1:], ["perft_qlora", *baselines])
    print(f"{name}, device {args.device}, torch threads {rows[0].get('threads', '?')}")
    print(render(rows))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"arch": name, "device": args.device, "results": rows}, handle, indent=2)
    return 0 if all("error" not in r for r in rows) else 1
