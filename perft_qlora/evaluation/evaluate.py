"""Evaluate a base model and PERFT adapters on the paper's reasoning tasks (LLM-Adapters test sets).

    python -m perft_qlora.evaluate --model allenai/OLMoE-1B-7B-0924 \\
        --adapter perft=runs/perft-top2-8/adapter --tasks commonsense --data-dir LLM-Adapters/dataset \\
        --output-dir eval/perft-top2-8

The NF4 base model is loaded once and evaluated, then each adapter is attached, evaluated and detached.
Test files are read from ``<data-dir>/<task folder>/test.json`` (LLM-Adapters' ``dataset/`` layout) or from
``--test-file TASK=PATH_OR_HUB_NAME``. Your own test set: ``--data [NAME=]FILE`` (rows with ``instruction``,
optional ``input`` and ``answer``), scored by ``--match exact|contains|regex:PATTERN|choice`` (own_data.py);
with ``--data`` only those are run unless ``--tasks`` is given too. Writes ``predictions.jsonl`` (every row, as it goes), ``summary.json``
and ``results.md``; ``--resume`` continues a stopped run. Tasks: boolq piqa siqa hellaswag winogrande arc-e
arc-c obqa addsub multiarith singleeq gsm8k aqua svamp demo; groups: commonsense, math, all.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from .._version import __version__
from ..cli import add_debug_option, error_path, positive_int
from ..formats.chat_templates import ChatTemplate
from ..formats.prompts import DEFAULT_TEMPLATE, TEMPLATES
from ..method.adapters import adapter_kind, attach_saved_adapter, detach_adapter, named_adapters, training_record
from ..method.checkpoint import (
    WEIGHTS_NAME,
    AdapterError,
    verify_adapter_files,
    verify_safetensors,
)
from ..quant.loader import load_model
from ..quant.model_config import is_local_path, model_config
from .own_data import MATCHES, own_test_set, parse_match
from .predictions import PredictionsError, PredictionStore
from .protocol import PROTOCOLS, Protocol
from .summary import Summary, previous_summary, resume_conflicts
from .task_runner import run_task
from .tasks import TaskError, TestSet, load_test_set, resolve_tasks

BASE_LABEL = "base"


@dataclass
class Plan:
    """Everything checked before the model is loaded."""

    protocol: Protocol
    templates: dict[str, str]
    """Prompt template per model label (the base model and each adapter)."""
    test_sets: list[TestSet]
    adapters: dict[str, str]
    settings: dict
    previous: dict | None
    chats: dict[str, ChatTemplate] = field(default_factory=dict)
    """Per adapter label trained with ``--chat-template`` (and no ``--template`` given): that chat template."""


def parse_adapters(values: list[str], model_config=None) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> ``{name: dir}``; each dir must hold a usable adapter
    (config and a complete weights file) trained for ``model_config``'s shapes when that is given."""
    adapters: dict[str, str] = {}
    for name, directory in named_adapters(values, reserved=(BASE_LABEL,)).items():
        if not os.path.isdir(directory):
            raise AdapterError(f"adapter directory {directory} does not exist (from --adapter {name}={directory})")
        if adapter_kind(directory) == "peft":  # the LoRA baseline: peft checks its fit when it loads
            weights = os.path.join(directory, WEIGHTS_NAME)
            if os.path.exists(weights):
                verify_safetensors(weights)
            adapters[name] = os.path.abspath(directory)
            continue
        verify_adapter_files(directory, model_config)  # against the base's config.json before any weight loads
        adapters[name] = os.path.abspath(directory)
    return adapters


def adapter_template(directory: str) -> str | None:
    """The prompt template an adapter was trained with (its training record), or None if unrecorded."""
    return training_record(directory).get("template")


def adapter_chats(requested: str | None, adapters: dict[str, str]) -> dict[str, ChatTemplate]:
    """The chat template each adapter was trained with (``train --chat-template``); none when ``--template`` asks
    for a prompt template instead."""
    chats = {name: ChatTemplate.from_record(training_record(d)) for name, d in adapters.items()}
    return {name: chat for name, chat in chats.items() if chat is not None and requested is None}


def choose_templates(requested: str | None, adapters: dict[str, str]) -> dict[str, str]:
    """Per model label: ``--template`` if given (warning where an adapter was trained with another), else the
    adapter's own (``chat:NAME`` for a chat template), else the default (``released``)."""
    templates = {BASE_LABEL: requested or DEFAULT_TEMPLATE}
    for name, directory in adapters.items():
        chat = ChatTemplate.from_record(training_record(directory))
        trained = f"chat:{chat.name}" if chat is not None else adapter_template(directory)
        if requested and trained and requested != trained:
            print(f"warning: adapter {name} was trained with the {trained!r} template; evaluating it with "
                  f"{requested!r} as --template asks", file=sys.stderr)
        templates[name] = requested or trained or DEFAULT_TEMPLATE
    return templates


def own_test_sets(args) -> list[TestSet]:
    """``--data`` sources scored by ``--match`` (own_data.py); names unique."""
    if args.match is not None and not args.data:
        raise TaskError("--match scores a test file of your own; pass it with --data [NAME=]FILE")
    match = parse_match(args.match or "exact")
    test_sets = [own_test_set(value, match) for value in args.data]
    names = [t.task.name for t in test_sets]
    if len(set(names)) < len(names):
        raise TaskError(f"--data names {', '.join(names)} repeat; name each: --data NAME=FILE")
    return test_sets


def prepare(args) -> Plan:
    """Resolve tasks, read and validate every test file and adapter, and check the output directory."""
    config = model_config(args.model) if is_local_path(args.model) else None  # hub: checked when it loads
    own = own_test_sets(args)
    tasks = resolve_tasks(args.tasks or "commonsense") if args.tasks or not own else []
    overrides = dict(_key_value(item, "--test-file") for item in args.test_file)
    if extra := sorted(set(overrides) - {task.name for task in tasks}):
        raise TaskError(f"--test-file given for {', '.join(extra)}, which --tasks does not include")
    test_sets = [load_test_set(task, overrides.get(task.name) or task.test_source(args.data_dir)) for task in tasks]
    test_sets += own
    adapters = parse_adapters(args.adapter, config)
    if args.no_base and not adapters:
        raise TaskError("--no-base with no --adapter leaves nothing to evaluate")
    protocol = PROTOCOLS[args.protocol]
    if args.greedy or args.num_beams is not None:
        protocol = protocol.with_beams(1 if args.greedy else args.num_beams)
    if args.max_new_tokens is not None:
        protocol = protocol.with_max_new_tokens(args.max_new_tokens)
    templates = choose_templates(args.template, adapters)
    settings = {
        "perft_qlora_version": __version__, "model": args.model, "adapters": adapters,
        "decoding": {**protocol.to_dict(), "template": templates}, "tasks": [t.task.name for t in test_sets],
        "test_files": {t.task.name: t.source for t in test_sets}, "limit": args.limit, "batch_size": args.batch_size,
        **({"match": {t.task.name: t.task.match for t in own}} if own else {}),
    }
    previous = previous_summary(args.output_dir) if args.resume else None
    if previous is not None and (problems := resume_conflicts(previous, settings)):
        raise PredictionsError("cannot --resume with different settings:\n  " + "\n  ".join(problems))
    return Plan(protocol, templates, test_sets, adapters, settings, previous, adapter_chats(args.template, adapters))


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise TaskError(f"{flag} expects TASK=SOURCE, got {item!r}")
    return resolve_tasks(key)[0].name, value


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the summary (also written to ``<output-dir>/summary.json``).

    Bad input ends as one ``error:`` line and exit status 1 before the model loads (``cli.error_path``)."""
    args = make_parser().parse_args(argv)
    stopped = f"finished rows are in {os.path.join(args.output_dir, 'predictions.jsonl')}; run the same command " \
              "with --resume to continue"
    with error_path(args.debug, on_interrupt=lambda: stopped):
        return _evaluate(args, prepare(args))


def _evaluate(args, plan: Plan) -> dict:
    store = PredictionStore(os.path.join(args.output_dir, "predictions.jsonl"), resume=args.resume)
    for test_set in plan.test_sets:
        print(test_set.report())
    summary = Summary(plan.settings, results=dict(plan.previous["results"]) if plan.previous else {})
    summary.write(args.output_dir)
    models = ([] if args.no_base else [(BASE_LABEL, None)]) + list(plan.adapters.items())
    with store:
        model, tokenizer = load_model(args.model, device=args.device)
        for label, adapter_dir in models:
            adapted = model if adapter_dir is None else attach_saved_adapter(model, adapter_dir)
            chat = plan.chats.get(label)
            protocol = (plan.protocol.with_chat(chat, tokenizer) if chat is not None
                        else plan.protocol.with_template(plan.templates[label]))
            for test_set in plan.test_sets:
                result = run_task(adapted, tokenizer, label, test_set, protocol, store,
                                  batch_size=args.batch_size, limit=args.limit)
                summary.add(label, test_set.task.name, result)
                summary.write(args.output_dir)
            if adapter_dir is not None:
                model = detach_adapter(adapted)
    print(summary.markdown())
    print(f"predictions, summary.json and results.md in {args.output_dir}")
    return summary.to_dict()



def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m perft_qlora.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="base model: a save_pretrained directory or a Hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="a saved PERFT or peft (LoRA baseline) adapter to evaluate (repeatable); NAME defaults to the folder name")
    parser.add_argument("--no-base", action="store_true", help="evaluate only the adapters, not the base model")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names and/or groups commonsense, math, all (default: commonsense, "
                             "or none when --data is given)")
    parser.add_argument("--data-dir", default="dataset",
                        help="laid out like LLM-Adapters' dataset/: <data-dir>/<task>/test.json (default: %(default)s)")
    parser.add_argument("--test-file", action="append", default=[], metavar="TASK=SOURCE",
                        help="test set for one task: a .json/.jsonl file or a datasets hub name (repeatable)")
    parser.add_argument("--data", action="append", default=[], metavar="[NAME=]FILE",
                        help="a test set of your own (.json/.jsonl rows with instruction, optional input, answer), "
                             "scored as task NAME (default: the file's stem) by --match (repeatable)")
    parser.add_argument("--match", default=None, metavar="|".join(MATCHES),
                        help="how --data answers are checked: exact, contains, regex:PATTERN (first group if any), "
                             "choice (letters A-E) or choice:OPT1,OPT2,... (default: exact)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="perft",
                        help="perft: the PERFT authors' scripts (the last ### Response:); llm-adapters: LLM-Adapters' own (the "
                             "first) (default: %(default)s)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt template (default: each adapter's own, released for the base model); "
                             "a warning names adapters trained with another")
    parser.add_argument("--greedy", action="store_true", help="one beam instead of the protocol's 4 (quick looks)")
    parser.add_argument("--num-beams", type=positive_int, default=None, help="beam width (default: the protocol's, 4)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="override the protocol's token budget for every task (quick looks; recorded)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N rows of each task")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="prompts per generate call (default: %(default)s)")
    parser.add_argument("--output-dir", default="eval-results", help="where results go (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run in --output-dir, skipping finished rows")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available, else cpu)")
    add_debug_option(parser)
    return parser


if __name__ == "__main__":
    main()
