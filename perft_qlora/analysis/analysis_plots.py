"""PNG plots of an analysis result, drawn only from its JSON dict (so every plotted number is in the JSON).

Needs matplotlib (``pip install -e ".[analyze]"``); uses the object-oriented API (``Figure``), so it
never switches a notebook's backend. :func:`draw_all` returns ``[(file name, title, caption)]``.
"""

from __future__ import annotations

import os

from ..atomic import atomic_path

ADAPTER_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _save(figure, out_dir: str, name: str) -> str:
    with atomic_path(os.path.join(out_dir, name)) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    return name


def _adapter_color(result: dict, name: str) -> str:
    return ADAPTER_COLORS[list(result["adapters"]).index(name) % len(ADAPTER_COLORS)]


def _axis_labels(projection: dict) -> tuple[str, str]:
    if projection["method"] == "pca":
        x, y = (100 * v for v in projection["explained_variance"])
        return f"PC 1 ({x:.1f}% of variance)", f"PC 2 ({y:.1f}% of variance)"
    share = 100 * projection["explained_variance"][0]
    return f"UMAP 1 (after PCA keeping {share:.0f}% of variance)", "UMAP 2"


def draw_map(result: dict, layer: str, out_dir: str) -> tuple[str, str, str]:
    """Layer ``layer``'s 2-D map: base keys and router vectors coloured by base expert, PEFT vectors on top."""
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure

    projection = result["layers"][layer]["projection"]
    points, experts = projection["points"], projection["experts"]
    n = result["num_experts"]
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"].resampled(n)
    norm = BoundaryNorm([e - 0.5 for e in range(n + 1)], n)
    figure = Figure(figsize=(7.5, 6), layout="constrained")
    axis = figure.add_subplot()
    xs, ys = zip(*points["base keys"])
    axis.scatter(xs, ys, c=experts["base keys"], cmap=cmap, norm=norm, s=8, alpha=0.35,
                 label=f"base expert key vectors ({result['settings']['keys']} rows, sample)")
    xs, ys = zip(*points["base router"])
    scale = axis.scatter(xs, ys, c=experts["base router"], cmap=cmap, norm=norm, s=170, marker="*",
                         edgecolors="black", linewidths=0.6, label="base router expert vectors")
    for name in result["adapters"]:
        color = _adapter_color(result, name)
        if f"{name} down" in points:
            xs, ys = zip(*points[f"{name} down"])
            axis.scatter(xs, ys, color=color, marker="x", s=22, alpha=0.6, label=f"{name}: PEFT down-projection rows")
        if f"{name} router" in points:
            xs, ys = zip(*points[f"{name} router"])
            axis.scatter(xs, ys, color=color, marker="^", s=90, edgecolors="black", linewidths=0.6,
                         label=f"{name}: PEFT router vectors")
            for j, (x, y) in enumerate(points[f"{name} router"]):
                axis.annotate(f"P{j}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
    xlabel, ylabel = _axis_labels(projection)
    method = projection["method"].upper()
    axis.set(title=f"Layer {layer}: router and key vectors of the base experts and the PEFT experts ({method})",
             xlabel=xlabel, ylabel=ylabel)
    axis.title.set_fontsize(10)
    legend = axis.legend(fontsize=7, loc="best", framealpha=0.85)
    for handle, text in zip(legend.legend_handles, legend.get_texts()):
        if text.get_text().startswith("base"):  # coloured by expert in the plot: grey in the legend, see colour bar
            handle.set_array(None)
            handle.set_facecolor("0.55")
    figure.colorbar(scale, ax=axis, label="base expert", ticks=range(0, n, max(1, n // 16)))
    caption = (f"Layer {layer}: every vector as a unit direction, projected to 2-D ({method}). Stars: the base "
               "router's expert vectors; dots: sampled key vectors of each base expert (same colour); "
               "triangles P0..: PEFT router vectors; crosses: PEFT down-projection rows.")
    return _save(figure, out_dir, f"layer{layer}_map.png"), f"Layer {layer}: where the experts sit", caption


def draw_similarity(result: dict, out_dir: str) -> tuple[str, str, str]:
    """Per layer: base router vs own / other experts' keys; each adapter's router and down rows vs base router."""
    from matplotlib.figure import Figure

    rows = result["summary"]
    layers = sorted({r["layer"] for r in rows})
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axis = figure.add_subplot()
    base = [r for r in rows if r["name"] == "base"]
    axis.plot(layers, [r["router_own_keys_cos"] for r in base], "k-o", label="base router vs its own expert's keys (mean cos)")
    axis.plot(layers, [r["router_other_keys_cos"] for r in base], "k:o", label="base router vs other experts' keys (mean cos)")
    for name in result["adapters"]:
        mine = [r for r in rows if r["name"] == name]
        color = _adapter_color(result, name)
        if any(r["router_nearest_base_cos"] is not None for r in mine):
            axis.plot([r["layer"] for r in mine], [r["router_nearest_base_cos"] for r in mine], "-^", color=color,
                      label=f"{name}: PEFT router vs nearest base router vector (mean cos)")
        axis.plot([r["layer"] for r in mine], [r["down_router_abs_cos"] for r in mine], "--x", color=color,
                  label=f"{name}: PEFT down rows vs nearest base router vector (mean |cos|)")
    chance = [r for r in rows if r["name"] == "random"]
    axis.plot(layers, [r["router_nearest_base_cos"] for r in chance], "-", color="grey", linewidth=0.9,
              label="random direction vs nearest base router vector (mean cos)")
    axis.plot(layers, [r["down_router_abs_cos"] for r in chance], "--", color="grey", linewidth=0.9,
              label="random direction vs nearest base router vector (mean |cos|)")
    axis.set(title="Cosine similarity per layer", xlabel="layer", ylabel="cosine similarity", xticks=layers)
    axis.legend(fontsize=7, loc="best", framealpha=0.85)
    caption = ("Per layer: how close each kind of vector lies to the base experts' directions; the grey lines are "
               "what random directions give against the same base vectors.")
    return _save(figure, out_dir, "similarity.png"), "Cosine similarities per layer", caption


def draw_load(result: dict, out_dir: str) -> tuple[str, str, str]:
    """Heat maps (layer x expert) of the share of routed (token, slot) pairs: base router, then each adapter."""
    from matplotlib.figure import Figure

    layers = sorted(result["layers"], key=int)
    panels = [("base router (bare base model)", [result["layers"][k]["routing"]["base"]["load"] for k in layers])]
    for name, spec in result["adapters"].items():
        loads = [(result["layers"][k]["routing"].get(name) or {}).get("peft_load") for k in layers]
        if all(load is not None for load in loads):
            panels.append((f"{name} ({spec['variant']}): PEFT experts", loads))
    figure = Figure(figsize=(4.2 * len(panels), 0.5 * len(layers) + 2.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, loads) in zip(axes, panels):
        image = axis.imshow(loads, aspect="auto", cmap="Blues", vmin=0.0, vmax=max(max(row) for row in loads))
        axis.set(title=title, xlabel="expert", ylabel="layer", yticks=range(len(layers)), yticklabels=layers)
        axis.title.set_fontsize(9)
        figure.colorbar(image, ax=axis, label="share of (token, slot) assignments")
    figure.suptitle(f"Expert load on {result['settings']['tokens']} tokens of real text", fontsize=10)
    caption = "Darker: the expert receives more of the routed tokens. A uniform load is 1 / (number of experts)."
    return _save(figure, out_dir, "routing_load.png"), "Expert load on real tokens", caption


def draw_agreement(result: dict, out_dir: str) -> tuple[str, str, str]:
    """Per layer: load entropy of each router, and how often each PEFT router agrees with the base router."""
    from matplotlib.figure import Figure

    rows = result["summary"]
    layers = sorted({r["layer"] for r in rows})
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    base = [r for r in rows if r["name"] == "base"]
    left.plot(layers, [r["load_entropy"] for r in base], "k-o", label="base router")
    for name in result["adapters"]:
        mine = [r for r in rows if r["name"] == name and r["load_entropy"] is not None]
        color = _adapter_color(result, name)
        left.plot([r["layer"] for r in mine], [r["load_entropy"] for r in mine], "-^", color=color, label=name)
        agreeing = [r for r in mine if r["agreement"] is not None]
        if agreeing:
            x = [r["layer"] for r in agreeing]
            right.plot(x, [r["agreement"] for r in agreeing], "-^", color=color, label=f"{name}: agreement")
            right.plot(x, [r["agreement_if_independent"] for r in agreeing], ":", color=color,
                       label=f"{name}: if the routers were independent")
    left.set(title="Load entropy (1 = all experts equally used)", xlabel="layer", ylabel="normalized entropy",
             ylim=(0, 1.05), xticks=layers)
    right.set(title="PEFT top-1 expert's base counterpart is in the base top-K", xlabel="layer",
              ylabel="share of tokens", ylim=(0, 1.05), xticks=layers)
    for axis in (left, right):
        axis.title.set_fontsize(9)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best")
    caption = ("Left: how evenly each router spreads tokens. Right: how often the PEFT router's first choice "
               "stands for a base expert the base router also chose (PERFT-E: always, by construction).")
    return _save(figure, out_dir, "routing_agreement.png"), "Routing balance and agreement", caption


def draw_all(result: dict, out_dir: str) -> list[tuple[str, str, str]]:
    """Every plot of ``result`` into ``out_dir``: a map per layer, similarities, and the routing plots with data."""
    figures = [draw_map(result, layer, out_dir) for layer in sorted(result["layers"], key=int)]
    figures.append(draw_similarity(result, out_dir))
    if result["settings"]["tokens"]:
        figures += [draw_load(result, out_dir), draw_agreement(result, out_dir)]
    return figures
