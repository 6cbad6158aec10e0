"""`python -m perft_qlora.train`: the demo end to end, options, resume parity, every variant, the losses it logs."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from perft_qlora import load_adapter, load_model
from perft_qlora.errors import UsageError
from perft_qlora.method.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from perft_qlora.training.backends import BackendUnavailableError, get_backend
from perft_qlora.training.train import main, run
from perft_qlora.training.train_options import DEMO_PRESETS, parse_args
from perft_qlora.training.trainer import PerftSFTTrainer


def quick_args(out, *extra):
    """The demo, cut to a few small steps without validation."""
    return parse_args([
        "--demo", "--output-dir", str(out), "--max-steps", "3", "--val-size", "0", "--batch-size", "4",
        "--max-length", "128", "--logging-steps", "1", "--save-steps", "100", "--warmup-steps", "0", *extra,
    ])


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's first command, as is (only the output directory differs)."""
    out = tmp_path_factory.mktemp("demo")
    trainer = run(parse_args(["--demo", "--output-dir", str(out)]))
    return out, trainer


def test_demo_loss_falls_and_the_best_adapter_is_written(demo_run):
    out, trainer = demo_run
    losses = [entry["loss"] for entry in train_logs(trainer)]
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert sorted(os.listdir(out / "adapter")) == sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME])
    with open(out / "adapter" / CONFIG_NAME) as handle:
        meta = json.load(handle)
    assert meta["perft"]["variant"] == "perft" and meta["extra"]["training"]["data"] == DEMO_PRESETS["data"]
    assert meta["extra"]["training"]["template"] == "released"
    card = (out / "adapter" / "README.md").read_text()  # our model card, not TRL's ("[None](https://...None)")
    assert "None" not in card and str(out / "base") in card and "| prompt template | `released` |" in card
    assert "| variant | `perft` |" in card and f"| best eval loss | {trainer.state.best_metric:.4g} |" in card
    assert "load_adapter(model" in card and (out / "README.md").read_text().startswith("# perft adapter for")
    checkpoint = out / "checkpoint-45"
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", WEIGHTS_NAME} <= set(os.listdir(checkpoint))
    assert not any(name.startswith("model") for name in os.listdir(checkpoint))  # no base weights in checkpoints
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-45")


def test_demo_adapter_reloads_into_a_fresh_base_with_identical_outputs(demo_run):
    out, trainer = demo_run
    fresh, tokenizer = load_model(str(out / "base"), device="cpu", progress=False)
    load_adapter(fresh, str(out / "adapter"))
    batch = tokenizer(["Does the word 'abcde' contain the letter 'h'?"], return_tensors="pt")
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trained(**batch).logits, fresh(**batch).logits)


def test_demo_logs_both_balance_losses_throughput_memory_and_routing(demo_run):
    _, trainer = demo_run
    entry = train_logs(trainer)[-1]
    for key in ("aux_loss", "perft_aux_loss", "tokens_per_second", "peak_rss_gib", "learning_rate",
                "routing/L0_imbalance", "routing/L1_entropy"):
        assert key in entry, key
    assert entry["tokens_per_second"] > 0 and 1.0 <= entry["routing/L0_imbalance"] <= 4.0
    assert "eval_perft_aux_loss" in [k for e in trainer.state.log_history for k in e]


def test_console_shows_one_bar_and_aligned_eval_lines_not_raw_dicts(tmp_path, capsys):
    main(["--demo", "--output-dir", str(tmp_path), "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2",
          "--logging-steps", "1", "--batch-size", "4", "--max-length", "128"])
    err = capsys.readouterr().err
    assert "{'loss'" not in err and "'eval_loss'" not in err and "Tokenizing train dataset" not in err
    evals = [line[line.index("eval  step"):] for line in err.splitlines() if "eval  step" in line]
    assert len(evals) == 2 and evals[0].index("loss") == evals[1].index("loss")  # aligned columns
    assert "loss=" in err and "lr=" in err and "tok/s=" in err  # the bar's postfix
    trainer = run(quick_args(tmp_path / "again", "--max-steps", "1"))
    kinds = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    assert "TrainingProgress" in kinds and not kinds & {"ProgressCallback", "PrinterCallback"}


def test_perft_balance_loss_is_added_to_the_training_loss(tmp_path):
    trainer = run(quick_args(tmp_path, "--max-steps", "1"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()  # no dropout: two forwards give the same numbers
    with torch.no_grad():
        with_aux = trainer.compute_loss(trainer.model, dict(batch))
        aux = trainer._metrics["eval"]["perft_aux_loss"][-1]
        coef, trainer.perft_aux_loss_coef = trainer.perft_aux_loss_coef, 0.0
        without = trainer.compute_loss(trainer.model, dict(batch))
    assert coef == pytest.approx(0.01)  # OLMoE's recipe value
    assert (with_aux - without).item() == pytest.approx(coef * aux, rel=1e-3)


@pytest.mark.parametrize("variant", ["perft", "perft_e", "perft_d", "perft_s", "lora"])
def test_every_variant_trains_with_gradient_checkpointing(tmp_path, variant):
    trainer = run(quick_args(tmp_path, "--variant", variant, "--max-steps", "2"))
    model = trainer.model
    assert model.is_activation_checkpointing
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    # Up-projections start at zero: after two steps they must have moved (gradients flowed through checkpointing).
    ups = [p for n, p in trainable.items() if n.endswith(("perft_experts.up", "lora_B.default.weight"))]
    assert ups and all(p.abs().sum() > 0 for p in ups)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in train_logs(trainer))
    adapter = tmp_path / "adapter"
    expected = {"adapter_config.json" if variant == "lora" else CONFIG_NAME, WEIGHTS_NAME}  # peft's file name for lora
    assert expected <= set(os.listdir(adapter))


def test_mixtral_checkpoint_trains(tmp_path):
    from perft_qlora.training.tiny import save_tiny_model

    base = save_tiny_model(str(tmp_path / "mixtral"), "mixtral")
    trainer = run(quick_args(tmp_path / "out", "--model", base, "--max-steps", "2", "--no-completion-only-loss"))
    assert trainer.perft_aux_loss_coef == pytest.approx(0.02)  # Mixtral's recipe value
    assert "perft_aux_loss" in train_logs(trainer)[-1]


class StopAt(TrainerCallback):
    """Simulates a crash right after the checkpoint at ``step`` was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["--max-steps", "6", "--save-steps", "3", "--adapter-dropout", "0.1"]
    full = run(quick_args(tmp_path / "full", *common))
    interrupted = run(quick_args(tmp_path / "cut", *common), callbacks=[StopAt(3)])
    assert interrupted.state.global_step == 3
    resumed = run(quick_args(tmp_path / "cut", *common, "--resume"))
    assert resumed.state.global_step == 6
    expected = {e["step"]: e["loss"] for e in train_logs(full)}
    got = {e["step"]: e["loss"] for e in train_logs(resumed) if e["step"] > 3}  # 1-3 come from the checkpoint
    assert set(got) == {4, 5, 6}
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)


def test_checkpoints_store_the_optimizer_by_name_and_earlier_ones_still_resume(tmp_path):
    """optimizer.pt holds torch's by-name state dict (the same in every engine, so FSDP and one process can resume
    each other's checkpoints); a checkpoint in the Trainer's own numbered form (before that) resumes the same."""
    common = ["--max-steps", "5", "--save-steps", "3"]
    interrupted = run(quick_args(tmp_path / "named", *common), callbacks=[StopAt(3)])
    saved = torch.load(tmp_path / "named" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    names = {n for n, p in interrupted.model.named_parameters() if p.requires_grad}
    assert set(saved["state"]) == names == {n for group in saved["param_groups"] for n in group["params"]}
    shutil.copytree(tmp_path / "named", tmp_path / "numbered")
    torch.save(interrupted.optimizer.state_dict(), tmp_path / "numbered" / "checkpoint-3" / "optimizer.pt")
    adapters = {}
    for kind in ("named", "numbered"):
        run(quick_args(tmp_path / kind, *common, "--resume"))
        adapters[kind] = load_file(tmp_path / kind / "adapter" / WEIGHTS_NAME)
    assert adapters["named"].keys() == adapters["numbered"].keys()
    for key, value in adapters["named"].items():
        assert torch.equal(value, adapters["numbered"][key]), key


def test_existing_runs_need_resume_or_overwrite_and_demo_removes_only_its_own(tmp_path, capsys):
    plain = ["--output-dir", str(tmp_path), "--max-steps", "1", "--save-steps", "1", "--val-size", "0",
             "--batch-size", "4", "--max-length", "128", "--model", "m", "--data", "d.json"]
    run(quick_args(tmp_path, "--max-steps", "1", "--save-steps", "1"))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="pass --resume"):
        run(parse_args(plain))  # without --demo nothing is overwritten by default
    capsys.readouterr()
    again = run(quick_args(tmp_path, "--max-steps", "1", "--save-steps", "1"))  # a previous demo's directory
    assert again.state.global_step == 1 and (tmp_path / "checkpoint-1").is_dir()
    assert "--demo (a previous demo run): removing checkpoint-1/, adapter/, base/ from" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what the demo wrote is removed
    with pytest.raises(UsageError, match="no checkpoint"):
        run(quick_args(tmp_path / "empty", "--resume"))
    other = tmp_path / "other-run"  # checkpoints and an adapter that no --demo wrote
    (other / "checkpoint-80").mkdir(parents=True)
    (other / "adapter").mkdir()
    with pytest.raises(UsageError, match=r"earlier run \(checkpoint-80/, adapter/\) \(it was not written by --demo\)"):
        run(quick_args(other, "--max-steps", "1"))
    assert (other / "checkpoint-80").is_dir() and (other / "adapter").is_dir()
    run(quick_args(other, "--max-steps", "1", "--overwrite"))
    assert not (other / "checkpoint-80").exists() and "--overwrite: removing checkpoint-80/, adapter/" in capsys.readouterr().err


def test_options_precedence_cli_over_file_over_demo_presets(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 0.5\nbottleneck: 4\nlayers: 0,1\nvariant: perft_e\n")
    args = parse_args(["--demo", "--config", str(config), "--bottleneck", "2"])
    assert args.learning_rate == 0.5          # file beats the demo preset (1e-2)
    assert args.bottleneck == 2               # command line beats the file
    assert args.layers == (0, 1) and args.variant == "perft_e"
    assert args.epochs == DEMO_PRESETS["epochs"] and args.data == DEMO_PRESETS["data"]
    plain = parse_args(["--model", "m", "--data", "d.json"])
    assert plain.learning_rate is None and plain.warmup_steps == 100 and plain.batch_size == 16
    assert plain.max_length == 256 and plain.val_size == 120 and plain.adapter_dropout == 0.05
    assert plain.num_experts == 4 and plain.top_k == 2 and plain.gradient_checkpointing


def test_config_file_accepts_json_and_demo_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "run.json"
    good.write_text(json.dumps({"demo": True, "max_steps": 7}))
    args = parse_args(["--config", str(good)])
    assert args.demo and args.max_steps == 7 and args.learning_rate == DEMO_PRESETS["learning_rate"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1e-5\n")
    with pytest.raises(UsageError, match="unknown option.*learning_rat"):
        parse_args(["--config", str(bad)])


def test_model_and_data_are_required_without_demo(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data", "d.json"])
    assert "--model and --data are required" in capsys.readouterr().err


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--learning-rate", "--aux-loss-coef", "--completion-only-loss", "--resume", "--backend", "--val-size"):
        assert option in text
    assert "(default: 100)" in text and "recipe" in text


def test_malformed_training_rows_are_reported_and_skipped(tmp_path, capsys):
    rows = json.load(open(DEMO_PRESETS["data"]))[:12] + [{"instruction": "x"}, {"output": 3}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    trainer = run(quick_args(tmp_path / "out", "--data", str(data), "--max-steps", "1", "--max-length", "16",
                             "--no-completion-only-loss"))  # a truncated response would leave nothing to learn
    assert len(trainer.train_dataset) == 12
    err = capsys.readouterr().err
    assert "12 rows used, 2 skipped" in err and "row 13: missing or empty 'output'" in err
    assert "12 of 12 examples checked are longer than --max-length 16" in err


def test_unsloth_backend_fails_at_once_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the failure path is for machines without one")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        get_backend("unsloth")


def test_trainer_refuses_a_model_without_trainable_parameters(tiny_nf4):
    model, tokenizer = tiny_nf4("olmoe")
    with pytest.raises(ValueError, match="no trainable parameters"):
        PerftSFTTrainer(model, processing_class=tokenizer)


@pytest.mark.parametrize("variant", ["lora", "perft"])
def test_the_adapter_remembers_its_prompt_template(tmp_path, variant):
    """evaluate and the app use the template an adapter was trained with: a peft (LoRA) adapter included, whose
    own adapter_config.json has no field for it (a training record beside it)."""
    from perft_qlora.evaluation.evaluate import adapter_template
    from perft_qlora.method.adapters import TRAINING_NAME, training_record

    run(quick_args(tmp_path, "--variant", variant, "--max-steps", "2", "--save-steps", "2", "--template", "alpaca"))
    for directory in (tmp_path / "adapter", tmp_path / "checkpoint-2"):
        assert adapter_template(str(directory)) == "alpaca"
        assert training_record(str(directory))["variant"] == variant
    assert (TRAINING_NAME in os.listdir(tmp_path / "adapter")) == (variant == "lora")


def test_options_are_resolved_once_into_a_frozen_object(tmp_path):
    options = parse_args(["--demo", "--output-dir", str(tmp_path)])
    assert options.model == str(tmp_path / "base") and options.demo_base  # the demo base's copy, resolved here
    assert options.device in ("cpu", "cuda") and (options.num_experts, options.top_k) == (4, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cpu"
    given = parse_args(["--demo", "--model", "m", "--output-dir", str(tmp_path)])
    assert given.model == "m" and not given.demo_base
    plain = parse_args(["--model", "m", "--data", "d.json", "--variant", "perft_e"])
    assert (plain.num_experts, plain.top_k) == (None, None)  # M and K' defaults only where the variant takes them
