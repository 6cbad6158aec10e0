"""python -m perft_qlora.analyze: summaries on a model with known geometry, the CLI's files, bad inputs, stats."""

from __future__ import annotations

import json
import os
import re
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import perft_qlora.analysis.analysis_report as report_module
from perft_qlora import PerftConfig, attach_perft, iter_perft_blocks, load_model, save_adapter
from perft_qlora.analysis.analysis import analyze, read_adapter_spec
from perft_qlora.analysis.analyze import main
from perft_qlora.analysis.geometry import chance_abs_cosine, project_2d
from perft_qlora.method.stats import (
    agreement,
    co_occurrence,
    imbalance,
    normalized_entropy,
    normalized_mutual_information,
    routing_stats,
)
from perft_qlora.training.distributed import routing_log  # the trainer's logs
from perft_qlora.training.tiny import save_tiny_model

N = 8  # tiny OLMoE experts; hidden 64, intermediate 64, 2 layers
PERM = [3, 0, 7, 1, 6, 2, 5, 4]  # PEFT router vector j = base router vector PERM[j]
SIGMA = [3, 5, 1, 1, 0, 7, 2, 6]  # PEFT expert j's down rows = ± base router vector SIGMA[j]


def hadamard(n: int) -> torch.Tensor:
    """(n, n) Sylvester Hadamard matrix: orthogonal rows of ±1 (exact in NF4: the code book holds ±1)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@pytest.fixture(scope="module")
def geometry_dirs(tmp_path_factory):
    """A tiny OLMoE whose router row e and every gate row of expert e are direction d_e (Hadamard rows), plus a
    PERFT adapter (router rows d_PERM[j], down rows ±d_SIGMA[j]) and a PERFT-E adapter (down rows of j: d_j)."""
    root = tmp_path_factory.mktemp("geometry")
    base = save_tiny_model(str(root / "base"), "olmoe", seed=0)
    d = hadamard(64)[1 : N + 1]  # (N, 64); skip the all-ones row
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(0.25 * d)
            half = layer.mlp.experts.gate_up_proj.shape[1] // 2
            layer.mlp.experts.gate_up_proj[:, :half] = (0.05 * d)[:, None, :]
    model.save_pretrained(base)
    signs = torch.tensor([1.0, -1.0] * 4)[:, None]  # (DB=8, 1): down rows may point either way
    adapters = {}
    for name, config in (("perft", PerftConfig(variant="perft", num_experts=N, top_k=2, bottleneck=8)),
                         ("perft_e", PerftConfig(variant="perft_e", bottleneck=8))):
        nf4, _ = load_model(base, device="cpu", progress=False)
        attach_perft(nf4, config)
        with torch.no_grad():
            for _, block in iter_perft_blocks(nf4):
                if name == "perft":
                    block.perft_router.weight.copy_(0.25 * d[PERM])
                rows = d[SIGMA] if name == "perft" else d
                block.perft_experts.down.copy_(rows[:, None, :] * signs * 0.1)
                block.perft_experts.up.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
        adapters[name] = save_adapter(nf4, str(root / name / "adapter"))
    return base, adapters


@pytest.fixture(scope="module")
def geometry_result(geometry_dirs):
    base, adapters = geometry_dirs
    model, _ = load_model(base, device="cpu", progress=False)
    specs = [read_adapter_spec(name, path, model.config) for name, path in adapters.items()]
    texts = [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return analyze(model, specs, [0, 1], texts, keys_per_expert=16)


def test_similarity_summaries_come_out_as_constructed(geometry_result):
    close = {"abs": 1e-4, "rel": 0}
    for layer in ("0", "1"):
        entry = geometry_result["layers"][layer]
        base = entry["base"]
        assert base["nearest_key_expert"] == list(range(N))
        assert base["nearest_key_cos"] == pytest.approx([1.0] * N, **close)
        assert base["own_mean_cos"] == pytest.approx([1.0] * N, **close)
        assert base["other_mean_cos"] == pytest.approx([0.0] * N, **close)  # Hadamard rows are orthogonal
        assert base["summary"]["nearest_key_is_own"] == 1.0
        chance = entry["random"]  # random directions against the same vectors: far from the constructed 1.0
        assert 0.1 < chance["nearest_base_cos"] < chance["nearest_base_abs_cos"] < 0.5
        router = entry["adapters"]["perft"]["router"]
        assert router["nearest_base_expert"] == PERM and router["nearest_key_expert"] == PERM
        assert router["nearest_base_cos"] == pytest.approx([1.0] * N, **close)
        down = entry["adapters"]["perft"]["down"]
        assert down["nearest_base_expert"] == SIGMA
        assert down["max_abs_cos_router"] == pytest.approx([1.0] * N, **close)
        assert down["mean_max_abs_cos_router"] == pytest.approx([1.0] * N, **close)  # sign flips do not matter
        own = [1.0 if PERM[j] == SIGMA[j] else 0.0 for j in range(N)]
        assert down["own_router_abs_cos"] == pytest.approx(own, **close)
        perft_e = entry["adapters"]["perft_e"]
        assert perft_e["router"] is None and perft_e["down"]["nearest_base_expert"] == list(range(N))
        assert "own_router_abs_cos" not in perft_e["down"]
        points = entry["projection"]["points"]
        assert [len(points[k]) for k in ("base router", "base keys", "perft router", "perft down", "perft_e down")] \
            == [N, N * 16, N, N * 8, N * 8]


def test_token_routing_agreement_as_constructed(geometry_result):
    for layer in ("0", "1"):
        routing = geometry_result["layers"][layer]["routing"]
        perft, perft_e = routing["perft"], routing["perft_e"]
        # PERFT's router rows are the base router's, permuted: its first choice is the base's first choice
        assert perft["agreement"] >= 0.98 and perft["nmi_top1"] >= 0.9
        assert perft_e["agreement"] == 1.0 and perft_e["nmi_top1"] == pytest.approx(1.0, abs=1e-6)
        assert perft_e["peft_load"] == perft_e["base_load"]  # PERFT-E routes exactly as the base router
        for stats in (perft, perft_e):
            assert sum(stats["peft_load"]) == pytest.approx(1.0, abs=1e-4) and 0.0 <= stats["entropy"] <= 1.0
            assert stats["agreement_if_independent"] < stats["agreement"]
        joint = torch.tensor(perft["top1_joint"])
        assert joint.sum().item() == pytest.approx(1.0, abs=1e-4)
        mass_on_perm = sum(joint[j, PERM[j]].item() for j in range(N))
        assert mass_on_perm >= 0.98
    # layer 0's router input does not depend on any adapter: the base router's choices there are untouched
    assert geometry_result["layers"]["0"]["routing"]["perft"]["base_topk_overlap_with_bare"] == 1.0


def test_stats_functions():
    assert normalized_entropy([0.25] * 4) == pytest.approx(1.0) and normalized_entropy([1, 0, 0, 0]) == 0.0
    assert imbalance([0.25] * 4) == pytest.approx(1.0) and imbalance([1, 0, 0, 0]) == 4.0
    ids = torch.tensor([0, 1, 2, 3, 0, 1])
    assert normalized_mutual_information(co_occurrence(ids, (ids + 1) % 4, 4, 4)) == pytest.approx(1.0)
    independent = co_occurrence(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2, 2)
    assert normalized_mutual_information(independent) == pytest.approx(0.0, abs=1e-9)
    base = torch.tensor([[2, 0], [1, 3], [0, 1]])
    assert agreement(torch.tensor([1, 0, 1]), base, counterpart=[1, 2]) == pytest.approx(2 / 3)
    assert chance_abs_cosine(2) == pytest.approx(2 / torch.pi, rel=1e-6)  # E|cos| on a circle


def test_trainer_routing_log_uses_the_shared_stats(tiny_nf4, token_batch):
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2))
    model(token_batch[0])
    logs, stats = routing_log(model), routing_stats(model)
    for layer, layer_stats in stats.items():
        shares = layer_stats["expert_fraction"]
        assert logs[f"routing/L{layer}_imbalance"] == pytest.approx(imbalance(shares))
        assert logs[f"routing/L{layer}_entropy"] == pytest.approx(normalized_entropy(shares))


def test_umap_projection_follows_the_authors_recipe(monkeypatch):
    """PCA to the fewest components explaining 50% of the variance, then UMAP (a stand-in module here)."""
    seen = {}

    class FakeUMAP:
        def __init__(self, n_components, metric, random_state):
            seen.update(n_components=n_components, metric=metric)

        def fit_transform(self, x):
            seen["shape"] = x.shape
            return x[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    generator = torch.Generator().manual_seed(0)
    groups = {"a": torch.randn(30, 16, generator=generator), "b": torch.randn(10, 16, generator=generator)}
    out = project_2d(groups, "umap")
    pca = project_2d(groups, "pca")
    assert out["method"] == "umap" and seen["n_components"] == 2 and seen["metric"] == "cosine"
    assert seen["shape"][0] == 40 and 2 <= seen["shape"][1] < 16 and out["explained_variance"][0] >= 0.5
    assert [len(out["points"][k]) for k in "ab"] == [30, 10]
    assert pca["method"] == "pca" and 0 < sum(pca["explained_variance"]) <= 1.0


def _data_file(path) -> str:
    rows = [{"instruction": f"Is {w} a word?", "input": "", "output": "the correct answer is true", "answer": "true"}
            for w in ("cat", "dog", "sun")]
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_checkpoint):
    """The CLI on a tiny base + a saved PERFT adapter, with --data and the default --out."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_checkpoint("olmoe")
    adapters = []
    for directory, config in (("run", PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=8)),
                              ("other", PerftConfig(variant="perft_e", bottleneck=8))):
        model, _ = load_model(base, device="cpu", progress=False)
        attach_perft(model, config)
        extra = {"training": {"template": "alpaca"}} if directory == "run" else None  # what training records
        adapters.append(save_adapter(model, str(root / directory / "adapter"), extra_metadata=extra))
    main(["--model", base, "--adapter", f"perft={adapters[0]}", "--adapter", f"perft_e={adapters[1]}",
          "--data", _data_file(root / "rows.json"), "--max-length", "32", "--keys-per-expert", "8"])
    return root / "run" / "analysis", adapters


def test_cli_writes_json_markdown_and_pngs(cli_run):
    out, (adapter, other) = cli_run
    result = json.loads((out / "analysis.json").read_text())
    files = [f["file"] for f in result["figures"]]
    assert files == ["layer0_map.png", "layer1_map.png", "similarity.png", "routing_load.png", "routing_agreement.png"]
    report = (out / "report.md").read_text()
    for name in files:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
    assert result["adapters"]["perft"]["directory"] == adapter and result["settings"]["texts"] == 3
    assert result["adapters"]["perft_e"]["directory"] == other and sorted(os.listdir(out.parent.parent / "other")) == [
        "adapter"]  # one report, beside the first adapter only
    assert result["command"].startswith("python -m perft_qlora.analyze --model")
    assert result["settings"]["template"] == "alpaca"  # the first adapter's training template, not the default
    assert "routed tokens" in (out / "report.md").read_text() and "in the `alpaca` prompt template" in (
        out / "report.md").read_text()


def test_data_is_routed_in_the_adapters_training_template(tmp_path):
    from perft_qlora.analysis.analysis import AdapterSpec
    from perft_qlora.analysis.analyze import load_texts, training_template
    from perft_qlora.formats.prompts import format_prompt, released_train_prompt

    def spec(name, template):
        return AdapterSpec(name, str(tmp_path), {"extra": {"training": {"template": template}}} if template else {})

    assert training_template([]) == "released" and training_template([spec("a", None)]) == "released"
    assert training_template([spec("a", "alpaca"), spec("b", None)]) == "alpaca"
    args = types.SimpleNamespace(data=_data_file(tmp_path / "rows.json"), data_split="train", max_texts=2)
    released, alpaca = load_texts(args, "released"), load_texts(args, "alpaca")
    assert released == [released_train_prompt("Is cat a word?", "", "the correct answer is true"),
                        released_train_prompt("Is dog a word?", "", "the correct answer is true")]
    assert alpaca[0] == format_prompt("Is cat a word?", "", "the correct answer is true") != released[0]


def test_every_number_in_the_report_is_in_the_json(cli_run):
    out, _ = cli_run
    result = json.loads((out / "analysis.json").read_text())
    report = (out / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table_rows) == 2 * 4 + 2 * 3  # 2 layers x geometry (base, random, 2 adapters) + routing (base, 2)
    json_numbers = {f"{v:.3f}" for row in result["summary"] for v in row.values() if isinstance(v, float)}
    for line in table_rows:
        for cell in line.strip("|").split("|")[3:]:
            cell = cell.strip()
            if re.fullmatch(r"-?\d+\.\d{3}", cell):
                assert cell in json_numbers, f"{cell} in the report is not in analysis.json"


def test_without_matplotlib_json_and_markdown_say_how_to_get_plots(cli_run, tmp_path, monkeypatch):
    out, _ = cli_run
    result = json.loads((out / "analysis.json").read_text())
    monkeypatch.setattr(report_module, "plots_available", lambda: False)
    written = report_module.write_analysis({k: v for k, v in result.items() if k != "figures"}, str(tmp_path))
    assert written["plots"] == [] and sorted(os.listdir(tmp_path)) == ["analysis.json", "report.md"]
    assert 'plots need matplotlib: pip install -e ".[analyze]"' in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # importing gradio
def test_app_info_panel_shows_the_analysis(cli_run, tiny_checkpoint):
    from test_app import load_app

    from perft_qlora.serving.chat import ChatModel

    _, (adapter, other) = cli_run
    chat = ChatModel(*load_model(tiny_checkpoint("olmoe"), device="cpu", progress=False), name="tiny")
    chat.register_adapter("second", other)
    app = load_app().CompareApp(chat, 2)
    text, plots = app.analysis("second")
    assert "No analysis yet" in text and plots == []  # its report is beside the other adapter, not loaded here
    chat.register_adapter("mine", adapter)
    for name, shown in (("mine", "perft"), ("second", "perft_e")):
        text, plots = app.analysis(name)
        assert f"**Analysis** of `{shown}`" in text and "report.md" in text and f"| 1 | {shown} |" in text
        assert [caption for _, caption in plots][:2] == ["layer0_map.png", "layer1_map.png"]
    text, plots = app.analysis("base")
    assert plots == [] and "Pick an adapter" in text


def _error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1  # cli.error_path, as train and evaluate
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_inputs_give_one_error_line_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import perft_qlora.quant.loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad input")

    monkeypatch.setattr(perft_qlora.quant.loader, "load_model", refuse)
    base, other = tiny_checkpoint("olmoe"), tiny_checkpoint("mixtral")
    model, _ = load_model(other, device="cpu", progress=False)
    attach_perft(model, PerftConfig(variant="perft", num_experts=2, top_k=1))
    foreign = save_adapter(model, str(tmp_path / "mixtral-adapter"))
    line = _error(capsys, ["--model", base, "--adapter", f"m={foreign}"])
    assert "trained for another base model" in line and "model_type='mixtral'" in line
    line = _error(capsys, ["--model", base, "--layers", "0,5"])
    assert "--layers 0,5" in line and "[5] do not exist" in line and "2 decoder layers (0..1)" in line
    assert "--layers" in _error(capsys, ["--model", base, "--layers", "one"])
    assert "does not exist" in _error(capsys, ["--model", base, "--adapter", f"x={tmp_path / 'missing'}"])
    from perft_qlora.training.baseline import attach_lora_baseline

    model, _ = load_model(base, device="cpu", progress=False)
    attach_lora_baseline(model, rank=4, alpha=8.0, dropout=0.0).save_pretrained(str(tmp_path / "lora"))
    assert "peft LoRA adapter" in _error(capsys, ["--model", base, "--adapter", f"lora={tmp_path / 'lora'}"])
    assert "no such directory" in _error(capsys, ["--model", str(tmp_path / "nowhere")])
    monkeypatch.setattr("perft_qlora.analysis.analyze.importlib.util.find_spec", lambda name: None)
    assert "umap-learn" in _error(capsys, ["--model", base, "--projection", "umap"])
