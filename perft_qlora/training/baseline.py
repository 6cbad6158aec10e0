"""The MoE-agnostic baseline: peft LoRA on the attention projections of the (NF4) model.

The paper compares PERFT with LoRA on attention at equal activated parameters; this builds that
baseline with peft itself, so it is the standard recipe, not a re-implementation. peft keeps the
LoRA weights in float32 (its ``autocast_adapter_dtype``) and wraps bitsandbytes' ``Linear4bit`` directly.
"""

from __future__ import annotations

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attach_lora_baseline(model, rank: int, alpha: float, dropout: float, target_modules=ATTENTION_PROJECTIONS):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA(rank, alpha, dropout) on ``target_modules``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("the LoRA baseline needs peft: pip install 'perft-qlora[dev]' (or pip install peft)") from error
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
