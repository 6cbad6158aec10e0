"""``python -m perft_qlora.bench gpu-check [--out DIR] [--smoke]``: everything a GPU session measures, in one run.

Stages, in order, each in its own process with its own time box (a failure or a timeout is recorded,
never fatal; the run was sized for 8 minutes on one H100/H200 before the two offload stages, whose time boxes add
4 minutes):

1. ``env``: GPU, capability, memory, driver/CUDA, and the versions of every dependency (missing ones named);
2. ``pytest-gpu``: ``pytest -m gpu`` (bf16 kernels at real shapes, determinism, CUDA-graph decode step);
3. ``kernels``: ``bench kernels`` for OLMoE and Mixtral layers at 1/16/512/4096 tokens, forward and
   backward, every backend, with the bf16 ``grouped_mm`` and bnb dequantize + ``grouped_mm`` baselines;
4. ``train-olmoe-<backend>``: ``bench train`` OLMoE-1B-7B 16x256 for perft_qlora per backend (the first
   also runs the hf-bf16 and bnb-param4 baselines); ``train-mixtral``: Mixtral 4x512 cut to 2 layers;
   ``train-olmoe-offload``: the OLMoE run with a quarter of the MoE layers' experts streamed from host memory
   (its step time against ``train-olmoe-grouped``'s: the overlap); ``train-mixtral-offload``: Mixtral 4x512
   cut to 4 layers, every layer's experts streamed;
5. ``generate``: ``bench generate`` decode tokens/s, one stream and a batch of 8, per backend;
6. ``fsdp-gpu``: the FSDP2 ``gpu`` test (one rank through accelerate's FSDP2 plugin, losses against one GPU),
   last so that its process launches cannot eat the timings' budget.

Writes ``DIR/gpu-check.json`` (every stage: command, seconds, status, output tail, its JSON),
``DIR/benchmarks.md`` (a block for docs/benchmarks.md) and ``DIR/measured.py`` (the backend table of
``perft_qlora/kernels/measured.py``, from the kernel timings: review it, then copy it there).
``--smoke`` runs the same stages on CPU at tiny shapes (Triton interpreter) to keep this script working.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from ..errors import UsageError

TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")
"""The clone's tests/, found from the package's own location (so gpu-check runs from any directory); an installed
wheel has none."""
SMOKE_TIMEOUT = 300
"""Seconds per stage in a smoke run: CPU interpreter runs on a shared CI machine, not a measurement."""
PACKAGES = ("torch", "triton", "bitsandbytes", "transformers", "trl", "peft", "accelerate", "datasets", "dill",
            "multiprocess", "safetensors", "numpy")


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    timeout_s: int
    env: dict
    result_file: str | None = None
    absent: str | None = None
    """Why the stage cannot run here (its tests are not installed); recorded as ``no-tests``, not run."""


def environment() -> dict:
    """Machine, GPU and package versions (None for a package that is not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env = dict(python=platform.python_version(), platform=platform.platform(), packages=versions,
               missing=[n for n, v in versions.items() if v is None], cuda=torch.version.cuda,
               kernels_env=os.environ.get("PERFT_QLORA_KERNELS", "auto"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                   sms=props.multi_processor_count)
    return env


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "perft_qlora.bench", *args]


def stages(out: str, smoke: bool, cache_dir: str) -> list[Stage]:
    """The stage list; ``smoke`` shrinks every stage to tiny CPU shapes (same commands, other flags)."""
    interp = {"TRITON_INTERPRET": "1"} if smoke else {}
    cache = ["--cache-dir", cache_dir]
    tests = [os.path.join(TESTS_DIR, "test_kernels_gpu.py")] if smoke else [TESTS_DIR]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    absent = None if os.path.isdir(TESTS_DIR) else (
        f"no tests/ beside the package ({TESTS_DIR}): an installed wheel has none; run gpu-check from a clone "
        "(pip install -e .) for the pytest stages")
    result = [Stage("pytest-gpu", [*pytest, "-m", "gpu", "-k", "not fsdp and not within_15_percent", *tests], SMOKE_TIMEOUT if smoke else 90, {},
                    absent=absent)]
    kernels = ["--smoke"] if smoke else ["--models", "olmoe,mixtral", "--tokens", "1,16,512,4096"]
    result.append(Stage("kernels", _bench("kernels", *kernels, "--out", f"{out}/kernels.json"), SMOKE_TIMEOUT if smoke else 120,
                        interp, "kernels.json"))
    shape = ["--arch", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0"] if smoke else [
        "--arch", "olmoe-1b-7b", "--batch", "16", "--seq", "256", "--steps", "4", "--warmup", "1"]
    for i, backend in enumerate(["grouped"] if smoke else ["grouped", "triton"]):
        baseline = "hf-bf16,bnb-param4" if i == 0 and not smoke else "none"
        result.append(Stage(f"train-olmoe-{backend}", _bench("train", *shape, "--baseline", baseline, *cache, "--out",
                            f"{out}/train-olmoe-{backend}.json"), SMOKE_TIMEOUT if smoke else 150,
                            {"PERFT_QLORA_KERNELS": backend}, f"train-olmoe-{backend}.json"))
    if not smoke:
        mixtral = ["--arch", "mixtral-8x7b", "--batch", "4", "--seq", "512", "--num-layers", "2", "--steps", "3",
                   "--warmup", "1", "--baseline", "bnb-param4"]
        result.append(Stage("train-mixtral", _bench("train", *mixtral, *cache, "--out", f"{out}/train-mixtral.json"), 50,
                            {"PERFT_QLORA_KERNELS": "grouped"}, "train-mixtral.json"))
    offload = ["--arch", "tiny", "--num-layers", "4", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
               "--offload-experts", "all"] if smoke else [*shape, "--offload-experts", "0.25"]
    result.append(Stage("train-olmoe-offload", _bench("train", *offload, *cache, "--out", f"{out}/train-olmoe-offload.json"),
                        SMOKE_TIMEOUT if smoke else 120, {"PERFT_QLORA_KERNELS": "grouped"}, "train-olmoe-offload.json"))
    if not smoke:
        mixtral_offload = ["--arch", "mixtral-8x7b", "--batch", "4", "--seq", "512", "--num-layers", "4", "--steps", "3",
                           "--warmup", "1", "--offload-experts", "all"]
        result.append(Stage("train-mixtral-offload", _bench("train", *mixtral_offload, *cache, "--out",
                            f"{out}/train-mixtral-offload.json"), 120, {"PERFT_QLORA_KERNELS": "grouped"},
                            "train-mixtral-offload.json"))
    gen = ["--arch", "tiny", "--new-tokens", "2", "--repeats", "1", "--batches", "1,2", "--backends", "grouped,reference"] \
        if smoke else ["--arch", "olmoe-1b-7b", "--new-tokens", "32", "--batches", "1,8", "--backends", "grouped,triton,reference"]
    result.append(Stage("generate", _bench("generate", *gen, *cache, "--out", f"{out}/generate.json"), SMOKE_TIMEOUT if smoke else 90,
                        {}, "generate.json"))
    if not smoke:  # last: FSDP2 on one GPU (issue 17) launches its own processes; it must not starve the timings
        result.append(Stage("fsdp-gpu", [*pytest, "-m", "gpu", "-k", "fsdp", os.path.join(TESTS_DIR, "test_distributed.py")],
                            120, {}, absent=absent))
    return result


def run_stage(stage: Stage, out: str, timeout_s: float) -> dict:
    """Run one stage; never raises. Status: ok, failed (exit code), timeout."""
    record = dict(name=stage.name, argv=stage.argv, env=stage.env, timeout_s=round(timeout_s))
    if stage.absent:
        return {**record, "status": "no-tests", "seconds": 0, "tail": stage.absent}
    start = time.perf_counter()
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    if "TRITON_INTERPRET" not in stage.env:
        env.pop("TRITON_INTERPRET", None)
    try:
        done = subprocess.run(stage.argv, capture_output=True, text=True, env=env, timeout=max(1, timeout_s), check=False)
        record.update(status="ok" if done.returncode == 0 else "failed", returncode=done.returncode,
                      tail=(done.stdout[-3000:] + "\n" + done.stderr[-2000:]).strip())
    except subprocess.TimeoutExpired as expired:
        text = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        record.update(status="timeout", returncode=None, tail=text[-3000:])
    record["seconds"] = round(time.perf_counter() - start, 1)
    path = os.path.join(out, stage.result_file) if stage.result_file else None
    if path and os.path.isfile(path):
        with open(path) as handle:
            record["result"] = json.load(handle)
    return record


def measured_table(kernel_result: dict, capability: str) -> dict[tuple[str, str, str], str]:
    """``measured.MEASURED`` entries from ``bench kernels`` rows: triton where it beat grouped in training.

    Per op and shape class, the time is forward(train) + backward(dx) (the MLP) or forward+backward (the
    adapter); Triton gets the entry only when it was faster at every token count of the class.
    """
    from ..kernels.dispatch import pick_formulation, shape_class
    from .kernels import ADAPTERS, SHAPES

    wins: dict[tuple[str, str, str], list[bool]] = {}
    times: dict[tuple, float] = {}
    for r in kernel_result.get("rows", []):
        if r["passes"] == "forward":
            continue
        times[(r["part"], r["model"], r["tokens"], r["method"])] = times.get((r["part"], r["model"], r["tokens"], r["method"]), 0.0) + r["ms"]
    for (part, model, tokens, method), ms in times.items():
        shape = SHAPES[model]
        if part == "mlp" and method == "nf4-triton":
            other = times.get((part, model, tokens, "nf4-grouped"))
            key = ("nf4_expert_mlp", f"E{shape['experts']}xH{shape['hidden']}xI{shape['inter']}")
        elif part == "adapter" and ": triton-" in method:
            name, form = method.split(": triton-")
            m, _, db = ADAPTERS[name]
            m = m or shape["experts"]
            if form != pick_formulation(m, db):
                continue
            other = times.get((part, model, tokens, f"{name}: grouped-{form}"))
            key = ("routed_adapter", f"M{m}xDB{db}xD{shape['hidden']}")
        else:
            continue
        if other is not None:
            wins.setdefault((capability, key[0], shape_class(tokens, key[1])), []).append(ms < other)
    return {key: "triton" if all(w) else "grouped" for key, w in sorted(wins.items())}


def write_measured(path: str, table: dict, source: str) -> None:
    lines = ['"""Measured backend table (see the docstring of the file this replaces); written by bench gpu-check."""', "",
             f"# {source}", "MEASURED: dict[tuple[str, str, str], str] = {"]
    lines += [f"    {key!r}: {value!r}," for key, value in table.items()] + ["}", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def markdown(env: dict, records: list[dict], command: str) -> str:
    from . import generate, kernels, train

    head = (f"### gpu-check: {env.get('gpu', 'CPU (smoke: measures nothing)')} ({env.get('capability', '-')}), "
            f"torch {env['packages']['torch']}, CUDA {env['cuda']}, triton {env['packages']['triton']}, "
            f"bitsandbytes {env['packages']['bitsandbytes']}")
    lines = [head, "", f"Command: `{command}`", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in records]
    for r in records:
        if "result" not in r:
            continue
        lines += ["", f"#### {r['name']}", ""]
        if r["name"] == "kernels":
            lines.append(kernels.render(r["result"]["rows"], f"device: {r['result']['device']}"))
        elif r["name"].startswith("train"):
            lines += ["```", train.render(r["result"]["results"]), "```"]
        elif r["name"] == "generate":
            lines.append(generate.render(r["result"]))
    return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perft_qlora.bench gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-check", help="directory for the JSON, markdown and table (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter): tests the script")
    p.add_argument("--only", default=None, help="comma list of stage names to run (default: all)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages together (default: 480, smoke 1500)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "perft_qlora", "bench"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise UsageError("gpu-check needs a CUDA GPU; --smoke runs the same stages on CPU at tiny shapes")
    budget = args.budget or (1500.0 if args.smoke else 480.0)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    start, env, records = time.perf_counter(), environment(), []
    print(json.dumps(env, indent=1), flush=True)
    for stage in stages(out, args.smoke, args.cache_dir):
        if args.only and stage.name not in args.only.split(","):
            continue
        left = budget - (time.perf_counter() - start)
        record = run_stage(stage, out, min(stage.timeout_s, left)) if left > 5 else dict(name=stage.name, status="skipped",
                                                                                          seconds=0, tail="no time left")
        records.append(record)
        print(f"[gpu-check] {stage.name}: {record['status']} in {record['seconds']} s", flush=True)
    kernel_result = next((r.get("result") for r in records if r["name"] == "kernels"), None)
    table = measured_table(kernel_result, env.get("capability", "cpu")) if kernel_result else {}
    write_measured(os.path.join(out, "measured.py"), table, f"{env.get('gpu', 'cpu')}, torch {env['packages']['torch']}")
    command = "python -m perft_qlora.bench gpu-check " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(out, "benchmarks.md"), "w") as handle:
        handle.write(markdown(env, records, command))
    summary = dict(env=env, stages=records, measured={" / ".join(k): v for k, v in table.items()},
                   seconds=round(time.perf_counter() - start, 1))
    with open(os.path.join(out, "gpu-check.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"[gpu-check] wrote {out}/gpu-check.json, benchmarks.md, measured.py in {summary['seconds']} s")
    for record in records:
        if record["status"] == "no-tests":
            print(f"[gpu-check] {record['name']}: not run: {record['tail']}", flush=True)
    return 0 if all(r["status"] in ("ok", "no-tests") for r in records) else 1
