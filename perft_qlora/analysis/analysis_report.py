"""An analysis on disk: ``analysis.json`` (every number), PNG plots and ``report.md`` (embedding them).

Where it lives: ``python -m perft_qlora.analyze`` writes to ``--out``, by default ``analysis/`` beside the
first adapter's directory (``perft-demo/adapter`` -> ``perft-demo/analysis/``); not inside it, because
``save_adapter`` refuses to replace a directory holding anything but an adapter. :func:`find_analysis`
looks there (and beside other adapters analysed with it) for a report covering a given adapter directory
(the comparison app's info panel uses it).
The markdown and the plots are rendered from the JSON dict alone.
"""

from __future__ import annotations

import importlib.util
import json
import os

from ..atomic import write_text

JSON_NAME = "analysis.json"
REPORT_NAME = "report.md"
DIR_NAME = "analysis"
PLOTS_NEED = 'plots need matplotlib: pip install -e ".[analyze]"'


def default_out_dir(adapter_dirs: list[str]) -> str:
    """``analysis/`` beside the first adapter directory, or ``./analysis`` without adapters."""
    if not adapter_dirs:
        return DIR_NAME
    return os.path.join(os.path.dirname(os.path.abspath(adapter_dirs[0])), DIR_NAME)


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_analysis(result: dict, out_dir: str, command: str | None = None) -> dict:
    """Write the JSON, the plots (when matplotlib is installed) and the report; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    figures = []
    if plots_available():
        from .analysis_plots import draw_all

        figures = draw_all(result, out_dir)
    result = {**result, "figures": [{"file": f, "title": t, "caption": c} for f, t, c in figures]}
    if command:
        result["command"] = command
    write_text(os.path.join(out_dir, JSON_NAME), json.dumps(result, indent=1))
    write_text(os.path.join(out_dir, REPORT_NAME), report_markdown(result))
    return {"json": os.path.join(out_dir, JSON_NAME), "report": os.path.join(out_dir, REPORT_NAME),
            "plots": [os.path.join(out_dir, f) for f, _, _ in figures]}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


GEOMETRY_COLUMNS = (
    ("layer", "layer"), ("name", "model"), ("variant", "variant"),
    ("router_own_keys_cos", "router · own keys"), ("router_other_keys_cos", "router · other keys"),
    ("nearest_key_is_own", "nearest key is own"), ("router_nearest_base_cos", "PEFT router · nearest base router"),
    ("down_router_abs_cos", "PEFT down · base router (abs)"), ("down_keys_abs_cos", "PEFT down · keys (abs)"),
)
ROUTING_COLUMNS = (
    ("layer", "layer"), ("name", "model"), ("load_entropy", "load entropy"), ("agreement", "agreement"),
    ("agreement_if_independent", "if independent"), ("nmi_top1", "NMI top-1"),
    ("base_topk_overlap_with_bare", "base top-K kept"),
)


def _table(rows: list[dict], columns) -> list[str]:
    lines = ["| " + " | ".join(label for _, label in columns) + " |",
             "|" + "|".join("---" if key in ("name", "variant") else "---:" for key, _ in columns) + "|"]
    for row in rows:
        cells = [str(row.get(key)) if key in ("layer", "name", "variant") else _fmt(row.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(result: dict) -> str:
    """The report: settings, how to read it, the summary tables and the plots (all from ``result``)."""
    s = result["settings"]
    adapters = ", ".join(f"`{n}` ({a['variant']}, {a['directory']})" for n, a in result["adapters"].items()) or "none"
    lines = [
        f"# Analysis of `{result['model']}`", "",
        (f"{result['model_type']}, {result['num_layers']} layers, {result['num_experts']} experts (top-{result['top_k']}), "
        f"hidden size {result['hidden_size']}. Adapters: {adapters}.  "),
        (f"Layers {s['layers']}; key vectors: {s['keys_per_expert']} `{s['keys']}` rows per expert (seed {s['seed']}); "
        f"projection: {s['projection']}; routed tokens: {s['tokens']} from {s['texts']} texts"
        + (f" in the `{s['template']}` prompt template." if s.get("template") else ".")), "",
    ]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    lines += [
        "## How to read it", "",
        ("- Cosines compare directions. Two unrelated directions of this width give a mean |cos| of "
        f"{result['chance_abs_cos']:.3f}. A *nearest* value is a maximum over many vectors, so compare it with "
        "the *random* row: the same summary for random directions against this layer's base vectors."),
        ("- *router · own keys*: mean cosine of each base router expert vector with its own expert's key vectors "
        "(vs *other keys*); *nearest key is own*: share of router vectors whose single most similar key vector "
        "belongs to their own expert."),
        ("- *PEFT router · nearest base router*: mean over PEFT router vectors of the cosine with the closest base "
        "router vector. *PEFT down*: each down-projection row (what a PEFT expert reads) against the closest base "
        "router / key vector, as |cos| (a row's sign is arbitrary)."),
        ("- Routing: *load entropy* 1 = every expert used equally; *agreement*: share of tokens whose PEFT top-1 "
        "expert's counterpart base expert (PERFT-E: itself; PERFT: the nearest base router vector) is in the base "
        "router's top-K, beside what independent routers would give; *NMI top-1*: normalized mutual information of "
        "the two routers' first choices; *base top-K kept*: share of the bare base model's top-K choices the "
        "base router still makes with the adapter attached (earlier layers' adapters move the hidden states)."),
        "", "## Geometry", "", *_table(result["summary"], GEOMETRY_COLUMNS), "",
    ]
    if s["tokens"]:
        routed = [r for r in result["summary"] if r.get("load_entropy") is not None]
        lines += ["## Routing of real tokens", "", *_table(routed, ROUTING_COLUMNS), ""]
    if result.get("figures"):
        lines += ["## Plots", ""]
        for figure in result["figures"]:
            lines += [f"### {figure['title']}", "", f"![{figure['title']}]({figure['file']})", "", figure["caption"], ""]
    else:
        lines += [f"No plots: {PLOTS_NEED}.", ""]
    lines += [f"Every number above, and more (per expert, per layer), is in `{JSON_NAME}`.", ""]
    return "\n".join(lines)


def find_analysis(adapter_dir: str, also_beside: tuple[str, ...] = ()) -> tuple[str, str, dict] | None:
    """``(analysis dir, adapter name in it, result)`` of an analysis covering ``adapter_dir``.

    Looks in ``analysis/`` beside ``adapter_dir``, then beside each of ``also_beside`` (adapters analysed
    together are written beside the first of them).
    """
    adapter_dir = os.path.realpath(adapter_dir)
    for directory in (adapter_dir, *also_beside):
        out_dir = default_out_dir([directory])
        try:
            with open(os.path.join(out_dir, JSON_NAME), encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError):
            continue
        for name, adapter in (result.get("adapters") or {}).items():
            if os.path.realpath(adapter.get("directory", "")) == adapter_dir:
                return out_dir, name, result
    return None


def adapter_analysis_markdown(adapter_dir: str, also_beside: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """A short markdown summary of ``adapter_dir``'s analysis and its plot files, or how to make one."""
    found = find_analysis(adapter_dir, also_beside)
    if found is None:
        out = default_out_dir([adapter_dir])
        return ((f"No analysis yet. Make one with `python -m perft_qlora.analyze --model BASE --adapter NAME={adapter_dir}`"
                f" (written to `{out}`)."), [])
    out_dir, name, result = found
    rows = [r for r in result["summary"] if r["name"] in (name, "base", "random")]
    columns = [c for c in GEOMETRY_COLUMNS[:2] + GEOMETRY_COLUMNS[6:] + ROUTING_COLUMNS[2:4]]
    lines = [(f"**Analysis** of `{name}` ({result['adapters'][name]['variant']}): "
             f"`{os.path.join(out_dir, REPORT_NAME)}`"), "", *_table(rows, columns)]
    plots = [os.path.join(out_dir, f["file"]) for f in result.get("figures", [])]
    return "\n".join(lines), [p for p in plots if os.path.isfile(p)]
