"""Answer an instruction with a base model and a saved adapter, in the prompt template the adapter was trained with.

    python -m perft_qlora.generate --model perft-demo/base --adapter perft-demo/adapter \\
        "Is the following text written in small letters? Answer format: true/false" --input "IQQ SFVP"
    python -m perft_qlora.generate --model perft-demo/base --adapter perft-demo/adapter --interactive

The answer streams to stdout as it is generated. Without ``--adapter`` the base model answers (``released``
template). ``--interactive`` reads one instruction per line from stdin until end of input (Ctrl-D); a tab
on the line separates the instruction from its input. ``--template`` overrides the adapter's recorded template
(with a warning when it recorded another). An adapter trained with ``--chat-template`` is prompted through that
chat template and stops at its end-of-turn token. Decoding is greedy unless ``--temperature`` asks for sampling.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import HelpFormatter, add_debug_option, error_path, positive_int
from ..errors import UsageError
from ..formats.prompts import TEMPLATES
from ..method.adapters import adapter_kind
from ..method.checkpoint import WEIGHTS_NAME, AdapterError, verify_adapter_files, verify_safetensors
from ..quant.model_config import is_local_path, model_config
from .generator import Generator, Sampling, choose_template, recorded_chat_template


def check_adapter(directory: str, config=None) -> None:
    """A usable adapter in ``directory`` (config and complete weights), trained for ``config``'s shapes if given."""
    if not os.path.isdir(directory):
        raise AdapterError(f"--adapter {directory}: no such directory; pass a folder written by train or save_adapter")
    if adapter_kind(directory) == "peft":  # the LoRA baseline: peft checks its fit when it loads
        if os.path.exists(weights := os.path.join(directory, WEIGHTS_NAME)):
            verify_safetensors(weights)
        return
    verify_adapter_files(directory, config)  # its header, and its base (family, width, experts, layers) if known


def check(args) -> tuple[Sampling, str]:
    """Everything checked before the model loads: prompt or --interactive, decoding, adapter, template."""
    if args.interactive == (args.prompt is not None):
        raise UsageError("pass an instruction to answer, or --interactive to read instructions from stdin (not both)")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the instruction is empty; pass the text to answer")
    if args.interactive and args.input:
        raise UsageError("--input is for a single instruction; with --interactive put a tab between instruction and input")
    if args.greedy and args.temperature is not None:
        raise UsageError("--greedy and --temperature contradict each other; pass one (greedy is the default)")
    sampling = Sampling(args.max_new_tokens, greedy=args.temperature is None,
                        temperature=args.temperature if args.temperature is not None else 0.7, top_p=args.top_p)
    config = model_config(args.model) if is_local_path(args.model) else None  # a hub id is checked as it loads
    if args.adapter is not None:
        check_adapter(args.adapter, config)
    template, warning = choose_template(args.template, args.adapter)
    chat = recorded_chat_template(args.adapter)
    if args.template is not None and chat is not None:
        warning = f"adapter {args.adapter} was trained with the chat template {chat.name!r}; prompting it with " \
                  f"{args.template!r} as --template asks"
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return sampling, template


def answer(generator: Generator, instruction: str, input: str, sampling: Sampling, out=None) -> str:
    """Stream one answer to ``out`` (stdout), ending the line; returns the text."""
    out = out or sys.stdout
    text = ""
    for piece in generator.stream(instruction, input, sampling):
        text += piece
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return text


def interact(generator: Generator, sampling: Sampling, lines, out=None) -> int:
    """Answer each non-blank line of ``lines`` (``instruction[<tab>input]``) until they end; returns how many."""
    out = out or sys.stdout
    prompt = sys.stdin.isatty() and lines is sys.stdin
    count = 0
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            return count
        instruction, _, context = line.rstrip("\n").partition("\t")
        if instruction.strip():
            answer(generator, instruction, context, sampling, out)
            count += 1


def main(argv: list[str] | None = None) -> int:
    """Answer the instruction (or stdin's, with --interactive); returns the exit status, 0."""
    args = make_parser().parse_args(argv)
    with error_path(args.debug):
        sampling, template = check(args)
        chat = recorded_chat_template(args.adapter) if args.template is None else None  # as it was trained
        generator = Generator.load_with(args.model, args.adapter, template, device=args.device, quantize=args.quantize,
                                        chat=chat)
        if args.interactive:
            interact(generator, sampling, sys.stdin)
        else:
            answer(generator, args.prompt, args.input, sampling)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perft_qlora.generate", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("prompt", nargs="?", default=None,
                        help="the instruction to answer (rendered with the adapter's prompt template)")
    parser.add_argument("--input", default="", help="the template's optional input section for the instruction")
    parser.add_argument("--model", required=True, help="base model: a save_pretrained directory or a hub id")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a saved PERFT or peft (LoRA baseline) adapter; without it the base model answers")
    parser.add_argument("--interactive", action="store_true",
                        help="read instructions from stdin, one per line, until end of input")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt template (default: the adapter's recorded one, released for the base model)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens generated at most per answer")
    parser.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature instead of greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling")
    parser.add_argument("--quantize", choices=["nf4", "none"], default="nf4",
                        help="nf4 (as trained) or none (the checkpoint's dtype)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available, else cpu)")
    add_debug_option(parser)
    return parser


if __name__ == "__main__":
    main()
