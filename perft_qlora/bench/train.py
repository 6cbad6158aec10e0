"""``python -m perft_qlora.bench train``: training speed and memory, perft_qlora against the standard recipes.

    python -m perft_qlora.bench train --arch olmoe-1b-7b --batch 16 --seq 256 --baseline hf-qlora,hf-bf16,bnb-param4
    python -m perft_qlora.bench train --arch mixtral-8x7b --batch 4 --seq 512 --num-layers 8 --baseline bnb-param4
    python -m perft_qlora.bench train --arch tiny --steps 2 --warmup 1     # CPU: checks the harness, measures nothing
    python -m perft_qlora.bench train --arch olmoe-1b-7b --num-layers 8 --offload-experts 0.25   # a quarter streamed
    python -m perft_qlora.bench train --arch olmoe-1b-7b --seq 1024 --lengths uniform:64-1024 --packing   # padded vs packed

A random-weight checkpoint at the architecture's real shapes is written once to ``--cache-dir`` and every
setup loads it from disk as a user would. Each setup runs in its own process (so peaks do not mix) and trains
through the same TRL ``SFTTrainer`` loop on random tokens with activation checkpointing; the first
``--warmup`` steps are excluded and tokens/s is taken from the median step time. Setups:

- ``perft_qlora``: ``load_model`` (every big weight NF4, experts included) + PERFT (``--variant``...);
  ``--offload-experts all`` or a fraction streams that share of the MoE layers' experts from host memory
  (``quant/expert_offload.py``; spread evenly, as ``load_model(offload_experts="auto")`` places them).
- ``hf-qlora``: ``BitsAndBytesConfig(load_in_4bit)`` + ``prepare_model_for_kbit_training`` + peft LoRA r=16 on
  attention (the recipe users follow today; its experts stay bf16, bitsandbytes issue #1849).
- ``hf-bf16``: bf16 model, ``experts_implementation="grouped_mm"``, LoRA on attention.
- ``bnb-param4``: the bf16 model with bitsandbytes' ``replace_parameter_4bit`` (NF4, double quant) on every
  fused expert tensor, grouped_mm, LoRA on attention (the strongest 4-bit path the libraries offer).

Prints a table and writes JSON (``--out``): load seconds (wall, and CPU user/system in the JSON), peak memory
while loading (the device's on CUDA, else the host's) with the host peak split into anonymous and file-backed
resident pages (mapped checkpoint pages count, as the OOM killer counts them), weights in memory, peak memory
while training, tokens/s. On a CPU the training peak is the process's peak RSS.

Packing: ``--lengths uniform:MIN-MAX`` draws each example's length (seeded, MAX <= ``--seq``) instead of
every example being ``--seq`` tokens, and enough examples for ``--warmup + --steps`` full steps of
``--batch x --seq`` tokens; each setup then trains one epoch over them, padded to the longest in its batch.
``--packing`` adds a ``SETUP+packing`` row per setup: the same examples through TRL's own packing
(``SFTConfig(packing=True)``: best-fit decreasing into rows of ``--seq``, padding-free), after the probe
``train --packing`` runs (``training/packing.py``; a model it refuses gets a failed row). Tokens/s then
counts real (non-pad) tokens over the timed steps, divided by their time; the JSON also has each run's real
and pad tokens and its padding share (pad / all tokens the model saw).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from ..cli import HelpFormatter
from ..errors import UsageError
from ..quant.load_report import LoadMeter
from ..quant.memory import peak_memory_bytes
from .isolate import run_each_in_own_process
from .random_checkpoint import ARCHES, CACHE_DIR, cached_checkpoint

SETUPS = ("perft_qlora", "hf-qlora", "hf-bf16", "bnb-param4")
PACKED = "+packing"
"""Suffix of a setup's packed run (``--packing``)."""
GIB = 2**30


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _attention_lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, config)


def build_model(setup: str, path: str, args):
    """(model, tokenizer) for ``setup``, ready to train."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = args.device
    if setup == "perft_qlora":
        from ..method.config import PerftConfig
        from ..method.model import attach_perft
        from ..quant.loader import load_model

        model, tokenizer = load_model(path, device=device, progress=False, **_offload_kwargs(path, args))
        top_k = args.top_k if args.variant == "perft" else None
        experts = args.num_experts if args.variant in ("perft", "perft_d") else None
        attach_perft(model, PerftConfig(variant=args.variant, num_experts=experts, top_k=top_k,
                                        bottleneck=args.bottleneck), dtype=torch.float32)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if setup == "hf-qlora":
        from peft import prepare_model_for_kbit_training

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map=device)
        return _attention_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device,
                                                 experts_implementation="grouped_mm")
    if setup == "bnb-param4":
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        for module in model.modules():
            for name in ("gate_up_proj", "down_proj"):
                if isinstance(getattr(module, name, None), torch.nn.Parameter) and getattr(module, name).dim() == 3:
                    replace_parameter_4bit(module, name, compress_statistics=True, quant_type="nf4")
    return _attention_lora(model), tokenizer


def offload_fraction(text: str) -> float:
    """``--offload-experts``: none (0), all (1) or the fraction of MoE layers streamed, in [0, 1]."""
    value = {"none": 0.0, "all": 1.0}.get(text)
    if value is None:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass none, all or a fraction of the MoE layers in [0, 1]")
    return value


def _offload_kwargs(path: str, args) -> dict:
    """``load_model`` arguments streaming ``args.offload_experts`` of the MoE layers (rounded to whole layers, spread
    evenly; ``auto`` would keep a layer resident whenever streaming it saves nothing, as with two or fewer)."""
    fraction = getattr(args, "offload_experts", 0.0)
    if fraction in (0.0, 1.0):
        return {"offload_experts": "all" if fraction else "none"}
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..quant.expert_placement import expert_layer_bytes, spread

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    layer_bytes = expert_layer_bytes(meta)
    moe = tuple(i for i, n in enumerate(layer_bytes) if n)
    return {"offload_experts": spread(moe, max(1, round(fraction * len(moe))))}


class _StepTimer:
    """Trainer callback: wall time of every optimizer step (device synchronised)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def lengths_spec(text: str) -> tuple[int, int]:
    """``--lengths uniform:MIN-MAX``: (MIN, MAX), each example's length drawn uniformly in [MIN, MAX]."""
    kind, _, span = text.partition(":")
    low, _, high = span.partition("-")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = (0, 0)
    if kind != "uniform" or not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: pass uniform:MIN-MAX with 1 <= MIN <= MAX, e.g. uniform:16-256")
    return bounds


def random_examples(args, vocab: int) -> list[list[int]]:
    """The random token ids every setup trains on (seed 0): ``--batch x (--warmup + --steps)`` rows of ``--seq``
    tokens, or with ``--lengths`` examples of drawn lengths until they hold that many tokens (so that packed
    into rows of ``--seq`` they fill at least ``--warmup + --steps`` steps)."""
    generator = torch.Generator().manual_seed(0)
    if args.lengths is None:
        rows = torch.randint(0, min(vocab, 256), (args.batch * (args.warmup + args.steps), args.seq), generator=generator)
        return rows.tolist()
    low, high = args.lengths
    examples, total = [], 0
    while total < args.batch * args.seq * (args.warmup + args.steps):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        examples.append(torch.randint(0, min(vocab, 256), (length,), generator=generator).tolist())
        total += length
    return examples


def _counting(trainer_cls):
    """``trainer_cls`` that records (real, pad) tokens of every training step's batch: the attention mask's ones
    of a padded batch; every token of a padding-free (packed) one, which has no mask and no padding."""

    class Counting(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_counts = []

        def training_step(self, model, inputs, *rest, **kwargs):
            ids = inputs["input_ids"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            self.token_counts.append((real, ids.numel() - real))
            return super().training_step(model, inputs, *rest, **kwargs)

    return Counting


def run_setup(setup: str, path: str, args) -> dict:
    """Load, then train ``warmup + steps`` steps of ``setup``; returns the measurements."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ..training.packing import check_packing
    from ..training.trainer import PerftSFTTrainer

    base, packing = setup.removesuffix(PACKED), setup.endswith(PACKED)
    with LoadMeter(args.device) as meter:  # host peak as anonymous + file-backed pages, device peak
        model, tokenizer = build_model(base, path, args)
    load, weights = meter.report, _weights_bytes(model)
    if packing:
        check_packing(model)  # as train --packing: refused in one line where packed examples would see each other
    dataset = Dataset.from_dict({"input_ids": random_examples(args, model.config.vocab_size)})
    on_cpu = not str(args.device).startswith("cuda")
    # Fixed lengths: warmup + steps steps. Drawn lengths: one epoch, so padded and packed see the same examples.
    length = {"max_steps": args.warmup + args.steps} if args.lengths is None else {"num_train_epochs": 1}
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, **length, per_device_train_batch_size=args.batch, packing=packing,
            learning_rate=1e-5, logging_steps=10_000, save_strategy="no", report_to=["none"], max_length=args.seq,
            activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
            use_cpu=on_cpu, bf16=not on_cpu, dataloader_pin_memory=not on_cpu, disable_tqdm=True,
        )
        timer = _StepTimer()
        callback = type("StepTimer", (TrainerCallback,), {"on_step_begin": timer.on_step_begin, "on_step_end": timer.on_step_end})()
        trainer_cls = _counting(PerftSFTTrainer if base == "perft_qlora" else SFTTrainer)
        trainer = trainer_cls(model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
        _reset_peak()
        trainer.train()
    if len(timer.times) <= args.warmup:
        raise UsageError(f"{setup}: {len(timer.times)} steps, none after --warmup {args.warmup}; lower --warmup")
    step = statistics.median(timer.times[args.warmup:])
    counts = trainer.token_counts[:len(timer.times)]
    real, pad = sum(c[0] for c in counts), sum(c[1] for c in counts)
    timed_real = sum(c[0] for c in counts[args.warmup:])
    tokens_per_s = args.batch * args.seq / step if args.lengths is None else timed_real / sum(timer.times[args.warmup:])
    return {
        "setup": setup, "load_s": load.seconds, "load_user_s": load.user_s, "load_sys_s": load.sys_s,
        "load_peak_gib": (load.device_peak if load.device_peak is not None else load.host.peak) / GIB,
        "load_host_peak_gib": load.host.peak / GIB, "load_host_anon_gib": load.host.peak_anon / GIB,
        "load_host_file_gib": load.host.peak_file / GIB, "weights_gib": weights / GIB,
        "train_peak_gib": peak_memory_bytes()[1] / GIB, "step_s": step, "tokens_per_s": tokens_per_s,
        "steps_timed": len(timer.times) - args.warmup, "real_tokens": real, "pad_tokens": pad,
        "padding_share": pad / max(1, real + pad),
        "offloaded_layers": len(getattr(getattr(model, "expert_placement", None), "offloaded", ())),
        "kernels": {"requested": os.environ.get("PERFT_QLORA_KERNELS", "auto"), **_kernel_choices()},
    }


def _kernel_choices() -> dict:
    from ..kernels import backend_choices  # the compute backend per op, as chosen during this run

    return backend_choices()


def render(rows: list[dict], tokens: bool = False) -> str:
    """The table; ``tokens`` adds the real-token and padding-share columns (``--lengths`` / ``--packing``)."""
    width = max(12, *(len(r["setup"]) + 1 for r in rows))
    head = (f"{'setup':<{width}} {'load s':>8} {'load peak':>10} {'host anon':>10} {'host file':>10} {'weights':>9} "
            f"{'train peak':>11} {'tokens/s':>10}" + (f" {'real tokens':>12} {'pad share':>9}" if tokens else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setup']:<{width}} failed: {r['error']}")
            continue
        lines.append(f"{r['setup']:<{width}} {r['load_s']:>8.1f} {r['load_peak_gib']:>8.2f} G "
                     f"{r['load_host_anon_gib']:>8.2f} G "
                     f"{r['load_host_file_gib']:>8.2f} G {r['weights_gib']:>7.2f} G "
                     f"{r['train_peak_gib']:>9.2f} G {r['tokens_per_s']:>10,.0f}"
                     + (f" {r['real_tokens']:>12,} {r['padding_share']:>9.1%}" if tokens else ""))
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perft_qlora.bench train", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHES), help="shapes to build (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=None, help="cut the model to this many decoder layers (default: all of the architecture's)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lengths", type=lengths_spec, default=None, metavar="uniform:MIN-MAX",
                   help="draw each example's length (seeded, MAX <= --seq) and train one epoch over them "
                        "(default: every example --seq tokens)")
    p.add_argument("--packing", action="store_true",
                   help="also run each setup packed (TRL packing, padding-free) on the same examples: SETUP+packing")
    p.add_argument("--variant", default="perft", choices=("perft", "perft_e", "perft_d", "perft_s"),
                   help="PERFT variant of the perft_qlora setup (default: %(default)s)")
    p.add_argument("--num-experts", type=int, default=4, help="M (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=2, help="K' (default: %(default)s)")
    p.add_argument("--bottleneck", type=int, default=16, help="DB (default: %(default)s)")
    p.add_argument("--baseline", default="none", help=f"comma list of {', '.join(SETUPS[1:])}, or none (default: %(default)s)")
    p.add_argument("--offload-experts", type=offload_fraction, default=0.0, metavar="none|all|FRACTION",
                   help="perft_qlora: stream this share of the MoE layers' experts from host memory (default: none)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where each setup trains: cuda, cuda:1, cpu ... (default: cuda when available, else cpu)")
    p.add_argument("--cache-dir", default=CACHE_DIR,
                   help="where the random-weight checkpoint is written once and reused (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one setup in this process
    return p


def setup_runs(baselines: list[str], packing: bool) -> list[str]:
    """The rows, in order: perft_qlora then each baseline, each followed by its packed run with ``--packing``."""
    return [run for setup in ["perft_qlora", *baselines] for run in (setup, setup + PACKED)[:1 + packing]]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    baselines = [] if args.baseline == "none" else [b.strip() for b in args.baseline.split(",") if b.strip()]
    unknown = sorted(set(baselines) - set(SETUPS[1:]))
    if unknown:
        raise UsageError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(SETUPS[1:])}")
    if args.lengths is not None and args.lengths[1] > args.seq:
        raise UsageError(f"--lengths uniform:{args.lengths[0]}-{args.lengths[1]} is longer than --seq {args.seq}; "
                         f"lower its MAX or raise --seq")
    path = cached_checkpoint(args.arch, args.num_layers, args.cache_dir)
    name = os.path.basename(path)
    if args.only:
        print(json.dumps(run_setup(args.only, path, args)))
        return 0
    rows = run_each_in_own_process("train", argv if argv is not None else sys.argv[1:], setup_runs(baselines, args.packing))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lengths = f"{args.seq}" if args.lengths is None else f"{args.lengths[0]}-{args.lengths[1]} (uniform)"
    print(f"{name}, batch {args.batch} x {lengths} tokens, {args.variant}, device {device}")
    print(render(rows, tokens=args.lengths is not None or args.packing))
    if args.out:
        spec = None if args.lengths is None else f"uniform:{args.lengths[0]}-{args.lengths[1]}"
        with open(args.out, "w") as handle:
            json.dump({"arch": name, "batch": args.batch, "seq": args.seq, "device": device, "lengths": spec,
                       "packing": args.packing, "results": rows}, handle, indent=2)
    return 0 if all("error" not in r for r in rows) else 1

