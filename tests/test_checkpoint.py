"""Adapter checkpoints: save / load round trips (bit-exact logits), atomic overwrite, and bad inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from perft_qlora import (
    AdapterError,
    PerftConfig,
    __version__,
    attach_perft,
    iter_perft_blocks,
    load_adapter,
    save_adapter,
)
from perft_qlora.method.checkpoint import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

ARCHS = ("olmoe", "mixtral")
NUM_LAYERS = 2  # tiny.py: num_hidden_layers=2
HIDDEN_SIZE = 64
NUM_BASE_EXPERTS = {"olmoe": 8, "mixtral": 4}


def _perft_config(**overrides) -> PerftConfig:
    return PerftConfig(**{"variant": "perft", "num_experts": 4, "top_k": 2, **overrides})


def _randomize(model, seed: int, std: float = 0.5) -> None:
    """Give every adapter / PERFT-router parameter random values so the adapter is not a no-op."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for _, block in iter_perft_blocks(model):
            for module in (block.perft_router, block.perft_experts):
                for param in module.parameters():
                    values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                    param.copy_(values.to(param.dtype))
                    count += 1
    assert count > 0


def _logits(model, batch) -> torch.Tensor:
    ids, mask = batch
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{prefix}.{name}": p.detach().clone()
        for i, block in iter_perft_blocks(model)
        for prefix, module in (("router", block.perft_router), ("experts", block.perft_experts))
        for name, p in module.named_parameters()
    }


def _saved(tiny_nf4, directory, arch="olmoe", config=None, seed=0):
    model, _ = tiny_nf4(arch)
    attach_perft(model, config or _perft_config())
    _randomize(model, seed)
    save_adapter(model, str(directory))
    return model


def _edit_config(directory, **changes) -> None:
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        metadata = json.load(f)
    metadata.update(changes)
    with open(path, "w") as f:
        json.dump(metadata, f)


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_bit_exact(arch, tiny_nf4, token_batch, tmp_path):
    base, _ = tiny_nf4(arch)
    base_logits = _logits(base, token_batch)

    model, _ = tiny_nf4(arch)
    config = _perft_config()
    attach_perft(model, config)
    _randomize(model, seed=0)
    expected = _logits(model, token_batch)
    assert not torch.equal(expected, base_logits), "the randomised adapter should change the logits"

    directory = tmp_path / "adapter"
    assert save_adapter(model, str(directory)) == str(directory)
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    with open(directory / CONFIG_NAME) as f:
        metadata = json.load(f)
    for key in ("model_type", "hidden_size", "num_experts", "layers", "library_version", "format_version", "perft"):
        assert key in metadata, key
    assert metadata["model_type"] == arch
    assert metadata["hidden_size"] == HIDDEN_SIZE
    assert metadata["num_experts"] == NUM_BASE_EXPERTS[arch]
    assert metadata["layers"] == list(range(NUM_LAYERS))
    assert metadata["library_version"] == __version__
    assert metadata["format_version"] == FORMAT_VERSION
    assert PerftConfig.from_dict(metadata["perft"]) == config

    # no pickle: a plain safetensors file with exactly the adapter's tensors
    state = load_file(str(directory / WEIGHTS_NAME))
    assert len(state) == len(_adapter_params(model))
    assert all(key.startswith(("layers.0.", "layers.1.")) for key in state)

    fresh, _ = tiny_nf4(arch)
    assert load_adapter(fresh, str(directory)) is fresh
    assert fresh.perft_config == config
    got = _logits(fresh, token_batch)
    assert torch.equal(got, expected)

    original, loaded = _adapter_params(model), _adapter_params(fresh)
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key
        assert original[key].dtype == loaded[key].dtype, key


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "config_kwargs",
    [
        dict(variant="perft_e"),
        dict(variant="perft_d", num_experts=3),
        dict(variant="perft_s"),
        dict(variant="perft", num_experts=4, top_k=2, layers=[1]),
    ],
    ids=["perft_e", "perft_d", "perft_s", "layers1"],
)
def test_round_trip_variants(arch, config_kwargs, tiny_nf4, token_batch, tmp_path):
    config = PerftConfig(**config_kwargs)
    model, _ = tiny_nf4(arch)
    attach_perft(model, config)
    _randomize(model, seed=1)
    expected = _logits(model, token_batch)

    directory = tmp_path / "adapter"
    save_adapter(model, str(directory))
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    with open(directory / CONFIG_NAME) as f:
        metadata = json.load(f)
    expected_layers = config.layers if config.layers is not None else list(range(NUM_LAYERS))
    assert metadata["layers"] == expected_layers

    fresh, _ = tiny_nf4(arch)
    load_adapter(fresh, str(directory))
    assert [i for i, _ in iter_perft_blocks(fresh)] == expected_layers
    assert fresh.perft_config == config
    assert torch.equal(_logits(fresh, token_batch), expected)


def test_round_trip_layers_subset_leaves_other_layer_plain(tiny_nf4, token_batch, tmp_path):
    """With layers=[1], the loaded model must still differ from the base only through layer 1's adapter."""
    base, _ = tiny_nf4("olmoe")
    base_logits = _logits(base, token_batch)
    model = _saved(tiny_nf4, tmp_path / "adapter", config=_perft_config(layers=[1]))
    fresh, _ = tiny_nf4("olmoe")
    load_adapter(fresh, str(tmp_path / "adapter"))
    got = _logits(fresh, token_batch)
    assert torch.equal(got, _logits(model, token_batch))
    assert not torch.equal(got, base_logits)
    state = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert state and all(key.startswith("layers.1.") for key in state)


def test_save_over_existing_replaces_it(tiny_nf4, token_batch, tmp_path):
    directory = tmp_path / "adapter"
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, _perft_config())
    _randomize(model, seed=0)
    first_logits = _logits(model, token_batch)
    save_adapter(model, str(directory))

    _randomize(model, seed=123)
    second_logits = _logits(model, token_batch)
    assert not torch.equal(first_logits, second_logits)
    (directory / "stray.txt").write_text("not part of an adapter")
    with pytest.raises(AdapterError, match="holds files other than an adapter.*stray.txt"):
        save_adapter(model, str(directory))  # never delete what is not ours (e.g. a Trainer checkpoint dir)
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "stray.txt"])
    (directory / "stray.txt").unlink()
    save_adapter(model, str(directory))

    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".adapter")]

    fresh, _ = tiny_nf4("olmoe")
    load_adapter(fresh, str(directory))
    got = _logits(fresh, token_batch)
    assert torch.equal(got, second_logits)
    assert not torch.equal(got, first_logits)


def test_save_creates_missing_parent(tiny_nf4, tmp_path):
    directory = tmp_path / "a" / "b" / "adapter"
    _saved(tiny_nf4, directory)
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert not [name for name in os.listdir(directory.parent) if name.startswith(".adapter")]


# --- bad inputs -------------------------------------------------------------------------------------------


@pytest.fixture
def olmoe_adapter(tiny_nf4, tmp_path):
    directory = tmp_path / "adapter"
    _saved(tiny_nf4, directory)
    return directory


def test_load_dir_without_config(tiny_nf4, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"is not an adapter directory: perft_config\.json \(PERFT\) and adapter_config\.json \(peft\) are missing"):
        load_adapter(model, str(empty))
    assert getattr(model, "perft_config", None) is None


def test_load_nonexistent_dir(tiny_nf4, tmp_path):
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"perft_config\.json \(PERFT\) and adapter_config\.json \(peft\) are missing"):
        load_adapter(model, str(tmp_path / "does-not-exist"))


def test_load_config_not_json(tiny_nf4, olmoe_adapter):
    (olmoe_adapter / CONFIG_NAME).write_text("{not json at all")
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"perft_config\.json is corrupt"):
        load_adapter(model, str(olmoe_adapter))


def test_load_config_json_not_object(tiny_nf4, olmoe_adapter):
    (olmoe_adapter / CONFIG_NAME).write_text("[1, 2, 3]")
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"format_version None"):
        load_adapter(model, str(olmoe_adapter))


def test_load_format_version_99(tiny_nf4, olmoe_adapter):
    _edit_config(olmoe_adapter, format_version=99)
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=rf"format_version 99; .* reads version {FORMAT_VERSION}"):
        load_adapter(model, str(olmoe_adapter))


def test_load_model_type_mismatch(tiny_nf4, olmoe_adapter):
    model, _ = tiny_nf4("mixtral")
    with pytest.raises(AdapterError, match=r"model_type='olmoe' but this model has 'mixtral'"):
        load_adapter(model, str(olmoe_adapter))
    assert getattr(model, "perft_config", None) is None


def test_load_hidden_size_mismatch(tiny_nf4, olmoe_adapter):
    _edit_config(olmoe_adapter, hidden_size=128)
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"hidden_size=128 but this model has 64"):
        load_adapter(model, str(olmoe_adapter))


def test_load_num_experts_mismatch(tiny_nf4, olmoe_adapter):
    _edit_config(olmoe_adapter, num_experts=16)
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"num_experts=16 but this model has 8"):
        load_adapter(model, str(olmoe_adapter))


def test_load_layers_mismatch(tiny_nf4, olmoe_adapter):
    _edit_config(olmoe_adapter, layers=[0])
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"covers layers \[0\], the model has \[0, 1\]"):
        load_adapter(model, str(olmoe_adapter))


def test_load_weights_missing(tiny_nf4, olmoe_adapter):
    os.remove(olmoe_adapter / WEIGHTS_NAME)
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"has no adapter_model\.safetensors"):
        load_adapter(model, str(olmoe_adapter))
    assert getattr(model, "perft_config", None) is None


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_load_weights_corrupt(tiny_nf4, olmoe_adapter, corruption):
    path = olmoe_adapter / WEIGHTS_NAME
    data = path.read_bytes()
    if corruption == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        path.write_bytes(b"")
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is corrupt"):
        load_adapter(model, str(olmoe_adapter))
    assert getattr(model, "perft_config", None) is None


def test_load_weights_missing_key(tiny_nf4, olmoe_adapter):
    path = str(olmoe_adapter / WEIGHTS_NAME)
    state = load_file(path)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, path, metadata={"format": "pt"})
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=rf"does not match: missing \['{dropped}'\], unexpected \[\]"):
        load_adapter(model, str(olmoe_adapter))
    _assert_untouched(model)


def test_load_weights_unexpected_key(tiny_nf4, olmoe_adapter):
    path = str(olmoe_adapter / WEIGHTS_NAME)
    state = load_file(path)
    state["layers.9.perft_experts.up"] = torch.zeros(1)
    save_file(state, path, metadata={"format": "pt"})
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"missing \[\], unexpected \['layers\.9\.perft_experts\.up'\]"):
        load_adapter(model, str(olmoe_adapter))
    _assert_untouched(model)


def test_load_weights_wrong_shape(tiny_nf4, olmoe_adapter):
    path = str(olmoe_adapter / WEIGHTS_NAME)
    state = load_file(path)
    state["layers.0.perft_experts.up"] = torch.zeros(2, 3, dtype=state["layers.0.perft_experts.up"].dtype)
    save_file(state, path, metadata={"format": "pt"})
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"layers\.0\.perft_experts\.up has shape \(2, 3\)"):
        load_adapter(model, str(olmoe_adapter))
    _assert_untouched(model)


def test_load_into_model_with_different_adapter(tiny_nf4, olmoe_adapter):
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, _perft_config(num_experts=3))
    with pytest.raises(AdapterError, match=r"config differs"):
        load_adapter(model, str(olmoe_adapter))


def test_save_without_adapter(tiny_nf4, tmp_path):
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(AdapterError, match=r"no PERFT adapter is attached"):
        save_adapter(model, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".adapter")]


def test_adapter_error_is_value_error():
    assert issubclass(AdapterError, ValueError)


# --- attach_perft -----------------------------------------------------------------------------------------


def test_attach_twice(tiny_nf4):
    model, _ = tiny_nf4("olmoe")
    attach_perft(model, _perft_config())
    with pytest.raises(ValueError, match=r"already has PERFT blocks attached"):
        attach_perft(model, _perft_config())


def test_attach_layer_out_of_range(tiny_nf4):
    model, _ = tiny_nf4("olmoe")
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist; the model has 2 decoder layers"):
        attach_perft(model, _perft_config(layers=[5]))
    assert getattr(model, "perft_config", None) is None
    assert list(iter_perft_blocks(model)) == []


# --- no pickle --------------------------------------------------------------------------------------------


def test_weights_are_plain_safetensors(olmoe_adapter):
    path = olmoe_adapter / WEIGHTS_NAME
    state = load_file(str(path))
    assert state
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    expected = {
        f"layers.{i}.{name}"
        for i in range(NUM_LAYERS)
        for name in ("perft_router.weight", "perft_experts.down", "perft_experts.up")
    }
    assert set(state) == expected
    assert state["layers.0.perft_experts.up"].shape == (4, HIDDEN_SIZE, 16)
    assert state["layers.0.perft_router.weight"].shape == (4, HIDDEN_SIZE)
    # safetensors layout: u64 little-endian header length, then a JSON header; not a zip / pickle
    raw = path.read_bytes()
    assert raw[:2] != b"PK"
    header_len = int.from_bytes(raw[:8], "little")
    assert 0 < header_len < len(raw)
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == expected


def _assert_untouched(model):
    """A failed load leaves no adapter behind: the base blocks are back and nothing is trainable."""
    assert getattr(model, "perft_config", None) is None
    assert not list(iter_perft_blocks(model))
    assert not any(p.requires_grad for p in model.parameters())
