"""`python -m perft_qlora.export`: the folder plain transformers loads scores exactly as perft_qlora does.

Every family x variant is exported from a tiny model with a random (non-zero) adapter; one fresh process in
which ``perft_qlora`` cannot be imported loads every folder with ``trust_remote_code=True`` and checks its
float32 logits and greedy tokens against perft_qlora's own model with the adapter.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from perft_qlora import PerftConfig, attach_perft, load_adapter, load_model, save_adapter
from perft_qlora.export import main as export_main
from perft_qlora.quant.arch import ARCHITECTURES
from perft_qlora.training.tiny import save_tiny_model

VARIANTS = {"perft": {"num_experts": 4, "top_k": 2}, "perft_e": {}, "perft_d": {"num_experts": 2}, "perft_s": {}}
NEW_TOKENS = 6


def make_adapter(base: str, directory: str, variant: str, template: str = "alpaca", seed: int = 0,
                 scale: float = 0.3) -> str:
    """A saved adapter with every tensor random (the up-projections too), so it changes the logits."""
    model, _ = load_model(base, quantize="none", device="cpu", dtype=torch.float32, progress=False)
    attach_perft(model, PerftConfig(variant=variant, bottleneck=8, activation="silu" if variant == "perft_d" else None,
                                    **VARIANTS[variant]), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "perft_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_adapter(model, directory, extra_metadata={"training": {"template": template}})


def reference(model, ids: torch.Tensor) -> dict:
    """perft_qlora's float32 logits and greedy continuation of ``ids``."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=257)
    return {"logits": logits, "tokens": tokens[:, ids.shape[1]:]}


CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["perft_qlora"] = None  # the package is installed here; the exported folder must not need it
    try:
        import perft_qlora  # noqa: F401
        raise SystemExit("perft_qlora is importable in the child process")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    cases, report = torch.load(sys.argv[1]), {}
    for out, expected in cases.items():
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        ids = expected["ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            tokens = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=257)
        report[out] = {
            "class": type(model).__name__,
            "max_diff": (logits - expected["logits"]).abs().max().item(),
            "scale": expected["logits"].abs().max().item(),
            "same_tokens": torch.equal(tokens[:, ids.shape[1]:], expected["tokens"]),
        }
    print(json.dumps(report))
""").replace("NEW_TOKENS", str(NEW_TOKENS))


def run_without_perft_qlora(cases: dict, tmp_path) -> dict:
    """Load every exported folder in a fresh process that cannot import perft_qlora; its report per folder."""
    torch.save(cases, tmp_path / "cases.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "cases.pt")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_lora_adapter(base: str, directory: str) -> str:
    """A peft LoRA adapter (the ``--variant lora`` baseline's kind) with non-zero B matrices."""
    from perft_qlora.training.baseline import attach_lora_baseline

    model, _ = load_model(base, quantize="none", device="cpu", dtype=torch.float32, progress=False)
    model = attach_lora_baseline(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family x variant exported in float32 (base weights as the checkpoint has them), two --dequantized
    exports and a LoRA one; perft_qlora's references; and the report of one process without perft_qlora."""
    root = tmp_path_factory.mktemp("export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    cases, folders = {}, {}

    def export(key, base, adapter, *flags, quantize="none"):
        out = str(root / "-".join(["out", *key]))
        export_main(["--model", base, "--adapter", adapter, "--out", out, "--dtype", "float32", *flags])
        model, _ = load_model(base, quantize=quantize, device="cpu", dtype=torch.float32, progress=False)
        if key[1] == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        else:
            load_adapter(model, adapter)
        cases[out] = {"ids": ids, **reference(model, ids)}
        folders[key] = (base, adapter, out)

    for arch in ARCHITECTURES:
        base = save_tiny_model(str(root / f"base-{arch}"), arch, seed=1)
        for variant in VARIANTS:
            export((arch, variant), base, make_adapter(base, str(root / f"adapter-{arch}-{variant}"), variant))
    for arch in ("olmoe", "deepseek_v3"):
        base, adapter, _ = folders[(arch, "perft")]
        export((arch, "perft", "dequantized"), base, adapter, "--dequantized", quantize="nf4")
    base = folders[("qwen3_moe", "perft")][0]
    export(("qwen3_moe", "lora"), base, make_lora_adapter(base, str(root / "adapter-lora")))
    torch.set_num_threads(threads)
    return cases, folders, run_without_perft_qlora(cases, root)


def test_every_family_and_variant_loads_without_perft_qlora_and_matches(exported):
    cases, folders, report = exported
    assert set(report) == set(cases)
    for key, (_, _, out) in folders.items():
        row = report[out]
        assert row["class"] == ("Qwen3MoeForCausalLM" if key[1] == "lora" else "Perft" + row["class"][5:]), row
        assert row["class"].startswith("Perft") or key[1] == "lora", row
        tolerance = 1e-4 if "dequantized" in key else 1e-5  # the NF4 model's linears go through bitsandbytes
        assert row["max_diff"] <= tolerance * max(1.0, row["scale"]), (key, row)
        assert row["same_tokens"], (key, row)
    assert len(folders) == len(ARCHITECTURES) * len(VARIANTS) + 3


def test_the_adapter_matters_in_the_exported_model(exported):
    """The references differ from the base without the adapter, so matching them checks the PERFT blocks."""
    cases, folders, _ = exported
    base, _, out = folders[("qwen2_moe", "perft")]
    model, _ = load_model(base, quantize="none", device="cpu", dtype=torch.float32, progress=False)
    with torch.no_grad():
        plain = model(input_ids=cases[out]["ids"]).logits
    assert (plain - cases[out]["logits"]).abs().max() > 1e-2


def test_folder_layout_and_config(exported):
    _, folders, _ = exported
    out = folders[("mixtral", "perft")][2]
    names = set(os.listdir(out))
    assert {"config.json", "modeling_perft.py", "model.safetensors.index.json", "README.md", "tokenizer.json",
            "adapter"} <= names
    with open(os.path.join(out, "config.json")) as handle:
        config = json.load(handle)
    assert config["model_type"] == "mixtral"
    assert config["auto_map"] == {"AutoConfig": "modeling_perft.PerftMixtralConfig",
                                  "AutoModelForCausalLM": "modeling_perft.PerftMixtralForCausalLM"}
    assert config["perft"]["variant"] == "perft" and config["perft"]["num_experts"] == 4
    assert config["perft"]["prompt_template"] == "alpaca" and config["perft"]["renormalize"] is True
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == 1 + 2  # the embeddings and head, then one shard per decoder layer
    with open(os.path.join(out, "modeling_perft.py")) as handle:
        imported = {line.split()[1].split(".")[0] for line in handle if line.startswith(("import ", "from "))}
    assert imported == {"__future__", "torch", "transformers"}


def test_tokenizer_carries_the_adapter_template(exported):
    from transformers import AutoTokenizer

    from perft_qlora.formats.prompts import format_prompt

    _, folders, _ = exported
    out = folders[("olmoe", "perft")][2]
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Is it raining?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == format_prompt("Is it raining?")


def test_round_trip_into_the_toolkit(exported, caplog):
    """load_model reads the exported folder as a base (the adapter tensors left out); its adapter/ attaches."""
    _, folders, _ = exported
    caplog.set_level(logging.WARNING, logger="perft_qlora.quant.loader")
    base, adapter, out = folders[("olmoe", "perft_e")]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name, (model_dir, adapter_dir) in {"original": (base, adapter), "exported": (out, os.path.join(out, "adapter"))}.items():
        model, _ = load_model(model_dir, quantize="nf4", device="cpu", progress=False)
        load_adapter(model, adapter_dir)
        logits[name] = model(input_ids=ids).logits
    assert torch.equal(logits["original"], logits["exported"])
    assert "not used by the model" not in caplog.text  # the adapter's tensors are expected there
    model.train()
    out_ = model(input_ids=ids, labels=ids)
    out_.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "perft_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_input_is_one_line_before_loading(tmp_path, capsys):
    base = save_tiny_model(str(tmp_path / "base"), "olmoe")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", base, "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "error: --adapter" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    adapter = make_adapter(base, str(tmp_path / "adapter"), "perft_s")
    with pytest.raises(SystemExit):
        export_main(["--model", base, "--adapter", adapter, "--out", str(tmp_path / "out")])
    assert "is not empty" in capsys.readouterr().err


def test_fused_and_per_expert_checkpoints_export_the_same_tensors(exported, tmp_path):
    """The tiny bases are saved in the hub's per-expert layout (Mixtral's block_sparse_moe.experts.N.w1 ...); the
    same weights in transformers-5's fused layout export to the same tensors."""
    from safetensors.torch import load_file, save_file

    _, folders, _ = exported
    base, adapter, out = folders[("mixtral", "perft_s")]
    model, _ = load_model(base, quantize="none", device="cpu", dtype=torch.bfloat16, progress=False)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(base, name)) as handle:
            (fused / name).write_text(handle.read())
    again = str(tmp_path / "out")
    export_main(["--model", str(fused), "--adapter", adapter, "--out", again, "--dtype", "float32"])

    def tensors(folder):
        merged = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                merged.update(load_file(os.path.join(folder, name)))
        return merged

    ours, theirs = tensors(out), tensors(again)
    assert ours.keys() == theirs.keys() and "model.layers.1.mlp.experts.gate_up_proj" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
