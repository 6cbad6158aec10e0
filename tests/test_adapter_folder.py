"""A saved PERFT adapter folder: transformers and peft no longer mistake it for a peft adapter, its model card says
what it is, and adapters saved with the earlier config name (``adapter_config.json``) still load."""

from __future__ import annotations

import os

import pytest
import torch

from perft_qlora import PerftConfig, attach_perft, load_adapter, save_adapter
from perft_qlora.method.adapters import adapter_kind, training_record
from perft_qlora.method.checkpoint import CONFIG_NAME, LEGACY_CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict
from perft_qlora.training.model_card import render_model_card


@pytest.fixture
def saved(tiny_nf4, tmp_path):
    """(base dir, adapter dir, model): a tiny OLMoE with a PERFT adapter (random up-projections) and its card."""
    model, _ = tiny_nf4("olmoe")
    config = PerftConfig(variant="perft", num_experts=2, top_k=1, bottleneck=4)
    attach_perft(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("perft_experts.up"):
                param.normal_(0, 0.1)
    base = model.config._name_or_path
    card = render_model_card({"base_model": base, "template": "alpaca"}, config.to_dict(), adapter_dir="ADAPTER")
    adapter = save_adapter(model, str(tmp_path / "adapter"), extra_metadata={"training": {"template": "alpaca"}},
                           model_card=card)
    return base, adapter, model


def test_transformers_and_peft_stop_at_the_folder_and_its_card_says_what_it_is(saved):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, model = saved
    assert sorted(os.listdir(adapter)) == ["README.md", WEIGHTS_NAME, CONFIG_NAME]
    with pytest.raises(ValueError, match="Unrecognized model in .*adapter. Should have a `model_type` key"):
        AutoModelForCausalLM.from_pretrained(adapter)  # stops at the folder
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(model, adapter)
    # Under peft's file name (adapters saved before) both took it for a peft adapter: transformers loaded the
    # base model the config names, then failed on the missing peft_type.
    legacy = os.path.join(os.path.dirname(adapter), "legacy")
    os.makedirs(legacy)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        with open(os.path.join(adapter, name), "rb") as src, open(os.path.join(legacy, name if name == WEIGHTS_NAME
                                                                               else LEGACY_CONFIG_NAME), "wb") as dst:
            dst.write(src.read())
    with pytest.raises(TypeError, match="missing required keys: {'peft_type'}"):
        AutoModelForCausalLM.from_pretrained(legacy)
    with pytest.raises(KeyError, match="peft_type"):
        PeftModel.from_pretrained(model, legacy)
    with open(os.path.join(adapter, "README.md"), encoding="utf-8") as handle:
        card = handle.read()
    assert "**A PERFT adapter**" in card and "neither a model" in card and "nor a peft adapter" in card
    assert f"python -m perft_qlora.export --model {base} --adapter ADAPTER --out OUT" in card
    assert 'load_adapter(model, "ADAPTER")' in card and "python -m perft_qlora.generate" in card


def test_an_adapter_saved_with_the_earlier_config_name_still_loads(saved, tiny_nf4):
    _, adapter, model = saved
    os.rename(os.path.join(adapter, CONFIG_NAME), os.path.join(adapter, LEGACY_CONFIG_NAME))  # as saved before
    assert adapter_kind(adapter) == "perft" and training_record(adapter) == {"template": "alpaca"}
    fresh, _ = tiny_nf4("olmoe")
    load_adapter(fresh, adapter)
    expected = adapter_state_dict(model)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in adapter_state_dict(fresh).items())
    save_adapter(fresh, adapter)  # saving over it writes the new name only
    assert sorted(os.listdir(adapter)) == [WEIGHTS_NAME, CONFIG_NAME]
