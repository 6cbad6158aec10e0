"""``PerftSFTTrainer``: TRL's ``SFTTrainer`` for a PERFT-adapted NF4 model.

What it adds to ``SFTTrainer``, and nothing else:

- the PERFT router's balance loss, ``coef · LB(PERFT router logits)``, added to the training loss
  (``SFTTrainer`` computes its loss from fused log-probs, not from ``output.loss``, so the forward hook's
  sum is not used here) and logged as ``perft_aux_loss``; TRL itself adds and logs the base router's
  term (``aux_loss``, weighted by ``SFTConfig.router_aux_loss_coef``);
- tokens/s, peak memory and per-layer PERFT routing statistics at every logging step;
- checkpoints that hold the adapter only (``perft_config.json`` + ``adapter_model.safetensors``, written
  by :func:`save_adapter`), plus the optimizer, scheduler and RNG state the Trainer adds; resuming and
  best-checkpoint selection load them back with :func:`load_adapter`. The optimizer state is stored by
  parameter name, whole, in every engine (one process, DDP, FSDP: under FSDP gathered from the shards), so a
  checkpoint resumes under any of them.

Why the Trainer accepts the 4-bit model: transformers refuses "purely quantized" models only when
``model.is_quantized`` is set, which its own ``HfQuantizer`` loading does. ``load_model`` quantizes with
bitsandbytes' format but outside that machinery, so the check does not apply; the condition it guards
(a quantized model without anything trainable) is checked here instead. The LoRA baseline (a peft
``PeftModel``) goes through the Trainer's own peft code paths unchanged.
"""

from __future__ import annotations

import os
import time

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from ..atomic import write_text
from ..kernels import backend_choices
from ..method.adapters import write_training_record
from ..method.checkpoint import CARD_NAME, AdapterError, adapter_state_dict, load_adapter, save_adapter
from ..method.losses import perft_balance_loss
from ..method.model import balance_loss_coef, parameter_report
from ..quant.memory import peak_memory_bytes
from .distributed import routing_log
from .model_card import render_model_card
from .output_dir import card_is_free, remove_incomplete
from .progress import REPLACES, TrainingProgress
from .resume_checks import load_tensor_file
from .run_checkpoints import CheckpointSaveError, last_complete_checkpoint, mark_complete, save_failure


def _perft_model(model):
    """The model carrying ``perft_config`` (unwrapped from DDP and friends), or None for other adapters."""
    while hasattr(model, "module"):
        model = model.module
    return model if getattr(model, "perft_config", None) is not None else None


def _keyed_by_name(optimizer_state: dict) -> bool:
    """Whether an optimizer state dict is torch's by-name form (``get_optimizer_state_dict``), not ``state_dict()``'s."""
    params = [p for group in optimizer_state.get("param_groups", []) for p in group.get("params", [])]
    return bool(params) and all(isinstance(p, str) for p in params)


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def peak_memory_gib() -> dict[str, float]:
    """``peak_gpu_mem_gib`` (allocated by torch, since the last reset) on CUDA, else ``peak_rss_gib``."""
    kind, peak = peak_memory_bytes()
    return {"peak_gpu_mem_gib" if kind == "gpu" else "peak_rss_gib": peak / 2**30}


class PerftSFTTrainer(SFTTrainer):
    """``SFTTrainer`` plus the PERFT balance loss, richer logs and adapter-only checkpoints (see module doc).

    Args (besides ``SFTTrainer``'s):
        run_metadata: written into every saved ``perft_config.json`` under ``extra.training`` (data source,
            base model, recipe knobs), together with the step and epoch of the save.
    """

    def __init__(self, model, *args, run_metadata: dict | None = None, **kwargs):
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the model has no trainable parameters: attach adapters first "
                "(perft_qlora.attach_perft, or the LoRA baseline) before building the trainer"
            )
        super().__init__(model, *args, **kwargs)
        self.run_metadata = dict(run_metadata or {})
        perft = _perft_model(self.model)
        self.perft_aux_loss_coef = balance_loss_coef(perft) if perft is not None else 0.0
        self._last_log = (time.perf_counter(), 0)
        for callback in REPLACES:  # one progress bar + aligned eval lines instead of raw dicts (progress.py)
            self.remove_callback(callback)
        if not self.args.disable_tqdm:
            self.add_callback(TrainingProgress())

    # ---- loss -------------------------------------------------------------------------------------
    def _move_model_to_device(self, model, device):
        """A model with offloaded experts (``load_model(offload_experts=...)``) is already where it must be: moving
        it would pull the host-resident experts onto the device."""
        if getattr(model, "expert_stager", None) is None and getattr(getattr(model, "base_model", None), "expert_stager", None) is None:
            super()._move_model_to_device(model, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        aux = perft_balance_loss(model, inputs.get("attention_mask")) if self.perft_aux_loss_coef else None
        if aux is None:
            return result
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["perft_aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        # Like TRL's base-router term: a per-micro-batch mean, averaged over the accumulation steps.
        steps = self.current_gradient_accumulation_steps if (num_items_in_batch is not None and mode == "train") else 1
        weighted = self.perft_aux_loss_coef * aux / steps
        if return_outputs:
            loss, outputs = result
            return loss + weighted.to(loss.dtype), outputs
        return result + weighted.to(result.dtype)

    # ---- logging ----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            now, tokens = time.perf_counter(), self._total_train_tokens
            last_time, last_tokens = self._last_log
            if tokens > last_tokens and now > last_time:
                logs["tokens_per_second"] = (tokens - last_tokens) / (now - last_time)
            self._last_log = (now, tokens)
            logs.update(peak_memory_gib())
            kernels = {f"kernels/{op}": choice for op, choice in backend_choices().items()}
            if kernels != getattr(self, "_kernels_logged", None):  # the compute backend per op, when it changes
                logs.update(kernels)
                self._kernels_logged = kernels
            perft = _perft_model(self.model)
            if perft is not None and perft.perft_config.variant in ("perft", "perft_e"):
                logs.update(routing_log(perft))
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled or _perft_model(self.model) is None:
            return super().save_model(output_dir, _internal_call)
        # The Trainer's FSDP branch would gather the whole model, 4-bit storage included, onto rank 0.
        self._save(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, made complete only by its last file (``run_checkpoints.mark_complete``, once
        every rank's files are in); an incomplete one left at this step by a killed run is replaced, and older
        checkpoints are rotated out only after the new one is complete."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            remove_incomplete(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:
            if not save_failure(err):
                raise
            last = last_complete_checkpoint(run_dir)
            raise CheckpointSaveError(
                f"could not write {folder} ({err}); " + (f"the last complete checkpoint is {last}: free space on the "
                "disk and continue with --resume" if last else "no checkpoint is complete: free space and start again")
            ) from err
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's RNG state is written
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        perft = _perft_model(self.model)
        if perft is None:  # the peft LoRA baseline: peft's adapter files (the Trainer), plus our training record
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                write_training_record(output_dir or self.args.output_dir, self._training_metadata())
            return
        state = adapter_state_dict(perft)  # every rank: under FSDP this gathers the shards
        if self.args.should_save:
            directory = output_dir or self.args.output_dir
            metadata = self._training_metadata()
            card = render_model_card(metadata, perft.perft_config.to_dict(), parameter_report(perft), directory)
            save_adapter(perft, directory, extra_metadata={"training": metadata}, model_card=card, state=state)
        # save_adapter replaces the directory as a whole: other ranks write their RNG state into it only after.
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if _perft_model(self.model) is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # One optimizer file for every engine: torch's full optimizer state dict, keyed by parameter name and
        # gathered whole under FSDP (the adapter's state is small), so a checkpoint resumes one process, DDP or
        # FSDP alike. Under FSDP the Trainer would otherwise write the whole model's shards.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer), options=options)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or _perft_model(self.model) is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        paths = [os.path.join(checkpoint, name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
        if not all(os.path.isfile(path) for path in paths):
            return
        state, scheduler = (load_tensor_file(path) for path in paths)  # a file holding code: one line, refused
        if not _keyed_by_name(state):  # the Trainer's own format: a checkpoint of perft_qlora before 2026-11-30
            if self.is_fsdp_enabled:
                raise AdapterError(f"{checkpoint}/{OPTIMIZER_NAME} was written by an earlier perft_qlora (parameters "
                                   "numbered, not named); resume it without FSDP, then continue under FSDP")
            return super()._load_optimizer_and_scheduler(checkpoint)
        # Every rank reads the (small) file; under FSDP each keeps its own shard of every state tensor.
        set_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer), state,
                                 options=StateDictOptions(full_state_dict=self.is_fsdp_enabled))
        self.lr_scheduler.load_state_dict(scheduler)

    # ---- model card -------------------------------------------------------------------------------
    def _training_metadata(self) -> dict:
        return {**self.run_metadata, "global_step": self.state.global_step, "epoch": self.state.epoch,
                "best_eval_loss": self.state.best_metric}

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> None:
        """Our card (model_card.py) in ``output_dir``, instead of TRL's (which names a local base model ``None``);
        never over a ``README.md`` of the user's (``output_dir.card_is_free``)."""
        if not self.is_world_process_zero() or not card_is_free(self.args.output_dir):
            return
        perft = _perft_model(self.model)
        report = parameter_report(perft) if perft is not None else None  # LoRA: peft writes its own card too
        card = render_model_card(self._training_metadata(), perft.perft_config.to_dict() if perft else None, report,
                                 os.path.join(self.args.output_dir, "adapter"))
        write_text(os.path.join(self.args.output_dir, CARD_NAME), card)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        perft = _perft_model(model if model is not None else self.model)
        if perft is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(perft, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        perft = _perft_model(self.model)
        if perft is None:
            return super()._load_best_model()
        load_adapter(perft, self.state.best_model_checkpoint)
