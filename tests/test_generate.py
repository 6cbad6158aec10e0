"""python -m perft_qlora.generate and perft_qlora.Generator: the recorded template, streaming, --interactive, errors;
the perft-qlora console script that dispatches to every command."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
import torch

import perft_qlora
import perft_qlora.quant.loader as loader_module
from perft_qlora import PerftConfig, attach_perft, load_adapter, load_model, save_adapter
from perft_qlora.commands import COMMANDS
from perft_qlora.commands import main as perft_qlora_command
from perft_qlora.formats.prompts import TEMPLATES
from perft_qlora.generate import main as generate_main

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir, adapter dir): the shipped demo base (a real BPE: its answers are words, which the streamer
    hands out one by one) and a PERFT adapter with random up-projections, recorded as trained with the
    ``alpaca`` template (not the default), so a prompt in the wrong template shows."""
    from perft_qlora.training.demo_base import demo_base_dir

    root = tmp_path_factory.mktemp("generate")
    base = demo_base_dir()
    model, _ = load_model(base, device="cpu", progress=False)
    attach_perft(model, PerftConfig(variant="perft", num_experts=2, top_k=1, bottleneck=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("perft_experts.up"):
                param.normal_(0, 0.05)  # an adapter that changes the answers
    adapter = save_adapter(model, str(root / "adapter"), extra_metadata={"training": {"template": "alpaca"}})
    return base, adapter


def reference(base: str, adapter: str | None, prompt: str) -> str:
    """What plain transformers generate() gives for ``prompt`` on a fresh load (greedy)."""
    model, tokenizer = load_model(base, device="cpu", progress=False)
    if adapter is not None:
        load_adapter(model, adapter)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)


def test_generator_prompts_in_the_recorded_template_and_streams(trained):
    base, adapter = trained
    generator = perft_qlora.Generator.load(base, adapter, device="cpu")
    assert generator.template.name == "alpaca"
    assert generator.prompt("Say hi", "now") == TEMPLATES["alpaca"].eval("Say hi", "now", "")
    pieces = list(generator.stream("Say hi", max_new_tokens=MAX_NEW))
    assert len(pieces) > 1  # streamed, not returned at the end
    alpaca = reference(base, adapter, TEMPLATES["alpaca"].eval("Say hi", "", ""))
    assert "".join(pieces) == alpaca
    assert alpaca != reference(base, adapter, TEMPLATES["released"].eval("Say hi", "", ""))  # the template matters
    assert generator("Say hi", max_new_tokens=MAX_NEW) == alpaca.strip()
    with pytest.warns(UserWarning, match="trained with the 'alpaca' template; prompting it with 'released'"):
        overridden = perft_qlora.Generator.load(base, adapter, template="released", device="cpu")
    assert overridden.template.name == "released"


def test_command_answers_one_instruction_and_the_base_without_adapter(trained, capsys):
    base, adapter = trained
    generate_main(["--model", base, "--adapter", adapter, "Say hi", "--max-new-tokens", str(MAX_NEW), "--device", "cpu"])
    assert capsys.readouterr().out == reference(base, adapter, TEMPLATES["alpaca"].eval("Say hi", "", "")) + "\n"
    generate_main(["--model", base, "Say hi", "--input", "x", "--max-new-tokens", str(MAX_NEW), "--device", "cpu"])
    assert capsys.readouterr().out == reference(base, None, TEMPLATES["released"].eval("Say hi", "x", "")) + "\n"


def test_interactive_reads_lines_until_end_of_input(trained, capsys, monkeypatch):
    base, adapter = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hi\n\n   \nRepeat\tabc\n"))
    assert perft_qlora_command(["generate", "--model", base, "--adapter", adapter, "--interactive",
                                "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]) == 0
    expected = [reference(base, adapter, TEMPLATES["alpaca"].eval(i, x, "")) for i, x in (("Say hi", ""), ("Repeat", "abc"))]
    assert capsys.readouterr().out == "".join(f"{text}\n" for text in expected)  # blank lines skipped


@pytest.mark.parametrize("argv, message", [
    ([], "pass an instruction to answer, or --interactive"),
    (["hi", "--interactive"], "pass an instruction to answer, or --interactive"),
    (["  "], "the instruction is empty"),
    (["hi", "--greedy", "--temperature", "0.5"], "--greedy and --temperature contradict each other"),
    (["hi", "--temperature", "0"], "temperature must be > 0"),
    (["hi", "--adapter", "no/such/dir"], "--adapter no/such/dir: no such directory"),
    (["--interactive", "--input", "x"], "--input is for a single instruction"),
])
def test_bad_input_is_one_error_line_before_any_model_loads(trained, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(loader_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stopped:
        generate_main(["--model", trained[0], *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_adapter_folder_as_model_and_template_override_are_named(trained, capsys, monkeypatch):
    base, adapter = trained
    monkeypatch.setattr(loader_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        generate_main(["--model", adapter, "hi"])
    assert f"error: {adapter} is an adapter folder, not a base model: pass it as --adapter" in capsys.readouterr().err

    def stop(*args, **kwargs):
        raise perft_qlora.AdapterError("stopped after the checks")

    monkeypatch.setattr(loader_module, "load_model", stop)
    with pytest.raises(SystemExit):
        generate_main(["--model", base, "--adapter", adapter, "--template", "released", "hi"])
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: adapter {adapter} was trained with the 'alpaca' template; prompting it with 'released' "
                   "as --template asks", "error: stopped after the checks"]


def test_console_script_dispatches_every_command(capsys):
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]  # 3.10: no tomllib
    assert [line.split("#")[0].strip() for line in scripts.splitlines() if line.strip()] == [
        'perft-qlora = "perft_qlora.commands:main"']
    assert set(COMMANDS) == {"train", "evaluate", "export", "generate", "plan", "analyze", "bench", "app"}
    import importlib.util

    for name, (module, _) in COMMANDS.items():
        if name != "export":  # perft_qlora.exporting.export: issue 25's export command, merged separately
            assert importlib.util.find_spec(module) is not None, module
    assert perft_qlora_command(["plan", "--model", "olmoe-1b-7b"]) == 0
    assert "olmoe" in capsys.readouterr().out.lower()
    assert perft_qlora_command([]) == 2 and "generate" in capsys.readouterr().out
    assert perft_qlora_command(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as help_exit:
        perft_qlora_command(["generate", "--help"])
    assert help_exit.value.code == 0 and "--interactive" in capsys.readouterr().out


def test_apps_compare_runs_from_another_directory(tmp_path):
    """``python /path/to/apps/compare.py`` outside the clone runs the app's code in the package (perft_qlora.app,
    which ``perft-qlora app`` runs too)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "apps" / "compare.py"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "perft-qlora app --demo" in result.stdout, result.stderr
