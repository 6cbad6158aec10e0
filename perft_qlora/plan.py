"""``python -m perft_qlora.plan``: what fine-tuning a model needs in GPU memory, from its config alone.

    python -m perft_qlora.plan --model qwen3-30b-a3b --variant perft --num-experts 4 --top-k 2 --batch 16 --seq 256
    python -m perft_qlora.plan --model path/to/config.json --variant perft_e
    python -m perft_qlora.plan --model all          # the six shipped configs, one table
    python -m perft_qlora.plan --model mixtral-8x7b --gpu-memory 24   # which layers' experts to stream, PCIe budget

The model is built on the ``meta`` device (no weights, no download). Weights are counted as ``load_model``
stores them (``footprint.py``: exact bytes, tested against CPU loads); adapters, their gradients and
AdamW state from the variant's own modules; activations for one micro-batch with activation checkpointing
by a formula (an estimate, not yet checked against a measured ``bench train`` GPU peak). ``--gpu-memory``
keeps as many MoE layers' experts resident as the card allows and streams the rest from host memory
(``quant/expert_placement.py``, the rule ``load_model(offload_experts="auto")`` follows), and prints the
PCIe bytes per step next to the compute (``quant/stream_budget.py``: arithmetic at a stated bandwidth and
throughput, no measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .cli import positive_int
from .errors import PerftQloraError
from .method.config import PerftConfig, default_shape
from .method.variants import BlockFacts, build_adapter
from .quant.arch import ARCHITECTURES, SHIPPED_CONFIGS, decoder_layers
from .quant.expert_placement import ExpertPlacement, place_experts
from .quant.footprint import Footprint, layer_footprints, weight_footprint
from .quant.memory import format_bytes
from .quant.stream_budget import DEFAULT_PCIE_GBPS, DEFAULT_TFLOPS, StreamBudget

KNOWN_MODELS = {name: shipped.hub_id for name, shipped in SHIPPED_CONFIGS.items()}
"""Short name -> hub model whose public config.json is shipped as ``configs/<short name>.json`` (the registry's)."""
GPU_SIZES_GB = (24, 40, 48, 80)
RUNTIME_ALLOWANCE = 2**30
"""CUDA context and allocator slack added to every total: 1 GiB, an assumption, not a measurement."""
GIB = 2**30


class PlanError(PerftQloraError):
    """The --model argument names no config this planner can read."""


def read_config(model: str):
    """(display name, config) for a short name, a hub id of a shipped config, a config.json or a directory."""
    by_hub = {hub.lower(): short for short, hub in KNOWN_MODELS.items()}
    short = model if model in KNOWN_MODELS else by_hub.get(model.lower())
    if short is not None:
        path, name = SHIPPED_CONFIGS[short].path, short
    elif os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        path, name = Path(model) / "config.json", model
    elif os.path.isfile(model):
        path, name = Path(model), model
    else:
        raise PlanError(
            f"--model {model!r} is neither a shipped config ({', '.join(KNOWN_MODELS)}, or 'all') nor a config.json "
            "file or a directory holding one"
        )
    data = json.loads(path.read_text())
    data.pop("quantization_config", None)  # gpt-oss's MXFP4 hub weights: the plan counts what load_model stores
    if "model_type" not in data:
        raise PlanError(f"{path} has no model_type; pass a transformers config.json")
    return name, AutoConfig.for_model(**data)


def moe_facts(config) -> BlockFacts:
    """N, K and the gating of the config's MoE blocks (family table first, then the common config names)."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is not None:
        return BlockFacts(config.hidden_size, arch.num_experts(config), arch.top_k(config),
                          arch.renormalizes_top_k(config), arch.gating)
    num_experts = next(getattr(config, a) for a in ("num_local_experts", "num_experts", "n_routed_experts") if hasattr(config, a))
    gating = "sigmoid" if getattr(config, "scoring_func", "softmax") == "sigmoid" else "softmax"
    return BlockFacts(config.hidden_size, int(num_experts), int(config.num_experts_per_tok),
                      bool(getattr(config, "norm_topk_prob", False)), gating)


def moe_layer_indices(model) -> list[int]:
    arch = ARCHITECTURES.get(model.config.model_type)
    if arch is not None:
        return arch.moe_layers(model)
    return [i for i, layer in enumerate(decoder_layers(model)) if hasattr(getattr(layer, "mlp", None), "experts")]


@dataclass
class AdapterPlan:
    params: int
    params_per_token: int
    bytes_per_param: int

    @property
    def weights(self) -> int:
        return self.params * self.bytes_per_param

    @property
    def grads(self) -> int:
        return self.params * self.bytes_per_param

    @property
    def optimizer(self) -> int:
        return 2 * self.params * self.bytes_per_param  # AdamW: exp_avg and exp_avg_sq, in the parameters' dtype

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def adapter_plan(config: PerftConfig, facts: BlockFacts, num_moe_layers: int, dtype: torch.dtype) -> AdapterPlan:
    """Adapter parameters of every MoE layer, from the variant's own modules built on ``meta``."""
    with torch.device("meta"):
        router, experts = build_adapter(config, facts, dtype)
    per_layer = sum(p.numel() for p in router.parameters()) + sum(p.numel() for p in experts.parameters())
    per_token = router.experts_per_token * experts.params_per_expert + router.params_per_token
    size = torch.empty((), dtype=dtype).element_size()
    return AdapterPlan(per_layer * num_moe_layers, per_token * num_moe_layers, size)


def _linears(module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _norm_elements(layer) -> int:
    """RMSNorms upcast to float32 and keep the float32 input and output: 4 bf16-sized values per normed value.
    Qwen3's per-head q/k norms run on the whole q/k projection output."""
    attn, total = layer.self_attn, 0
    for name, module in layer.named_modules():
        if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            feeder = getattr(attn, {"self_attn.q_norm": "q_proj", "self_attn.k_norm": "k_proj"}.get(name, ""), None)
            total += 4 * (feeder.out_features if feeder is not None else module.weight.numel())
    return total


def _attention_elements(attn) -> int:
    linears = _linears(attn)
    output = getattr(attn, "o_proj", linears[-1])
    return sum(m.out_features for m in linears) + output.in_features  # q/k/v (or MLA's), attention output


def _adapter_elements(facts: BlockFacts, config: PerftConfig, adapter_bytes: int) -> int:
    m = facts.num_experts if config.variant == "perft_e" else (config.num_experts or 1)
    k = {"perft": config.top_k, "perft_e": facts.top_k}.get(config.variant, m)
    per_dtype = facts.hidden_size + 2 * m + k * (config.bottleneck + 2 * facts.hidden_size)  # input copy, logits, experts
    return per_dtype * adapter_bytes // 2


def _layer_elements_per_token(layer, facts: BlockFacts, config: PerftConfig, moe: bool, adapter_bytes: int):
    """(bf16-sized activations one token keeps inside one decoder layer, largest dequantized weight in values)."""
    d = facts.hidden_size
    attn = _linears(layer.self_attn)
    elements = 2 * d + _norm_elements(layer) + _attention_elements(layer.self_attn)  # residual adds
    mlp, lin = layer.mlp, _linears(layer.mlp)  # dense MLP, or shared experts and their gates
    elements += sum(m.out_features for m in lin) + (lin[-1].in_features if lin else 0)
    biggest = max(m.weight.numel() for m in lin + attn)
    if not moe:
        return elements, biggest
    inter = min(p.shape[1:].numel() for p in mlp.experts.parameters() if p.dim() == 3) // d  # I of (E, 2I, H)
    routed = facts.top_k * (2 * d + 3 * inter)  # gathered input, gate/up, activation, weighted output per chosen expert
    router = 3 * facts.num_experts  # logits, float32 scores
    adapter = _adapter_elements(facts, config, adapter_bytes)
    return elements + router + routed + adapter, max(biggest, 3 * d * inter)  # experts dequantized one at a time


def activation_bytes(model, facts: BlockFacts, config: PerftConfig, batch: int, seq: int, adapter_bytes: int = 4) -> int:
    """Estimated peak activation bytes of one training micro-batch with every decoder layer checkpointed.

    ``L·T·D`` checkpointed layer inputs, plus one layer's recomputed activations and their gradients
    (``2 ×`` the largest layer's per-token values ``× T``: projections, routed-expert intermediates, router
    scores, RMSNorms' float32 copies, the adapters in their own dtype), plus the embeddings, final norm and
    their gradients (``4·T·D``), plus the largest weight dequantized for a matmul; bf16 unless said. The
    ``[T, vocab]`` logits are not counted: TRL's fused LM-head loss works in tiles.
    """
    tokens, d = batch * seq, facts.hidden_size
    layers = decoder_layers(model)
    moe = set(moe_layer_indices(model))
    per_layer = [
        _layer_elements_per_token(layer, facts, config, i in moe, adapter_bytes) for i, layer in enumerate(layers)
    ]
    widest = max(e for e, _ in per_layer)
    dequantized = max(w for _, w in per_layer)
    return 2 * (len(layers) * tokens * d + 2 * widest * tokens + 4 * tokens * d + dequantized)


@dataclass
class MemoryPlan:
    name: str
    model_type: str
    loadable: bool
    parameters: int
    layers: int
    moe_layers: int
    facts: BlockFacts
    weights: Footprint
    bf16_weights: int
    adapters: AdapterPlan
    activations: int
    gpus: int = 1
    """FSDP2 over this many GPUs (``examples/accelerate/fsdp.yaml``); 1: the whole model on one GPU."""
    gathered: int = 0
    """Under FSDP, bytes all-gathered whole at the peak: two decoder layers (the one computing and the next,
    prefetched; the largest layer counted twice) and the output embedding (accelerate keeps that unit gathered
    from the end of the forward to the start of the backward)."""
    expert_layer_bytes: tuple[int, ...] = ()
    """NF4 routed-expert bytes of each decoder layer (0 for a dense one)."""
    active_parameters: int = 0
    """Parameters one token goes through: routed experts counted top-k of E."""

    def placement(self, gpu_memory_gib: float) -> ExpertPlacement | None:
        """Experts resident / streamed on a card of ``gpu_memory_gib`` (None: does not fit even all streamed)."""
        budget = int(gpu_memory_gib * GIB) - (self.total - sum(self.expert_layer_bytes))
        placement = place_experts(self.expert_layer_bytes, "auto", max(budget, 0))
        return placement if placement.device_bytes <= budget else None

    def weights_limit(self, gpu_memory_gib: float) -> float:
        """train's ``--gpu-memory-limit`` for this card: what the weights may use once adapters, AdamW state,
        activations and the allowance have their share."""
        return (gpu_memory_gib * GIB - self.adapters_per_gpu - self.activations - RUNTIME_ALLOWANCE) / GIB

    @property
    def weights_per_gpu(self) -> int:
        """All weights on one GPU; under FSDP the rank's shard, what stays whole, and what is gathered at the peak."""
        if self.gpus == 1:
            return self.weights.total
        return self.shard + self.weights.replicated + self.gathered

    @property
    def shard(self) -> int:
        """One GPU's share of the weights FSDP shards."""
        return -(-(self.weights.total - self.weights.replicated) // self.gpus)

    @property
    def adapters_per_gpu(self) -> int:
        return -(-self.adapters.total // self.gpus)

    @property
    def total(self) -> int:
        return self.weights_per_gpu + self.adapters_per_gpu + self.activations + RUNTIME_ALLOWANCE

    def fits(self) -> dict[int, bool]:
        return {size: self.total <= size * GIB for size in GPU_SIZES_GB}


def make_plan(name, model_config, perft_config: PerftConfig, batch: int, seq: int, device: str = "cuda",
              double_quant: bool = True, adapter_dtype: torch.dtype = torch.float32, gpus: int = 1) -> MemoryPlan:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    facts = moe_facts(model_config)
    moe = moe_layer_indices(model)
    return MemoryPlan(
        name=name, model_type=model_config.model_type, loadable=model_config.model_type in ARCHITECTURES,
        parameters=sum(p.numel() for p in model.parameters()), layers=len(decoder_layers(model)), moe_layers=len(moe),
        facts=facts, weights=weight_footprint(model, device, torch.bfloat16, double_quant),
        bf16_weights=sum(p.numel() * 2 for p in model.parameters()),
        adapters=adapter_plan(perft_config, facts, len(moe), adapter_dtype),
        activations=activation_bytes(
            model, facts, perft_config, batch, seq, torch.empty((), dtype=adapter_dtype).element_size()
        ),
        gpus=gpus, gathered=_gathered_bytes(model, device, double_quant) if gpus > 1 else 0,
        expert_layer_bytes=tuple(f.nf4.get("experts", 0) + f.scales.get("experts", 0)
                                 for f in layer_footprints(model, device, torch.bfloat16, double_quant)),
        active_parameters=_active_parameters(model, facts),
    )


def _active_parameters(model, facts: BlockFacts) -> int:
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name and p.dim() == 3)
    return sum(p.numel() for p in model.parameters()) - routed + routed * facts.top_k // facts.num_experts


def format_offload(plan: MemoryPlan, gpu_memory_gib: float, batch: int, seq: int, pcie_gbps: float, tflops: float,
                   checkpointing: bool = True) -> str:
    """The ``--gpu-memory`` lines: resident and streamed layers, PCIe bytes and time next to the compute."""
    placement = plan.placement(gpu_memory_gib)
    head = f"  on {gpu_memory_gib:g} GiB"
    if placement is None:
        return (f"{head}: does not fit even with every MoE layer's experts streamed (needs "
                f"{_gib(plan.total - sum(plan.expert_layer_bytes) + place_experts(plan.expert_layer_bytes, 'all').device_bytes)})")
    budget = StreamBudget(placement, plan.active_parameters, batch * seq, pcie_gbps, tflops, checkpointing)
    train = (f"  train        --offload-experts auto --gpu-memory-limit {plan.weights_limit(gpu_memory_gib):.2f}"
             f"  (GiB for the weights: the card less adapters, AdamW state, activations and the allowance)")
    return "\n".join([f"{head}:", *budget.lines(), train])


def _gathered_bytes(model, device: str, double_quant: bool) -> int:
    largest = max(f.total for f in layer_footprints(model, device, torch.bfloat16, double_quant))
    output = model.get_output_embeddings()
    return 2 * largest + (output.weight.numel() * 2 if output is not None else 0)  # bf16


def _gib(n: int) -> str:
    """GiB with two decimals; small amounts in the largest unit that shows them (MiB, KiB, B)."""
    return format_bytes(n, down_to=10)


def format_plan(plan: MemoryPlan, perft_config: PerftConfig, batch: int, seq: int) -> str:
    f, a = plan.weights, plan.adapters
    dense = ", ".join(f"{dtype} {_gib(n)}" for dtype, n in sorted(f.dense.items()))
    status = "loadable" if plan.loadable else "not loadable by this version (accounted only)"
    fits = ", ".join(f"{size} GB: {'yes' if ok else 'no'}" for size, ok in plan.fits().items())
    lines = [
        (f"{plan.name} ({plan.model_type}; {status}): {plan.parameters / 1e9:.2f} B parameters, {plan.layers} layers "
         f"({plan.moe_layers} MoE), {plan.facts.num_experts} experts, top-{plan.facts.top_k} {plan.facts.gating}"),
        (f"  weights      {_gib(f.total)}: NF4 {_gib(sum(f.nf4.values()))} + scales {_gib(sum(f.scales.values()))}, "
         f"dense {dense}  (all bf16: {_gib(plan.bf16_weights)})"),
        (f"  adapters     {perft_config.variant}: {a.params:,} parameters ({a.params_per_token:,} per token); weights "
         f"{_gib(a.weights)} + grads {_gib(a.grads)} + AdamW state {_gib(a.optimizer)}"),
        (f"  activations  {_gib(plan.activations)} for batch {batch} x {seq} tokens, checkpointing on (estimate: "
         "within 15% of CPU-measured peaks of tiny models; no GPU bench train peak to check it against yet)"),
        *([] if plan.gpus == 1 else [
            (f"  FSDP2 x {plan.gpus}    weights per GPU {_gib(plan.weights_per_gpu)}: shard {_gib(plan.shard)} + whole "
             f"on every GPU {_gib(f.replicated)} + gathered at the peak {_gib(plan.gathered)} (two layers, lm_head); "
             f"adapters + AdamW per GPU {_gib(plan.adapters_per_gpu)}; activations for each GPU's batch of {batch}"),
        ]),
        f"  allowance    {_gib(RUNTIME_ALLOWANCE)} CUDA context and allocator slack (assumed)",
        f"  total        {_gib(plan.total)}  ->  fits {fits}",
    ]
    return "\n".join(lines)


def format_table(plans: list[MemoryPlan]) -> str:
    rows = ["| model | family | loadable | NF4 weights | adapters + AdamW | activations | total | fits |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for p in plans:
        fits = ", ".join(f"{s} GB" for s, ok in p.fits().items() if ok) or "none"
        rows.append(f"| {p.name} | {p.model_type} | {'yes' if p.loadable else 'no'} | {_gib(p.weights.total)} | "
                    f"{_gib(p.adapters.total)} | {_gib(p.activations)} | {_gib(p.total)} | {fits} |")
    return "\n".join(rows)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perft_qlora.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help=f"short name ({', '.join(KNOWN_MODELS)}), 'all', a config.json or a directory; repeatable")
    parser.add_argument("--variant", default="perft", choices=("perft", "perft_e", "perft_d", "perft_s"))
    parser.add_argument("--num-experts", type=int, default=None, help="M (default 4 for perft / perft_d)")
    parser.add_argument("--top-k", type=int, default=None, help="K' (perft; default 2)")
    parser.add_argument("--bottleneck", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch size (the recipe's 16)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (the recipe's 256)")
    parser.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-double-quant", action="store_true", help="plain float32 NF4 scales")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="plan for a card of this many GiB: which MoE layers' experts stay resident, which stream "
                             "from host memory, and the PCIe traffic per step")
    parser.add_argument("--pcie-gbps", type=float, default=DEFAULT_PCIE_GBPS,
                        help="host-to-device bandwidth assumed for --gpu-memory, GB/s")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help="sustained bf16 throughput assumed for the compute time next to the PCIe time, TFLOP/s")
    parser.add_argument("--gpus", type=positive_int, default=1,
                        help="shard over this many GPUs with FSDP2 (examples/accelerate/fsdp.yaml); totals are per GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    num_experts, top_k = default_shape(args.variant, args.num_experts, args.top_k)
    if args.gpu_memory is not None and (args.gpu_memory <= 0 or args.gpus > 1):
        parser.error("--gpu-memory takes a positive size in GiB, for one GPU (offloading is not combined with FSDP)")
    if args.pcie_gbps <= 0 or args.tflops <= 0:
        parser.error("--pcie-gbps and --tflops must be positive")
    try:
        perft_config = PerftConfig(variant=args.variant, num_experts=num_experts, top_k=top_k, bottleneck=args.bottleneck)
        names = [n for m in args.model for n in (KNOWN_MODELS if m == "all" else [m])]
        configs = [read_config(name) for name in names]
    except (PlanError, ValueError) as error:
        parser.error(str(error))
    plans = []
    for name, config in configs:
        plan = make_plan(name, config, perft_config, args.batch, args.seq, double_quant=not args.no_double_quant,
                         adapter_dtype=getattr(torch, args.adapter_dtype), gpus=args.gpus)
        print(format_plan(plan, perft_config, args.batch, args.seq))
        if args.gpu_memory is not None:
            print(format_offload(plan, args.gpu_memory, args.batch, args.seq, args.pcie_gbps, args.tflops))
        print()
        plans.append(plan)
    if len(plans) > 1:
        print(format_table(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
