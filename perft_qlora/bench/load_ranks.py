"""One rank's load under FSDP2 (only the experts it keeps) against a whole load, in N CPU processes.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 -m perft_qlora.bench.load_ranks \\
        --arch olmoe-1b-7b --num-layers 4 --mode shard        # and --mode whole

Rank 0 writes (once) the random-weight checkpoint ``bench load`` uses; every rank then loads it on the CPU
(where FSDP ranks load before ``fully_shard`` moves their shards to a GPU) and prints one JSON line: host peak
(``VmHWM`` after a reset, with the resident set before loading), checkpoint bytes read, wall seconds. ``shard``
passes :class:`~perft_qlora.quant.sharding.ExpertShard` as ``perft_qlora.train`` does under FSDP; ``whole``
loads everything, as under DDP.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from ..quant.host_memory import HostPeak
from ..quant.loader import load_model
from ..quant.sharding import ExpertShard
from ..training.distributed import gather_from_ranks
from .random_checkpoint import ARCHES, CACHE_DIR, cached_checkpoint

GIB = 2**30


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m torch.distributed.run ... -m perft_qlora.bench.load_ranks")
    p.add_argument("--arch", default="olmoe-1b-7b", choices=sorted(ARCHES))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--mode", default="shard", choices=("shard", "whole"))
    p.add_argument("--cache-dir", default=CACHE_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        cached_checkpoint(args.arch, args.num_layers, args.cache_dir, progress=False)
    dist.barrier()
    path = cached_checkpoint(args.arch, args.num_layers, args.cache_dir)  # written by rank 0: found, not rewritten
    shard = ExpertShard(rank, world, gather_from_ranks) if args.mode == "shard" else None
    start = time.perf_counter()
    with HostPeak() as peak:
        model, _ = load_model(path, device="cpu", progress=False, experts_shard=shard)
    report = peak.report
    print(json.dumps({
        "rank": rank, "ranks": world, "mode": args.mode, "arch": args.arch, "layers": args.num_layers,
        "wall_s": round(time.perf_counter() - start, 1), "host_peak_gib": round(report.peak / GIB, 3),
        "before_gib": round(report.start / GIB, 3), "read_gib": round(model.load_report.bytes_read / GIB, 3),
    }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
