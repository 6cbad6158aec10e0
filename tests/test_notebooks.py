"""notebooks/*.ipynb: committed clean, and executed end to end with nbclient on the tiny model (CPU).

Parameters are injected the way papermill does it: a code cell with the overrides is inserted right after the
cell tagged ``parameters``. Each notebook runs in a temporary working directory, so its relative
``OUTPUT_DIR`` lands there; ``PYTHONPATH`` points the kernel at this checkout, so the install cell is a no-op.
"""

import importlib.util
import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from perft_qlora.evaluation.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "compare_variants")
VARIANTS = ("perft", "perft_e", "perft_d", "perft_s", "lora")
CELL_TIMEOUT_S = 600
TINY_EVAL_LIMIT = 4

pytestmark = pytest.mark.slow


def read_notebook(name):
    return nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)


def parameters_index(nb):
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def with_parameters(name, **parameters):
    """Notebook ``name`` with a cell setting ``parameters`` inserted after its parameters cell (as papermill does)."""
    nb = read_notebook(name)
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_index(nb) + 1, injected)
    return nb


def execute(nb, workdir, monkeypatch):
    """Run ``nb`` in place, in ``workdir``, with this checkout importable; returns it."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return nb


def outputs(nb, mime):
    """Every ``mime`` payload of display outputs, in cell order."""
    return [out["data"][mime] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if mime in out.get("data", {})]


def stream_text(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out["output_type"] == "stream")


def markdown_table(nb, header_start):
    """Rows (lists of cell strings) of the first markdown output whose table starts with ``header_start``."""
    for text in outputs(nb, "text/markdown"):
        if text.startswith(header_start):
            lines = [line for line in text.splitlines() if line.startswith("|")]
            return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    raise AssertionError(f"no markdown table starting with {header_start!r} in the outputs")


@pytest.fixture(scope="module")
def module_monkeypatch():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, module_monkeypatch):
    workdir = tmp_path_factory.mktemp("quickstart")
    nb = with_parameters("quickstart", TINY=True, TINY_MAX_STEPS=3, TINY_EVAL_LIMIT=TINY_EVAL_LIMIT,
                         OUTPUT_DIR="runs/qs", LAUNCH_APP=False)
    execute(nb, workdir, module_monkeypatch)
    return nb, workdir / "runs" / "qs"


@pytest.fixture(scope="module")
def compare_variants(tmp_path_factory, module_monkeypatch):
    workdir = tmp_path_factory.mktemp("compare")
    nb = with_parameters("compare_variants", TINY=True, TINY_MAX_STEPS=3, TINY_EVAL_LIMIT=TINY_EVAL_LIMIT,
                         OUTPUT_DIR="runs/cv", VARIANTS=list(VARIANTS))
    execute(nb, workdir, module_monkeypatch)
    return nb, workdir / "runs" / "cv"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    nb = read_notebook(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "clear the outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    params = nb.cells[parameters_index(nb)].source
    assert re.search(r"^TINY = None\b", params, re.MULTILINE)  # the full run unless told otherwise (or no GPU)
    assert re.search(r"^OUTPUT_DIR = \"runs/", params, re.MULTILINE)
    for cell in nb.cells:  # no machine-specific absolute paths
        assert not re.search(r"[\"'](/(work|home|root|tmp|Users|content)/|[A-Z]:\\\\)", cell.source), cell.source


def test_quickstart_trains_evaluates_and_shows_the_results(quickstart):
    nb, out = quickstart
    assert sorted(os.listdir(out / "train" / "adapter")) == ["README.md", "adapter_model.safetensors", "perft_config.json"]
    assert (out / "train" / "base" / "config.json").is_file()
    with open(out / "train" / "adapter" / "perft_config.json") as handle:
        assert json.load(handle)["perft"]["variant"] == "perft"
    rows = markdown_table(nb, "| model | demo")
    assert [row[0] for row in rows] == ["base", "perft"]
    with open(out / "eval" / "summary.json") as handle:
        summary = json.load(handle)
    for model in ("base", "perft"):
        result = summary["results"][model]["demo"]
        assert result["total"] == TINY_EVAL_LIMIT
        assert rows[[r[0] for r in rows].index(model)][1] == f"{100 * result['accuracy']:.1f}"
    text = stream_text(nb)
    assert "python -m perft_qlora.train --demo --max-steps 3" in text and "adapter saved to" in text


def test_quickstart_prints_the_app_command_without_launching_it(quickstart):
    nb, _ = quickstart
    text = stream_text(nb)
    command = next(line.strip() for line in text.splitlines() if "compare.py" in line and "--share" in line)
    assert command.startswith("python ") and command.endswith(" --share")
    assert "--model runs/qs/train/base --adapter perft=runs/qs/train/adapter" in command
    assert not os.path.isabs(command.split()[1]) and os.path.isfile(os.path.join(REPO, "apps", "compare.py"))
    assert "The app was not launched" in text and "gradio.live" not in text


def test_quickstart_command_helper_streams_output_and_raises_on_failure(tmp_path, monkeypatch):
    """The notebook's ``run`` helper shows the command's output and stops the notebook when the command fails,
    where a plain ``!python ...`` would carry on."""
    helper = next(cell for cell in read_notebook("quickstart").cells if "def run(" in cell.source)
    failing = "run([sys.executable, '-c', 'import sys; print(\"half done\"); sys.exit(3)'])"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(helper.source), nbformat.v4.new_code_cell(failing),
        nbformat.v4.new_code_cell("print('after the failure')"),
    ])
    with pytest.raises(CellExecutionError, match="returned non-zero exit status 3"):
        execute(nb, tmp_path, monkeypatch)
    text = stream_text(nb)
    assert "$ python -c" in text and "half done" in text and "after the failure" not in text


def test_compare_variants_parameter_table(compare_variants):
    nb, out = compare_variants
    rows = {row[0]: row for row in markdown_table(nb, "| variant | PEFT experts | trainable")}
    assert list(rows) == list(VARIANTS)
    trainable = {v: int(rows[v][2].replace(",", "")) for v in VARIANTS}
    activated = {v: int(rows[v][3].replace(",", "")) for v in VARIANTS}
    assert activated["lora"] == trainable["lora"] > 0  # dense: every token uses every LoRA weight
    assert activated["perft_s"] == trainable["perft_s"] > 0  # one shared expert
    assert activated["perft_d"] == trainable["perft_d"] > trainable["perft_s"]  # all M experts, always on
    assert 0 < activated["perft"] < trainable["perft"]  # Top-2 of 4 experts (+ the router)
    assert 0 < activated["perft_e"] < trainable["perft_e"]  # the base router's top-2 of 8
    assert rows["perft"][1] == "2 of 4 expert(s) per token" and rows["perft_e"][1] == "2 of 8 expert(s) per token"
    assert all(float(rows[v][5]) > 0 and float(rows[v][6]) > 0 for v in VARIANTS)  # train and eval losses logged
    for variant in VARIANTS:
        config = "adapter_config.json" if variant == "lora" else "perft_config.json"  # peft's name for peft's adapter
        assert {config, "adapter_model.safetensors"} <= set(os.listdir(out / variant / "adapter"))
    with open(out / "lora" / "adapter" / "adapter_config.json") as handle:
        assert json.load(handle)["peft_type"] == "LORA"


def test_compare_variants_accuracy_table(compare_variants):
    nb, out = compare_variants
    rows = markdown_table(nb, "| model | demo")
    assert [row[0] for row in rows] == ["base", *VARIANTS]
    with open(out / "eval" / "summary.json") as handle:
        results = json.load(handle)["results"]
    with open(out / "eval" / "predictions.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    demo = TASKS["demo"]
    for row in rows:  # each cell is the accuracy re-scored here from the raw generations
        scored = [demo.is_correct(demo.extract(r["response"]), r["gold"]) for r in records if r["model"] == row[0]]
        assert len(scored) == results[row[0]]["demo"]["total"] == TINY_EVAL_LIMIT
        assert results[row[0]]["demo"]["correct"] == sum(scored)
        assert row[1] == f"{100 * sum(scored) / len(scored):.1f}", row


def test_compare_variants_routing(compare_variants):
    nb, _ = compare_variants
    page = "".join(outputs(nb, "text/html"))
    tables = dict(re.findall(r"<table class='routing' data-variant='(\w+)'>(.*?)</table>", page, re.DOTALL))
    assert sorted(tables) == ["perft", "perft_d", "perft_e", "perft_s"]
    experts = {"perft": 4, "perft_e": 8, "perft_d": 4, "perft_s": 1}
    for variant, table in tables.items():
        layers = re.findall(r"<tr data-layer='(\d+)'>(.*?)</tr>", table, re.DOTALL)
        assert [layer for layer, _ in layers] == ["0", "1", "2", "3"]  # the shipped demo base's four MoE layers
        for _, row in layers:
            shares = [float(share) for share in re.findall(r">([\d.]+)%<", row)]
            assert len(shares) == experts[variant] and sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares))
    assert re.search(r"<p class='unrouted'>No PEFT router \(dense\): lora</p>", page)
    if importlib.util.find_spec("matplotlib") is not None:  # the kernel shares this environment
        assert outputs(nb, "image/png"), "matplotlib is installed, so the routing heat maps should be drawn"
    else:
        assert "matplotlib is not installed" in stream_text(nb)


def test_compare_variants_analysis(compare_variants):
    """The last cells run ``python -m perft_qlora.analyze`` on the routed variants and show its tables and plots."""
    nb, out = compare_variants
    with open(out / "analysis" / "analysis.json") as handle:
        result = json.load(handle)
    assert sorted(result["adapters"]) == ["perft", "perft_d", "perft_e", "perft_s"]  # LoRA has no PEFT experts
    assert result["settings"]["tokens"] > 0 and result["num_layers"] == 4  # the shipped demo base
    assert sorted(result["layers"]) == [str(i) for i in range(4)]  # every layer by default
    shown = [text for text in outputs(nb, "text/markdown") if text.startswith("# Analysis of")]
    assert len(shown) == 1 and "## Routing of real tokens" in shown[0]
    files = [figure["file"] for figure in result["figures"]]
    if importlib.util.find_spec("matplotlib") is not None:
        assert "layer0_map.png" in files and all((out / "analysis" / name).is_file() for name in files)
    else:
        assert files == [] and "plots need matplotlib" in shown[0] + stream_text(nb)
