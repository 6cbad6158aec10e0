"""The adapter's model card (``README.md``): what was trained, on what, how well, and how to load it.

``PerftSFTTrainer`` writes it instead of TRL's automatic card (whose base model reads ``None`` for a local
model): beside every saved PERFT adapter, and into ``--output-dir`` unless a ``README.md`` of the user's is there
(``output_dir.card_is_free``).
"""

from __future__ import annotations


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _what_this_is(is_perft: bool, base: str, adapter_dir: str) -> list[str]:
    """The card's first paragraph: what the folder is, and what opens it (the hub shows this card)."""
    if not is_perft:
        return ["A peft LoRA adapter (perft_qlora's baseline, `--variant lora`) trained on an NF4 base model: "
                "`peft.PeftModel.from_pretrained(base_model, this_folder)` opens it."]
    return [
        ("**A PERFT adapter** (routed PEFT experts, arXiv 2508.02587) trained with perft_qlora on an NF4 base "
         "model: `perft_config.json` + `adapter_model.safetensors`, the adapter only, not the base weights."),
        "",
        ("It is neither a model (`transformers.AutoModelForCausalLM.from_pretrained` has no `config.json` to "
         "read here) nor a peft adapter (`peft.PeftModel.from_pretrained` finds no `adapter_config.json`): load "
         "it with perft_qlora as below, or export base model and adapter to a folder plain transformers opens: "
         f"`python -m perft_qlora.export --model {base} --adapter {adapter_dir} --out OUT`."),
    ]


def render_model_card(metadata: dict, perft: dict | None, report=None, adapter_dir: str = "ADAPTER_DIR") -> str:
    """Markdown for an adapter trained with ``metadata`` (the run's ``extra.training``: base model, data, template,
    steps, best eval loss), ``perft`` (``PerftConfig.to_dict()``, None for the LoRA baseline) and ``report``
    (a ``model.ParameterReport``)."""
    base = metadata.get("base_model") or "BASE_MODEL"
    variant = metadata.get("variant") or (perft or {}).get("variant", "lora")
    lines = [
        f"# {variant} adapter for {base}",
        "",
        *_what_this_is(perft is not None, base, adapter_dir),
        "",
        "| | |",
        "|---|---|",
        f"| base model | {_fmt(base)} |",
        f"| variant | {_fmt(variant)} |",
    ]
    if perft:
        knobs = ", ".join(f"{k}={v}" for k, v in perft.items() if k != "variant" and v is not None)
        lines.append(f"| knobs | {knobs} |")
    if report is not None:
        lines += [f"| trainable parameters | {report.trainable:,} |",
                  (f"| activated per token | {report.trainable_per_token:,} ({report.activated_ratio:.4%} of the "
                   f"backbone's {report.backbone_per_token:,}) |")]
    lines += [
        f"| data | {_fmt(metadata.get('data'))} |",
        f"| prompt template | {_fmt(metadata.get('template'))} |",
        f"| steps | {_fmt(metadata.get('global_step'))} (epoch {_fmt(metadata.get('epoch'))}) |",
        f"| best eval loss | {_fmt(metadata.get('best_eval_loss'))} |",
        f"| seed | {_fmt(metadata.get('seed'))} |",
        "",
        "## Load it",
        "",
        "```python",
        "from perft_qlora import Generator, load_adapter, load_model",
        "",
        f'model, tokenizer = load_model("{base}")  # NF4, experts included',
        f'load_adapter(model, "{adapter_dir}")',
        f'print(Generator.load("{base}", adapter="{adapter_dir}")("INSTRUCTION"))  # the recorded prompt template',
        "```",
        "",
        f'Generate: `python -m perft_qlora.generate --model {base} --adapter {adapter_dir} "INSTRUCTION"`.',
        (f"Evaluate: `python -m perft_qlora.evaluate --model {base} --adapter {adapter_dir} --tasks commonsense` "
         f"(prompts use the adapter's `{metadata.get('template') or 'released'}` template)."),
        "",
    ]
    return "\n".join(lines)
