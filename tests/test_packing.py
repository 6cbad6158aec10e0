"""``train --packing``: no attention across packed examples (probed on the model), balance losses over real tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from perft_qlora import PerftConfig, attach_perft
from perft_qlora.errors import UsageError
from perft_qlora.method.losses import perft_balance_loss
from perft_qlora.training.packing import LEAK_TOLERANCE, check_packing, packing_leak
from perft_qlora.training.tiny import tiny_config
from perft_qlora.training.train import run
from perft_qlora.training.train_options import parse_args


@pytest.fixture(scope="module")
def tiny_fp32():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("olmoe"), attn_implementation="sdpa").eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny_fp32, attention):
    tiny_fp32.set_attn_implementation(attention)
    assert packing_leak(tiny_fp32) < 1e-5
    check_packing(tiny_fp32)
    tiny_fp32.set_attn_implementation("sdpa")


def test_the_nf4_model_passes_the_probe(tiny_nf4):
    model, _ = tiny_nf4("olmoe")
    assert packing_leak(model) < LEAK_TOLERANCE / 2


class _Leaky(torch.nn.Module):
    """Every position sees the mean of all earlier tokens, whatever the position ids say: packing would leak."""

    def __init__(self):
        super().__init__()
        self.config = tiny_config("olmoe")
        self.embed = torch.nn.Embedding(self.config.vocab_size, 16)
        self.head = torch.nn.Linear(16, self.config.vocab_size)

    def forward(self, input_ids, position_ids=None, use_cache=False):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return CausalLMOutput(logits=self.head(h))


def test_a_model_whose_attention_crosses_the_boundary_is_refused():
    with pytest.raises(UsageError, match="--packing: this model's attention .* lets packed examples see each other"):
        check_packing(_Leaky())


def test_balance_losses_count_the_real_tokens_only(tiny_fp32):
    """Packed (padding-free, no mask) and padded-with-mask batches of the same two examples give the same losses."""
    model = AutoModelForCausalLM.from_config(tiny_config("olmoe")).eval()
    attach_perft(model, PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=4))
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randint(2, 256, (5,), generator=generator), torch.randint(2, 256, (8,), generator=generator)
    with torch.no_grad():
        positions = torch.cat([torch.arange(5), torch.arange(8)])[None]
        packed = model(input_ids=torch.cat([a, b])[None], position_ids=positions, output_router_logits=True,
                       use_cache=False)  # as TRL's compute_loss calls it: with a cache the mask ignores position ids
        packed_perft = perft_balance_loss(model)
        ids = torch.full((2, 8), 257)
        ids[0, :5], ids[1] = a, b
        mask = (torch.arange(8)[None] < torch.tensor([[5], [8]])).long()
        padded = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        padded_perft = perft_balance_loss(model, mask)
    torch.testing.assert_close(packed_perft, padded_perft)
    torch.testing.assert_close(packed.aux_loss, padded.aux_loss)
    unmasked = model(input_ids=ids, output_router_logits=True).aux_loss  # the padding counted: a different value
    assert not torch.allclose(unmasked, padded.aux_loss)


def test_train_packs_whole_examples(tmp_path):
    trainer = run(parse_args(["--demo", "--output-dir", str(tmp_path), "--max-steps", "1", "--val-size", "0",
                              "--batch-size", "2", "--save-steps", "100", "--warmup-steps", "0", "--packing",
                              "--max-length", "256"]))
    rows = trainer.train_dataset
    assert len(rows) < 256 and max(len(r) for r in rows["seq_lengths"]) > 1  # several examples per 256-token row
    assert all(sum(r) <= 256 for r in rows["seq_lengths"])
    assert trainer.state.global_step == 1


def test_packing_with_another_backend_is_refused():
    from perft_qlora.training.packing import check_packing_backend

    check_packing_backend("default")
    with pytest.raises(UsageError, match="--packing is checked with the default backend only"):
        check_packing_backend("unsloth")
