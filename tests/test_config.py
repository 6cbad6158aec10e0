"""PerftConfig validation, defaults and serialisation; the variant table's builders."""

from __future__ import annotations

import math

import pytest
import torch

from perft_qlora import PerftConfig
from perft_qlora.method.lora_experts import LoRAExperts
from perft_qlora.method.variants import VARIANTS, BlockFacts, build_adapter

FACTS = BlockFacts(hidden_size=64, num_experts=8, top_k=2, renormalizes=False)


# --- validation -------------------------------------------------------------------------------------------


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"variant must be one of .*got 'perft_x'"):
        PerftConfig(variant="perft_x", num_experts=4, top_k=2)


@pytest.mark.parametrize("variant", ["perft", "perft_d"])
def test_missing_num_experts(variant):
    with pytest.raises(ValueError, match=rf"{variant} needs num_experts \(M\) >= 1, got None"):
        PerftConfig(variant=variant, top_k=1 if variant == "perft" else None)


@pytest.mark.parametrize("variant", ["perft", "perft_d"])
def test_zero_num_experts(variant):
    with pytest.raises(ValueError, match=rf"{variant} needs num_experts \(M\) >= 1, got 0"):
        PerftConfig(variant=variant, num_experts=0, top_k=1 if variant == "perft" else None)


@pytest.mark.parametrize("top_k", [None, 0, 5])
def test_perft_bad_top_k(top_k):
    with pytest.raises(ValueError, match=rf"perft needs 1 <= top_k \(K'\) <= num_experts \(M=4\); got {top_k}"):
        PerftConfig(variant="perft", num_experts=4, top_k=top_k)


@pytest.mark.parametrize("top_k", [1, 4])
def test_perft_top_k_bounds_accepted(top_k):
    assert PerftConfig(variant="perft", num_experts=4, top_k=top_k).top_k == top_k


@pytest.mark.parametrize(
    "variant,num_experts",
    [("perft_e", None), ("perft_d", 4), ("perft_s", None)],
)
def test_top_k_rejected_outside_perft(variant, num_experts):
    with pytest.raises(ValueError, match=rf"top_k applies to variant 'perft' only; {variant} routes"):
        PerftConfig(variant=variant, num_experts=num_experts, top_k=2)


def test_perft_s_with_three_experts():
    with pytest.raises(ValueError, match=r"perft_s has exactly one shared expert; got num_experts=3"):
        PerftConfig(variant="perft_s", num_experts=3)


@pytest.mark.parametrize("num_experts", [None, 1])
def test_perft_s_with_one_or_unset_experts_ok(num_experts):
    assert PerftConfig(variant="perft_s", num_experts=num_experts).variant == "perft_s"


def test_bottleneck_zero():
    with pytest.raises(ValueError, match=r"bottleneck \(DB\) must be >= 1, got 0"):
        PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=0)


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'tanhh'"):
        PerftConfig(variant="perft", num_experts=4, top_k=2, activation="tanhh")


@pytest.mark.parametrize("activation", [None, "silu", "gelu", "relu"])
def test_known_activations_accepted(activation):
    assert PerftConfig(variant="perft", num_experts=4, top_k=2, activation=activation).activation == activation


@pytest.mark.parametrize("dropout", [1.0, -0.1])
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\), got {dropout}"):
        PerftConfig(variant="perft", num_experts=4, top_k=2, dropout=dropout)


def test_from_dict_unknown_field():
    data = PerftConfig(variant="perft", num_experts=4, top_k=2).to_dict()
    data["rank"] = 8
    with pytest.raises(ValueError, match=r"unknown PerftConfig fields \['rank'\]"):
        PerftConfig.from_dict(data)


# --- defaults and serialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("bottleneck", [1, 8, 16, 32])
def test_defaults_follow_bottleneck(bottleneck):
    config = PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=bottleneck)
    assert config.alpha == 2 * bottleneck
    assert config.scaling == 2.0
    assert config.init_std == pytest.approx(math.sqrt(2 / bottleneck), rel=1e-12)


def test_default_bottleneck_values():
    config = PerftConfig(variant="perft", num_experts=4, top_k=2)
    assert config.bottleneck == 16
    assert config.alpha == 32.0
    assert config.scaling == 2.0
    assert config.init_std == pytest.approx(math.sqrt(2 / 16))


def test_explicit_alpha_and_init_std_kept():
    config = PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=8, alpha=4.0, init_std=0.1)
    assert config.alpha == 4.0
    assert config.scaling == 0.5
    assert config.init_std == 0.1


def test_layers_deduplicated_and_sorted():
    config = PerftConfig(variant="perft", num_experts=4, top_k=2, layers=[3, 1, 3, 0, 1])
    assert config.layers == [0, 1, 3]


def test_layers_none_kept():
    assert PerftConfig(variant="perft", num_experts=4, top_k=2).layers is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="perft", num_experts=4, top_k=2),
        dict(variant="perft", num_experts=8, top_k=3, bottleneck=4, alpha=3.0, activation="silu", dropout=0.0,
             router_aux_loss_coef=0.5, layers=[2, 0, 2], init_std=0.3, router_init_std=0.1),
        dict(variant="perft_e"),
        dict(variant="perft_d", num_experts=3, activation="gelu"),
        dict(variant="perft_s", layers=[1]),
    ],
)
def test_to_dict_from_dict_round_trip(kwargs):
    config = PerftConfig(**kwargs)
    data = config.to_dict()
    assert isinstance(data, dict)
    assert data["variant"] == kwargs["variant"]
    again = PerftConfig.from_dict(data)
    assert again == config
    assert again.to_dict() == data


# --- variant table ----------------------------------------------------------------------------------------

VARIANT_CONFIGS = {
    "perft": (dict(variant="perft", num_experts=4, top_k=2), 4),
    "perft_e": (dict(variant="perft_e"), FACTS.num_experts),
    "perft_d": (dict(variant="perft_d", num_experts=3), 3),
    "perft_s": (dict(variant="perft_s"), 1),
}


def test_variant_table_covers_all_variants():
    assert set(VARIANTS) == set(VARIANT_CONFIGS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds(name):
    kwargs, expected_m = VARIANT_CONFIGS[name]
    config = PerftConfig(**kwargs)
    router, experts = build_adapter(config, FACTS, torch.float32)
    assert isinstance(router, torch.nn.Module)
    assert isinstance(experts, LoRAExperts)
    assert experts.num_experts == expected_m
    assert experts.up.shape == (expected_m, FACTS.hidden_size, config.bottleneck)
    assert experts.down.shape == (expected_m, config.bottleneck, FACTS.hidden_size)
    assert experts.up.dtype == torch.float32
    assert torch.count_nonzero(experts.up) == 0
    assert torch.equal(experts.up, torch.zeros_like(experts.up))
    # the down-projection is randomly initialised, so the bank is a no-op only through ``up``
    assert torch.count_nonzero(experts.down) > 0
    assert experts.scaling == config.scaling


def test_perft_e_num_experts_must_match_base():
    config = PerftConfig(variant="perft_e", num_experts=5)
    with pytest.raises(ValueError, match=r"num_experts must equal N=8 \(got 5\)"):
        build_adapter(config, FACTS, torch.float32)


def test_perft_e_explicit_matching_num_experts_ok():
    _, experts = build_adapter(PerftConfig(variant="perft_e", num_experts=8), FACTS, torch.float32)
    assert experts.num_experts == 8
