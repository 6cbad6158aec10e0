"""Look inside a MoE model and its PERFT adapters: where the PEFT experts sit and how tokens are routed.

    python -m perft_qlora.analyze --model perft-demo/base --adapter perft=perft-demo/adapter \\
        --data perft_qlora/data/demo/test.json
    python -m perft_qlora.analyze --model allenai/OLMoE-1B-7B-0924 --adapter perft=runs/perft/adapter \\
        --adapter perft_e=runs/perft-e/adapter --layers 0,7,15 --data commonsense_170k.json --out analysis/olmoe

Per chosen layer of the NF4 base (dequantizing one expert at a time): the base router's expert vectors,
a sample of each expert's key memory vectors and each adapter's PEFT router vectors and down-projection
rows, compared by cosine similarity and drawn in one 2-D projection (PCA; UMAP with ``umap-learn``).
With ``--data`` (rows in the prompt template the first adapter was trained with, ``released`` by default):
each router's expert load and entropy on real tokens, and how often the PEFT router agrees with the base
router. Writes ``analysis.json`` (every number), ``report.md`` and PNG plots
(matplotlib: ``pip install -e ".[analyze]"``) to ``--out``, by default ``analysis/`` beside the first
adapter, where the comparison app's info panel finds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

from transformers import AutoConfig

from ..cli import add_debug_option, error_path, positive_int
from ..errors import UsageError
from ..formats.prompts import DEFAULT_TEMPLATE, get_template
from ..formats.records import read_records
from ..method.adapters import named_adapters, recorded_training
from ..quant.arch import get_arch
from .analysis import analyze, read_adapter_spec
from .analysis_report import PLOTS_NEED, default_out_dir, write_analysis


class InputError(UsageError):
    """A bad command-line input, reported as one ``error:`` line before any model loads (``cli.error_path``)."""


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """``"0,3,8-11"`` or ``"all"`` / None -> sorted layer indices, each checked against ``num_layers``."""
    if spec is None or spec.strip() == "all":
        return list(range(num_layers))
    layers = set()
    for part in spec.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            span = range(int(first), int(last) + 1) if sep else [int(first)]
        except ValueError:
            raise InputError(f"--layers {spec!r}: write layer numbers like 0,3,8-11 (or all)") from None
        layers.update(span)
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad or not layers:
        raise InputError(f"--layers {spec}: layer(s) {bad} do not exist; the model has {num_layers} decoder layers "
                         f"(0..{num_layers - 1})")
    return sorted(layers)


def parse_adapters(values: list[str], config) -> list:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> checked ``AdapterSpec``s, in order."""
    named = named_adapters(values, reserved=("base", "random"))  # the report's own rows
    return [read_adapter_spec(name, directory, config) for name, directory in named.items()]


def projection_method(choice: str) -> str:
    has_umap = importlib.util.find_spec("umap") is not None
    if choice == "umap" and not has_umap:
        raise InputError('--projection umap needs umap-learn: pip install -e ".[umap]" (or use --projection pca)')
    return ("umap" if has_umap else "pca") if choice == "auto" else choice


def training_template(adapters: list) -> str:
    """The prompt template the adapters were trained with (``extra.training.template`` in their
    ``perft_config.json``; ``released`` where unrecorded or with no adapter); the first adapter's if they differ."""
    trained = [recorded_training(s.metadata).get("template") or DEFAULT_TEMPLATE for s in adapters]
    if len(set(trained)) > 1:
        named = ", ".join(f"{s.name}: {t}" for s, t in zip(adapters, trained))
        print(f"warning: the adapters were trained with different templates ({named}); --data is routed in "
              f"{adapters[0].name}'s", file=sys.stderr)
    return trained[0] if trained else DEFAULT_TEMPLATE


def load_texts(args, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Up to ``--max-texts`` LLM-Adapters rows of ``--data``, as training showed them: ``template``'s prompt
    followed by the output (``data.to_prompt_completion``)."""
    if args.data is None:
        return []
    records = read_records(args.data, required=("instruction", "output"), split=args.data_split)
    print(records.report(), file=sys.stderr)
    render = get_template(template).train
    return [render(r["instruction"], r.get("input", ""), "") + r["output"] for r in records.rows[: args.max_texts]]


def main(argv: list[str] | None = None) -> dict:
    """Check every input, load the NF4 base, analyse, write; returns the paths written.

    Bad input ends as one ``error:`` line and exit status 1 before the model loads (``cli.error_path``)."""
    args = make_parser().parse_args(argv)
    with error_path(args.debug, on_interrupt=lambda: "nothing was written"):
        return _analyze(args, argv)


def _check_inputs(args):
    """``(layers, adapters, projection, template, texts)``, every input checked before loading."""
    if args.model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(args.model)):
        raise InputError(f"--model {args.model}: no such directory")
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(args.model))
    except (OSError, ValueError) as err:
        raise InputError(f"--model {args.model}: cannot read its config ({str(err).splitlines()[0]})") from None
    get_arch(config)
    layers = parse_layers(args.layers, config.num_hidden_layers)
    adapters = parse_adapters(args.adapter, config)
    projection = projection_method(args.projection)
    template = training_template(adapters)
    return layers, adapters, projection, template, load_texts(args, template)


def _analyze(args, argv: list[str] | None) -> dict:
    layers, adapters, projection, template, texts = _check_inputs(args)
    out_dir = args.out or default_out_dir([s.directory for s in adapters])
    from ..quant.loader import load_model  # after the checks: importing the loader pulls in bitsandbytes

    model, tokenizer = load_model(os.path.expanduser(args.model), device=args.device, progress=True)
    token_ids = [tokenizer(t, truncation=True, max_length=args.max_length, return_tensors="pt").input_ids[0]
                 for t in texts]
    result = analyze(model, adapters, layers, token_ids or None, keys=args.keys, keys_per_expert=args.keys_per_expert,
                     projection=projection, seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    if texts:
        result["settings"]["template"] = template
    command = "python -m perft_qlora.analyze " + shlex.join(argv if argv is not None else sys.argv[1:])
    written = write_analysis(result, out_dir, command)
    if not written["plots"]:
        print(f"note: {PLOTS_NEED}", file=sys.stderr)
    print(f"wrote {written['report']}, {os.path.basename(written['json'])} and {len(written['plots'])} plot(s)")
    return written



def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perft_qlora.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: a save_pretrained directory or a Hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="a PERFT adapter directory (repeatable); NAME defaults to the folder name")
    p.add_argument("--layers", help="layers to analyse, e.g. 0,3,8-11 (default: all)")
    p.add_argument("--data", help="LLM-Adapters rows (.json/.jsonl or a datasets hub name) whose tokens to route")
    p.add_argument("--data-split", default="train", help="split of a hub data set (default: %(default)s)")
    p.add_argument("--max-texts", type=positive_int, default=32, help="rows of --data to route (default: %(default)s)")
    p.add_argument("--max-length", type=positive_int, default=256, help="tokens per row, truncated (default: %(default)s)")
    p.add_argument("--keys", choices=("gate", "up"), default="gate",
                   help="which projection's rows are the experts' key vectors (default: %(default)s)")
    p.add_argument("--keys-per-expert", type=positive_int, default=32,
                   help="key vectors sampled per base expert (default: %(default)s)")
    p.add_argument("--projection", choices=("auto", "pca", "umap"), default="auto",
                   help="2-D map: auto = UMAP when umap-learn is installed, else PCA (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="key sampling and UMAP seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--out", help="output directory (default: analysis/ beside the first adapter, else ./analysis)")
    add_debug_option(p)
    return p


if __name__ == "__main__":
    main()
