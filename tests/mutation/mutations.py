"""The hand list of planted bugs: one per promise the tests hold and per variant's routing rule.

Each mutation replaces exact, unique source snippets in one module of a temporary copy of the package
(never line numbers: after a refactor a snippet that is no longer there, or no longer unique, is a
loud "mutation target not found", not a silent no-op) and names the few tests that must then fail.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    """Short id (``--only`` takes it)."""
    module: str
    """File under perft_qlora/."""
    edits: tuple[tuple[str, str], ...]
    """(exact snippet, replacement) pairs; each snippet must occur exactly once in the module."""
    tests: tuple[str, ...]
    """pytest arguments, paths relative to the repository root; at least one selected test must fail."""


def _one(name: str, module: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name, module, ((old, new),), tests)


LOSSES = ("tests/test_losses.py",)
ROUTING_LOG = ("tests/test_losses.py", "-k", "routing_statistics")
ACCUMULATION = ("tests/test_trainer_accumulation.py",)
ATOMIC = ("tests/test_checkpoint_atomic.py",)
VARIANT_LOOP = ("tests/test_model.py", "-k", "per_token_loop or reuses_the_base")
NO_GRAD = ("tests/test_kernels_nf4_mlp.py", "tests/test_kernels_adapter.py", "-k", "no_grad")
SIGMOID_FAMILY = ("tests/test_families.py", "-k", "sigmoid_family")
KERNEL_TRUTH = ("tests/test_kernels_adapter.py", "tests/test_kernels_nf4_mlp.py", "-k", "fp32_interpreter")

MUTATIONS: tuple[Mutation, ...] = (
    # The PERFT balance loss: padding excluded, in the model's hook and in the trainer, divided by accumulation.
    _one("balance_loss_counts_padding", "method/losses.py",
         "load_balancing_loss_func(logits, router.num_experts, router.top_k, attention_mask)",
         "load_balancing_loss_func(logits, router.num_experts, router.top_k, None)", *LOSSES),
    _one("balance_loss_mask_not_cut_to_the_new_tokens", "method/losses.py",
         "attention_mask = attention_mask[:, -new_tokens:]", "pass",
         "tests/test_evaluate.py", "-k", "batched_generation_with_a_perft_router"),
    _one("trainer_balance_loss_counts_padding", "training/trainer.py",
         'perft_balance_loss(model, inputs.get("attention_mask"))', "perft_balance_loss(model, None)", *ACCUMULATION),
    _one("balance_loss_not_divided_by_accumulation", "training/trainer.py",
         "weighted = self.perft_aux_loss_coef * aux / steps", "weighted = self.perft_aux_loss_coef * aux",
         *ACCUMULATION),
    # Atomic adapter saves.
    Mutation("save_rewrites_in_place", "method/checkpoint.py", (
        ('staging = tempfile.mkdtemp(prefix=".adapter-", dir=parent)',
         "shutil.rmtree(directory, ignore_errors=True); os.makedirs(directory); staging = directory"),
        ("        if os.path.exists(directory):\n            retired", "        if False:\n            retired"),
    ), ATOMIC),
    _one("save_leaves_temporary_files", "method/checkpoint.py",
         "        shutil.rmtree(staging, ignore_errors=True)\n        raise", "        raise", *ATOMIC),
    _one("save_does_not_restore_the_previous_adapter", "method/checkpoint.py",
         "os.replace(old, directory)  # put the previous adapter back", "pass", *ATOMIC),
    # Nothing stored for backward under no_grad.
    _one("no_grad_inputs_not_detached", "kernels/dispatch.py",
         "return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)", "return tensors",
         *NO_GRAD),
    _one("nf4_kernel_always_stores_preactivations", "kernels/ops.py",
         "store_ab = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]", "store_ab = True", *NO_GRAD),
    # Routing statistics and their logs.
    _one("entropy_sign", "method/stats.py", "return -sum(p * math.log(p)", "return sum(p * math.log(p)", *ROUTING_LOG),
    _one("entropy_normalisation", "method/stats.py", "/ math.log(len(shares))", "/ math.log(2)", *ROUTING_LOG),
    _one("imbalance_not_scaled_by_m", "method/stats.py", "return max(shares) * len(shares)", "return max(shares)", *ROUTING_LOG),
    _one("shares_not_normalised_by_all_assignments", "method/stats.py",
         "minlength=num_experts).float()\n    return counts / counts.sum().clamp_min(1.0)",
         "minlength=num_experts).float()\n    return counts / counts.max().clamp_min(1.0)", *ROUTING_LOG),
    _one("logged_shares_not_normalised_by_all_assignments", "training/distributed.py",
         "shares = counts / counts.sum(dim=-1, keepdim=True)", "shares = counts / counts.amax(dim=-1, keepdim=True)",
         *ROUTING_LOG),
    # Each variant's routing rule.
    _one("perft_takes_the_bottom_k", "method/routing.py",
         "torch.topk(scores, self.top_k, dim=-1)", "torch.topk(scores, self.top_k, dim=-1, largest=False)",
         *VARIANT_LOOP),
    _one("perft_renormalisation_flipped", "method/routing.py",
         "        if self.renormalize:\n", "        if not self.renormalize:\n", *VARIANT_LOOP),
    _one("perft_gate_not_softmax", "method/routing.py",
         '"softmax": lambda logits: torch.softmax(logits, dim=-1),', '"softmax": torch.sigmoid,', *VARIANT_LOOP),
    _one("perft_e_indices_not_the_base_routers", "method/routing.py",
         "return Routing(base_weights, base_indices, None)", "return Routing(base_weights, base_indices.flip(-1), None)",
         *VARIANT_LOOP),
    _one("perft_e_weights_not_the_base_routers", "method/routing.py",
         "return Routing(base_weights, base_indices, None)",
         "return Routing(torch.ones_like(base_weights), base_indices, None)", *VARIANT_LOOP),
    _one("perft_d_not_all_experts", "method/routing.py",
         "indices = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)",
         "indices = torch.zeros(num_tokens, self.num_experts, dtype=torch.long, device=x.device)", *VARIANT_LOOP),
    _one("perft_d_averages_instead_of_sums", "method/routing.py",
         "weights = torch.ones(num_tokens, self.num_experts, device=x.device, dtype=x.dtype)",
         "weights = torch.full((num_tokens, self.num_experts), 1.0 / self.num_experts, device=x.device, dtype=x.dtype)",
         *VARIANT_LOOP),
    _one("perft_s_not_a_single_expert", "method/variants.py",
         '"perft_s": Variant(num_experts=lambda c, b: 1, router=lambda c, b, m, dtype: DenseGate(1))',
         '"perft_s": Variant(num_experts=lambda c, b: 2, router=lambda c, b, m, dtype: DenseGate(2))', *VARIANT_LOOP),
    _one("scaling_ignores_the_bottleneck", "method/config.py",
         "return self.alpha / self.bottleneck", "return self.alpha", *VARIANT_LOOP),
    # Sigmoid-scored families (DeepSeek-V3, GLM-4.5): the PERFT router scores like the family, checked against the
    # family's own definition (not against GATING, which the first mutation changes too).
    _one("sigmoid_family_router_scored_by_softmax", "method/routing.py",
         '"sigmoid": torch.sigmoid,', '"sigmoid": lambda logits: torch.softmax(logits, dim=-1),', *SIGMOID_FAMILY),
    _one("deepseek_gating_declared_softmax", "quant/arch.py",
         'gating="sigmoid",', 'gating="softmax",', *SIGMOID_FAMILY),
    # Truths independent of the code under test.
    _one("routing_layout_bug_shared_by_reference_and_kernels", "kernels/sorting.py",
         "return ExpertSort(order, order // indices.shape[1], offsets)",
         "return ExpertSort(order, order % indices.shape[1], offsets)", *KERNEL_TRUTH),
    _one("nf4_expert_slice_of_the_wrong_scales", "quant/nf4.py",
         "start, stop = expert * per_expert, (expert + 1) * per_expert", "start, stop = 0, per_expert",
         "tests/test_nf4.py", "-k", "loop_over_dequantized"),
    # FSDP2 (issue 17): a rank loads the experts FSDP keeps on it; the planner's per-GPU split.
    _one("rank_loads_the_first_ranks_experts", "quant/sharding.py",
         "return self.rank * per_rank, (self.rank + 1) * per_rank", "return 0, per_rank",
         "tests/test_loader.py", "-k", "experts_fsdp_keeps"),
    # Offloaded experts (issue 26): never computed from a buffer whose copy has not landed, staged again for backward.
    _one("offload_computes_before_the_copy_lands", "quant/expert_offload.py",
         "self.copier.wait(self.tickets[slot])", "pass", "tests/test_offload.py", "-k", "lands_late"),
    _one("offload_backward_uses_the_buffer_forward_left", "quant/expert_offload.py",
         "self.acquire(ordinal, direction=-1)", "pass", "tests/test_offload.py", "-k", "stages_the_layer_again"),
    _one("expert_scales_counted_as_replicated", "quant/footprint.py",
         'sharded_scales = math.ceil(numel / BLOCKSIZE) if kind == "experts" and double_quant else 0',
         "sharded_scales = 0", "tests/test_plan.py", "-k", "load_model_allocates and olmoe"),
)
