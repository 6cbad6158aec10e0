"""``accelerate launch --config_file examples/accelerate/fsdp.yaml tests/fsdp_on_cpu.py TRAIN-OPTIONS...``:
``perft_qlora.train`` under accelerate's FSDP2 in CPU processes (gloo), for tests/test_distributed.py.

accelerate (1.15) turns FSDP on only for GPU process groups: with the same config on CPU its state stays
``MULTI_CPU`` and the Trainer runs plain DDP without a word. This script sets, for a CPU process group, the two
things accelerate sets for a GPU one (``distributed_type = FSDP`` and the plugin it built from the launcher's
environment). Everything after that is accelerate's and the Trainer's own code: ``fully_shard`` per decoder
layer, the Trainer's FSDP branches, and our trainer's FSDP checkpoints. What CPU processes cannot show (moving
each shard to its GPU, bf16 mixed precision over the 4-bit storage) is the ``gpu`` test's part.

With ``PERFT_QLORA_SHARD_REPORT=DIR`` each rank writes ``DIR/rank{R}.json`` after its first step: the local
and whole shapes of one tensor of each kind (NF4 expert storage, NF4 attention linear, adapter).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import accelerate.state
from transformers import TrainerCallback

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_state_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == accelerate.state.DistributedType.MULTI_CPU:
        self.distributed_type = accelerate.state.DistributedType.FSDP
        self.fsdp_plugin = plugin


def _describe(tensor) -> dict:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return {"type": type(tensor).__name__, "dtype": str(tensor.dtype), "local": list(local.shape),
            "whole": list(tensor.shape), "device": str(local.device)}


class ShardReport(TrainerCallback):
    """After step 1: each rank's view of the sharded model (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != 1:
            return
        layer = model.model.layers[0]
        tensors = {
            "nf4_experts": layer.mlp.base.experts.gate_up_proj.packed,
            "nf4_linear": layer.self_attn.q_proj.weight,
            "adapter": layer.mlp.perft_experts.down,
        }
        report = {name: _describe(tensor) for name, tensor in tensors.items()}
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{os.environ['RANK']}.json"), "w") as handle:
            json.dump(report, handle)


def main(argv: list[str]) -> None:
    """``python -m perft_qlora.train``'s ``main`` with the shard report added to its callbacks."""
    from perft_qlora.cli import error_path
    from perft_qlora.training.demo import run_demo
    from perft_qlora.training.train import run
    from perft_qlora.training.train_options import parse_args

    accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
    args = parse_args(argv)
    report_dir = os.environ.get("PERFT_QLORA_SHARD_REPORT")
    train = functools.partial(run, callbacks=[ShardReport(report_dir)] if report_dir else None)
    with error_path(args.debug):
        if args.demo:
            run_demo(args, train)
        else:
            train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
