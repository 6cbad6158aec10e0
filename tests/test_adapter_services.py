"""The adapter services every command shares: the ``--adapter`` reading and the base-model fingerprint."""

import pytest

from perft_qlora.method.adapters import named_adapters, split_adapter_spec
from perft_qlora.method.checkpoint import AdapterError, base_fingerprint, fingerprint_mismatches
from perft_qlora.training.tiny import tiny_config


def test_adapter_specs_are_named_or_take_their_folder_name():
    assert split_adapter_spec("perft = runs/a") == ("perft", "runs/a")
    assert split_adapter_spec("runs/top2of4/") == ("top2of4", "runs/top2of4/")
    assert named_adapters(["a=x", "y/b"]) == {"a": "x", "b": "y/b"}
    with pytest.raises(AdapterError, match="takes NAME=DIR or DIR"):
        split_adapter_spec("name=")
    with pytest.raises(AdapterError, match="'a' is used twice or is reserved"):
        named_adapters(["a=x", "a=y"])
    with pytest.raises(AdapterError, match="'base' is used twice or is reserved"):
        named_adapters(["base=x"], reserved=("base",))


def test_the_fingerprint_is_read_from_the_config_and_names_each_difference():
    olmoe, mixtral = tiny_config("olmoe"), tiny_config("mixtral")
    print_ = base_fingerprint(olmoe)
    assert print_ == {"model_type": "olmoe", "hidden_size": olmoe.hidden_size, "num_experts": olmoe.num_experts,
                      "num_layers": olmoe.num_hidden_layers}
    assert fingerprint_mismatches(print_, olmoe) == {}
    wrong = fingerprint_mismatches({**print_, "num_experts": 10**9}, olmoe)
    assert wrong == {"num_experts": (10**9, olmoe.num_experts)}
    assert fingerprint_mismatches(print_, mixtral)["model_type"] == ("olmoe", "mixtral")
