"""Several processes (``accelerate launch``): each rank's device, launch checks, and cross-rank reductions.

What runs where under data parallel (``accelerate launch --multi_gpu --num_processes N``, DDP):

- every rank loads the whole NF4 model straight onto its own device (``cuda:LOCAL_RANK``), never GPU 0;
  DDP does not broadcast buffers (``ddp_broadcast_buffers=False``: the NF4 expert bytes are buffers);
- the Trainer splits each optimizer step's examples over the ranks; DDP averages the adapter gradients;
- the token-level loss is normalised by the token count of *all* ranks (the Trainer's
  ``average_tokens_across_devices``), so it equals the single-process loss of the same global batch;
- the balance losses (base router's ``aux_loss``, PERFT router's ``perft_aux_loss``) are computed per rank
  on that rank's micro-batch, and DDP averages their gradients: the result is the *mean of per-rank balance
  losses*, exactly what one process computes with ``--grad-accum N`` over the same micro-batches, and not
  the balance loss of the concatenated global batch (``f·P`` is not linear in the batch);
- logged ``loss``, ``aux_loss`` and ``perft_aux_loss`` are means over ranks (and accumulation steps);
  ``routing/L{i}_*`` are computed from expert counts summed over the ranks' latest micro-batches;
- only rank 0 writes checkpoints, the adapter and the log lines; each rank writes its own RNG state
  (``rng_state_{rank}.pth``) into the checkpoint, as the Trainer does.

Sharded (``accelerate launch --config_file examples/accelerate/fsdp.yaml``, FSDP2): the same averages, with the
gradients reduce-scattered instead of all-reduced. Each rank loads the model into host memory (``load_device``),
reading and quantizing only the routed experts FSDP will keep on it (``expert_shard``; the rest of the model, a
few percent of it, whole), :func:`~perft_qlora.quant.sharding.shardable_storage` turns the 4-bit storage into
parameters, and accelerate's ``fully_shard`` (one unit per decoder layer) moves each rank's 1/N of every layer
to its GPU. Checkpoints hold whole tensors (adapter, optimizer state) gathered from the shards and written by
rank 0 (``trainer.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import UsageError
from ..method.model import iter_perft_blocks
from ..method.stats import balance_log
from ..quant.sharding import ExpertShard

if TYPE_CHECKING:
    from .train_options import TrainOptions

# Options that may differ between ranks without changing what is trained.
RANK_LOCAL_OPTIONS = ("device",)


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE``, set by torchrun / ``accelerate launch``); 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``); 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank_device(requested: str | None) -> str:
    """The device this rank loads its model onto: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher.

    Without it every rank would load onto the current device, GPU 0, before the Trainer picks the rank's
    GPU (N copies of the model on one card). Refuses a fixed ``cuda:K`` with several ranks and a rank
    without a GPU of its own.
    """
    requested = requested or ("cuda" if torch.cuda.is_available() else "cpu")  # --device's default
    device = torch.device(requested)
    if device.type != "cuda" or world_size() == 1:
        return requested
    if device.index is not None:
        raise UsageError(
            f"--device {requested} would put all {world_size()} ranks on the same GPU; pass --device cuda "
            "(each rank then takes cuda:LOCAL_RANK)"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank() >= count:
        raise UsageError(
            f"rank with LOCAL_RANK {local_rank()} has no GPU of its own ({count} visible on this node); "
            f"launch at most {count} processes per node, or --device cpu"
        )
    torch.cuda.set_device(local_rank())
    return f"cuda:{local_rank()}"


def per_rank_batch_size(global_batch_size: int, grad_accum: int) -> int:
    """``--global-batch-size G`` as examples per rank and step, ``G / (ranks · --grad-accum)``; refuses a remainder."""
    per_step = world_size() * grad_accum
    if global_batch_size % per_step:
        raise UsageError(
            f"--global-batch-size {global_batch_size} is not divisible by {world_size()} rank(s) x --grad-accum "
            f"{grad_accum} = {per_step}; pick a multiple of {per_step} or change the process count"
        )
    return global_batch_size // per_step


def check_engine(options: TrainOptions) -> None:
    """Refuse options that cannot run under the engine ``accelerate launch`` chose (read from its env vars)."""
    engine = launch_engine()
    if engine == "fsdp":
        check_fsdp(options)
    if engine == "deepspeed":
        raise UsageError("DeepSpeed is not supported; launch with --config_file examples/accelerate/ddp.yaml "
                         "(or fsdp.yaml to shard the model)")
    if world_size() > 1 and engine != "fsdp" and (options.offload_experts == "all" or options.gpu_memory_limit):
        raise UsageError("--offload-experts / --gpu-memory-limit run in one process only (accelerate refuses a model "
                         "with offloaded parts in data parallel); drop them or launch a single process")
    if world_size() > 1 and options.backend == "unsloth":
        raise UsageError("--backend unsloth runs in one process only; drop it or launch a single process")


def check_fsdp(options: TrainOptions) -> None:
    """What the FSDP path supports: FSDP2, PERFT variants, our activation checkpointing, parameters on the GPU."""
    env = os.environ.get
    fix = "; see examples/accelerate/fsdp.yaml"
    if env("FSDP_VERSION", "1") != "2":
        raise UsageError(f"FSDP version {env('FSDP_VERSION', '1')} is not supported, only FSDP2: set "
                         f"fsdp_version: 2 in the accelerate config{fix}")
    if options.variant == "lora":
        raise UsageError("--variant lora is not supported under FSDP (its peft checkpoints would gather the "
                         "whole 4-bit model); train it data parallel (examples/accelerate/ddp.yaml) or on one GPU")
    if env("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true" and options.gradient_checkpointing:
        raise UsageError("fsdp_activation_checkpointing and --gradient-checkpointing both recompute layers: "
                         f"set fsdp_activation_checkpointing: false (train's --gradient-checkpointing does it){fix}")
    if options.offload_experts == "all" or options.gpu_memory_limit is not None:
        raise UsageError("--offload-experts / --gpu-memory-limit are not supported under FSDP (it shards the experts "
                         "across GPUs instead); drop them or launch without FSDP")
    if env("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise UsageError(f"fsdp_offload_params is not supported (untested with the NF4 storage): set it to "
                         f"false{fix}")


def expert_shard() -> ExpertShard | None:
    """Under FSDP with several ranks: the routed experts this rank loads (those FSDP keeps on it), else None."""
    if launch_engine() != "fsdp" or world_size() == 1:
        return None
    return ExpertShard(rank=int(os.environ.get("RANK", "0")), world=world_size(), gather=gather_from_ranks)


_HOST_GROUP = None  # a gloo group for host tensors when the default group is NCCL (created on first use)


def gather_from_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's equally sized ``local``, concatenated in rank order (host tensors: a gloo group)."""
    global _HOST_GROUP
    if dist.get_backend() != "gloo" and _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")  # NCCL moves GPU tensors only; the loader's are in host memory
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous(), group=_HOST_GROUP)
    return torch.cat(parts)


def load_device(device: str) -> str:
    """Where this rank loads the model: its GPU, except under FSDP, where the model (with only this rank's
    experts) stays in host memory until ``fully_shard`` moves the rank's shard of each layer to the GPU, so a
    model bigger than one card loads."""
    return "cpu" if launch_engine() == "fsdp" else device


def launch_engine() -> str:
    """``fsdp``, ``deepspeed``, ``ddp`` (several processes) or ``single``, from the launcher's environment."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp" if world_size() > 1 else "single"


def options_fingerprint(options: TrainOptions) -> str:
    """A digest of every option that decides what is trained (not the rank's own device)."""
    values = {k: v for k, v in sorted(dataclasses.asdict(options).items()) if k not in RANK_LOCAL_OPTIONS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_options(fingerprints: list[str]) -> None:
    """Refuse a run whose ranks parsed different options (e.g. a different ``--config`` file per node)."""
    if len(set(fingerprints)) > 1:
        groups = {}
        for rank, value in enumerate(fingerprints):
            groups.setdefault(value, []).append(rank)
        detail = "; ".join(f"ranks {ranks}: {value}" for value, ranks in groups.items())
        raise UsageError(
            f"the ranks were started with different options (fingerprints {detail}); give every node the "
            "same command line and --config file"
        )


def prepare_ranks(options: TrainOptions) -> None:
    """Run every launch check (no-op checks in one process); the rank's device and batch size are already in
    ``options`` (``train_options.resolve``).

    Starts the process group early (accelerate's ``PartialState``, the one the Trainer reuses) so that the
    ranks can compare their options before any model is loaded.
    """
    check_engine(options)
    if world_size() > 1:
        check_same_options(gather_fingerprints(options, options.device))


def gather_fingerprints(options: TrainOptions, device: str) -> list[str]:
    """Every rank's :func:`options_fingerprint`, in rank order (starts the process group)."""
    from accelerate import PartialState

    PartialState(cpu=not device.startswith("cuda"))
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, options_fingerprint(options))
    return gathered


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first and the other ranks after it (deleting old checkpoints, writing files)."""
    parallel = world_size() > 1 and dist.is_available() and dist.is_initialized()
    if parallel and not is_main_process():
        dist.barrier()
    yield
    if parallel and is_main_process():
        dist.barrier()


def routing_log(model) -> dict[str, float]:
    """The trainer's ``routing/L{i}_imbalance`` / ``_entropy`` logs of the latest micro-batch, with the expert
    counts of every rank summed (a collective: every rank must call it; one process: its own counts)."""
    return balance_log(expert_fractions(model))


def expert_fractions(model) -> dict[int, list[float]]:
    """Per PERFT layer, each PEFT expert's share of the latest micro-batch's (token, slot) assignments,
    with the counts summed over all ranks (a collective: every rank must call it)."""
    blocks = [(i, b) for i, b in iter_perft_blocks(model) if b.last_routing is not None]
    if not blocks:
        return {}
    counts = torch.stack([
        torch.bincount(b.last_routing.indices.detach().reshape(-1), minlength=b.perft_experts.num_experts).float()
        for _, b in blocks
    ])  # (layers, M)
    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    shares = counts / counts.sum(dim=-1, keepdim=True)
    return {i: row.tolist() for (i, _), row in zip(blocks, shares)}
