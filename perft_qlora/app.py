"""Chat with a base MoE model and its PERFT adapters side by side (Gradio).

    python apps/compare.py --model allenai/OLMoE-1B-7B-0924 --adapter perft=runs/perft --adapter perft_e=runs/pe
    python apps/compare.py --demo [--demo-dir perft-demo]      # shipped small base + demo adapter, CPU
    perft-qlora app --demo        # the same from an installed package (or python -m perft_qlora.app), any directory

The app's code lives here, in the package, so an installed wheel carries it; ``apps/compare.py`` (its documented
home in the clone) runs this module's ``main``.

One base model is loaded once in NF4; adapters are switched per request without reloading it
(``perft_qlora.serving.chat.ChatModel``). The base model is always the first column. This file is layout and event
wiring only: ``build_demo(chat)`` returns the ``gr.Blocks``, nothing is loaded at import, and ``__main__``
serves on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import html
import os
import sys

import gradio as gr

from perft_qlora import cli
from perft_qlora.analysis.analysis_report import adapter_analysis_markdown
from perft_qlora.method.adapters import named_adapters
from perft_qlora.serving.chat import (
    BASE,
    STYLES,
    ChatError,
    ChatModel,
    GenerationSettings,
    RoutingTrace,
    message_text,
    user_content,
)

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#17becf", "#bcbd22", "#8c564b", "#e377c2", "#7f7f7f")
CELL_STYLE = "color:#fff;text-align:center;padding:2px 4px;min-width:1.6em;border:0"
HEATMAP_EMPTY = "<p id='routing-empty'>Send a prompt to see which experts routed each generated token.</p>"


def _shown(token: str) -> str:
    return html.escape(token.replace(" ", "␣").replace("\n", "⏎")) or "∅"


def _cells(steps: list[list[tuple[int, float]]], tokens: list[str], layer: int, kind: str, dense: bool) -> str:
    cells = []
    for j, experts in enumerate(steps):
        top = experts[0][0] if experts else 0
        tip = ", ".join(f"{e} ({w:.2f})" for e, w in experts)
        label = "all" if dense else str(top)
        color = "#888" if dense else PALETTE[top % len(PALETTE)]
        cells.append(
            f"<td class='rt-cell' title='token {j} {_shown(tokens[j])} · layer {layer} · {kind}: {tip}' "
            f"style='background:{color};{CELL_STYLE}'>{label}</td>"
        )
    return "".join(cells)


def routing_html(name: str, trace: RoutingTrace | None) -> str:
    """Layers x generated tokens; each cell is coloured by the heaviest expert chosen (hover for all of them)."""
    if trace is None or not trace.tokens:
        return HEATMAP_EMPTY
    dense = trace.variant in ("perft_d", "perft_s")
    head = "".join(f"<th style='font-weight:normal;padding:0 2px;border:0'>{_shown(t)}</th>" for t in trace.tokens)
    rows = []
    for layer in sorted(trace.base):
        if layer in trace.peft:
            cells = _cells(trace.peft[layer], trace.tokens, layer, f"PEFT ({trace.variant})", dense)
            rows.append(f"<tr><th style='text-align:left;border:0'>L{layer} PEFT</th>{cells}</tr>")
        cells = _cells(trace.base[layer], trace.tokens, layer, "base router", False)
        rows.append(f"<tr><th style='text-align:left;border:0'>L{layer} base</th>{cells}</tr>")
    legend = " ".join(
        f"<span style='background:{PALETTE[e]};color:#fff;padding:0 4px'>{e}</span>"
        for e in range(min(len(PALETTE), max(trace.num_base_experts, trace.num_peft_experts)))
    )
    return (
        f"<div id='routing-heatmap' style='overflow-x:auto'><p><b>{html.escape(name)}</b>: expert with the largest "
        f"gate weight per layer (rows) and generated token (columns); hover a cell for every chosen expert "
        f"and its weight.</p><table style='border-collapse:separate;border-spacing:1px;font-size:12px'>"
        f"<tr><th style='border:0'></th>{head}</tr>{''.join(rows)}</table>"
        f"<p style='font-size:12px'>experts: {legend}</p></div>"
    )


def info_markdown(info: dict) -> str:
    if info["name"] == BASE:
        return (f"**base model** `{info['model']}` ({info['model_type']}): "
                f"{info['backbone_parameters']:,} parameters, "
                f"{info['backbone_parameters_per_token']:,} active per token")
    knobs = ", ".join(f"{k}={v}" for k, v in info["knobs"].items() if v is not None)
    return (
        f"**{info['name']}** — variant `{info['variant']}` from `{info['directory']}`  \n"
        f"knobs: {knobs}  \ntrainable parameters: {info['trainable_parameters']:,}; activated per token: "
        f"{info['activated_parameters_per_token']:,} ({info['activated_ratio']:.3%} of the backbone's "
        f"{info['backbone_parameters_per_token']:,})"
    )


class CompareApp:
    """The event handlers behind ``build_demo``: one prompt fanned out to ``num_columns`` chat columns."""

    def __init__(self, chat: ChatModel, num_columns: int):
        self.chat, self.n = chat, num_columns

    def _split(self, columns):
        return list(columns[: self.n]), [list(h or []) for h in columns[self.n:]]

    def send(self, request: gr.Request, message, context, style, max_new_tokens, temperature, top_p, greedy, view,
             *columns):
        """Stream ``message`` (+ optional input ``context``) to every column in turn.

        Yields the prompt and input boxes (cleared), histories, stats, routing traces, heat map and the turn.
        """
        names, histories = self._split(columns)
        knobs = (max_new_tokens, temperature, top_p, greedy)
        yield from self._run(request, (message or "", context or ""), style, knobs, view, names, histories)

    def retry(self, request: gr.Request, turn, style, max_new_tokens, temperature, top_p, greedy, view, *columns):
        """Drop the latest turn from every column that has it and send the same prompt again."""
        names, histories = self._split(columns)
        if not turn:
            raise gr.Error("nothing to retry yet: send a prompt first")
        shown = user_content(*turn)
        for k, history in enumerate(histories):
            if len(history) >= 2 and history[-1]["role"] == "assistant" and message_text(history[-2]) == shown:
                histories[k] = history[:-2]
        yield from self._run(request, tuple(turn), style, (max_new_tokens, temperature, top_p, greedy), view, names,
                             histories)

    def _run(self, request, turn, style, knobs, view, names, histories):
        message, context = turn
        try:
            settings = GenerationSettings(*knobs)
            if not message.strip():
                raise ChatError("the prompt is empty; type a message first")
            self.chat.build_prompt([], message, style, context)  # fail once, before any column, on a style problem
        except ChatError as err:
            raise gr.Error(str(err)) from err
        cancel = self.chat.new_request(_session(request))
        stats, traces = [""] * self.n, [None] * self.n
        for k, name in enumerate(names):
            if cancel.is_set():
                stats[k] = f"**{name}** · stopped before it started"
                yield self._outputs(histories, stats, traces, view, turn)
                continue
            try:
                replies = self.chat.respond(name, histories[k], message, settings, style, cancel, context)
                for history, update in replies:
                    histories[k], stats[k] = history, f"**{name}** · {update.summary()}"
                    yield self._outputs(histories, stats, traces, view, turn)
                traces[k] = (name, update.trace)
            except ChatError as err:
                stats[k] = f"**{name}** · ⚠️ {err}"
            yield self._outputs(histories, stats, traces, view, turn)

    def _outputs(self, histories, stats, traces, view, turn):
        return ["", "", *histories, *stats, traces, self.heatmap(view, traces), list(turn)]

    def stop(self, request: gr.Request) -> str:
        stopped = self.chat.cancel(_session(request))
        return "stopping…" if stopped else "nothing is running"

    def clear(self):
        return [*([[]] * self.n), *([""] * self.n), [None] * self.n, HEATMAP_EMPTY, None]

    def heatmap(self, view, traces) -> str:
        entry = traces[int(view)] if traces and view is not None and int(view) < len(traces) else None
        return routing_html(*entry) if entry else HEATMAP_EMPTY

    def info(self, name):
        try:
            info = self.chat.info(name)
        except ChatError as err:
            return f"⚠️ {err}", {}
        return info_markdown(info), info.get("adapter_config", info)

    def analysis(self, name):
        """The adapter's ``python -m perft_qlora.analyze`` summary and plots, if one was written beside it."""
        try:
            info = self.chat.info(name)
        except ChatError as err:
            return f"⚠️ {err}", []
        if "directory" not in info:
            return "Pick an adapter to see its analysis (the base model appears in each adapter's).", []
        others = tuple(self.chat.info(other)["directory"] for other in self.chat.names[1:])
        text, plots = adapter_analysis_markdown(info["directory"], others)
        from PIL import Image  # a gradio dependency; images, not paths, so no file serving is needed

        return text, [(Image.open(path), os.path.basename(path)) for path in plots]

    def add_adapter(self, name, directory):
        """Register an adapter at run time; a bad directory is reported, the app keeps running."""
        try:
            self.chat.register_adapter(name or "", os.path.expanduser(directory or ""))
            status = f"✅ registered **{name.strip()}** from `{directory}`; pick it in a column."
        except (ValueError, OSError) as err:  # AdapterError is a ValueError
            status = f"⚠️ could not load adapter **{name}**: {err}"
        choices = self.chat.names
        return [status, *[gr.update(choices=choices) for _ in range(self.n - 1)], gr.update(choices=choices)]


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _chat_columns(names: list[str], n: int):
    """``n`` columns of (model picker, chat, stats); the first is locked to the base model."""
    pickers, chatbots, stats = [], [], []
    with gr.Row(equal_height=True):
        for k in range(n):
            with gr.Column(min_width=240):
                default = BASE if k == 0 else names[min(k, len(names) - 1)]
                pickers.append(gr.Dropdown(names, value=default, label=f"column {k + 1}", interactive=k > 0,
                                           elem_id=f"pick-{k}"))
                chatbots.append(gr.Chatbot(label=default, height=340, elem_id=f"chat-{k}"))
                stats.append(gr.Markdown(elem_id=f"stats-{k}"))
    return pickers, chatbots, stats


def _settings():
    """The generation settings every column shares: style, max new tokens, temperature, top-p, greedy."""
    with gr.Accordion("Generation settings (shared by all columns)", open=True), gr.Row():
        return [
            gr.Radio([(label, key) for key, label in STYLES.items()], value="template", label="prompt style"),
            gr.Slider(1, 512, value=32, step=1, label="max new tokens"),
            gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature"),
            gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p"),
            gr.Checkbox(value=True, label="greedy"),
        ]


def build_demo(chat: ChatModel, num_columns: int | None = None, errors: dict[str, str] | None = None,
               examples: list[tuple[str, str]] | None = None, allow_add: bool = True) -> gr.Blocks:
    """The app: column 1 is the base model, the others default to the registered adapters in order."""
    names = chat.names
    n = max(num_columns or len(names), 1)
    app = CompareApp(chat, n)
    with gr.Blocks(title="perft_qlora · compare adapters") as demo:
        gr.Markdown(f"## Compare PERFT adapters\nBase model: `{chat.name}` (loaded once; adapters switch per request)")
        if errors:
            gr.Markdown("\n".join(f"⚠️ adapter **{k}** was not loaded: {v}" for k, v in errors.items()),
                        elem_id="load-errors")
        pickers, chatbots, stats = _chat_columns(names, n)
        with gr.Row():
            prompt = gr.Textbox(label="prompt / instruction (sent to every column)", lines=2, scale=3, elem_id="prompt")
            context = gr.Textbox(label="input (optional: the template's ### Input)", lines=2, scale=2,
                                 elem_id="context")
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary", elem_id="send")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            retry_btn = gr.Button("Retry", elem_id="retry")
            clear_btn = gr.Button("Clear", elem_id="clear")
        stop_note = gr.Markdown()
        if examples:
            gr.Examples(examples=[list(e) for e in examples], inputs=[prompt, context])
        settings = _settings()
        traces, turn = gr.State([None] * n), gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                view = gr.Dropdown([(f"column {k + 1}", k) for k in range(n)], value=1 if n > 1 else 0,
                                   label="routing heat map of column", elem_id="view")
                heat = gr.HTML(HEATMAP_EMPTY, elem_id="heatmap")
            with gr.Column(scale=2):
                info_pick = gr.Dropdown(names, value=names[1] if len(names) > 1 else BASE, label="adapter info")
                info_md = gr.Markdown(elem_id="info")
                with gr.Accordion("perft_config.json (knobs and training metadata)", open=False):
                    info_json = gr.JSON(show_label=False)
                with gr.Accordion("Analysis (python -m perft_qlora.analyze)", open=False):
                    analysis_md = gr.Markdown(elem_id="analysis")
                    analysis_plots = gr.Gallery(show_label=False, columns=2, height="auto", elem_id="analysis-plots")
                if allow_add:
                    with gr.Accordion("Add an adapter", open=False):
                        add_name = gr.Textbox(label="name", elem_id="add-name")
                        add_dir = gr.Textbox(label="adapter directory on the server", elem_id="add-dir")
                        add_btn = gr.Button("Load adapter", elem_id="add")
                        add_status = gr.Markdown(elem_id="add-status")

        knobs = [*settings, view]
        outputs = [prompt, context, *chatbots, *stats, traces, heat, turn]
        model_queue = {"concurrency_limit": 1, "concurrency_id": "model"}
        gr.on([send_btn.click, prompt.submit], app.send, [prompt, context, *knobs, *pickers, *chatbots], outputs,
              api_name="send", **model_queue)
        retry_btn.click(app.retry, [turn, *knobs, *pickers, *chatbots], outputs, api_name="retry", **model_queue)
        stop_btn.click(app.stop, None, stop_note, api_name="stop", queue=False)
        clear_btn.click(app.clear, None, [*chatbots, *stats, traces, heat, turn], api_name="clear")
        view.change(app.heatmap, [view, traces], heat, api_visibility="private")
        for picker, chatbot, stat in zip(pickers, chatbots, stats):
            picker.change(lambda name: (gr.update(value=[], label=name), ""), picker, [chatbot, stat],
                          api_visibility="private")
        gr.on([demo.load, info_pick.change], app.info, info_pick, [info_md, info_json], api_name="adapter_info")
        gr.on([demo.load, info_pick.change], app.analysis, info_pick, [analysis_md, analysis_plots],
              api_name="adapter_analysis")
        if allow_add:
            add_btn.click(app.add_adapter, [add_name, add_dir], [add_status, *pickers[1:], info_pick],
                          api_name="add_adapter", **model_queue)
    return demo


def build_demo_outputs(directory: str) -> None:
    """``python -m perft_qlora.train --demo --output-dir directory``, in this process."""
    from perft_qlora.training.train import main as train_main

    train_main(["--demo", "--output-dir", directory])


def demo_paths(directory: str, build=build_demo_outputs) -> tuple[str, dict[str, str]]:
    """``(base dir, {"demo": adapter dir})`` written by ``python -m perft_qlora.train --demo``; made first if missing."""
    base, adapter = os.path.join(directory, "base"), os.path.join(directory, "adapter")
    missing = [p for p in (base, adapter) if not os.path.isdir(p)]
    if missing:
        print(
            f"--demo: {' and '.join(missing)} not found; making them now with\n"
            f"    python -m perft_qlora.train --demo --output-dir {directory}\n"
            "(the shipped base + a PERFT adapter on the demo task, under 3 minutes on a CPU)", file=sys.stderr,
        )
        build(directory)
    return base, {"demo": adapter}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python apps/compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model: Hub id or local save_pretrained directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter directory written by save_adapter; repeat for more columns")
    parser.add_argument("--demo", action="store_true", help="the shipped small base and the demo adapter (trained first if missing), on CPU")
    parser.add_argument("--demo-dir", default="perft-demo", help="output of `train --demo` (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available, else cpu)")
    parser.add_argument("--columns", type=int, default=None, help="number of chat columns (default: 1 + adapters)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, local only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    cli.add_debug_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Serve the app; bad input ends as one ``error:`` line before the model loads (``perft_qlora.cli``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.demo and not args.model:
        parser.error("give --model (and --adapter NAME=DIR ...) or --demo")
    with cli.error_path(args.debug, on_interrupt=lambda: "the app stopped; nothing to save"):
        serve(args)


def check_adapters(adapters: dict[str, str], config) -> tuple[dict[str, str], dict[str, str]]:
    """``(usable, name -> error)``: each ``--adapter`` against its own safetensors header and, given the base's
    ``config`` (its ``config.json``), that base, before the base loads; the app starts without the others."""
    from perft_qlora.errors import PerftQloraError
    from perft_qlora.serving.generate import check_adapter

    usable, errors = {}, {}
    for name, directory in adapters.items():
        try:
            check_adapter(directory, config)
            usable[name] = directory
        except PerftQloraError as err:
            errors[name] = str(err)
    return usable, errors


def serve(args: argparse.Namespace) -> None:
    from perft_qlora.quant.model_config import is_local_path, model_config

    adapters = named_adapters(args.adapter, reserved=(BASE,))  # checked before the model loads
    if args.demo:
        base, demo_adapters = demo_paths(args.demo_dir)
        adapters, device = {**demo_adapters, **adapters}, args.device or "cpu"
    else:
        base, device = args.model, args.device
    config = model_config(base) if is_local_path(base) else None  # no config.json, not a MoE family: one line
    adapters, early = check_adapters(adapters, config)
    chat = ChatModel.load(base, device=device)
    errors = {**early, **chat.register_many(adapters)}
    for name, err in errors.items():
        print(f"warning: adapter {name!r} not loaded: {err}", file=sys.stderr)
    examples = None
    if args.demo:
        from perft_qlora.formats.demo_data import demo_data_path
        from perft_qlora.formats.records import read_records

        examples = [(row["instruction"], row.get("input", "")) for row in read_records(demo_data_path("test")).rows[:3]]
    local = args.host in ("127.0.0.1", "localhost", "::1") and not args.share
    demo = build_demo(chat, args.columns, errors, examples, allow_add=local)  # loading server paths: local only
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
